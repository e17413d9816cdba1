"""LongNet dilated attention (Ding et al. 2023), as Prov-GigaPath's slide encoder computes it, in O(N) memory.

For each branch (segment length w, dilation r) the sequence is cut into segments of w tokens; within a
segment, head j attends only among the tokens at positions t ≡ o_j (mod r), t counted from the segment start,
with the per-head offset o_j = j // ⌈H/r⌉ (heads are split into r groups, group g taking offset g, so the heads
together cover every position). A query gets an output from a branch only on its head's lattice; the branches'
outputs are merged with weights softmax_b(lse_b) over the branches covering it (lse = log-sum-exp of its logits),
which equals one softmax over the union of the branches' key sets. Weights are not differentiated
(`stop_gradient`), as in LongNet's reference implementation (torchscale).

The reference pads the sequence with zero vectors to a multiple of min(w, L) and each segment to a multiple of
r; a zero key has logit 0 and value 0, so it adds exp(0) to its query's denominator. Here those keys are not
materialised: each (row, head, segment) counts them from the row's true length L and adds log(count) to the lse.
Valid tokens must come first in each row (`length` = how many); the rest is padding that never takes part.

Each branch gathers its lattices ([B·H, ~N/r] tokens, one index array per head, built with NumPy at trace
time) and runs `mmfm.models.attention` (blockwise) with the segments as segment ids, so no branch holds more than
[B·H, block_q, block_k] logits and key blocks outside a query block's segments are skipped.

Known difference: when w is not a multiple of r and the sequence spans several segments, the reference shifts
the outputs of later segments (its scatter assumes segments of the padded length ⌈w/r⌉·r); this module keeps
each token's own output. Prov-GigaPath's released branches reach that case only above 185,363 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmfm.models.attention import _NEG, attention


def head_offsets(n_heads: int, ratio: int) -> np.ndarray:
    """Offset of each head's lattice within a segment: heads split into `ratio` groups of ⌈H/r⌉ (the last may
    be short), group g reading positions ≡ g (mod r)."""
    return np.arange(n_heads) // -(-n_heads // ratio)


def _branch(q, k, v, length, seg_len: int, ratio: int, block_q: int, block_k: int):
    """One (segment length, dilation) branch → (out [B, T, H, d], lse [B, T, H]); off-lattice queries get out 0
    and lse -1e30."""
    b, t, h, d = q.shape
    span = min(seg_len, t)                      # positions of one segment present in the padded sequence
    n_seg, per_seg = -(-t // seg_len), -(-span // ratio)
    off = head_offsets(h, ratio)                                               # [H]
    within = off[:, None, None] + ratio * np.arange(per_seg)[None, None, :]    # [H, 1, m]
    pos = np.arange(n_seg)[None, :, None] * seg_len + within                   # [H, n_seg, m]
    exists = ((within < span) & (pos < t)).reshape(h, -1)                      # slot holds a real position
    pos = np.minimum(pos, t - 1).reshape(h, -1)
    seg_id = jnp.asarray(np.repeat(np.arange(n_seg), per_seg), jnp.int32)

    def gather(x):  # [B, T, H, d] → [B·H, M, 1, d], head j reading its own lattice
        xs = jnp.take_along_axis(jnp.moveaxis(x, 2, 1), jnp.asarray(pos)[None, :, :, None], axis=2)
        return xs.reshape(b * h, -1, 1, d)

    valid = jnp.asarray(exists)[None] & (jnp.asarray(pos)[None] < length[:, None, None])   # [B, H, M]
    segs = jnp.broadcast_to(seg_id, (b * h, seg_id.shape[0]))
    out, lse = attention(gather(q), gather(k), gather(v), valid.reshape(b * h, -1), segs, segs,
                         block_q=block_q, block_k=block_k, return_lse=True)
    out, lse = out.reshape(b, h, -1, d), lse.reshape(b, h, -1)

    # zero keys of the reference's padding: per (row, head, segment), lattice points in [filled, padded end)
    seg_start = jnp.asarray(np.arange(n_seg) * seg_len)
    filled = jnp.clip(length[:, None] - seg_start[None], 0, seg_len)                        # [B, n_seg]
    end = jnp.where(length >= seg_len, -(-seg_len // ratio), -(-length // ratio)) * ratio   # [B]
    count = lambda x: jnp.maximum(0, (x[:, None, :] - jnp.asarray(off)[None, :, None] + ratio - 1) // ratio)
    zeros = jnp.maximum(count(jnp.broadcast_to(end[:, None], filled.shape)) - count(filled), 0)  # [B, H, n_seg]
    zeros = jnp.repeat(zeros, per_seg, axis=2)                                              # [B, H, M]
    merged = jnp.logaddexp(lse, jnp.where(zeros > 0, jnp.log(jnp.maximum(zeros, 1)), _NEG))
    out = out * jnp.exp(lse - merged)[..., None].astype(out.dtype)

    # back to token order: token p of head j sits at slot (p // w)·m + (p mod w − o_j) / r of its lattice
    p = np.arange(t)
    rel = p[None, :] % seg_len - off[:, None]                                               # [H, T]
    on = jnp.asarray(rel % ratio == 0)
    slot = jnp.asarray(np.where(rel % ratio == 0, (p // seg_len)[None] * per_seg + rel // ratio, 0))
    dense_out = jnp.take_along_axis(out, slot[None, :, :, None], axis=2)                    # [B, H, T, d]
    dense_lse = jnp.take_along_axis(merged, slot[None], axis=2)
    dense_out = jnp.where(on[None, :, :, None], dense_out, 0)
    dense_lse = jnp.where(on[None], dense_lse, _NEG)
    return jnp.moveaxis(dense_out, 1, 2), jnp.moveaxis(dense_lse, 1, 2)


def dilated_attention(q: jax.Array, k: jax.Array, v: jax.Array, length: jax.Array, segment_lengths: Sequence[int],
                      dilation_ratios: Sequence[int], *, block_q: int = 512, block_k: int = 1024) -> jax.Array:
    """q, k, v [B, T, H, d] with each row's `length` [B] valid tokens first → [B, T, H, d] in q.dtype."""
    if len(segment_lengths) != len(dilation_ratios) or not segment_lengths:
        raise ValueError(f"segment_lengths {segment_lengths} and dilation_ratios {dilation_ratios}: one per branch")
    outs, lses = zip(*(_branch(q, k, v, length, w, r, block_q, block_k)
                       for w, r in zip(segment_lengths, dilation_ratios)))
    weights = jax.nn.softmax(jax.lax.stop_gradient(jnp.stack(lses)), axis=0)               # [n_branch, B, T, H]
    out = sum(o.astype(jnp.float32) * w[..., None] for o, w in zip(outs, weights))
    return out.astype(q.dtype)
