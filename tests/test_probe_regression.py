"""`regression` probe: every reported number recomputed in the test with scikit-learn (Ridge, PCA, r2_score), scipy
(pearsonr, spearmanr) and statsmodels (Benjamini–Hochberg) on the folds the probe wrote; the genes of a fold are
the training cases' highly variable genes, whatever the test cases hold."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy.stats import pearsonr, spearmanr
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from statsmodels.stats.multitest import multipletests

from mmfm.eval.probe import probe
from mmfm.eval.probes import regression
from mmfm.eval.tasks import TaskError

N, GENES = 40, 30


def _world(tmp_path, seed=0):
    """Embeddings of N cases (`slide` sees the latent state, `slide_meanpool` is noise) and an rna.h5ad of counts
    driven by that state, in a folder the embeddings record as their cohort."""
    r = np.random.default_rng(seed)
    z = r.standard_normal((N, 3))
    cases = [f"c{i:02d}" for i in range(N)]
    load = r.normal(0, 0.8, (3, GENES)) * (r.random(GENES) < 0.7)
    mu = np.exp(3.0 + r.normal(0, 0.5, GENES) + z @ load)
    counts = r.poisson(mu * np.exp(r.normal(0, 0.3, (N, 1)))).astype(np.float32)
    genes = [f"G{j:02d}" for j in range(GENES)]
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    ad.AnnData(counts, obs=pd.DataFrame(index=cases), var=pd.DataFrame(index=genes)).write_h5ad(cohort / "rna.h5ad")
    obs = pd.DataFrame({"age": 50 + 8 * z[:, 0] + r.normal(0, 4, N), "grade": r.integers(1, 4, N)},
                       index=cases)
    emb = ad.AnnData(obs=obs, obsm={"slide": z @ r.standard_normal((3, 8)) + 0.3 * r.standard_normal((N, 8)),
                                    "slide_meanpool": r.standard_normal((N, 8))}, uns={"cohort": str(cohort)})
    return emb, counts, genes


def _lognorm(counts):
    """Library size to 1e4, log1p — in float32 like the probe's scanpy normalisation."""
    c = counts.astype(np.float32)
    return np.log1p(c / c.sum(1, keepdims=True) * np.float32(1e4)).astype(np.float64)


def _folds(out, task):
    return pd.read_csv(out / "folds" / f"{task}.tsv", sep="\t", index_col="case_id")


def _fold_value(res, emb, metric, fold):
    r = res.results
    return float(r[(r.embedding == emb) & (r.metric == metric) & (r.fold == str(fold))].value.iloc[0])


@pytest.mark.parametrize("pca", [None, 4])
def test_ridge_scores_equal_sklearn_scipy_statsmodels_on_the_same_folds(tmp_path, pca):
    emb, counts, genes = _world(tmp_path)
    task = {"name": "expr", "type": "regression", "source": "rna", "names": ["G0*", "G1*"], "alphas": [3.0],
            "pca": pca, "permutations": 0, "embeddings": ["slide"], "folds": 3}
    res = probe(emb, [task], tmp_path / "out", plots=False)
    folds = _folds(tmp_path / "out", "expr")
    named = [g for g in genes if g.startswith(("G0", "G1"))]
    y = pd.DataFrame(_lognorm(counts), index=emb.obs_names, columns=genes)[named]
    x = pd.DataFrame(emb.obsm["slide"], index=emb.obs_names)
    per = pd.read_csv(tmp_path / "out" / "per_target.csv")
    assert folds.shape[1] == 3
    for i, fc in enumerate(folds.columns):
        tr, te = folds.index[folds[fc] == "train"], folds.index[folds[fc] == "test"]
        xtr, xte = x.loc[tr].to_numpy(), x.loc[te].to_numpy()
        if pca:
            p = PCA(pca, random_state=0).fit(xtr)
            xtr, xte = p.transform(xtr), p.transform(xte)
        pred = Ridge(alpha=3.0).fit(xtr, y.loc[tr]).predict(xte)
        yte = y.loc[te].to_numpy()
        ref = pd.DataFrame({"pearson": [pearsonr(yte[:, j], pred[:, j])[0] for j in range(len(named))],
                            "p": [pearsonr(yte[:, j], pred[:, j])[1] for j in range(len(named))],
                            "spearman": [spearmanr(yte[:, j], pred[:, j])[0] for j in range(len(named))],
                            "r2": r2_score(yte, pred, multioutput="raw_values")}, index=named)
        got = per[per.fold == i].set_index("target").loc[named]
        np.testing.assert_allclose(got[["pearson", "spearman", "r2"]], ref[["pearson", "spearman", "r2"]],
                                   atol=1e-5)  # float32 normalisation rounds in a different order
        np.testing.assert_allclose(got.p, ref.p, rtol=1e-4, atol=1e-9)
        reject, q, _, _ = multipletests(ref.p, alpha=0.05, method="fdr_bh")
        np.testing.assert_allclose(got.q, q, rtol=1e-4, atol=1e-9)
        assert _fold_value(res, "slide", "n_significant", i) == int((reject & (ref.pearson > 0)).sum())
        assert _fold_value(res, "slide", "pearson_mean", i) == pytest.approx(ref.pearson.mean(), abs=1e-6)
        assert _fold_value(res, "slide", "pearson_median", i) == pytest.approx(ref.pearson.median(), abs=1e-6)
        assert _fold_value(res, "slide", "r2_mean", i) == pytest.approx(ref.r2.mean(), abs=1e-6)
    assert _fold_value(res, "slide", "pearson_mean", 0) > 0.3  # the state is in the embedding


def test_alpha_per_target_is_the_leave_one_out_choice():
    """RidgeCV's α per target equals a brute-force leave-one-out over the grid with sklearn's Ridge."""
    r = np.random.default_rng(1)
    x, y = r.standard_normal((25, 6)), r.standard_normal((25, 3))
    y[:, 0] += 3 * x[:, 0]  # one strong target (small α), two noise targets (large α)
    grid = (0.01, 1.0, 100.0, 1e4)
    _, alpha = regression.fit_predict(x, y, x[:2], alphas=grid)
    for t in range(y.shape[1]):
        loo = [np.mean([(Ridge(alpha=a).fit(np.delete(x, i, 0), np.delete(y[:, t], i)).predict(x[i:i + 1])[0]
                         - y[i, t]) ** 2 for i in range(len(x))]) for a in grid]
        assert alpha[t] == grid[int(np.argmin(loo))]
    assert alpha[0] < alpha[1:].max()


def test_benjamini_hochberg_equals_statsmodels():
    p = np.random.default_rng(2).uniform(0, 0.2, 200) ** 2
    p[[3, 7]] = np.nan  # undefined correlations count as p = 1
    _, q, _, _ = multipletests(np.nan_to_num(p, nan=1.0), method="fdr_bh")
    np.testing.assert_allclose(regression.bh(p), q, rtol=1e-12)


def test_hvgs_come_from_the_training_fold_only(tmp_path):
    """Fold 0's genes are scanpy's top-k of its training cases. Making two quiet genes wildly variable in fold 0's
    TEST cases changes the top-k of all cases (so leakage would show) but not the genes fold 0 predicts."""
    emb, counts, genes = _world(tmp_path)
    task = {"name": "hvg", "type": "regression", "source": "rna", "hvg": 6, "permutations": 0,
            "embeddings": ["slide"], "folds": 3}
    probe(emb, [task], tmp_path / "a", plots=False)
    folds = _folds(tmp_path / "a", "hvg")
    per = pd.read_csv(tmp_path / "a" / "per_target.csv")
    tr = folds.index[folds.fold_0 == "train"]
    te = np.flatnonzero(folds.fold_0.reindex(emb.obs_names).to_numpy() == "test")

    def top(rows, c):
        a = ad.AnnData(_lognorm(c)[rows].astype(np.float32), var=pd.DataFrame(index=genes))
        sc.pp.highly_variable_genes(a, n_top_genes=6, flavor="seurat")
        return set(a.var.dispersions_norm.sort_values(ascending=False, kind="stable").index[:6])

    assert set(per[per.fold == 0].target) == top(emb.obs_names.get_indexer(tr), counts)
    changed = counts.copy()
    quiet = np.argsort(_lognorm(counts).std(0))[:2]
    changed[np.ix_(te, quiet)] *= np.random.default_rng(3).choice([0.0, 30.0], (len(te), 2))
    assert top(np.arange(N), changed) != top(np.arange(N), counts)  # the change matters to an all-case choice
    ad.AnnData(changed, obs=pd.DataFrame(index=emb.obs_names), var=pd.DataFrame(index=genes)).write_h5ad(
        tmp_path / "cohort" / "rna.h5ad")
    probe(emb, [task], tmp_path / "b", plots=False)
    per_b = pd.read_csv(tmp_path / "b" / "per_target.csv")
    assert _folds(tmp_path / "b", "hvg").equals(folds)
    assert set(per_b[per_b.fold == 0].target) == set(per[per.fold == 0].target)


def test_obs_targets_chance_baseline_and_report(tmp_path):
    """A clinical number: the informed embedding beats the permutation null and the noise embedding; the covariate
    baseline, paired rows, per-target CSV and the per-target plot come out with no further wiring."""
    emb, _, _ = _world(tmp_path)
    task = {"name": "age", "type": "regression", "source": "obs", "names": ["age"], "permutations": 2,
            "embeddings": ["slide", "slide_meanpool"], "baseline": ["grade"], "folds": 4}
    res = probe(emb, [task], tmp_path / "out", plots=True)
    s = res.summary.set_index(["embedding", "metric"])["mean"]
    assert s["slide", "pearson_mean"] > 0.5 > s["slide", "chance_pearson_mean"]
    assert abs(s["slide_meanpool", "chance_pearson_mean"]) < 0.4
    assert s["slide", "pearson_mean"] > s["slide_meanpool", "pearson_mean"]
    assert "baseline:grade" in set(res.summary.embedding)
    paired = pd.read_csv(tmp_path / "out" / "paired.csv")
    assert {"slide_meanpool", "baseline:grade"} <= set(paired[paired.metric == "pearson_mean"].baseline)
    assert (tmp_path / "out" / "age_per_target.png").is_file()
    assert "regression" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize("task, message", [
    ({"source": "obs"}, "needs key 'names'"),
    ({"source": "obs", "names": ["nope*"]}, r"'names' entry 'nope\*' matches no obs"),
    ({"source": "protein"}, "protein.h5ad not found"),
])
def test_regression_errors_name_the_key(tmp_path, task, message):
    emb, _, _ = _world(tmp_path)
    with pytest.raises(TaskError, match=message):
        probe(emb, [{"name": "t", "type": "regression", "embeddings": ["slide"], **task}], tmp_path / "out",
              plots=False)


def test_protein_targets_are_the_panel_normalised_like_rna(tmp_path):
    emb, counts, genes = _world(tmp_path)
    panel = ad.AnnData(counts[:, :6] * 10, obs=pd.DataFrame(index=emb.obs_names),
                       var=pd.DataFrame(index=[f"AB{j}" for j in range(6)]))
    panel.write_h5ad(tmp_path / "cohort" / "protein.h5ad")
    task = {"name": "prot", "type": "regression", "source": "protein", "alphas": [1.0], "permutations": 0,
            "embeddings": ["slide"], "folds": 3}
    probe(emb, [task], tmp_path / "out", plots=False)
    per = pd.read_csv(tmp_path / "out" / "per_target.csv")
    folds = _folds(tmp_path / "out", "prot")
    te = folds.index[folds.fold_0 == "test"]
    y = pd.DataFrame(_lognorm(counts[:, :6] * 10), index=emb.obs_names).loc[te].to_numpy()
    tr = folds.index[folds.fold_0 == "train"]
    x = pd.DataFrame(emb.obsm["slide"], index=emb.obs_names)
    ytr = pd.DataFrame(_lognorm(counts[:, :6] * 10), index=emb.obs_names).loc[tr]
    pred = Ridge(alpha=1.0).fit(x.loc[tr], ytr).predict(x.loc[te])
    r = [pearsonr(y[:, j], pred[:, j])[0] for j in range(6)]
    got = per[per.fold == 0].set_index("target").loc[[f"AB{j}" for j in range(6)], "pearson"]
    np.testing.assert_allclose(got, r, atol=1e-5)


def test_mlp_option_runs_on_the_same_folds(tmp_path):
    emb, _, _ = _world(tmp_path)
    task = {"name": "m", "type": "regression", "source": "rna", "hvg": 5, "model": "mlp", "hidden": 16,
            "permutations": 0, "embeddings": ["slide"], "folds": 3}
    res = probe(emb, [task], tmp_path / "out", plots=False)
    v = res.results[res.results.metric == "pearson_mean"].value
    assert len(v) == 3 and np.isfinite(v).all()


def test_permutation_null_fitted_side_by_side_equals_one_fit_per_permutation():
    r = np.random.default_rng(4)
    x, y = r.standard_normal((30, 5)), r.standard_normal((30, 3))
    xt, yt = r.standard_normal((10, 5)), r.standard_normal((10, 3))
    got = regression.permutation_null(x, y, xt, yt, permutations=3, fdr=0.05, seed=7, model="ridge")
    rng = np.random.default_rng(7)
    runs = [regression.summary(regression.per_target(yt, regression.fit_predict(
        x, y[rng.permutation(30)], xt)[0]), 0.05) for _ in range(3)]
    for k in regression.SUMMARY:
        assert got[k] == pytest.approx(np.mean([run[k] for run in runs]), abs=1e-10)
