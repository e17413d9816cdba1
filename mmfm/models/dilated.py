"""LongNet dilated attention (Ding et al. 2023), as Prov-GigaPath's slide encoder computes it, in O(N) memory.

For each branch (segment length w, dilation r) the sequence is cut into segments of w tokens; within a
segment, head j attends only among the tokens at positions t ≡ o_j (mod r), t counted from the segment start,
with the per-head offset o_j = j // ⌈H/r⌉ (heads are split into r groups, group g taking offset g, so the heads
together cover every position). A query gets an output from a branch only on its head's lattice; the branches'
outputs are merged with weights softmax_b(lse_b) over the branches covering it (lse = log-sum-exp of its
logits), which equals one softmax over all the branches' keys (a key in several branches counted once per
branch). Weights are not differentiated (`stop_gradient`), as in LongNet's reference implementation (torchscale).

The reference pads the sequence with zero vectors to a multiple of min(w, L) and each segment to a multiple of
r; a zero key has logit 0 and value 0, so it adds exp(0) to its query's denominator. Here those keys are not
materialised: each (row, head, segment) counts them from the row's true length L and adds log(count) to the lse.
Valid tokens must come first in each row (`length` = how many); the rest is padding that never takes part.

Every branch's lattices are gathered ([B·H, ≈N/r] tokens each, indices computed from iotas) into
one sequence that runs through `mmfm.models.attention` (blockwise) with (branch, segment) as the segment id: at
most [B·H, block_q, block_k] logits exist at once, key blocks outside a query block's segments are skipped, and
one kernel serves all branches. Memory grows with N (≈2N gathered tokens per q, k, v), never with N².

Known difference: when w is not a multiple of r and the sequence spans several segments, the reference shifts
the outputs of later segments (its scatter assumes segments of the padded length ⌈w/r⌉·r); this module keeps
each token's own output. Prov-GigaPath's released branches reach that case only above 185,363 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmfm.models.attention import attention

_NEG = -1e30  # the lse of "no key" (as mmfm.models.attention reports it): weight 0 after the merge softmax


def head_offsets(n_heads: int, ratio: int) -> np.ndarray:
    """Offset of each head's lattice within a segment: heads split into `ratio` groups of ⌈H/r⌉ (the last may
    be short), group g reading positions ≡ g (mod r)."""
    return np.arange(n_heads) // -(-n_heads // ratio)


def _lattices(t: int, h: int, segment_lengths: Sequence[int], ratios: Sequence[int]) -> dict[str, jax.Array]:
    """Layout of all branches over T tokens, from iotas (fused by XLA, never stored as constants of size T). Per
    head, each branch's lattice slots, segment after segment (m = ⌈min(w, T)/r⌉ slots per segment), concatenated
    over branches ([H, S]): `pos` (token read), `exists` (a token of the segment and sequence), `seg` (segment id,
    unique across branches), and per slot the branch's w, r, the segment's start and the head's offset o (for the
    zero keys); `slot` [n_branch, H, T]: where token p of head j sits in the concatenation, `on`: whether it is on
    a lattice."""
    parts, slots, ons, first, n_seg_before = [], [], [], 0, 0
    p = jnp.arange(t)[None, :]                                                            # [1, T]
    for w, r in zip(segment_lengths, ratios):
        span, n_seg = min(w, t), -(-t // w)
        m = -(-span // r)
        off = jnp.asarray(head_offsets(h, r), jnp.int32)[:, None, None]                   # [H, 1, 1]
        within = off + r * jnp.arange(m)[None, None, :]                                   # [H, 1, m]
        start = jnp.arange(n_seg)[None, :, None] * w                                      # [1, n_seg, 1]
        full = lambda x: jnp.broadcast_to(x, (h, n_seg, m)).reshape(h, -1)
        parts.append({"pos": full(jnp.minimum(start + within, t - 1)),
                      "exists": full((within < span) & (start + within < t)),
                      "seg": full(n_seg_before + jnp.arange(n_seg)[None, :, None]), "w": full(jnp.asarray(w)),
                      "r": full(jnp.asarray(r)), "start": full(start), "off": full(off)})
        rel = p % w - off[:, :, 0]                                                        # [H, T]
        ons.append(rel % r == 0)
        slots.append(first + jnp.where(rel % r == 0, (p // w) * m + rel // r, 0))
        first, n_seg_before = first + n_seg * m, n_seg_before + n_seg
    lat = {k: jnp.concatenate([part[k] for part in parts], 1) for k in parts[0]}
    return {**lat, "slot": jnp.stack(slots), "on": jnp.stack(ons)}


def dilated_attention(q: jax.Array, k: jax.Array, v: jax.Array, length: jax.Array, segment_lengths: Sequence[int],
                      dilation_ratios: Sequence[int], *, block_q: int = 512, block_k: int = 1024) -> jax.Array:
    """q, k, v [B, T, H, d] with each row's `length` [B] valid tokens first → [B, T, H, d] in q.dtype.

    All branches' lattices run as one `attention` call (branch and segment as the segment id), so one blockwise
    kernel serves every branch."""
    if len(segment_lengths) != len(dilation_ratios) or not segment_lengths:
        raise ValueError(f"segment_lengths {segment_lengths} and dilation_ratios {dilation_ratios}: one per branch")
    b, t, h, d = q.shape
    lat = _lattices(t, h, segment_lengths, dilation_ratios)
    n_slots = lat["pos"].shape[1]
    valid = (lat["exists"][None] & (lat["pos"][None] < length[:, None, None])).reshape(b * h, n_slots)
    segs = jnp.broadcast_to(lat["seg"].astype(jnp.int32), (b, h, n_slots)).reshape(b * h, n_slots)

    def gather(x):  # [B, T, H, d] → [B·H, S, 1, d], head j reading its own lattices
        return jnp.take_along_axis(jnp.moveaxis(x, 2, 1), lat["pos"][None, :, :, None], axis=2).reshape(b * h, -1, 1, d)

    out, lse = attention(gather(q), gather(k), gather(v), valid, segs, segs, block_q=block_q, block_k=block_k,
                         return_lse=True)
    out, lse = out.reshape(b, h, n_slots, d), lse.reshape(b, h, n_slots)

    # the reference's zero keys: lattice points of a segment in [filled, ⌈min(w, L)/r⌉·r)
    w, r, off, L = lat["w"][None], lat["r"][None], lat["off"][None], length[:, None, None]
    filled = jnp.clip(L - lat["start"][None], 0, w)
    count = lambda x: jnp.maximum(0, (x - off + r - 1) // r)
    zeros = jnp.maximum(count(-(-jnp.minimum(L, w) // r) * r) - count(filled), 0)             # [B, H, S]
    merged = jnp.logaddexp(lse, jnp.where(zeros > 0, jnp.log(jnp.maximum(zeros, 1)), _NEG))
    out = out.astype(jnp.float32) * jnp.exp(lse - merged)[..., None]

    # back to token order, one [B, H, n_branch·T] gather; branches merged by the softmax of their lse
    idx = jnp.moveaxis(lat["slot"], 0, 1).reshape(h, -1)                                       # [H, n_branch·T]
    on = jnp.moveaxis(lat["on"], 0, 1)[None]                                                   # [1, H, nb, T]
    dense_out = jnp.take_along_axis(out, idx[None, :, :, None], axis=2).reshape(b, h, -1, t, d)
    dense_lse = jnp.where(on, jnp.take_along_axis(merged, idx[None], axis=2).reshape(b, h, -1, t), _NEG)
    weights = jax.nn.softmax(jax.lax.stop_gradient(dense_lse), axis=2) * on                    # [B, H, nb, T]
    return jnp.moveaxis((dense_out * weights[..., None]).sum(2), 1, 2).astype(q.dtype)
