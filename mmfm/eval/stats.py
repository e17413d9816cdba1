"""Aggregation of probe metrics the way Patho-Bench reports them.

Several folds: mean ± SE over folds with SE = std(ddof=0) / sqrt(n). One fold: 100 seeded bootstrap resamples of the
pooled test predictions, reported as the bootstrap mean and the 2.5–97.5 percentile interval (not the point
estimate), so numbers are comparable with published Patho-Bench/THREADS tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


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
    """Mean ± standard error over folds; undefined folds (NaN, e.g. one class in test) are left out."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Estimate(float("nan"), n=0)
    return Estimate(float(v.mean()), se=float(v.std(ddof=0) / np.sqrt(v.size)), n=int(v.size))


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
