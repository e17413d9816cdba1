"""Aggregation of probe metrics, and paired comparisons between embeddings.

Several folds: mean ± SE over folds with SE = sample SD (ddof=1) / √k — the usual standard error of a mean of k
values (Patho-Bench divides the ddof=0 SD by √k, which is √((k−1)/k) smaller: 0.89× at k = 5). One fold: 100
seeded bootstrap resamples of the pooled test predictions, reported as the bootstrap mean and the 2.5–97.5
percentile interval (not the point estimate), as in published Patho-Bench/THREADS tables.

Two embeddings probed on the same folds are compared by their per-fold differences (`paired`): mean, SE as above,
a t-based 95% CI and the paired t-test; because the k training sets overlap, the fold differences are positively
correlated and that test is anti-conservative, so the Nadeau–Bengio corrected resampled t-test (variance × (1 + k ·
n_test/n_train)) is reported beside it. On one fold the same bootstrap resamples of both (`paired_bootstrap`)
give a percentile CI of the difference and a two-sided bootstrap p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Estimate:
    """A summarised metric: `se` for fold aggregates, `lo`/`hi` for bootstrap intervals."""

    mean: float
    se: float | None = None
    lo: float | None = None
    hi: float | None = None
    n: int = 0

    def format(self, digits: int = 3) -> str:
        if not np.isfinite(self.mean):
            return "N/A"
        if self.lo is not None:
            return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"
        if self.se is not None and self.n > 1:
            return f"{self.mean:.{digits}f} ± {self.se:.{digits}f}"
        return f"{self.mean:.{digits}f}"


def mean_se(values) -> Estimate:
    """Mean ± standard error (sample SD / √k) over folds; undefined folds (NaN, e.g. one class in test) are left
    out. One finite value has no SE (NaN)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Estimate(float("nan"), n=0)
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    return Estimate(float(v.mean()), se=se, n=int(v.size))


@dataclass(frozen=True)
class Paired:
    """A paired difference a − b: mean, SE, 95% interval, two-sided p; `p_corrected` = Nadeau–Bengio (folds)."""

    mean: float
    se: float
    lo: float
    hi: float
    p: float
    n: int
    method: str
    p_corrected: float = float("nan")

    def format(self, digits: int = 3) -> str:
        if not np.isfinite(self.mean):
            return "N/A"
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def paired(a, b, *, test_train_ratio: float | None = None, level: float = 0.95) -> Paired:
    """Per-fold paired difference of two embeddings' metric on the same folds (NaN in either side: fold left out).

    SE = sample SD of the differences / √k; CI = mean ± t_{k−1} · SE; p = paired t-test (= scipy ttest_rel).
    With `test_train_ratio` (n_test / n_train of a fold) also the Nadeau–Bengio corrected p.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    k = d.size
    if k < 2:
        return Paired(float(d.mean()) if k else float("nan"), *[float("nan")] * 4, n=k, method="paired t")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    se = sd / np.sqrt(k)
    half = float(sps.t.ppf(0.5 + level / 2, k - 1)) * se
    p = _t_p(mean, se, k - 1)
    p_nb = float("nan")
    if test_train_ratio is not None:
        p_nb = _t_p(mean, sd * np.sqrt(1.0 / k + test_train_ratio), k - 1)
    return Paired(mean, se, mean - half, mean + half, p, k, "paired t over folds", p_nb)


def _t_p(mean: float, se: float, dof: int) -> float:
    if se == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * sps.t.sf(abs(mean / se), dof))


def paired_bootstrap(a, b, level: float = 0.95) -> Paired:
    """Difference of two metrics computed on the SAME bootstrap resamples (index-aligned draws): bootstrap mean,
    percentile interval, SE = SD of the differences, two-sided p = 2 · (min(#{d ≤ 0}, #{d ≥ 0}) + 1) / (B + 1)
    (the +1 keeps a Monte-Carlo p above its resolution 1/B instead of reporting 0)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return Paired(*[float("nan")] * 5, n=0, method="paired bootstrap")
    q = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(d, [q, 100.0 - q])
    p = min(1.0, 2.0 * (min((d <= 0).sum(), (d >= 0).sum()) + 1) / (d.size + 1))
    return Paired(float(d.mean()), float(d.std(ddof=1)) if d.size > 1 else float("nan"), float(lo), float(hi),
                  float(p), int(d.size), "paired bootstrap")


def bootstrap(metrics: Callable[[np.ndarray], dict[str, float]], n_samples: int, *, n_boot: int = 100,
              seed: int = 0) -> dict[str, np.ndarray]:
    """Every metric on `n_boot` seeded resamples (with replacement) of the row indices 0..n_samples-1.

    `metrics(idx)` receives the resampled indices and returns {name: value}. A resample where a metric is
    undefined (no events, one class) yields NaN, which `percentile_ci` drops.
    """
    rng = np.random.default_rng(seed)
    rows: list[dict[str, float]] = []
    for _ in range(n_boot):
        idx = rng.choice(n_samples, size=n_samples, replace=True)
        try:
            rows.append(metrics(idx))
        except ValueError:
            rows.append({})
    names = list(dict.fromkeys(k for r in rows for k in r))
    return {k: np.array([r.get(k, np.nan) for r in rows], dtype=float) for k in names}


def percentile_ci(values, level: float = 0.95) -> Estimate:
    """Bootstrap mean and the central `level` percentile interval of the finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Estimate(float("nan"), n=0)
    a = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(v, [a, 100.0 - a])
    return Estimate(float(v.mean()), lo=float(lo), hi=float(hi), n=int(v.size))
