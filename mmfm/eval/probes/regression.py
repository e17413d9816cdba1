"""Regression probe: continuous targets (genes, proteins, clinical numbers) from embeddings, scored per target.

The field's readouts: bulk (HE2RNA, SEQUOIA) report per-gene Pearson r on held-out patients and how many genes are
significantly predicted after Benjamini–Hochberg FDR control; spot-level (HEST-Benchmark) PCA-256 + ridge on tile
embeddings, Pearson per gene over the top-50 highly variable genes. Everything that is fitted — the gene choice,
the PCA, the feature scaling, the ridge α (per target, efficient leave-one-out CV of sklearn's RidgeCV) — sees the
training fold only. The chance reference is a permutation null: the same model fitted on training targets whose
rows are shuffled against the features, scored on the same test fold.
"""

from __future__ import annotations

import warnings
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
from scipy import stats as sps
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import RidgeCV
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from mmfm.data.omics import top_variable

ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 15))  # ridge grid, chosen per target by LOO on the train fold
MODELS = ("ridge", "mlp")
SUMMARY = ("pearson_mean", "pearson_median", "spearman_mean", "r2_mean", "n_significant")


def top_genes(y_train: pd.DataFrame, k: int) -> list[str]:
    """The k most variable genes (scanpy seurat dispersion of log1p values) of the TRAINING rows, in column order."""
    idx = top_variable(ad.AnnData(y_train.to_numpy(np.float32), var=pd.DataFrame(index=y_train.columns)),
                       min(k, y_train.shape[1]))
    return list(y_train.columns[np.sort(idx)])


def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q); NaN p counts as 1 (an undefined correlation is no discovery)."""
    p = np.where(np.isfinite(p), np.asarray(p, np.float64), 1.0)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p)
    q = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(q[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def pearson(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: (Pearson r, two-sided p of r = 0 under normality); NaN where a column is constant."""
    n = len(y)
    yc, pc = y - y.mean(0), pred - pred.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (yc * pc).sum(0) / np.sqrt((yc ** 2).sum(0) * (pc ** 2).sum(0))
        r = np.clip(r, -1.0, 1.0)
        t = r * np.sqrt((n - 2) / np.maximum(1.0 - r ** 2, 1e-300))
    p = 2.0 * sps.t.sf(np.abs(t), n - 2) if n > 2 else np.full(r.shape, np.nan)
    return r, np.where(np.isfinite(r), p, np.nan)


def per_target(y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per target: Pearson r and its p, Spearman ρ, R² (1 − SSE/SST on these rows; NaN for a constant target)."""
    r, p = pearson(y, pred)
    rho, _ = pearson(sps.rankdata(y, axis=0), sps.rankdata(pred, axis=0))
    sst = ((y - y.mean(0)) ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(sst > 0, 1.0 - ((y - pred) ** 2).sum(0) / sst, np.nan)
    return {"pearson": r, "p": p, "spearman": rho, "r2": r2}


def summary(scores: dict[str, np.ndarray], fdr: float = 0.05) -> dict[str, float]:
    """Per task: mean / median r over targets, mean ρ and R², and how many targets have BH q ≤ fdr and r > 0."""
    r = scores["pearson"]
    sig = (bh(scores["p"]) <= fdr) & (np.nan_to_num(r) > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (e.g. one test row)
        return {"pearson_mean": float(np.nanmean(r)), "pearson_median": float(np.nanmedian(r)),
                "spearman_mean": float(np.nanmean(scores["spearman"])), "r2_mean": float(np.nanmean(scores["r2"])),
                "n_significant": float(sig.sum())}


class Features:
    """The feature side fitted on the training fold: optional z-score, optional PCA-k (HEST's PCA-256)."""

    def __init__(self, x_train: np.ndarray, *, pca: int | None = None, standardize: bool = False, seed: int = 0):
        self.scaler = StandardScaler().fit(x_train) if standardize else None
        x = self.scaler.transform(x_train) if self.scaler else x_train
        k = None if pca is None else min(pca, *x.shape)
        self.pca = PCA(n_components=k, random_state=seed).fit(x) if k else None
        self.train = self(x_train)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self.scaler.transform(x) if self.scaler else x
        return self.pca.transform(x) if self.pca else x


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *,
                model: Literal["ridge", "mlp"] = "ridge", alphas=ALPHAS, hidden: int = 256,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fit on (already transformed) training features; return (test predictions [n_test, T], α per target).

    ridge: sklearn RidgeCV, α per target from `alphas` by efficient leave-one-out on the training rows (one α:
    fixed). mlp: one hidden layer (`hidden` units, ReLU, Adam, early stopping on 10% of the training rows) on
    z-scored targets; its α column is the L2 penalty (1e-4)."""
    if model == "ridge":
        with threadpool_limits(1, user_api="blas"):  # small dense solves: threads only contend (4-7× CPU, loaded)
            return _ridge(x_train, y_train, x_test, tuple(alphas))
    if model == "mlp":
        ys = StandardScaler().fit(y_train)
        m = MLPRegressor(hidden_layer_sizes=(hidden,), alpha=1e-4, early_stopping=len(x_train) >= 20,
                         max_iter=500, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m.fit(x_train, ys.transform(y_train))
        pred = ys.inverse_transform(m.predict(x_test).reshape(len(x_test), -1))
        return pred, np.full(y_train.shape[1], 1e-4)
    raise ValueError(f"unknown regression model {model!r}; expected one of {MODELS}")


def _ridge(x_train, y_train, x_test, alphas: tuple) -> tuple[np.ndarray, np.ndarray]:
    m = RidgeCV(alphas=np.asarray(alphas, float), alpha_per_target=len(alphas) > 1).fit(x_train, y_train)
    pred = m.predict(x_test).reshape(len(x_test), -1)  # sklearn drops the axis of a single target
    return pred, np.broadcast_to(np.asarray(m.alpha_, float), (y_train.shape[1],)).copy()


def permutation_null(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
                     permutations: int, fdr: float, seed: int, **fit) -> dict[str, float]:
    """Mean summary over `permutations` fits on training targets shuffled (rows) against the features. Ridge fits
    every permutation at once (their targets side by side: α and fit are per target, the features' decomposition
    is shared), the MLP one permutation at a time."""
    rng = np.random.default_rng(seed)
    shuffled = [y_train[rng.permutation(len(y_train))] for _ in range(permutations)]
    if fit.get("model", "ridge") == "ridge":
        pred, _ = fit_predict(x_train, np.hstack(shuffled), x_test, seed=seed, **fit)
        preds = np.split(pred, permutations, axis=1)
    else:
        preds = [fit_predict(x_train, y, x_test, seed=seed, **fit)[0] for y in shuffled]
    runs = [summary(per_target(y_test, p), fdr) for p in preds]
    return {k: float(np.mean([r[k] for r in runs])) for k in SUMMARY}
