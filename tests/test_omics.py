"""Omics preprocessing against a NumPy reimplementation and against scanpy itself (bit for bit: mmfm reproduces
scanpy's normalize_total, log1p and seurat dispersion without importing it); fitted on training cases only;
vocabulary alignment."""

import contextlib
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from conftest import simulate_tiny

from mmfm.data.omics import OmicsTransform, counts_of, log_normalize, seurat_dispersions, top_variable

GENES = [f"g{i}" for i in range(8)]
TRAIN = [f"c{i}" for i in range(10)]


def _adata(counts, cases=None, genes=GENES, layer=False):
    cases = cases or [f"c{i}" for i in range(len(counts))]
    obs, var = pd.DataFrame(index=pd.Index(cases)), pd.DataFrame(index=pd.Index(genes))
    if layer:  # X holds something else (e.g. scaled data); counts live in the layer
        return ad.AnnData(X=np.log1p(counts).astype(np.float32) - 3, obs=obs, var=var,
                          layers={"counts": counts.astype(np.float32)})
    return ad.AnnData(X=counts.astype(np.float32), obs=obs, var=var)


def _counts(n=14, g=len(GENES), seed=0):
    rng = np.random.default_rng(seed)
    lib = rng.integers(500, 5000, size=(n, 1))
    return rng.poisson(lib * rng.dirichlet(np.ones(g) * 2)[None, :]).astype(np.float64)


def _ref_lognorm(counts, target_sum=1e4):
    return np.log1p(counts / counts.sum(axis=1, keepdims=True) * target_sum)


def test_matches_numpy_reference():
    counts = _counts()
    t = OmicsTransform.fit(_adata(counts), TRAIN)
    ln = _ref_lognorm(counts)
    mu, sd = ln[:10].mean(0), ln[:10].std(0)
    values, mask = t.transform(_adata(counts))
    assert t.genes == GENES and values.dtype == np.float32 and mask.dtype == bool and mask.all()
    np.testing.assert_allclose(t.mean, mu, rtol=1e-5)
    np.testing.assert_allclose(t.std, sd, rtol=1e-5)
    np.testing.assert_allclose(values, (ln - mu) / sd, rtol=1e-4, atol=1e-4)


def test_counts_layer_is_used_and_sparse_equals_dense():
    counts = _counts()
    dense = OmicsTransform.fit(_adata(counts), TRAIN)
    layer = OmicsTransform.fit(_adata(counts, layer=True), TRAIN)
    a = _adata(counts)
    a.X = sp.csr_matrix(a.X)
    sparse = OmicsTransform.fit(a, TRAIN)
    for t in (layer, sparse):
        np.testing.assert_allclose(t.mean, dense.mean, rtol=1e-6)
        np.testing.assert_allclose(t.transform(a)[0], dense.transform(_adata(counts))[0], rtol=1e-5, atol=1e-6)
    assert sp.issparse(a.X) and a.X.dtype == np.float32
    np.testing.assert_array_equal(a.X.toarray(), counts)  # the caller's matrix is not normalised in place


def test_fit_ignores_test_cases():
    counts = _counts()
    changed = counts.copy()
    changed[10:] = np.random.default_rng(9).poisson(50.0, changed[10:].shape) * np.arange(1, len(GENES) + 1)
    for kw in ({}, {"n_top_genes": 3}):
        a = OmicsTransform.fit(_adata(counts), TRAIN, **kw)
        b = OmicsTransform.fit(_adata(changed), TRAIN, **kw)
        assert a.genes == b.genes
        np.testing.assert_array_equal(a.mean, b.mean)
        np.testing.assert_array_equal(a.std, b.std)
    # ... and the training cases do matter (the test above can fail)
    assert not np.array_equal(OmicsTransform.fit(_adata(changed), TRAIN[:5] + ["c12"]).mean, a.mean)


def test_shuffled_panel_gives_identical_values():
    counts = _counts()
    t = OmicsTransform.fit(_adata(counts), TRAIN)
    perm = np.random.default_rng(1).permutation(len(GENES))
    shuffled = _adata(counts[:, perm], genes=[GENES[i] for i in perm])
    np.testing.assert_allclose(t.transform(shuffled)[0], t.transform(_adata(counts))[0], rtol=1e-6)


def test_partial_panel_masks_absent_genes_never_zero_fills():
    counts = _counts()
    t = OmicsTransform.fit(_adata(counts), TRAIN)
    other = _counts(n=5, g=4, seed=3)  # another cohort: 3 vocabulary genes (shuffled) + one unknown gene
    names = ["g5", "gX", "g1", "g0"]
    values, mask = t.transform(_adata(other, cases=[f"o{i}" for i in range(5)], genes=names))
    ln = _ref_lognorm(other)  # its own library sizes
    for j, g in enumerate(GENES):
        if g in names:
            k = names.index(g)
            assert mask[:, j].all()
            np.testing.assert_allclose(values[:, j], (ln[:, k] - t.mean[j]) / t.std[j], rtol=1e-4, atol=1e-4)
        else:
            assert not mask[:, j].any() and (values[:, j] == 0).all()


def test_fixed_panel_keeps_order_and_refuses_unmeasured_genes():
    counts = _counts()
    t = OmicsTransform.fit(_adata(counts), TRAIN, genes=["g6", "g2", "g4"])
    assert t.genes == ["g6", "g2", "g4"]
    ln = _ref_lognorm(counts)  # library size over every measured gene, not just the panel
    np.testing.assert_allclose(t.mean, ln[:10][:, [6, 2, 4]].mean(0), rtol=1e-5)
    with pytest.raises(ValueError, match="not measured in the training data: gZ"):
        OmicsTransform.fit(_adata(counts), TRAIN, genes=["g1", "gZ"])


def test_protein_without_normalisation():
    values = np.random.default_rng(2).lognormal(2.0, 1.0, (14, 5))
    names = [f"p{i}" for i in range(5)]
    t = OmicsTransform.fit(_adata(values, genes=names), TRAIN, normalize=False)
    ref = (values - values[:10].mean(0)) / values[:10].std(0)
    np.testing.assert_allclose(t.transform(_adata(values, genes=names))[0], ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="n_top_genes needs normalize=True"):
        OmicsTransform.fit(_adata(values, genes=names), TRAIN, n_top_genes=2, normalize=False)


def test_save_load_roundtrip_is_exact(tmp_path):
    counts = _counts()
    t = OmicsTransform.fit(_adata(counts), TRAIN, n_top_genes=5, target_sum=1e6)
    path = t.save(tmp_path / "rna_transform.json")
    assert json.loads(path.read_text())["genes"] == t.genes  # plain JSON
    u = OmicsTransform.load(path)
    assert u.genes == t.genes and u.target_sum == 1e6 and u.normalize
    np.testing.assert_array_equal(u.mean, t.mean)
    np.testing.assert_array_equal(u.std, t.std)
    np.testing.assert_array_equal(u.transform(_adata(counts))[0], t.transform(_adata(counts))[0])
    (tmp_path / "bad.json").write_text('{"genes": []}')
    with pytest.raises(ValueError, match="bad.json: not an OmicsTransform file"):
        OmicsTransform.load(tmp_path / "bad.json")


def test_bad_input_is_named():
    counts = _counts()
    counts[3, 2] = -1
    with pytest.raises(ValueError, match="non-negative; bad row.*c3"):
        OmicsTransform.fit(_adata(counts), TRAIN)
    with pytest.raises(ValueError, match="not in the AnnData obs: zz"):
        OmicsTransform.fit(_adata(_counts()), ["c1", "zz"])


def _pbmc_counts():
    """scanpy's real 10x PBMC subset (700 cells × 765 genes). This scanpy stores log1p(normalised) values
    in .raw; each cell's smallest non-zero expm1 value is one count, which recovers integer counts."""
    a = sc.datasets.pbmc68k_reduced()
    e = np.expm1(a.raw.X.toarray().astype(np.float64))
    unit = np.where(e > 0, e, np.inf).min(axis=1, keepdims=True)
    counts = np.round(e / unit)
    assert np.abs(e / unit - counts).max() < 0.2  # really integers up to storage precision
    return ad.AnnData(X=counts.astype(np.float32), obs=pd.DataFrame(index=a.obs_names),
                      var=pd.DataFrame(index=a.raw.var_names))


def _seurat_hvg(logx, n, n_bins=20):
    """NumPy reimplementation of Seurat's mean.var.plot dispersion ranking (scanpy flavor='seurat')."""
    x = np.expm1(logx)
    mean, var = x.mean(0), x.var(0, ddof=1)
    mean[mean == 0] = 1e-12
    disp = var / mean
    disp[disp == 0] = np.nan
    disp, lmean = np.log(disp), np.log1p(mean)
    bins = pd.cut(lmean, n_bins).codes
    norm = np.full_like(disp, np.nan)
    for b in np.unique(bins):
        d = disp[bins == b]
        avg, dev = np.nanmean(d), (np.nanstd(d, ddof=1) if np.isfinite(d).sum() > 1 else np.nan)
        if np.isnan(dev):  # a lone gene in its bin counts as normalised dispersion 1
            avg, dev = 0.0, avg
        norm[bins == b] = (d - avg) / dev
    return set(np.argsort(-np.nan_to_num(norm, nan=-np.inf), kind="stable")[:n])


def test_hvg_on_real_pbmc68k_matches_reference_and_uses_train_only():
    a = _pbmc_counts()
    rng = np.random.default_rng(0)
    train = list(rng.choice(a.obs_names, 500, replace=False))
    t = OmicsTransform.fit(a, train, n_top_genes=200)
    assert len(t.genes) == 200
    rows = a.obs_names.get_indexer(train)
    ref = _seurat_hvg(_ref_lognorm(a.X[rows].astype(np.float64)), 200)
    assert set(t.genes) == {a.var_names[i] for i in ref}
    assert t.genes == [g for g in a.var_names if g in set(t.genes)]  # original order kept
    values, mask = t.transform(a)
    np.testing.assert_allclose(values[rows].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(values[rows].std(0), 1, atol=1e-3)
    assert mask.all()
    # HVGs chosen on all 700 cells differ: the 200 held-out cells were not consulted
    assert set(OmicsTransform.fit(a, list(a.obs_names), n_top_genes=200).genes) != set(t.genes)


@pytest.fixture(scope="module")
def count_tables(tmp_path_factory):
    """float32 count matrices the project feeds omics: the simulator's RNA counts, real PBMC counts, fractional
    values, and one with a zero-count cell, an unexpressed gene, a gene of constant counts, two identical genes (tied
    dispersions) and genes alone in their mean bin."""
    sim = ad.read_h5ad(simulate_tiny(tmp_path_factory.mktemp("sim") / "cohort") / "rna.h5ad").X
    pbmc = _pbmc_counts().X
    edge = pbmc[:, :120].copy()
    edge[:, 5], edge[:, 7], edge[:, 11] = 0, 2, edge[:, 10]
    edge[3] = 0
    # a row whose float64 total sits on a float32 rounding tie: 2^40 + 2^16, plus 126 values too small to move a
    # running sum, though a pairwise one keeps them: only scanpy's sequential order gives its size factor
    wide = np.vstack([np.r_[2.0**40, 2.0**16, np.full(126, 2.0**-14)], pbmc[:3, :128]]).astype(np.float32)
    return {"simulator": np.asarray(sim, np.float32), "pbmc": pbmc, "edge": edge, "wide range": wide,
            "fractional": (pbmc[:200, :300] * np.float32(1.37)).astype(np.float32) / 3,
            "identical rows": np.repeat(sim[:1], 6, axis=0), "one cell": sim[:1]}


def _scanpy(x, target_sum=1e4):
    """scanpy's own normalize_total → log1p on a fresh float32 copy (what mmfm called before)."""
    out = counts_of(ad.AnnData(x))
    with pytest.warns(UserWarning, match="zero counts") if (np.asarray(x.sum(axis=1)) == 0).any() else \
            contextlib.nullcontext():
        sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    return out


def _scanpy_dispersions(a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # log of a zero-variance gene's NaN, as ours
        return sc.pp.highly_variable_genes(a, n_top_genes=1, flavor="seurat", inplace=False)


def _variants(x):
    return {"dense": x, "csr": sp.csr_matrix(x)}


def test_log_normalize_is_scanpys_to_the_bit(count_tables):
    for name, counts in count_tables.items():
        for kind, x in _variants(counts).items():
            for target_sum in (1e4, 1e6):
                got, ref = log_normalize(ad.AnnData(x), target_sum=target_sum), _scanpy(x, target_sum)
                assert sp.issparse(got.X) == sp.issparse(ref.X) and got.X.dtype == ref.X.dtype == np.float32
                g, r = (m.toarray() if sp.issparse(m) else m for m in (got.X, ref.X))
                assert np.array_equal(g, r), (name, kind, target_sum, np.abs(g - r).max())
                assert got.uns["log1p"] == ref.uns["log1p"]
    assert (log_normalize(ad.AnnData(count_tables["edge"])).X[3] == 0).all()  # an empty cell stays 0


def test_seurat_dispersions_are_scanpys_to_the_bit(count_tables):
    """dispersions_norm equal bit for bit, NaN where scanpy has NaN, and top_variable's order is scanpy's ranking.
    CSR too, though scanpy's sparse sums go per numba thread: checked with NUMBA_NUM_THREADS=1, 2, 3 and 16."""
    for name, counts in count_tables.items():
        for kind, x in _variants(counts).items():
            ln = _scanpy(x)
            ref = _scanpy_dispersions(ln)["dispersions_norm"].to_numpy()
            got = seurat_dispersions(ln.X)
            assert np.array_equal(got, ref, equal_nan=True), (name, kind, np.nanmax(np.abs(got - ref)))
            order = np.argsort(-np.nan_to_num(ref, nan=-np.inf), kind="stable")
            np.testing.assert_array_equal(top_variable(ln, ln.n_vars), order)
    ln = _scanpy(count_tables["edge"])
    edge, means = seurat_dispersions(ln.X), _scanpy_dispersions(ln)["means"]
    codes = pd.cut(means, 20).cat.codes.to_numpy()
    lone = (np.bincount(codes)[codes] == 1) & ~np.isnan(edge)
    assert np.isnan(edge[5]) and edge[10] == edge[11]  # unexpressed, tied
    assert lone.sum() >= 2 and (edge[lone] == 1).all()  # a gene alone in its mean bin scores 1


def test_top_variable_takes_exactly_n_ties_in_gene_order(count_tables):
    """scanpy keeps every gene tied at its cut-off; top_variable keeps exactly n, the earlier gene of a tie."""
    ln = _scanpy(count_tables["edge"])
    ref = _scanpy_dispersions(ln)["dispersions_norm"].to_numpy()
    rank = list(np.argsort(-np.nan_to_num(ref, nan=-np.inf), kind="stable"))
    n = rank.index(10) + 1  # the cut-off falls between the tied genes 10 and 11
    assert rank[n] == 11
    hv = sc.pp.highly_variable_genes(ln, n_top_genes=n, flavor="seurat", inplace=False)["highly_variable"]
    got = top_variable(ln, n)
    assert hv.sum() == n + 1 and len(got) == n and 10 in got and 11 not in got
    assert set(got) < set(np.flatnonzero(hv))
    assert list(top_variable(ln, 1)) == [int(np.nanargmax(ref))]
    every = top_variable(ln, ln.n_vars + 5)  # more than there are: all, the NaN (unexpressed) genes last
    assert sorted(every) == list(range(ln.n_vars)) and every[-1] == 5
