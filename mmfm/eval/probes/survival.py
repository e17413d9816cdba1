"""Survival probe: linear Cox models on embeddings, scored with Harrell's C, Uno's C and time-dependent AUC.

Models follow Patho-Bench: elastic-net `CoxnetSurvivalAnalysis(alphas=[α], l1_ratio=0.5, max_iter=100000)` and, for
l1_ratio 0, ridge `CoxPHSurvivalAnalysis(alpha=α)`. Patho-Bench ships the grid α ∈ {0.01, 0.02, 0.07} and reports
every α on the test fold (its tutorial uses 0.07); choosing among them on test is leakage, so here a single α is
used as given and a grid is resolved by inner cross-validation (Harrell's C) on the training fold only (the probe's
`alpha_select: each` instead reports every α side by side, like Patho-Bench).
Risk convention (sksurv): higher risk = earlier event. `standardize=True` z-scores features with the mean/SD of the
data each model is fitted on (training fold, and each inner fold of an α sweep), as in classification.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.compare import compare_survival
from sksurv.linear_model import CoxnetSurvivalAnalysis, CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc

ALPHAS = (0.01, 0.02, 0.07)
MODELS = ("coxnet", "coxph")
METRICS = ("c_index", "uno_c", "td_auc")


def surv(event, time) -> np.ndarray:
    """sksurv's structured response (event bool, time float)."""
    y = np.empty(len(time), dtype=[("event", bool), ("time", float)])
    y["event"], y["time"] = np.asarray(event, bool), np.asarray(time, float)
    return y


def make_model(kind: str, alpha: float, l1_ratio: float = 0.5):
    if kind == "coxnet":
        return CoxnetSurvivalAnalysis(alphas=[alpha], l1_ratio=l1_ratio, max_iter=100000)
    if kind == "coxph":  # ridge Cox, Patho-Bench's l1_ratio == 0 branch
        return CoxPHSurvivalAnalysis(alpha=alpha, n_iter=100000)
    raise ValueError(f"unknown survival model {kind!r}; expected one of {MODELS}")


def _fit(kind: str, alpha: float, x: np.ndarray, y: np.ndarray, l1_ratio: float, standardize: bool = False):
    model = make_model(kind, alpha, l1_ratio)
    if standardize:
        model = make_pipeline(StandardScaler(), model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter; failures raise ArithmeticError
        return model.fit(x, y)


def harrell_c(event, time, risk) -> float:
    """Harrell's C exactly as Patho-Bench reports it (sksurv, tied_tol 1e-8)."""
    return float(concordance_index_censored(np.asarray(event, bool), np.asarray(time, float), risk)[0])


def select_alpha(kind: str, x: np.ndarray, y: np.ndarray, alphas, *, l1_ratio: float = 0.5,
                 inner_folds: int = 3, seed: int = 0, standardize: bool = False) -> float:
    """α with the best mean inner-fold Harrell's C on the TRAINING data (folds stratified by event)."""
    n_splits = min(inner_folds, int(y["event"].sum()))
    if n_splits < 2:
        raise ValueError("cannot select alpha: fewer than 2 events in the training fold; fix alpha instead")
    folds = list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(x, y["event"]))
    scores = []
    for alpha in alphas:
        cs = []
        for tr, va in folds:
            try:
                risk = _fit(kind, alpha, x[tr], y[tr], l1_ratio, standardize).predict(x[va])
                cs.append(harrell_c(y["event"][va], y["time"][va], risk) if y["event"][va].any() else np.nan)
            except (ArithmeticError, ValueError):
                cs.append(np.nan)
        scores.append(np.nanmean(cs) if np.isfinite(cs).any() else -np.inf)
    return float(alphas[int(np.argmax(scores))])


def fit_risk(kind: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, alphas=(0.07,),
             l1_ratio: float = 0.5, seed: int = 0, standardize: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit on the training fold; return (test risk, training risk, α used)."""
    alphas = tuple(alphas)
    alpha = alphas[0] if len(alphas) == 1 else select_alpha(kind, x_train, y_train, alphas, l1_ratio=l1_ratio,
                                                            seed=seed, standardize=standardize)
    model = _fit(kind, alpha, x_train, y_train, l1_ratio, standardize)
    return model.predict(x_test), model.predict(x_train), float(alpha)


def default_tau(train_time: np.ndarray) -> float:
    """Uno's C truncation: the 80th percentile of training follow-up, where the censoring KM is still > 0."""
    return float(np.percentile(train_time, 80))


def metrics(y_train: np.ndarray, y_test: np.ndarray, risk: np.ndarray, *, tau: float | None = None,
            horizons=()) -> dict:
    """Harrell's C, Uno's C (IPCW from the training censoring distribution, truncated at tau) and cumulative/dynamic
    AUC: `td_auc` = its mean over the quartiles of the test event times below tau, and `td_auc@h` at each requested
    horizon h (days, e.g. 365/1095/1825). NaN where undefined (no events, horizon outside the test follow-up)."""
    out = {"c_index": harrell_c(y_test["event"], y_test["time"], risk) if y_test["event"].any() else float("nan")}
    tau = default_tau(y_train["time"]) if tau is None else tau
    try:
        out["uno_c"] = float(concordance_index_ipcw(y_train, y_test, risk, tau=tau)[0])
    except (ValueError, ZeroDivisionError):
        out["uno_c"] = float("nan")
    t = y_test["time"]
    ev_times = t[y_test["event"] & (t < tau)]
    quartiles = np.unique(np.percentile(ev_times, [25, 50, 75])) if ev_times.size else np.array([])
    out["td_auc"] = _td_auc(y_train, y_test, risk, quartiles)[1]
    for h in horizons:
        out[f"td_auc@{h:g}"] = _td_auc(y_train, y_test, risk, np.array([float(h)]))[1]
    return out


def _td_auc(y_train, y_test, risk, times: np.ndarray) -> tuple[np.ndarray, float]:
    """sksurv cumulative_dynamic_auc at the times inside the test follow-up; (nan, nan) when none is."""
    t = y_test["time"]
    times = times[(times >= t.min()) & (times < t.max())]
    if not times.size:
        return np.array([]), float("nan")
    try:
        auc, mean = cumulative_dynamic_auc(y_train, y_test, risk, times)
    except ValueError:
        return np.array([]), float("nan")
    return auc, float(mean)


def logrank_p(y: np.ndarray, high_risk: np.ndarray) -> float:
    """Log-rank p-value between predicted high- and low-risk groups; NaN when a group is empty."""
    high_risk = np.asarray(high_risk, bool)
    if high_risk.all() or not high_risk.any() or not y["event"].any():
        return float("nan")
    return float(compare_survival(y, high_risk.astype(int))[1])
