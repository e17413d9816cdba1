"""Summary statistics: fold mean ± SE and bootstrap percentile CI, checked against plain NumPy."""

import numpy as np
import pytest

from mmfm.eval import stats


def test_mean_se_uses_sample_std_over_folds():
    v = [0.61, 0.7, 0.66, np.nan, 0.58, 0.73]
    e = stats.mean_se(v)
    f = np.array([0.61, 0.7, 0.66, 0.58, 0.73])  # an undefined fold (NaN) is left out
    se = np.sqrt(((f - f.mean()) ** 2).sum() / (len(f) - 1)) / np.sqrt(len(f))  # sample SD (k − 1) / √k
    assert e.mean == pytest.approx(f.mean())
    assert e.se == pytest.approx(se)
    assert e.n == 5
    assert e.format() == f"{f.mean():.3f} ± {se:.3f}"
    assert stats.mean_se([np.nan]).format() == "N/A"
    one = stats.mean_se([0.7, np.nan])
    assert one.n == 1 and np.isnan(one.se) and one.format() == "0.700"  # one fold has no SE


def test_percentile_ci_matches_numpy():
    v = np.random.default_rng(0).normal(size=257)
    e = stats.percentile_ci(np.r_[v, np.nan])
    assert e.mean == pytest.approx(v.mean())
    assert (e.lo, e.hi) == pytest.approx(tuple(np.percentile(v, [2.5, 97.5])))
    assert e.format() == f"{v.mean():.3f} [{np.percentile(v, 2.5):.3f}, {np.percentile(v, 97.5):.3f}]"


def test_bootstrap_resamples_rows_with_replacement_and_is_seeded():
    x = np.random.default_rng(1).normal(loc=2.0, size=400)
    seen = []

    def metric(idx):
        seen.append(idx)
        return {"mean": x[idx].mean(), "undefined": np.nan if idx[0] % 2 else 1.0}

    b = stats.bootstrap(metric, len(x), n_boot=200, seed=3)
    assert b["mean"].shape == (200,) and len(seen) == 200
    assert all(len(i) == 400 and i.min() >= 0 and i.max() < 400 and len(np.unique(i)) < 400 for i in seen)
    # Standard error of the mean: bootstrap spread ≈ sd/√n (deterministic for this seed, 15% tolerance).
    assert np.std(b["mean"]) == pytest.approx(x.std() / np.sqrt(400), rel=0.15)
    ci = stats.percentile_ci(b["mean"])
    assert ci.lo < x.mean() < ci.hi
    assert stats.percentile_ci(b["undefined"]).n == int(np.isfinite(b["undefined"]).sum()) < 200
    np.testing.assert_array_equal(stats.bootstrap(metric, len(x), n_boot=200, seed=3)["mean"], b["mean"])
