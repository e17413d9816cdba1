"""References beside every number: chance levels (robustness: random and site-only rankings), paired comparisons
between embeddings, per-fold standardisation, and the report rows chance · baselines · model · oracle.

Independent references: Monte-Carlo random / site-only embeddings through the brute-force neighbour counts, SciPy's
paired t-test, hand-written Nadeau–Bengio and percentile computations, NumPy z-scoring + plain sklearn/sksurv fits.
"""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from lifelines.datasets import load_lung
from scipy import stats as sps
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sksurv.linear_model import CoxnetSurvivalAnalysis

from mmfm.eval import report, stats
from mmfm.eval.probes import classification, robustness, survival
from mmfm.eval.probe import probe
from mmfm.eval.references import chance_level, role


@pytest.fixture(scope="module")
def lung():
    """NCCTG lung: real institutions as sites, sex as the biology, confounded by institution."""
    d = load_lung().dropna().reset_index(drop=True)
    return d.sex.astype(str).to_numpy(), d.inst.astype(int).astype(str).to_numpy()


def test_random_ranking_reference_matches_many_random_embeddings(lung):
    bio, site = lung
    n, k = len(bio), 10
    group = np.arange(n) // 2  # pairs of rows are one "slide": never each other's neighbours
    expected = robustness.expected_query_counts(bio, site, group, k, mode="random").sum(0)
    rng = np.random.default_rng(0)
    mc = np.mean([robustness.counts(rng.normal(size=(n, 8)), bio, site, group, k).to_numpy() for _ in range(150)], 0)
    np.testing.assert_allclose(expected, mc, rtol=0.06, atol=1.5)
    np.testing.assert_allclose(expected.sum(1), np.arange(1, k + 1) * n)  # every rank filled
    ri = robustness.indices(pd.DataFrame(expected, columns=list(robustness.KINDS), index=range(1, k + 1)))
    # confounded sites: a random embedding's RI is not 0.5 but share(SO) / share(SO + OS) over all candidate pairs
    so = ((bio[:, None] == bio[None]) & (site[:, None] != site[None]) & (group[:, None] != group[None])).sum()
    os_ = ((bio[:, None] != bio[None]) & (site[:, None] == site[None]) & (group[:, None] != group[None])).sum()
    assert abs(ri.robustness_index.iloc[0] - so / (so + os_)) < 0.02 and abs(so / (so + os_) - 0.5) > 0.05


def test_site_only_reference_matches_a_site_one_hot_embedding(lung):
    bio, site = lung
    n, k = len(bio), 12
    group = np.arange(n)
    expected = robustness.expected_query_counts(bio, site, group, k, mode="site").sum(0)
    # a site-only embedding: each institution a point on the circle, a tiny jitter orders same-site rows at random
    angle = 2 * np.pi * np.searchsorted(np.unique(site), site) / len(np.unique(site))
    rng = np.random.default_rng(1)
    mc = np.mean([robustness.counts(np.c_[np.cos(a), np.sin(a)], bio, site, group, k).to_numpy()
                  for a in (angle + 1e-4 * rng.normal(size=n) for _ in range(150))], 0)
    np.testing.assert_allclose(expected, mc, rtol=0.06, atol=1.0)
    per_query = robustness.expected_query_counts(bio, site, group, k, mode="site")
    crowded = pd.Series(site).map(pd.Series(site).value_counts()).to_numpy() > k  # ≥ k same-site candidates
    assert crowded.any() and (~crowded).any()
    assert np.all(per_query[crowded, -1, 1] == 0) and np.all(per_query[~crowded, -1, 1] > 0)  # SO only after them
    with pytest.raises(ValueError, match="reference ranking"):
        robustness.expected_query_counts(bio, site, group, k, mode="bio")


def test_probe_reports_chance_and_site_only_ri_on_the_same_rows(tmp_path, lung):
    bio, site = lung
    x = np.random.default_rng(0).normal(size=(len(bio), 5))
    x[:7] = np.nan  # absent rows: references use the embedding's own rows
    a = ad.AnnData(obs=pd.DataFrame({"sex": bio, "inst": site}, index=[f"p{i}" for i in range(len(bio))]),
                   obsm={"emb": x})
    r = probe(a, [{"name": "rob", "type": "robustness", "label": "sex", "site": "inst", "embeddings": ["emb"],
                   "ks": [5]}], tmp_path, plots=False).results.set_index("metric").value
    ok = slice(7, None)
    ref = {p: robustness.indices(pd.DataFrame(robustness.expected_query_counts(
        bio[ok], site[ok], a.obs_names[ok], 5, mode=m).sum(0), columns=list(robustness.KINDS), index=range(1, 6)))
        for p, m in (("chance", "random"), ("site_only", "site"))}
    assert r["chance_robustness_index@5"] == pytest.approx(ref["chance"].loc[5, "robustness_index"])
    assert r["site_only_robustness_index@5"] == pytest.approx(ref["site_only"].loc[5, "robustness_index"])
    assert r["n_test"] == len(bio) - 7
    table = pd.read_csv(tmp_path / "references.csv", keep_default_na=False, dtype=str)
    assert table.chance.iloc[0] == (f"{ref['chance'].loc[5, 'robustness_index']:.3f} · site-only "
                                    f"{ref['site_only'].loc[5, 'robustness_index']:.3f}")


def test_paired_fold_differences_match_scipy_and_nadeau_bengio():
    a = np.array([0.71, 0.66, 0.74, 0.69, 0.70])
    b = np.array([0.65, 0.66, 0.70, 0.61, 0.69])
    e = stats.paired(a, b, test_train_ratio=0.25)
    d = a - b
    t = sps.ttest_rel(a, b)
    assert e.mean == pytest.approx(d.mean()) and e.n == 5
    assert e.se == pytest.approx(np.std(d, ddof=1) / np.sqrt(5))
    assert e.p == pytest.approx(t.pvalue)
    half = sps.t.ppf(0.975, 4) * np.std(d, ddof=1) / np.sqrt(5)
    assert (e.lo, e.hi) == pytest.approx((d.mean() - half, d.mean() + half))
    t_nb = d.mean() / np.sqrt((1 / 5 + 0.25) * np.var(d, ddof=1))  # Nadeau & Bengio (2003), eq. for k-fold
    assert e.p_corrected == pytest.approx(2 * sps.t.sf(abs(t_nb), 4))
    assert e.p_corrected > e.p
    assert stats.paired([0.7, np.nan, 0.6], [0.6, 0.5, np.nan]).n == 1  # folds missing on either side drop out


def test_paired_bootstrap_percentiles_and_p():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.7, 0.02, 199), rng.normal(0.69, 0.02, 199)
    e = stats.paired_bootstrap(a, b)
    d = a - b
    assert (e.lo, e.hi) == pytest.approx(tuple(np.percentile(d, [2.5, 97.5])))
    assert e.p == pytest.approx(min(1, 2 * (min((d <= 0).sum(), (d >= 0).sum()) + 1) / 200))
    assert stats.paired_bootstrap(a + 1, a).p == pytest.approx(2 / 200)  # never 0: resolution 1/B


@pytest.fixture(scope="module")
def wdbc():
    x, y = load_breast_cancer(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    return x[perm[:300]], y[perm[:300]], x[perm[300:]], y[perm[300:]]


def test_standardize_uses_training_fold_statistics(wdbc):
    xtr, ytr, xte, _ = wdbc
    mu, sd = xtr.mean(0), xtr.std(0)
    ref = LogisticRegression(C=0.5, max_iter=10000, random_state=0, class_weight="balanced").fit((xtr - mu) / sd, ytr)
    proba, _ = classification.fit_predict(xtr, ytr, xte, 2, standardize=True)
    np.testing.assert_allclose(proba, ref.predict_proba((xte - mu) / sd), atol=1e-6)
    scale = np.logspace(-3, 3, xtr.shape[1])  # per-feature units no longer matter …
    again, _ = classification.fit_predict(xtr * scale, ytr, xte * scale, 2, standardize=True)
    np.testing.assert_allclose(again, proba, atol=1e-5)
    raw, _ = classification.fit_predict(xtr[:, :5] * scale[:5], ytr, xte[:, :5] * scale[:5], 2)
    raw2, _ = classification.fit_predict(xtr[:, :5], ytr, xte[:, :5], 2)
    assert np.abs(raw - raw2).max() > 1e-3  # … while the unscaled probe (Patho-Bench default) depends on them


def test_standardize_in_cox_fit():
    d = load_lung().dropna()
    x = d[["age", "ph.ecog", "ph.karno", "pat.karno", "meal.cal", "wt.loss"]].to_numpy(float)
    y = survival.surv(d.status == 1, d.time)
    tr, te = np.arange(0, 120), np.arange(120, len(x))
    mu, sd = x[tr].mean(0), x[tr].std(0)
    ref = CoxnetSurvivalAnalysis(alphas=[0.07], l1_ratio=0.5, max_iter=100000).fit((x[tr] - mu) / sd, y[tr])
    risk, _, _ = survival.fit_risk("coxnet", x[tr], y[tr], x[te], alphas=(0.07,), standardize=True)
    np.testing.assert_allclose(risk, ref.predict((x[te] - mu) / sd), atol=1e-6)


def test_report_rows_read_chance_baselines_model_oracle(tmp_path, wdbc):
    """Through probe(): one row per metric with chance, baseline, model and oracle cells in that order, and the
    paired table equal to per-fold differences of results.csv tested with SciPy."""
    xtr, ytr, xte, yte = wdbc
    x, y = np.r_[xtr, xte], np.r_[ytr, yte]
    rng = np.random.default_rng(0)
    a = ad.AnnData(obs=pd.DataFrame({"dx": y.astype(str)}, index=[f"c{i}" for i in range(len(y))]),
                   obsm={"oracle": np.c_[y + 0.1 * rng.normal(size=len(y))], "feat_meanpool": x[:, :3],
                         "feat": x[:, :10]})
    task = {"name": "dx", "type": "classification", "label": "dx", "folds": 4, "standardize": True,
            "embeddings": ["feat", "feat_meanpool", "oracle"]}
    res = probe(a, [task], tmp_path, plots=False)
    refs = pd.read_csv(tmp_path / "references.csv", keep_default_na=False, dtype=str)
    assert list(refs.columns) == ["task", "target", "metric", "chance", "baseline: feat_meanpool", "model: feat",
                                  "oracle"]
    assert refs.set_index("metric").chance.to_dict() == {"auroc": "0.500", "bacc": "0.500", "wall_s": "—"}
    r = res.results
    assert (r[r.metric == "standardized"].value == 1).all() and (r[r.metric == "n_classes"].value == 2).all()
    paired = pd.read_csv(tmp_path / "paired.csv")
    row = paired[(paired.metric == "auroc")].iloc[0]
    assert (row.embedding, row.baseline, row.n) == ("feat", "feat_meanpool", 4)
    v = r[r.metric == "auroc"].pivot_table(index="fold", columns="embedding", values="value")
    assert row["mean"] == pytest.approx((v.feat - v.feat_meanpool).mean())
    assert row.p == pytest.approx(sps.ttest_rel(v.feat, v.feat_meanpool).pvalue)
    n = r[r.metric.isin(["n_test", "n_train"]) & (r.embedding == "feat")].pivot_table(
        index="fold", columns="metric", values="value")
    assert n.n_test.sum() == len(y) and row.p_corrected == pytest.approx(
        stats.paired(v.feat, v.feat_meanpool, test_train_ratio=(n.n_test / n.n_train).mean()).p_corrected)
    md = (tmp_path / "summary.md").read_text()
    assert "## Chance · baselines · model · oracle" in md and "SE = sample SD (ddof=1) / √k" in md
    assert "## Paired differences: model − baseline" in md


def test_roles_and_chance_levels():
    assert [role(e) for e in ("slide", "slide_meanpool", "slide_random", "baseline:grade", "oracle", "rna")] == [
        "model", "baseline", "baseline", "baseline", "oracle", "model"]
    assert role("rna", {"rna": "baseline"}) == "baseline"
    with pytest.raises(ValueError, match="role of 'rna'"):
        role("rna", {"rna": "ceiling"})
    assert chance_level("c_index") == chance_level("td_auc@365") == 0.5
    assert chance_level("bacc", 4) == 0.25 and chance_level("kappa") == 0.0 and np.isnan(chance_level("f1"))
    assert report.reference_table(pd.DataFrame(columns=report.GROUP + ["mean", "text"]), pd.DataFrame(
        columns=["task", "target", "metric", "value"])).empty
