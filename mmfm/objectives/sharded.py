"""How the column blocks of a pair's logit matrix are visited: globally, all-gathered, or in a ring.

Each device holds its rows of the batch (anchors x) and must see every column y. A *block* turns
(x, y-block) into per-anchor-row accumulators plus logit statistics; accumulators are merged over
blocks and only at the end reduced across devices, so all three sweeps give the global result.

  local   one block with all columns; the arrays are global (jit + XLA sharding) or one device's.
  gather  inside `jax.shard_map`: all-gather the y side, one block of b_local × B logits.
  ring    inside `jax.shard_map`: y blocks travel around the ring with `ppermute`; each step holds
          one b_local × b_local block, rematerialised in the backward pass (`jax.checkpoint`),
          so per-device logit memory is O(b_local²) (the SigLIP paper's "chunked" implementation). The
          backward pass keeps the visiting y blocks (O(B·E) per device, as an all-gather would).

`axis` is a mesh axis name or a tuple of names (the trainer passes ("data", "fsdp")); `None`: arrays are
already global, and every collective below is then the identity.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Axis = str | tuple[str, ...] | None
Block = Callable[..., tuple[dict, dict]]
Merge = Callable[[tuple[dict, dict], tuple[dict, dict]], tuple[dict, dict]]


def psum(x, axis: Axis):
    return x if axis is None else jax.lax.psum(x, axis)


def pmin(x, axis: Axis):
    return x if axis is None else jax.lax.pmin(x, axis)


def pmax(x, axis: Axis):
    return x if axis is None else jax.lax.pmax(x, axis)


def pair_logits(x: jax.Array, y: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """z_ij = scale · ⟨x_i, y_j⟩ + bias at full matmul precision (no TF32/bf16 passes on accelerators)."""
    return scale * jnp.einsum("id,jd->ij", x, y, precision=jax.lax.Precision.HIGHEST) + bias


def sweep_local(block: Block, merge: Merge, cols: tuple, axis: Axis):
    del merge, axis
    return block(*cols)


def sweep_gather(block: Block, merge: Merge, cols: tuple, axis: Axis):
    del merge
    return block(*(jax.lax.all_gather(c, axis, tiled=True) for c in cols))


def sweep_ring(block: Block, merge: Merge, cols: tuple, axis: Axis):
    n = jax.lax.axis_size(axis)
    perm = [(k, (k + 1) % n) for k in range(n)]
    block = jax.checkpoint(block, prevent_cse=False)  # inside scan, CSE cannot undo the remat

    def step(carry, _):
        acc, cols = carry
        cols = tuple(jax.lax.ppermute(c, axis, perm) for c in cols)
        return (merge(acc, block(*cols)), cols), None

    (acc, _), _ = jax.lax.scan(step, (block(*cols), cols), length=n - 1)
    return acc


SWEEPS = {"global": sweep_local, "gather": sweep_gather, "ring": sweep_ring}
