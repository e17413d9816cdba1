"""What the objective logs beside the loss: logit statistics per pair, embedding norm and RankMe.

Logit statistics are accumulated per block (so the ring never holds more than one block) and
reduced across devices at the end; everything here is under `stop_gradient`, so diagnostics
never change the gradient. Empty sets (no positive pair in the batch) report 0, never NaN/inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmfm.objectives import sharded

_SIDES = ("pos", "neg")


def logit_stats(logits: jax.Array, pos: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """Sums, counts, minima and maxima of positive and negative logits over valid (i, j)."""
    logits = jax.lax.stop_gradient(logits)
    out = {}
    for side, sel in zip(_SIDES, (pos & valid, ~pos & valid)):
        out[f"{side}_sum"] = jnp.sum(jnp.where(sel, logits, 0.0))
        out[f"{side}_n"] = jnp.sum(sel, dtype=jnp.float32)
        out[f"{side}_min"] = jnp.min(jnp.where(sel, logits, jnp.inf))
        out[f"{side}_max"] = jnp.max(jnp.where(sel, logits, -jnp.inf))
    return out


# How each statistic combines across blocks and across devices, by key suffix.
_REDUCE = {"sum": (jnp.add, sharded.psum), "n": (jnp.add, sharded.psum),
           "min": (jnp.minimum, sharded.pmin), "max": (jnp.maximum, sharded.pmax)}


def _reducer(key: str):
    return _REDUCE[key.rsplit("_", 1)[1]]


def merge_stats(a: dict, b: dict) -> dict:
    """Combine the statistics of two blocks of the same anchor rows."""
    return {k: _reducer(k)[0](a[k], b[k]) for k in a}


def finalize_stats(stats: dict, axis) -> dict[str, jax.Array]:
    """Reduce over devices (`axis=None`: already global) and turn into mean/min/max; 0 if empty."""
    stats = {k: _reducer(k)[1](v, axis) for k, v in stats.items()}
    out = {}
    for side in _SIDES:
        n = stats[f"{side}_n"]
        has = n > 0
        out[f"{side}_mean"] = stats[f"{side}_sum"] / jnp.maximum(n, 1.0)
        out[f"{side}_min"] = jnp.where(has, stats[f"{side}_min"], 0.0)
        out[f"{side}_max"] = jnp.where(has, stats[f"{side}_max"], 0.0)
    return out


def rankme(x: jax.Array, rows: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Smooth effective rank (Garrido et al. 2023): exp(entropy of σ / ‖σ‖₁ + ε) over `rows`.

    Rows outside `rows` are zeroed, which leaves the singular values of the kept rows unchanged.
    0 when no row is kept.
    """
    x = jnp.where(rows[:, None], jax.lax.stop_gradient(x).astype(jnp.float32), 0.0)
    s = jnp.linalg.svd(x, compute_uv=False)
    p = s / jnp.maximum(jnp.sum(s), jnp.finfo(jnp.float32).tiny) + eps
    return jnp.where(jnp.any(rows), jnp.exp(-jnp.sum(p * jnp.log(p))), 0.0)


def mean_norm(x: jax.Array, rows: jax.Array) -> jax.Array:
    """Mean L2 norm of the kept rows of `x` (or mean of given per-row norms if `x` is [B]); 0 if none."""
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    norms = x if x.ndim == 1 else jnp.linalg.norm(x, axis=-1)
    return jnp.sum(jnp.where(rows, norms, 0.0)) / jnp.maximum(jnp.sum(rows), 1)
