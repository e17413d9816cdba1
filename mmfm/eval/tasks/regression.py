"""`regression`: continuous targets from case-level embeddings — genes of the cohort's rna.h5ad, proteins of
protein.h5ad, or numeric obs columns (cases.csv) — per embedding × fold, on patient-level folds.

Targets: `names` names them (globs allowed); RNA without `names` takes the top-`hvg` highly variable genes
(scanpy's seurat dispersion, mmfm.data.omics.top_variable) of each TRAINING fold, so the test cases never choose
what is predicted (the genes may differ between folds; every embedding of a fold predicts the same genes).
Transform (stated in the notes): RNA and protein get the modality's own normalisation (library size to 1e4, log1p:
mmfm.data.omics.log_normalize), obs columns none; `transform` overrides. The tile bags and omics files come from
the cohort the embeddings were made from (`uns['cohort']`) or the task's `cohort` key.

Rows per fold: `pearson_mean`, `pearson_median`, `spearman_mean`, `r2_mean`, `n_significant` (targets with r > 0
and Benjamini–Hochberg q ≤ `fdr` within the fold, SEQUOIA-style), their `chance_*` twins from the permutation
null on the same fold, and bookkeeping (`alpha` = median ridge α, `n_targets`, `n_test`, `n_train`). Per-target
scores (r, its p and q, ρ, R²) go to per_target.csv with a plot of per-target r, model against baseline.
The null shuffles the training targets, so it learns no direction: its mean r is ~0, but with very few features
(a one-column covariate baseline) a fitted direction of random sign still correlates with the genes that truly
covary with them, and `chance_n_significant` is then well above 0 — read it per column, not as one number.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd

from mmfm.data.omics import counts_of, log_normalize
from mmfm.eval.probes import regression
from mmfm.eval.tasks.base import (Collector, FoldSpec, Target, TaskError, case_features, case_values, fold_sides,
                                  result_key, row_groups)

TRANSFORMS = {"rna": "normalize_log1p", "protein": "normalize_log1p", "obs": "none"}


@dataclass(frozen=True, kw_only=True)
class RegressionSpec(FoldSpec):
    source: Literal["rna", "protein", "obs"] = "rna"  # the cohort's rna.h5ad / protein.h5ad, or obs columns
    names: tuple[str, ...] = ()  # target genes / proteins / obs columns (globs allowed); rna default: top-`hvg`
    hvg: int = 50  # rna without `names`: the top-k highly variable genes of each training fold
    transform: Literal["normalize_log1p", "log1p", "none"] | None = None  # default: rna/protein normalize_log1p
    model: Literal["ridge", "mlp"] = "ridge"
    alphas: tuple[float, ...] = regression.ALPHAS  # ridge α grid (per target, leave-one-out on the training fold)
    pca: int | None = None  # PCA-k of the features fitted on the training fold (HEST: 256)
    standardize: bool = False  # z-score features with the training fold's mean/SD (before the PCA)
    hidden: int = 256  # mlp: hidden units
    permutations: int = 1  # permutation-null fits per fold (the chance_* rows, averaged); 0: none
    fdr: float = 0.05  # Benjamini–Hochberg level of n_significant
    cohort: str | None = None  # cohort holding rna.h5ad / protein.h5ad (default: the embeddings' cohort)

    def __post_init__(self):
        if self.source == "obs" and not self.names:
            raise ValueError("source 'obs' needs key 'names' (numeric obs columns)")
        if self.source != "rna" and self.hvg != 50 and not self.names:
            raise ValueError("'hvg' picks genes of source 'rna' only")
        if self.hvg < 1 or not 0 < self.fdr < 1 or self.permutations < 0:
            raise ValueError("'hvg' must be >= 1, 'fdr' in (0, 1), 'permutations' >= 0")

    @property
    def how(self) -> str:
        return self.transform or TRANSFORMS[self.source]

    def values(self, adata: ad.AnnData) -> pd.DataFrame:
        """Transformed target values, cases × features (every named or candidate target), float64."""
        if self.source == "obs":
            cols = _match(self, [str(c) for c in adata.obs.columns])
            df = pd.DataFrame({c: pd.to_numeric(case_values(adata, self, "names", c), errors="coerce")
                               for c in cols}).dropna()
            return _transform(self, df)
        root = self.cohort or adata.uns.get("cohort")
        if not root:
            raise TaskError(f"task {self.name!r}: source {self.source!r} needs the cohort: the embeddings record "
                            "none; give key 'cohort'")
        path = Path(str(root)) / f"{self.source}.h5ad"
        if not path.is_file():
            raise TaskError(f"task {self.name!r}: source {self.source!r}: {path} not found")
        omics = ad.read_h5ad(path)
        try:
            x = (log_normalize(omics) if self.how == "normalize_log1p" else counts_of(omics)).to_df()
        except ValueError as e:
            raise TaskError(f"task {self.name!r}: {path}: {e}") from e
        x = np.log1p(x) if self.how == "log1p" else x
        return x[_match(self, list(x.columns))] if self.names else x

    def targets(self, adata, notes):
        y = self.values(adata)
        cases = y.index.astype(str).intersection(pd.Index(np.unique(row_groups(adata, self))))
        if len(cases) < 4:
            raise TaskError(f"task {self.name!r}: {len(cases)} case(s) have both an embedding row and "
                            f"{self.source} targets; a regression probe needs at least 4")
        what = (f"top-{self.hvg} highly variable genes of each training fold" if self.source == "rna"
                and not self.names else f"{y.shape[1]} target(s)")
        notes.append(f"{self.name}: {self.source} targets, {what}, transform {self.how}; {self.model}"
                     f"{f' on PCA-{self.pca}' if self.pca else ''}; chance = permutation null "
                     f"({self.permutations} fit(s) per fold)")
        return {"": (cases, None)}


def _match(spec: RegressionSpec, names: list[str]) -> list[str]:
    out: list[str] = []
    for pat in spec.names:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise TaskError(f"task {spec.name!r}: key 'names' entry {pat!r} matches no {spec.source} "
                            f"{'column' if spec.source == 'obs' else 'feature'}")
        out += [h for h in hits if h not in out]
    return out


def _transform(spec: RegressionSpec, df: pd.DataFrame) -> pd.DataFrame:
    if spec.how == "none":
        return df.astype(np.float64)
    if (df < 0).any().any():
        raise TaskError(f"task {spec.name!r}: transform {spec.how!r} needs non-negative targets")
    if spec.how == "log1p":
        return np.log1p(df.astype(np.float64))
    raise TaskError(f"task {spec.name!r}: transform 'normalize_log1p' is for rna / protein sources")


def chosen(spec: RegressionSpec, y_train: pd.DataFrame) -> list[str]:
    """The targets of one fold: the named ones, or the top-`hvg` genes of the training cases' values only."""
    if spec.source != "rna" or spec.names:
        return list(y_train.columns)
    if spec.how != "normalize_log1p":
        raise TaskError(f"task {spec.name!r}: 'hvg' ranks log-normalised counts; use transform normalize_log1p "
                        "or name the genes in 'names'")
    return regression.top_genes(y_train, spec.hvg)


def run(adata, spec: RegressionSpec, targets: list[Target], col: Collector) -> None:
    (target,) = targets
    y_all = spec.values(adata)
    y_all.index = y_all.index.astype(str)
    folds = target.folds
    genes = {fc: chosen(spec, y_all.loc[fold_sides(folds, fc, folds.index)[0]]) for fc in folds.columns}
    for emb in spec.probe_embeddings():
        feats = case_features(adata, spec, emb)
        cases = feats.index.intersection(y_all.index)
        for i, fc in enumerate(folds.columns):
            tr, te = fold_sides(folds, fc, cases)
            if len(tr) < 3 or len(te) < 3:
                col.notes.append(f"{spec.name} {emb} {fc}: skipped ({len(tr)} training / {len(te)} test cases)")
                continue
            y = y_all[genes[fc]]
            score_fold(spec, col, emb, i, feats.loc[tr].to_numpy(), y.loc[tr].to_numpy(), feats.loc[te].to_numpy(),
                       y.loc[te].to_numpy(), genes[fc], single=folds.shape[1] == 1)


def score_fold(spec, col: Collector, emb: str, i: int, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
               y_test: np.ndarray, names: list[str], single: bool) -> None:
    """One embedding × fold of a regression-type spec (`regression`, `spots`): features fitted on the training rows
    (z-score, PCA-k), the model, the per-target scores and their summary, the permutation null, bookkeeping."""
    fit = {"model": spec.model, "alphas": spec.alphas, "hidden": spec.hidden}
    t0 = time.perf_counter()
    f = regression.Features(x_train, pca=spec.pca, standardize=spec.standardize, seed=spec.seed)
    xte = f(x_test)
    pred, alpha = regression.fit_predict(f.train, y_train, xte, seed=spec.seed, **fit)
    key = result_key(spec, emb, model="" if spec.model == "ridge" else spec.model)  # ridge: the default linear probe
    col.evaluate(key, i, len(y_test), lambda idx: regression.summary(regression.per_target(y_test[idx], pred[idx]),
                                                                     spec.fdr), single, spec.seed)
    wall = time.perf_counter() - t0
    if spec.permutations:
        null = regression.permutation_null(f.train, y_train, xte, y_test, permutations=spec.permutations,
                                           fdr=spec.fdr, seed=spec.seed + i, **fit)
        col.add(key, i, {f"chance_{k}": v for k, v in null.items()})
    col.add(key, i, {"alpha": float(np.median(alpha)), "n_targets": len(names), "n_test": len(y_test),
                     "n_train": len(y_train), "wall_s": wall})
    s = regression.per_target(y_test, pred)
    col.per_target.append(pd.DataFrame({"task": spec.name, "embedding": emb, "model": spec.model, "fold": i,
                                        "target": names, **s, "q": regression.bh(s["p"]), "alpha": alpha}))
