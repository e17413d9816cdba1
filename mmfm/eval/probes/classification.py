"""Linear probe for classification and mutation tasks (Patho-Bench protocol).

sklearn LogisticRegression, lbfgs, max_iter 10000, random_state 0, by default NO feature scaling (embeddings are
compared as they come out of the encoder, as Patho-Bench does); `standardize=True` z-scores every feature with the
mean/SD of the data the model is fitted on (a StandardScaler in the same pipeline: the training fold, and each inner
fold of a C sweep), so embeddings of different scale and width meet the same C on equal terms. C is fixed (0.5 with
balanced class weights, the shipped Patho-Bench/THREADS setting) or chosen from a grid by inner cross-validation on
the training fold only: public splits have no validation fold, and picking C on the test fold is leakage.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from scipy.stats import rankdata
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

C_GRID = tuple(float(c) for c in np.logspace(-5, 6, 45))
"""Patho-Bench's 'auto' sweep: 45 log-spaced costs between 1e-5 and 1e6."""

METRICS = ("auroc", "bacc", "kappa", "f1")


def _logreg(C: float, balanced: bool) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=10000, random_state=0, class_weight="balanced" if balanced else None)


def _fit(x: np.ndarray, y: np.ndarray, C: float, balanced: bool,
         standardize: bool = False) -> LogisticRegression | Pipeline:
    model = make_pipeline(StandardScaler(), _logreg(C, balanced)) if standardize else _logreg(C, balanced)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def _proba(model: LogisticRegression | Pipeline, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities over ALL classes 0..n_classes-1 (a class absent from training gets 0)."""
    p = np.zeros((len(x), n_classes))
    p[:, model.classes_] = model.predict_proba(x)
    return p


def select_C(x: np.ndarray, y: np.ndarray, grid, *, balanced: bool, inner_folds: int = 3, seed: int = 0,
             standardize: bool = False) -> float:
    """C with the lowest mean validation log-loss over stratified inner folds of the TRAINING data."""
    counts = np.bincount(y)
    n_splits = min(inner_folds, int(counts[counts > 0].min()))
    if n_splits < 2:
        raise ValueError(f"cannot sweep C: a class has {counts[counts > 0].min()} training sample(s); fix C instead")
    folds = list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(x, y))
    classes = np.unique(y)
    losses = []
    for C in grid:
        loss = 0.0
        for tr, va in folds:
            m = _fit(x[tr], y[tr], C, balanced, standardize)
            p = np.zeros((len(va), len(classes)))
            p[:, np.searchsorted(classes, m.classes_)] = m.predict_proba(x[va])
            loss += log_loss(y[va], p, labels=classes)
        losses.append(loss)
    return float(grid[int(np.argmin(losses))])


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int, *,
                C: float | str = 0.5, balanced: bool = True, seed: int = 0,
                standardize: bool = False) -> tuple[np.ndarray, float]:
    """Fit on the training fold, return (test probabilities [n_test, n_classes], the C used).

    `C='auto'` sweeps `C_GRID`; a list sweeps that list; both by inner CV on the training fold.
    `standardize`: z-score features with the training fold's mean/SD (also inside each inner fold).
    """
    if isinstance(C, str) or np.ndim(C) > 0:
        C = select_C(x_train, y_train, C_GRID if isinstance(C, str) else tuple(C), balanced=balanced, seed=seed,
                     standardize=standardize)
    model = _fit(x_train, y_train, float(C), balanced, standardize)
    return _proba(model, x_test, n_classes), float(C)


def binary_auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve as the Mann–Whitney statistic (tied scores: mid-ranks, half credit) — sklearn's
    trapezoidal area up to float rounding, without its per-call input validation (~2 ms; a demo's probes and
    bootstraps call this thousands of times, holding the GIL their threads share)."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    return float((rankdata(score)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(y: np.ndarray, proba: np.ndarray) -> float:
    """Binary AUROC on the positive column; multiclass macro one-vs-rest. NaN when undefined (one class in y)."""
    n_classes = proba.shape[1]
    present = np.unique(y)
    if present.size < 2:
        return float("nan")
    if n_classes == 2:
        return binary_auroc(y == 1, proba[:, 1])
    if present.size < n_classes:  # one-vs-rest needs every class in y
        return float("nan")
    return float(np.mean([binary_auroc(y == c, proba[:, c]) for c in range(n_classes)]))


def metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Patho-Bench classification metrics: macro-OvR AUROC, balanced accuracy, quadratic kappa, macro F1 — from one
    confusion matrix, with sklearn's definitions (balanced_accuracy_score, cohen_kappa_score(weights='quadratic'),
    f1_score(average='macro', zero_division=0); the tests hold them to it), not its per-call validation."""
    y = np.asarray(y, np.int64)
    k = proba.shape[1]
    pred = proba.argmax(1)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)  # rows: true, columns: predicted
    true, predicted, hits = cm.sum(1), cm.sum(0), np.diagonal(cm)
    labels = np.union1d(y, pred)  # bacc and F1 average over the labels in y or the predictions, as sklearn's
    seen = labels[true[labels] > 0]
    weights = (np.arange(k)[None, :] - np.arange(k)[:, None]) ** 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = 1 - np.sum(weights * cm) / np.sum(weights * (np.outer(predicted, true) / predicted.sum()))
    return {
        "auroc": auroc(y, proba),
        "bacc": float(np.mean(hits[seen] / true[seen])),
        "kappa": float(kappa) if np.isfinite(kappa) else float("nan"),
        "f1": float(np.mean(2.0 * hits[labels] / (true[labels] + predicted[labels]))),
    }