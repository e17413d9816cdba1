"""Symmetric InfoNCE over one block of logits, with presence masks and multi-positives.

For TANGLE-style comparisons. With logits z_ij = ⟨x_i, y_j⟩ / τ, the softmax of anchor row i runs
over its valid columns j, and the row loss is minus the mean log-probability of its positives
P(i) = {valid j : case_index_j == case_index_i}:  L_i = logsumexp_j z_ij - mean_{j∈P(i)} z_ij.
A row is an anchor when P(i) is non-empty. The logsumexp is accumulated online (running max and
rescaled sum), so blocks of columns can arrive one at a time around a ring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DIRECTIONS = 2
"""a→b and b→a are averaged (CLIP/TANGLE symmetric loss)."""


def _finite(m: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(m), m, 0.0)


def rows(logits: jax.Array, pos: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """Per-anchor-row running max, rescaled exp-sum, positive-logit sum and count for one block."""
    m = jnp.max(jnp.where(valid, logits, -jnp.inf), axis=1)
    e = jnp.exp(jnp.where(valid, logits - _finite(m)[:, None], -jnp.inf))
    p = pos & valid
    return {"max": m, "sumexp": jnp.sum(e, axis=1),
            "pos_sum": jnp.sum(jnp.where(p, logits, 0.0), axis=1),
            "n_pos": jnp.sum(p, axis=1, dtype=jnp.float32)}


def merge(a: dict, b: dict) -> dict:
    m = jnp.maximum(a["max"], b["max"])
    mf = _finite(m)
    return {"max": m,
            "sumexp": a["sumexp"] * jnp.exp(a["max"] - mf) + b["sumexp"] * jnp.exp(b["max"] - mf),
            "pos_sum": a["pos_sum"] + b["pos_sum"], "n_pos": a["n_pos"] + b["n_pos"]}


def row_loss(acc: dict) -> tuple[jax.Array, jax.Array]:
    """(loss of each row, whether the row is an anchor) once every column block is merged."""
    anchor = acc["n_pos"] > 0
    # Non-anchor rows get safe placeholders so that neither value nor gradient can become NaN.
    lse = _finite(acc["max"]) + jnp.log(jnp.where(anchor, acc["sumexp"], 1.0))
    return lse - acc["pos_sum"] / jnp.maximum(acc["n_pos"], 1.0), anchor
