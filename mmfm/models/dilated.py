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


class _Lattice:
    """Static (NumPy) layout of one (segment length w, dilation r) branch over T tokens: per head the positions of
    its lattice, segment after segment, m slots per segment (slots past the segment or the sequence are empty)."""

    def __init__(self, t: int, h: int, seg_len: int, ratio: int):
        span = min(seg_len, t)                  # positions of one segment present in the padded sequence
        self.seg_len, self.ratio, self.n_seg, self.per_seg = seg_len, ratio, -(-t // seg_len), -(-span // ratio)
        self.off = head_offsets(h, ratio)                                                 # [H]
        within = self.off[:, None, None] + ratio * np.arange(self.per_seg)[None, None, :]  # [H, 1, m]
        pos = np.arange(self.n_seg)[None, :, None] * seg_len + within                     # [H, n_seg, m]
        self.exists = ((within < span) & (pos < t)).reshape(h, -1)
        self.pos = np.minimum(pos, t - 1).reshape(h, -1)
        self.seg = np.repeat(np.arange(self.n_seg), self.per_seg)
        rel = np.arange(t)[None, :] % seg_len - self.off[:, None]                         # [H, T]
        self.on = rel % ratio == 0              # token p is on head j's lattice, at slot (p // w)·m + rel / r
        self.slot = np.where(self.on, (np.arange(t) // seg_len)[None] * self.per_seg + rel // ratio, 0)

    def zero_keys(self, length: jax.Array) -> jax.Array:
        """[B, H, M]: zero vectors the reference pads into each (row, head, segment): lattice points in
        [filled, padded end), the end being ⌈min(w, L)/r⌉·r."""
        w, r = self.seg_len, self.ratio
        filled = jnp.clip(length[:, None] - jnp.asarray(np.arange(self.n_seg) * w)[None], 0, w)   # [B, n_seg]
        end = jnp.broadcast_to((-(-jnp.minimum(length, w) // r) * r)[:, None], filled.shape)
        count = lambda x: jnp.maximum(0, (x[:, None, :] - jnp.asarray(self.off)[None, :, None] + r - 1) // r)
        return jnp.repeat(jnp.maximum(count(end) - count(filled), 0), self.per_seg, axis=2)


def dilated_attention(q: jax.Array, k: jax.Array, v: jax.Array, length: jax.Array, segment_lengths: Sequence[int],
                      dilation_ratios: Sequence[int], *, block_q: int = 512, block_k: int = 1024) -> jax.Array:
    """q, k, v [B, T, H, d] with each row's `length` [B] valid tokens first → [B, T, H, d] in q.dtype.

    All branches' lattices run as one `attention` call (branch and segment as the segment id), so one blockwise
    kernel serves every branch."""
    if len(segment_lengths) != len(dilation_ratios) or not segment_lengths:
        raise ValueError(f"segment_lengths {segment_lengths} and dilation_ratios {dilation_ratios}: one per branch")
    b, t, h, d = q.shape
    lats = [_Lattice(t, h, w, r) for w, r in zip(segment_lengths, dilation_ratios)]
    pos = jnp.asarray(np.concatenate([lat.pos for lat in lats], 1))                        # [H, ΣM]
    seg_ids, first = [], 0
    for lat in lats:
        seg_ids.append(lat.seg + first)
        first += lat.n_seg
    segs = jnp.broadcast_to(jnp.asarray(np.concatenate(seg_ids), jnp.int32), (b * h, pos.shape[1]))
    exists = jnp.asarray(np.concatenate([lat.exists for lat in lats], 1))
    valid = (exists[None] & (pos[None] < length[:, None, None])).reshape(b * h, -1)

    def gather(x):  # [B, T, H, d] → [B·H, ΣM, 1, d], head j reading its own lattices
        return jnp.take_along_axis(jnp.moveaxis(x, 2, 1), pos[None, :, :, None], axis=2).reshape(b * h, -1, 1, d)

    out, lse = attention(gather(q), gather(k), gather(v), valid, segs, segs, block_q=block_q, block_k=block_k,
                         return_lse=True)
    out, lse = out.reshape(b, h, -1, d), lse.reshape(b, h, -1)
    outs, lses, first = [], [], 0
    for lat in lats:
        o, l = out[:, :, first:first + lat.pos.shape[1]], lse[:, :, first:first + lat.pos.shape[1]]
        first += lat.pos.shape[1]
        zeros = lat.zero_keys(length)
        merged = jnp.logaddexp(l, jnp.where(zeros > 0, jnp.log(jnp.maximum(zeros, 1)), _NEG))
        o = o * jnp.exp(l - merged)[..., None].astype(o.dtype)
        slot, on = jnp.asarray(lat.slot), jnp.asarray(lat.on)
        outs.append(jnp.where(on[None, :, :, None], jnp.take_along_axis(o, slot[None, :, :, None], axis=2), 0))
        lses.append(jnp.where(on[None], jnp.take_along_axis(merged, slot[None], axis=2), _NEG))     # [B, H, T]
    weights = jax.nn.softmax(jax.lax.stop_gradient(jnp.stack(lses)), axis=0)
    out = sum(o.astype(jnp.float32) * w[..., None] for o, w in zip(outs, weights))               # [B, H, T, d]
    return jnp.moveaxis(out, 1, 2).astype(q.dtype)
