"""Robustness index (PathoROB): a hand-counted toy example and a brute-force NumPy reference on real data."""

import numpy as np
import pandas as pd
import pytest
from lifelines.datasets import load_lung

from mmfm.eval.probes import robustness


def _unit(angles_deg):
    a = np.deg2rad(np.asarray(angles_deg, float))
    return np.stack([np.cos(a), np.sin(a)], 1) * np.arange(1, len(a) + 1)[:, None]  # norms differ: L2-normalised


def test_hand_counted_example():
    #        row:   0     1     2     3     4     5
    emb = _unit([0, 4, 11, 23, 41, 100])
    bio = np.array(["A", "A", "A", "B", "B", "B"])
    site = np.array(["s1", "s1", "s2", "s1", "s2", "s2"])
    slide = np.array([0, 0, 1, 2, 3, 4])  # rows 0 and 1 share a slide and never count as each other's neighbour
    # Nearest neighbours outside the own slide (angular distance), ranks 1 and 2:
    #   q0: 2 (A,s2)=SO, 3 (B,s1)=OS      q1: 2 SO, 3 OS         q2: 1 (A,s1)=SO, 0 SO
    #   q3: 2 (A,s2)=OO, 4 (B,s2)=SO      q4: 3 (B,s1)=SO, 2 (A,s2)=OS   q5: 4 (B,s2)=SS, 3 (B,s1)=SO
    # rank 1: SS=1 SO=4 OS=0 OO=1;  rank 2: SO=3 OS=3.
    ri = robustness.robustness_index(emb, bio, site, slide, ks=(1, 2))
    assert ri.loc[1, ["SS", "SO", "OS", "OO"]].tolist() == [1, 4, 0, 1]
    assert ri.loc[2, ["SS", "SO", "OS", "OO"]].tolist() == [1, 7, 3, 1]
    assert ri.loc[1, "robustness_index"] == pytest.approx(1.0)
    assert ri.loc[2, "robustness_index"] == pytest.approx(7 / 10)
    assert ri.loc[1, "bio_vs_confounding"] == pytest.approx(5 / 1)
    assert ri.loc[2, "bio_vs_confounding"] == pytest.approx(8 / 4)


def _bruteforce_counts(x, bio, site, group, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    c = np.zeros(4, int)
    for q in range(len(x)):
        order = [j for j in np.argsort(d[q], kind="stable") if group[j] != group[q]][:k]
        for j in order:
            sb, ss = bio[j] == bio[q], site[j] == site[q]
            c += [sb and ss, sb and not ss, (not sb) and ss, (not sb) and not ss]
    return c


def test_matches_bruteforce_on_ncctg_lung_with_real_institutions():
    """Real site labels: NCCTG institution (`inst`); 'biology' = sex; a group = one patient."""
    d = load_lung().dropna()
    x = d[["age", "ph.ecog", "ph.karno", "pat.karno", "meal.cal", "wt.loss"]].to_numpy(float)
    x = (x - x.mean(0)) / x.std(0) + np.random.default_rng(0).normal(scale=1e-6, size=x.shape)  # break exact ties
    bio, site = d["sex"].to_numpy(), d["inst"].to_numpy()
    group = np.arange(len(x)) // 2  # pairs of rows act as one "slide": excluded from each other's neighbours
    ri = robustness.robustness_index(x, bio, site, group, ks=(1, 5, 11))
    for k in (1, 5, 11):
        ss, so, os_, oo = _bruteforce_counts(x, bio, site, group, k)
        assert ri.loc[k, ["SS", "SO", "OS", "OO"]].tolist() == [ss, so, os_, oo]
        assert ri.loc[k, "robustness_index"] == pytest.approx(so / (so + os_))
        assert ss + so + os_ + oo == k * len(x)


def test_subsets_are_evaluated_separately_and_pooled():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    bio, site = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    subset = np.repeat([0, 1], 20)
    pooled = robustness.counts(x, bio, site, np.arange(40), 5, subset=subset)
    parts = sum(robustness.counts(x[subset == s], bio[subset == s], site[subset == s], np.arange(20), 5)
                for s in (0, 1))
    assert pooled.equals(parts)


def test_probe_robustness_task_on_lung(tmp_path):
    """`type: robustness` through the probe API: same numbers as the function, curve and projection plots."""
    import anndata as ad

    from mmfm.eval.probe import probe

    d = load_lung().reset_index(drop=True)
    x = d[["age", "ph.ecog", "ph.karno", "pat.karno", "meal.cal", "wt.loss"]].to_numpy(float)
    x = (x - np.nanmean(x, 0)) / np.nanstd(x, 0)  # rows with a missing covariate stay NaN = "absent"
    obs = pd.DataFrame({"inst": [None if pd.isna(v) else f"inst{int(v)}" for v in d.inst],
                        "sex": d.sex.astype(str).to_numpy()},
                       index=d.index.astype(str))
    a = ad.AnnData(obs=obs, obsm={"clin": x})
    r = probe(a, [{"name": "rob", "type": "robustness", "label": "sex", "site": "inst", "embeddings": ["clin"],
                   "ks": [1, 5, 11]}], tmp_path, projection="pca")
    ok = np.isfinite(x).all(1) & obs.inst.notna().to_numpy()
    ref = robustness.robustness_index(x[ok], obs.sex[ok], obs.inst[ok], obs.index[ok], ks=(1, 5, 11))
    got = r.results.set_index("metric").value
    for k in (1, 5, 11):
        assert got[f"robustness_index@{k}"] == pytest.approx(ref.loc[k, "robustness_index"])
        assert got[f"bio_vs_confounding@{k}"] == pytest.approx(ref.loc[k, "bio_vs_confounding"])
    boot = pd.read_csv(tmp_path / "bootstrap.csv")
    v = boot[boot.metric == "robustness_index@5"].value.to_numpy()
    assert len(v) == 100  # query rows resampled: summary shows bootstrap mean and percentile CI
    row = r.summary.set_index("metric").loc["robustness_index@5"]
    assert row["lo"] == pytest.approx(np.percentile(v, 2.5))
    assert row["mean"] == pytest.approx(ref.loc[5, "robustness_index"])  # point estimate, as PathoROB reports it
    assert (tmp_path / "rob_ri.png").exists() and (tmp_path / "rob_clin_projection.png").exists()
    assert "## rob (robustness, all rows)" in (tmp_path / "summary.md").read_text()
