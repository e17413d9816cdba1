"""Omics preprocessing fitted on training cases only and saved as JSON, so inference repeats it exactly.

counts (`layers['counts']` if present, else X) → library-size normalisation to `target_sum` → log1p
(scanpy's `pp.normalize_total` and `pp.log1p`, to the bit) → a feature vocabulary (highly variable genes of
the training cases, a fixed panel, or every gene) → per-feature z-score with the training cases' mean
and standard deviation. Normalisation uses each sample's own library only, so it leaks nothing;
the vocabulary and the z-score statistics see training cases only.

Vocabulary alignment: a cohort that does not measure a vocabulary gene gets mask False (value 0) in
that column. Zero-filling it as if measured would read "not measured" as "not expressed".
Library sizes are summed over the genes a cohort measures, so cohorts with very different panels
are best aligned on a shared fixed panel (`genes=`). Protein panels use the same class; `normalize=False` skips library-size normalisation and log1p
for panels already on a log scale.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from mmfm.io import id_list, write_json

FORMAT = "mmfm.OmicsTransform/1"
MIN_STD = 1e-6  # a constant feature is centred but not divided by ~0

# scanpy's arithmetic is reproduced below in NumPy/pandas instead of calling it: importing scanpy (numba, llvmlite,
# pyplot) costs about a second of GIL-holding start-up in every process that touches omics (the demo, each CLI
# command, notebook kernels). tests/test_omics.py checks every step against scanpy itself, bit for bit.


def counts_of(adata: AnnData) -> AnnData:
    """A float32 AnnData of the raw counts (`layers['counts']` if present, else X), checked finite and ≥ 0."""
    x = adata.layers["counts"] if "counts" in adata.layers else adata.X
    x = sp.csr_matrix(x, dtype=np.float32, copy=True) if sp.issparse(x) else np.array(x, dtype=np.float32)
    vals = x.data if sp.issparse(x) else x
    bad = ~np.isfinite(vals) | (vals < 0)
    if bad.any():
        rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))[bad] if sp.issparse(x) else \
            np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"omics counts must be finite and non-negative; bad row(s) for case(s) "
                         f"{id_list(adata.obs_names[np.unique(rows)])}")
    if not adata.var_names.is_unique:
        raise ValueError("omics var_names (genes/proteins) must be unique")
    return AnnData(X=x, obs=pd.DataFrame(index=adata.obs_names.astype(str)),
                   var=pd.DataFrame(index=adata.var_names.astype(str)))


def _library_sizes(x) -> np.ndarray:
    """Per-row totals as scanpy's normalize_total takes them: NumPy's float32 row sum for a dense matrix; for CSR
    its numba kernel's running float64 sum in storage order, rounded to the data's dtype."""
    if not sp.issparse(x):
        return np.sum(x, axis=1)
    length, start = np.diff(x.indptr), x.indptr[:-1]
    total = np.zeros(x.shape[0])
    for k in range(length.max(initial=0)):  # k-th stored value of every row that has one: row order kept
        live = length > k
        total[live] += x.data[start[live] + k]
    return total.astype(x.dtype)


def log_normalize(adata: AnnData, normalize: bool = True, target_sum: float = 1e4) -> AnnData:
    """counts → normalize_total(target_sum) → log1p (or the counts unchanged when `normalize` is False).

    scanpy's steps and dtypes: float32 size factors (library size / target_sum, a zero one read as 1, so an
    empty row stays 0), a float32 division, log1p in place."""
    out = counts_of(adata)
    if normalize:
        x = out.X
        scale = _library_sizes(x) / target_sum
        scale = scale + (scale == 0)
        if sp.issparse(x):
            x.data = np.log1p(x.data / np.repeat(scale, np.diff(x.indptr)))
        else:
            np.log1p(np.true_divide(x, scale[:, None], out=x), out=x)
        out.uns["log1p"] = {"base": None}  # what scanpy's log1p records, for scanpy users of the result
    return out


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def seurat_dispersions(x) -> np.ndarray:
    """Normalised dispersion per gene of log1p data `x`: scanpy's `highly_variable_genes(flavor="seurat")`
    `dispersions_norm` (Seurat's mean.var.plot). On expm1(x): log(sample variance / mean) (a zero one NaN),
    standardised by the mean and sample std (pandas') of the genes in its bin of log1p(mean) (20 equal-width
    bins, pd.cut); a bin without a std (one gene) uses mean 0 and std = its mean, so a lone gene scores 1.
    Bit-equal to scanpy for dense input. Sparse input is densified: scanpy's sparse mean and variance add per
    numba thread instead, the same bits on every table tested (tests/test_omics.py) but not by construction.
    """
    x = x.toarray() if sp.issparse(x) else np.array(x, order="C")
    np.expm1(x, out=x)
    n = x.shape[0]
    mean = x.mean(axis=0, dtype=np.float64)
    var = (x * x).mean(axis=0, dtype=np.float64) - mean**2
    if n != 1:
        var *= n / (n - 1)
    mean[mean == 0] = 1e-12
    disp = var / mean
    disp[disp == 0] = np.nan
    with np.errstate(invalid="ignore"):  # a constant gene's variance may round below 0: NaN, as in scanpy
        disp = pd.Series(np.log(disp))
    bins = pd.cut(pd.Series(np.log1p(mean)), bins=20)
    stats = disp.groupby(bins, observed=True).agg(["mean", "std"])
    lone = stats["std"].isnull()
    stats.loc[lone, "std"] = stats.loc[lone, "mean"]
    stats.loc[lone, "mean"] = 0
    stats = stats.loc[bins]
    return ((disp - stats["mean"].to_numpy()) / stats["std"].to_numpy()).to_numpy()


def top_variable(adata: AnnData, n: int) -> np.ndarray:
    """Column indices of the n genes of highest normalised dispersion (`seurat_dispersions`, NaN last).

    Exactly n, ties broken by gene order: scanpy's own cut-off keeps every tie, which would make the
    vocabulary size (a static batch shape) depend on the data.
    """
    disp = np.nan_to_num(seurat_dispersions(adata.X), nan=-np.inf)
    return np.argsort(-disp, kind="stable")[:n]


@dataclass
class OmicsTransform:
    """A fitted transform: vocabulary `genes` and their training mean/std on the log-normalised scale."""

    genes: list[str]
    mean: np.ndarray = field(repr=False)  # float64 [G]
    std: np.ndarray = field(repr=False)  # float64 [G], ≥ MIN_STD
    normalize: bool = True
    target_sum: float = 1e4

    @classmethod
    def fit(cls, adata: AnnData, train_case_ids, n_top_genes: int | None = None, genes=None,
            target_sum: float = 1e4, normalize: bool = True) -> OmicsTransform:
        """Fit on the rows of `train_case_ids` only.

        genes: fixed panel (order kept); every panel gene must be measured in `adata`.
        n_top_genes: keep the n most variable genes (scanpy 'seurat' flavour) of the training cases,
        among the panel if one is given, in their original order; when n ≥ the candidates, all are kept.
        """
        train = list(dict.fromkeys(str(c) for c in train_case_ids))
        obs = adata.obs_names.astype(str)
        unknown = [c for c in train if c not in set(obs)]
        if unknown:
            raise ValueError(f"OmicsTransform.fit: training case(s) not in the AnnData obs: {id_list(unknown)}")
        if not train:
            raise ValueError("OmicsTransform.fit: no training cases")
        rows = obs.get_indexer(train)
        sub = log_normalize(adata[rows], normalize, target_sum)
        var = sub.var_names.astype(str)
        if genes is None:
            cand = list(var)
        else:
            cand = [str(g) for g in genes]
            missing = [g for g in cand if g not in set(var)]
            if missing:
                raise ValueError(f"OmicsTransform.fit: panel gene(s) not measured in the training data: "
                                 f"{id_list(missing)}")
            if len(set(cand)) != len(cand):
                raise ValueError("OmicsTransform.fit: the gene panel has duplicates")
        sub = sub[:, cand]
        if n_top_genes is not None and n_top_genes < len(cand):
            if n_top_genes < 1:
                raise ValueError(f"OmicsTransform.fit: n_top_genes must be ≥ 1, got {n_top_genes}")
            if not normalize:  # the dispersion ranking undoes log1p; on raw values it is meaningless
                raise ValueError("OmicsTransform.fit: n_top_genes needs normalize=True (use a fixed panel instead)")
            sub = sub[:, np.sort(top_variable(sub, n_top_genes))]
        x = _dense(sub.X)
        std = x.std(axis=0)
        return cls(genes=[str(g) for g in sub.var_names], mean=x.mean(axis=0),
                   std=np.where(std < MIN_STD, 1.0, std), normalize=normalize, target_sum=float(target_sum))

    def transform(self, adata: AnnData) -> tuple[np.ndarray, np.ndarray]:
        """(values float32 [n_obs, G], mask bool [n_obs, G]) on `.genes`; unmeasured genes masked, value 0."""
        x = log_normalize(adata, self.normalize, self.target_sum)
        idx = x.var_names.astype(str).get_indexer(self.genes)
        have = idx >= 0
        values = np.zeros((adata.n_obs, len(self.genes)), np.float32)
        values[:, have] = (_dense(x.X[:, idx[have]]) - self.mean[have]) / self.std[have]
        mask = np.broadcast_to(have, values.shape).copy()
        return values, mask

    def to_dict(self) -> dict:
        return {"format": FORMAT, "normalize": self.normalize, "target_sum": self.target_sum,
                "genes": list(self.genes), "mean": self.mean.tolist(), "std": self.std.tolist()}

    def save(self, path: str | os.PathLike) -> Path:
        """JSON (floats written with full precision, so load() restores the transform exactly)."""
        write_json(path, self.to_dict(), indent=None)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> OmicsTransform:
        d = json.loads(Path(path).read_text())
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{path}: not an OmicsTransform file (format {FORMAT!r} expected)")
        mean, std = np.asarray(d["mean"], np.float64), np.asarray(d["std"], np.float64)
        if not len(d["genes"]) == len(mean) == len(std):
            raise ValueError(f"{path}: genes/mean/std lengths differ")
        return cls(genes=[str(g) for g in d["genes"]], mean=mean, std=std, normalize=bool(d["normalize"]),
                   target_sum=float(d["target_sum"]))
