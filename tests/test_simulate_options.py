"""The harder simulator options (focal morphology, nonlinear tile features, MNAR omics) and the oracle.

Each option must change only what it says (the other files stay byte-identical to the default cohort), do what it
says (checked with NumPy / scikit-learn / SciPy on the written files), and leave the default untouched.
"""

import hashlib
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from mmfm.data.bags import read_bag
from mmfm.eval.references import attach_oracle
from mmfm.simulate import (HARDER, SUBTYPES, TILE_TYPES, SimConfig, focal_region, missing_probability, oracle_embedding,
                           read_truth, simulate_cohort)
from mmfm.simulate.observation import RISK_MEAN, RISK_SD, TUMOUR_SIZE_RISK_CORR
from mmfm.simulate.tile_features import TYPE_APPEARANCE

SMALL = {"n_cases": 24, "feature_dim": 16, "bag_size_median": 80, "n_genes": 150, "n_proteins": 20}


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "truth" not in p.parts}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("options")
    return {name: simulate_cohort(root / name, SimConfig(**SMALL, **({} if name == "default" else HARDER[name])))
            for name in ("default", *HARDER)}


def test_defaults_are_off_and_options_change_only_their_files(cohorts):
    assert SimConfig().focal_rate == 0 and SimConfig().feature_mlp_hidden == 0 and SimConfig().mnar_strength == 0
    base = digests(cohorts["default"])
    for name, changed in (("focal", "bags/"), ("nonlinear", "bags/"), ("mnar", None)):
        d = digests(cohorts[name])
        same = {k for k in base if d.get(k) == base[k]}
        if changed:  # features move; cases, omics, reports and slide lists do not
            assert set(base) - same and all(k.startswith(changed) for k in set(base) - same), name
        else:  # MNAR moves only which cases have RNA / protein
            assert {k for k in set(base) | set(d) if base.get(k) != d.get(k)} <= {"rna.h5ad", "protein.h5ad"}
    for name in HARDER:  # same seed, same bytes (truth included)
        again = simulate_cohort(cohorts[name].parent / f"{name}-again", SimConfig(**SMALL, **HARDER[name]))
        full = {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()}
        assert all((cohorts[name] / k).read_bytes() == v for k, v in full.items()), name


def test_focal_region_carries_the_case_appearance_and_the_rest_looks_neutral(cohorts):
    """Inside the foci a focal slide equals the default slide byte for byte; outside, tiles of a type whose look
    depends on programmes or subtype differ, and tiles of types that never change (adipose, artefact) do not."""
    cfg = SimConfig(**SMALL, **HARDER["focal"])
    truth = read_truth(cohorts["focal"])
    slides = pd.read_csv(cohorts["focal"] / "truth" / "slides.csv")
    focal = slides[slides.case_id.map(truth.focal)]
    assert 0 < len(focal) < len(slides)
    constant = [TILE_TYPES.index(t) for t in TILE_TYPES if not TYPE_APPEARANCE[TILE_TYPES.index(t)].any()]
    for _, s in focal.iterrows():
        bag = read_bag(cohorts["focal"] / "bags" / f"{s.slide_id}.h5")
        ref = read_bag(cohorts["default"] / "bags" / f"{s.slide_id}.h5")
        i, j = int(s.case_id.split("-")[1]), int(s.slide_id.rsplit("-s", 1)[1])
        inside = focal_region(cfg, i, j, bag["coords"] // cfg.patch_size_level0)
        assert inside.sum() == max(1, round(cfg.focal_fraction * len(inside)))
        assert s.informative_fraction == pytest.approx(inside.mean(), abs=1e-6)
        types = np.load(cohorts["focal"] / "truth" / "tiles" / f"{s.slide_id}.npy")
        np.testing.assert_array_equal(bag["features"][inside], ref["features"][inside])
        still = ~inside & np.isin(types, constant)
        np.testing.assert_array_equal(bag["features"][still], ref["features"][still])
        moved = ~inside & ~np.isin(types, constant)
        assert (bag["features"][moved] != ref["features"][moved]).any(axis=1).all()
    assert (slides[~slides.case_id.map(truth.focal)].informative_fraction == 1).all()


def test_focal_option_dilutes_what_mean_pooling_sees(tmp_path):
    """Mean of a slide's tumour tiles (truth types): the subtype's growth pattern is plain to a linear probe when
    every tumour tile shows it and mostly lost when only the foci (5% of tiles) do, in every case."""
    knobs = {"n_cases": 160, "seed": 4, "feature_dim": 32, "bag_size_median": 120, "n_genes": 150, "n_proteins": 20,
             "site_effect": 0.0, "missing_slide": 0.0, "multi_slide_rate": 0.0}
    acc = {}
    for rate in (0.0, 1.0):
        out = simulate_cohort(tmp_path / f"f{rate}", SimConfig(**knobs, focal_rate=rate))
        slides = pd.read_csv(out / "slides.csv").join(read_truth(out), on="case_id")
        x = []
        for _, s in slides.iterrows():
            f = read_bag(out / s.path)["features"].astype(np.float64)
            tumour = np.load(out / "truth" / "tiles" / f"{s.slide_id}.npy") == TILE_TYPES.index("tumour")
            x.append(f[tumour].mean(0) if tumour.any() else f.mean(0))
        x = np.stack(x)
        clf = LogisticRegression(C=1.0, max_iter=5000)
        acc[rate] = cross_val_score(clf, (x - x.mean(0)) / x.std(0), slides["subtype"], cv=5).mean()
    assert acc[0.0] > acc[1.0] + 0.12, acc


def test_nonlinear_features_make_the_site_shift_depend_on_tissue_type(tmp_path):
    """Linear features: a site's stain shift moves every tile type's mean feature by the same vector. Through the
    random MLP it no longer does: the per-type site differences decorrelate (NumPy on the written bags)."""
    knobs = {"n_cases": 60, "seed": 2, "n_sites": 2, "site_confounding": 1e6, "feature_dim": 64,
             "bag_size_median": 400, "missing_slide": 0.0, "multi_slide_rate": 0.0, "n_genes": 150, "n_proteins": 20}
    agreement = {}
    for hidden in (0, HARDER["nonlinear"]["feature_mlp_hidden"]):
        out = simulate_cohort(tmp_path / f"h{hidden}", SimConfig(**knobs, feature_mlp_hidden=hidden))
        slides = pd.read_csv(out / "slides.csv").join(read_truth(out)["site"], on="case_id")
        sums = {}
        for _, s in slides.iterrows():
            f = read_bag(out / s.path)["features"].astype(np.float64)
            types = np.load(out / "truth" / "tiles" / f"{s.slide_id}.npy")
            for t in (0, 1):  # tumour, stroma
                acc = sums.setdefault((s.site, t), [0.0, 0])
                acc[0] = acc[0] + f[types == t].sum(0)
                acc[1] += int((types == t).sum())
        mean = {k: v[0] / v[1] for k, v in sums.items()}
        sites = sorted({k[0] for k in mean})
        d = [mean[(sites[0], t)] - mean[(sites[1], t)] for t in (0, 1)]
        agreement[hidden] = float(d[0] @ d[1] / np.linalg.norm(d[0]) / np.linalg.norm(d[1]))
    assert agreement[0] > 0.9 and agreement[HARDER["nonlinear"]["feature_mlp_hidden"]] < 0.8, agreement


def test_mnar_missingness_follows_tumour_size_and_keeps_the_rate(tmp_path):
    """RNA/protein go missing more often for small tumours (logistic slope ≈ −β, sklearn), the cohort-wide rate
    stays at the configured one, and the latent size tracks the log-hazard as documented."""
    beta = HARDER["mnar"]["mnar_strength"]
    knobs = {"n_cases": 2500, "feature_dim": 4, "bag_size_median": 8, "bag_size_min": 4, "bag_size_max": 32,
             "n_genes": 120, "n_proteins": 8, "missing_slide": 0.97, "site_confounding": 1e6}
    truth = read_truth(simulate_cohort(tmp_path / "mnar", SimConfig(**knobs, mnar_strength=beta)))
    z = truth[["tumour_size_z"]].to_numpy()
    assert abs(z.mean()) < 0.08 and abs(z.std() - 1) < 0.06
    assert sps.pearsonr(truth.tumour_size_z, truth.risk)[0] == pytest.approx(TUMOUR_SIZE_RISK_CORR, abs=0.05)
    assert truth.risk.mean() == pytest.approx(RISK_MEAN, abs=0.08) and truth.risk.std() == pytest.approx(RISK_SD,
                                                                                                          abs=0.08)
    for m, rate in (("rna", 0.15), ("protein", 0.35)):
        missing = ~truth[f"has_{m}"].astype(bool)
        assert abs(missing.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / len(truth)), m
        fit = LogisticRegression(C=1e6, max_iter=1000).fit(z, missing)
        assert fit.coef_[0, 0] == pytest.approx(-beta, abs=0.2), m
        np.testing.assert_allclose(truth[f"p_missing_{m}"],
                                   [missing_probability(SimConfig(**knobs, mnar_strength=beta), m, v) for v in z[:, 0]],
                                   rtol=1e-5)
    # the intercept keeps E[σ(a − βz)] at the rate: an independent Monte Carlo over z ~ N(0, 1)
    cfg = SimConfig(mnar_strength=beta)
    p = np.array([missing_probability(cfg, "rna", v) for v in np.random.default_rng(0).standard_normal(4000)])
    assert p.mean() == pytest.approx(0.15, abs=0.01)
    assert missing_probability(cfg, "report", -3.0) == cfg.missing_report  # other modalities stay MCAR
    mcar = read_truth(simulate_cohort(tmp_path / "mcar", SimConfig(**knobs)))
    assert (mcar.p_missing_rna == 0.15).all()
    assert abs(LogisticRegression(C=1e6).fit(mcar[["tumour_size_z"]], ~mcar.has_rna.astype(bool)).coef_[0, 0]) < 0.2


def test_cohort_written_before_the_new_knobs_resumes_and_a_changed_knob_is_refused(tmp_path):
    out = simulate_cohort(tmp_path / "c", SimConfig(**SMALL))
    marker = out / "truth" / "sim_config.json"
    old = {k: v for k, v in json.loads(marker.read_text()).items()
           if k not in ("focal_rate", "focal_fraction", "feature_mlp_hidden", "mnar_strength")}
    marker.write_text(json.dumps(old))
    before = digests(out)
    simulate_cohort(out, SimConfig(**SMALL))  # knobs absent from an old marker held their defaults
    assert digests(out) == before
    with pytest.raises(ValueError, match="focal_rate"):
        simulate_cohort(out, SimConfig(**SMALL, focal_rate=0.5))
    for bad, key in (({"focal_rate": 1.5}, "focal_rate"), ({"focal_fraction": 0.0}, "focal_fraction"),
                     ({"mnar_strength": -1.0}, "mnar_strength"), ({"feature_mlp_hidden": -2}, "feature_mlp_hidden")):
        with pytest.raises(ValueError, match=key):
            SimConfig(**bad).check()


def test_oracle_embedding_is_the_latent_truth(cohorts):
    truth = pd.read_csv(cohorts["default"] / "truth" / "cases.csv").set_index("case_id")
    o = oracle_embedding(cohorts["default"])
    assert list(o.columns) == [c for c in truth.columns if c.startswith("prog_")] + [f"subtype_{s}" for s in SUBTYPES]
    np.testing.assert_array_equal(o.filter(like="prog_").to_numpy(), truth.filter(like="prog_").to_numpy())
    assert (o.filter(like="subtype_").sum(1) == 1).all()
    assert (o.filter(like="subtype_").idxmax(1).str.removeprefix("subtype_") == truth.subtype).all()
    full = oracle_embedding(cohorts["default"], ("programmes", "drivers"))
    np.testing.assert_array_equal(full.filter(like="true_mut_").to_numpy(), truth.filter(like="true_mut_").to_numpy())
    with pytest.raises(ValueError, match="genotype"):
        oracle_embedding(cohorts["default"], ("genotype",))
    with pytest.raises(ValueError, match="truth/cases.csv"):
        oracle_embedding(cohorts["default"] / "bags")


def test_attach_oracle_aligns_rows_and_copies_absence(cohorts):
    truth = read_truth(cohorts["default"])
    ids = list(truth.index[::-1][:10])
    emb = np.random.default_rng(0).normal(size=(10, 3))
    emb[[2, 5]] = np.nan
    a = ad.AnnData(obs=pd.DataFrame(index=ids), obsm={"slide": emb})
    attach_oracle(a, cohorts["default"], like="slide")
    o = oracle_embedding(cohorts["default"]).loc[ids].to_numpy()
    ok = np.isfinite(emb).all(1)
    np.testing.assert_array_equal(a.obsm["oracle"][ok], o[ok])
    assert np.isnan(a.obsm["oracle"][~ok]).all()
    slides = ad.AnnData(obs=pd.DataFrame({"case_id": [ids[0], ids[0], ids[3]]}, index=["a", "b", "c"]))
    np.testing.assert_array_equal(attach_oracle(slides, cohorts["default"]).obsm["oracle"], o[[0, 0, 3]])
    with pytest.raises(ValueError, match="case-99999"):
        attach_oracle(ad.AnnData(obs=pd.DataFrame(index=["case-99999"])), cohorts["default"])
