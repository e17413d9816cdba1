"""Sigmoid (SigLIP) pair loss over one block of logits, with presence masks and multi-positives.

For anchor row i (modality a) and column j (modality b) with logit z_ij, the label is
y_ij = +1 if case_index_i == case_index_j else -1, and the term is -log σ(y_ij · z_ij), kept only
when both rows are valid (modality present, not padding). A row's loss is the SUM over its valid
columns (SigLIP, Zhai et al. 2023, does not divide by the number of columns); a row is an anchor
when it has at least one valid column. Row sums are additive over column blocks, which is what
lets the ring and all-gather implementations reproduce the global loss exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DIRECTIONS = 1
"""The sigmoid loss over all (i, j) already covers both directions of a pair."""


def rows(logits: jax.Array, pos: jax.Array, valid: jax.Array, weight: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-anchor-row partial sums for one block of columns; `weight` multiplies each (i, j) term."""
    nll = -jax.nn.log_sigmoid(jnp.where(pos, logits, -logits))
    if weight is not None:
        nll = nll * weight
    return {"nll": jnp.sum(jnp.where(valid, nll, 0.0), axis=1),
            "n_cols": jnp.sum(valid, axis=1, dtype=jnp.float32)}


def merge(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def row_loss(acc: dict) -> tuple[jax.Array, jax.Array]:
    """(loss of each row, whether the row is an anchor) once every column block is merged."""
    return acc["nll"], acc["n_cols"] > 0
