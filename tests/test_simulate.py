"""The simulated cohort: deterministic bytes, the contract's layout, and the latent structure it promises.

Statistical checks use an independent computation (scikit-learn probes, scikit-survival's C-index,
SciPy connected components, NumPy rank correlations) on a small cohort shared by the module.
"""

import hashlib
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index
from scipy import ndimage
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sksurv.metrics import concordance_index_censored

from mmfm.cli import main
from mmfm.data.bags import grid_indices, read_bag, read_header
from mmfm.data.cohort import Cohort, validate
from mmfm.simulate import DRIVERS, PROGRAMMES, SUBTYPES, TILE_TYPES, SimConfig, simulate_cohort
from mmfm.simulate.latent import HAZARD_PROGRAMMES, HAZARD_SUBTYPE, HAZARD_TP53

SMALL = dict(feature_dim=16, bag_size_median=60, n_genes=150, n_proteins=20)
STATS = SimConfig(n_cases=300, seed=3, feature_dim=32, bag_size_median=120, bag_size_max=3000, n_genes=300,
                  n_proteins=40)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return simulate_cohort(tmp_path_factory.mktemp("sim") / "cohort", STATS)


@pytest.fixture(scope="module")
def truth(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort / "truth" / "cases.csv").set_index("case_id")


@pytest.fixture(scope="module")
def pooled(cohort, truth) -> pd.DataFrame:
    """Mean-pooled features per slide, joined with the case truth."""
    slides = pd.read_csv(cohort / "slides.csv")
    feats = [read_bag(cohort / p)["features"].astype(np.float64).mean(0) for p in slides["path"]]
    df = slides.join(truth, on="case_id")
    df["x"] = list(np.stack(feats))
    return df


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = digests(simulate_cohort(tmp_path / "a", SimConfig(n_cases=6, **SMALL)))
    b = digests(simulate_cohort(tmp_path / "b", SimConfig(n_cases=6, **SMALL)))
    c = digests(simulate_cohort(tmp_path / "c", SimConfig(n_cases=6, seed=1, **SMALL)))
    assert a == b
    assert any(k.startswith("bags/") for k in a)
    bags = [k for k in set(a) & set(c) if k.startswith("bags/")]
    assert bags and all(a[k] != c[k] for k in bags + ["cases.csv", "rna.h5ad", "reports.jsonl"])


def test_case_does_not_depend_on_cohort_size(tmp_path):
    small = simulate_cohort(tmp_path / "small", SimConfig(n_cases=3, **SMALL))
    big = simulate_cohort(tmp_path / "big", SimConfig(n_cases=7, **SMALL))
    for p in (small / "bags").glob("*.h5"):
        assert p.read_bytes() == (big / "bags" / p.name).read_bytes()
    s, b = pd.read_csv(small / "cases.csv"), pd.read_csv(big / "cases.csv")
    pd.testing.assert_frame_equal(s, b.iloc[:3])
    rs, rb = ad.read_h5ad(small / "rna.h5ad"), ad.read_h5ad(big / "rna.h5ad")
    np.testing.assert_array_equal(rs.X, rb[rs.obs_names].X)


def test_layout_follows_contract(cohort):
    assert {"cohort.yaml", "cases.csv", "slides.csv", "rna.h5ad", "protein.h5ad", "reports.jsonl"} <= {
        p.name for p in cohort.iterdir()}
    cases = pd.read_csv(cohort / "cases.csv", keep_default_na=False)
    assert list(cases.columns[:6]) == ["case_id", "site", "os_days", "os_event", "subtype", "grade"]
    assert [c for c in cases.columns if c.startswith("mut_")] == [f"mut_{d}" for d in DRIVERS]
    assert set(cases["mut_TP53"]) <= {"0", "1", ""}  # unknown status is an empty cell
    assert set(cases["grade"]) <= {1, 2, 3} and set(cases["os_event"]) <= {0, 1}
    slides = pd.read_csv(cohort / "slides.csv")
    assert all((cohort / p).is_file() for p in slides["path"])
    assert all(p == f"bags/{s}.h5" for s, p in zip(slides["slide_id"], slides["path"]))
    for line in (cohort / "reports.jsonl").read_text().splitlines():
        assert set(json.loads(line)) == {"case_id", "text"}


def test_validator_accepts_output(cohort, truth):
    report = validate(cohort)
    assert report.ok, report.format()
    assert not report.warnings, report.format()
    c = Cohort.open(cohort)
    presence = c.presence().loc[truth.index]
    np.testing.assert_array_equal(presence["slide"], truth["n_slides"] > 0)
    for m in ("rna", "protein", "report", "mutation"):
        np.testing.assert_array_equal(presence[m], truth[f"has_{m}"], err_msg=m)


def test_coords_grid_and_fragments(cohort):
    slides = pd.read_csv(cohort / "truth" / "slides.csv")
    psl0 = STATS.patch_size_level0
    assert psl0 == 512  # 256 px at 20x on a 40x scan
    for sid in slides["slide_id"][:40]:
        head = read_header(cohort / "bags" / f"{sid}.h5")
        bag = read_bag(head.path)
        assert head.patch_size_level0 == psl0 and head.dim == STATS.feature_dim
        assert head.coord_attrs["patch_size"] == 256 and head.coord_attrs["level0_magnification"] == 40.0
        assert bag["features"].dtype == np.float16
        xy = bag["coords"]
        assert (xy % psl0 == 0).all() and len(np.unique(xy, axis=0)) == len(xy)
        assert (xy[:, 0] + psl0 <= head.coord_attrs["level0_width"]).all()
        assert (xy[:, 1] + psl0 <= head.coord_attrs["level0_height"]).all()
        grid = grid_indices(xy, psl0)
        frag = bag["fragment"]
        assert set(np.unique(frag)) == set(range(frag.max() + 1)) and frag.max() < 4
        for f in range(frag.max() + 1):  # a fragment is one blob of touching tiles (allowing a few islands)
            img = np.zeros(grid.max(axis=0)[::-1] + 1, bool)
            g = grid[frag == f]
            img[g[:, 1], g[:, 0]] = True
            labels, _ = ndimage.label(img)
            assert np.bincount(labels[img]).max() >= 0.9 * len(g), (sid, f)
        types = np.load(cohort / "truth" / "tiles" / f"{sid}.npy")
        assert types.shape == (len(xy),) and types.max() < len(TILE_TYPES)


def test_bag_sizes_heavy_tailed(cohort):
    n = np.array([read_header(p).n_tiles for p in sorted((cohort / "bags").glob("*.h5"))])
    assert n.min() >= STATS.bag_size_min and n.max() <= STATS.bag_size_max
    assert abs(np.median(n) / STATS.bag_size_median - 1) < 0.2
    assert abs(np.log(n).std() - STATS.bag_size_sigma) < 0.15
    assert np.quantile(n, 0.95) / np.median(n) > 3  # right tail: a few slides are many times the median


def test_big_bag_knob(tmp_path):
    out = simulate_cohort(tmp_path / "big", SimConfig(n_cases=1, feature_dim=8, bag_size_median=21000,
                                                      bag_size_sigma=0.0, bag_size_max=30000, missing_slide=0.0,
                                                      multi_slide_rate=0.0, n_genes=150, n_proteins=10))
    (bag,) = (out / "bags").glob("*.h5")
    assert read_header(bag).n_tiles == 21000


def test_site_and_subtype_are_in_the_features(pooled):
    x = np.stack(pooled["x"])
    for label, margin in (("site", 0.4), ("subtype", 0.15)):
        chance = pooled[label].value_counts(normalize=True).max()
        acc = cross_val_score(LogisticRegression(C=0.1, max_iter=3000), x, pooled[label], cv=5).mean()
        assert acc > chance + margin, (label, acc, chance)


def test_site_effect_knob_removes_site_signal(tmp_path):
    """With site_effect=0 only the (confounded) biology can reveal the site, so a probe does much worse."""
    def site_acc(effect):
        cfg = SimConfig(n_cases=120, seed=5, n_sites=4, site_effect=effect, missing_slide=0.0, multi_slide_rate=0.0,
                        **SMALL)
        out = simulate_cohort(tmp_path / f"e{effect}", cfg)
        slides = pd.read_csv(out / "slides.csv").join(pd.read_csv(out / "cases.csv").set_index("case_id"),
                                                      on="case_id")
        x = np.stack([read_bag(out / p)["features"].astype(np.float64).mean(0) for p in slides["path"]])
        return cross_val_score(LogisticRegression(C=0.1, max_iter=3000), x, slides["site"], cv=4).mean()

    assert site_acc(1.0) > site_acc(0.0) + 0.3


def test_composition_follows_programmes(cohort, truth):
    slides = pd.read_csv(cohort / "truth" / "slides.csv").join(truth, on="case_id")
    for tile_type, programme, rho_min in (("necrosis", "hypoxia", 0.3), ("immune", "immune", 0.4),
                                          ("stroma", "stromal", 0.3)):
        rho = spearmanr(slides[f"frac_{tile_type}"], slides[f"prog_{programme}"])[0]
        assert rho > rho_min, (tile_type, programme, rho)
    sid = slides["slide_id"].iloc[0]  # slides.csv fractions are those of the per-tile truth
    types = np.load(cohort / "truth" / "tiles" / f"{sid}.npy")
    np.testing.assert_allclose(np.bincount(types, minlength=len(TILE_TYPES)) / len(types),
                               slides.filter(like="frac_").iloc[0].to_numpy(), atol=1e-6)


def test_tile_types_cluster_spatially(cohort):
    """Neighbouring tiles share a type far more often than under a random shuffle of the same tiles."""
    rng = np.random.default_rng(0)
    observed, shuffled = [], []
    for bag in sorted((cohort / "bags").glob("*.h5"))[:30]:
        xy = grid_indices(read_bag(bag)["coords"], STATS.patch_size_level0)
        types = np.load(cohort / "truth" / "tiles" / f"{bag.stem}.npy")
        index = {tuple(p): i for i, p in enumerate(xy)}
        pairs = np.array([(i, index[(x + 1, y)]) for i, (x, y) in enumerate(xy) if (x + 1, y) in index])
        perm = rng.permutation(types)
        observed.append(np.mean(types[pairs[:, 0]] == types[pairs[:, 1]]))
        shuffled.append(np.mean(perm[pairs[:, 0]] == perm[pairs[:, 1]]))
    assert np.mean(observed) > np.mean(shuffled) + 0.15


def test_survival_tied_to_latent_risk(truth):
    assert [c for c in truth.columns if c.startswith("prog_")] == [f"prog_{p}" for p in PROGRAMMES]
    event = truth["os_event"].astype(bool)
    c = concordance_index_censored(event.to_numpy(), truth["os_days"].to_numpy(), truth["risk"].to_numpy())[0]
    assert c >= 0.65
    assert c == pytest.approx(concordance_index(truth["os_days"], -truth["risk"], event), abs=1e-9)
    assert 0.2 < event.mean() < 0.8
    np.testing.assert_array_equal(truth["os_days"], np.round(np.minimum(truth["event_days"], truth["censor_days"])))
    np.testing.assert_array_equal(event, truth["event_days"] <= truth["censor_days"])


def test_cox_fit_recovers_the_hazard_model(truth):
    """lifelines' Cox model on the latent covariates recovers the documented log-hazard coefficients."""
    df = truth[[f"prog_{p}" for p in PROGRAMMES] + ["true_mut_TP53", "os_days", "os_event"]].copy()
    for s in SUBTYPES[1:]:
        df[f"is_{s}"] = (truth["subtype"] == s).astype(float)
    fit = CoxPHFitter().fit(df, duration_col="os_days", event_col="os_event")
    want = {**{f"prog_{p}": b for p, b in zip(PROGRAMMES, HAZARD_PROGRAMMES)}, "true_mut_TP53": HAZARD_TP53,
            **{f"is_{s}": HAZARD_SUBTYPE[k + 1] - HAZARD_SUBTYPE[0] for k, s in enumerate(SUBTYPES[1:])}}
    for name, beta in want.items():
        est, se = fit.params_[name], fit.standard_errors_[name]
        assert abs(est - beta) < 3.5 * se, (name, est, beta, se)


def test_missingness_and_multi_slide_rates(cohort, truth):
    n = STATS.n_cases

    def close(observed, rate, k):
        assert abs(observed - rate) <= 4 * np.sqrt(rate * (1 - rate) / k) + 1e-9, (observed, rate)

    slides = pd.read_csv(cohort / "slides.csv")
    per_case = slides.groupby("case_id").size().reindex(truth.index, fill_value=0)
    close((per_case == 0).mean(), STATS.missing_slide, n)
    with_slide = per_case[per_case > 0]
    close((with_slide > 1).mean(), STATS.multi_slide_rate, len(with_slide))
    assert with_slide.max() <= STATS.max_slides_per_case
    close(1 - len(ad.read_h5ad(cohort / "rna.h5ad", backed="r")) / n, STATS.missing_rna, n)
    close(1 - len(ad.read_h5ad(cohort / "protein.h5ad", backed="r")) / n, STATS.missing_protein, n)
    close(1 - len((cohort / "reports.jsonl").read_text().splitlines()) / n, STATS.missing_report, n)
    cases = pd.read_csv(cohort / "cases.csv")
    close(cases["mut_TP53"].isna().mean(), STATS.missing_mutation, n)
    assert (cases.filter(like="mut_").isna().all(axis=1) == cases["mut_TP53"].isna()).all()


def test_rna_counts_follow_programmes(cohort, truth):
    rna = ad.read_h5ad(cohort / "rna.h5ad")
    x = np.asarray(rna.X, dtype=np.float64)
    assert (x >= 0).all() and (x == np.round(x)).all()
    lib = x.sum(1)
    assert lib.std() / lib.mean() > 0.2  # sequencing depth varies
    cpm = np.log1p(x / lib[:, None] * 1e6)
    t = truth.loc[rna.obs_names]
    genes = list(rna.var_names)
    for gene, programme in (("MKI67", "proliferation"), ("CD8A", "immune"), ("CA9", "hypoxia"),
                            ("COL1A1", "stromal"), ("KRT8", "differentiation")):
        assert spearmanr(cpm[:, genes.index(gene)], t[f"prog_{programme}"])[0] > 0.5, gene
    norm = x / lib[:, None] * np.median(lib)  # negative binomial: variance above the Poisson mean
    hk = genes.index("ACTB")
    assert norm[:, hk].var() > 3 * norm[:, hk].mean()
    dusp6 = cpm[:, genes.index("DUSP6")]  # a driver's transcriptional read-out
    assert dusp6[t["true_mut_KRAS"] == 1].mean() > dusp6[t["true_mut_KRAS"] == 0].mean()


def test_protein_panel_follows_programmes_and_drivers(cohort, truth):
    prot = ad.read_h5ad(cohort / "protein.h5ad")
    x = np.log(np.asarray(prot.X, dtype=np.float64))
    t = truth.loc[prot.obs_names]
    names = list(prot.var_names)
    assert spearmanr(x[:, names.index("Ki-67")], t["prog_proliferation"])[0] > 0.4
    assert spearmanr(x[:, names.index("CD8")], t["prog_immune"])[0] > 0.4
    p53 = x[:, names.index("p53")]
    assert p53[t["true_mut_TP53"] == 1].mean() > p53[t["true_mut_TP53"] == 0].mean() + 0.4


def test_reports_vary_and_state_the_truth(cohort, truth):
    rows = [json.loads(line) for line in (cohort / "reports.jsonl").read_text().splitlines()]
    sentences = [s for r in rows for s in r["text"].replace("FINAL DIAGNOSIS: ", "").split(". ")]
    assert len(set(sentences)) > 300
    templates = {"".join("#" if ch.isdigit() else ch for ch in s) for s in sentences}
    assert len(templates) > 60
    assert len({r["text"] for r in rows}) == len(rows)
    negative = ("No tumour necrosis", "Necrosis: absent", "Negative for necrosis", "no evidence of necrosis")
    positive = ("Tumour necrosis is present", "geographic necrosis", "Necrosis: present", "Comedo-type necrosis")
    for r in rows:
        said_yes, said_no = any(p in r["text"] for p in positive), any(p in r["text"] for p in negative)
        assert not (said_yes and said_no)
        if said_yes or said_no:
            assert said_yes == truth.loc[r["case_id"], "report_necrosis"], r
    diag_grade = pd.Series({r["case_id"]: r["text"] for r in rows}).str.contains("grade 3|poorly|G3")
    reported = truth.loc[diag_grade.index, "report_reported_grade"] == 3
    assert (diag_grade == reported).all()


def test_ten_thousand_cases_stream(tmp_path):
    """The 10k-case path with tiny bags: every case written, ids stable, case i independent of N."""
    knobs = dict(feature_dim=4, bag_size_median=8, bag_size_min=4, bag_size_max=32, n_genes=120, n_proteins=8,
                 missing_slide=0.97)
    out = simulate_cohort(tmp_path / "big", SimConfig(n_cases=10_000, **knobs))
    cases = pd.read_csv(out / "cases.csv")
    assert len(cases) == 10_000 and cases["case_id"].is_unique and cases["case_id"].iloc[-1] == "case-09999"
    assert ad.read_h5ad(out / "rna.h5ad", backed="r").shape[1] == 120
    small = simulate_cohort(tmp_path / "small", SimConfig(n_cases=50, **knobs))
    pd.testing.assert_frame_equal(pd.read_csv(small / "cases.csv"), cases.iloc[:50])


def test_cli_resume_and_config_guard(tmp_path, capsys):
    out = tmp_path / "c"
    args = ["simulate", "--out", str(out), "--cases", "4", "--feature-dim", "8", "--bag-size-median", "40",
            "--n-genes", "150", "--n-proteins", "10", "--missing-slide", "0"]
    assert main(args) == 0
    before = digests(out)
    victim = sorted((out / "bags").glob("*.h5"))[1]
    victim.unlink()
    (out / "cohort.yaml").unlink()
    assert main(args) == 0  # resumes: rewrites only what is missing, byte-identical
    assert digests(out) == before
    capsys.readouterr()
    assert main(args[:-2] + ["--seed", "9"]) == 2
    err = capsys.readouterr().err  # a user error: one line on stderr naming the command and the changed key
    assert err.startswith("mmfm simulate: error: ") and "seed" in err and err.count("\n") == 1
    assert main(["simulate", "--out", str(out), "--cases", "four"]) == 2
    assert "n_cases: Couldn't parse 'four' into an int" in capsys.readouterr().err
    assert main(["simulate", "--outt", str(out)]) == 2
    assert "unknown config key(s) outt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="missing_rna"):
        SimConfig(missing_rna=1.5).check()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a simulated cohort"):
        simulate_cohort(stranger, SimConfig(n_cases=2, **SMALL))

