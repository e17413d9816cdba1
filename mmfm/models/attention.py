"""Masked multi-head attention that stays linear in memory for 100k-tile bags.

`attention(q, k, v, kv_valid, q_segment, kv_segment, impl=...)` with q, k, v [B, N, H, d]. Query i may
attend key j iff key j is valid and, when segments are given, segment_q[i] == segment_kv[j] (tissue
fragments; registers get their own segment). A query with no allowed key returns zeros.
`return_lse=True` (blockwise only) also returns each query's log-sum-exp of its allowed logits [B, N, H] (-1e30
with no allowed key), which lets a caller merge attention over several key sets exactly (LongNet's dilated
branches, `mmfm.models.dilated`).

impl="blockwise" (default, any backend): flash-style online softmax in pure JAX. A `fori_loop` over query
blocks runs a `fori_loop` over key blocks carrying the running max m, normaliser l and fp32 accumulator;
blocks are sliced in place and each query block's output is written into one [B, N, H, d] buffer, so at
most [B, H, block_q, block_k] logits exist at once — never N×N, and no padded copies of q/k/v. Both loops
are rematerialised (`jax.checkpoint`), so the backward pass also keeps O(N) state per query block. Key
blocks that no query of the block may attend (all padding, or fragment ranges that do not overlap) are
skipped by `lax.cond`, which makes fragment-local layers over fragment-sorted tiles cheap.
impl="xla" / "cudnn": `jax.nn.dot_product_attention` with a dense [B, 1, N, N] mask — for small N
(training bags of a few thousand tiles); "cudnn" needs a GPU and runs in bf16.

`bias=DistanceBias(slopes, pos, on)` adds 2D ALiBi (TITAN, after Press et al.'s ALiBi): the logit of token i to
token j gets −slope_h · ‖pos_i − pos_j‖₂ (Euclidean distance of grid cells) when both tokens have a position,
0 when either has none (class token, registers). The dense kernels build it [B, H, N, N]; the blockwise kernel
builds it per [block_q, block_k] block from the blocks' positions, so it never exists N×N either.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLS = ("blockwise", "xla", "cudnn")
_NEG = -1e30  # finite, so fully masked blocks never produce inf - inf


class DistanceBias(NamedTuple):
    """2D ALiBi of a self-attention: slopes [H], grid positions pos [B, N, 2] (float), on [B, N] (has a position)."""
    slopes: jax.Array
    pos: jax.Array
    on: jax.Array

    def block(self, q_pos, q_on, k_pos, k_on) -> jax.Array:
        """[B, H, q, k] fp32 bias between the given query and key tokens."""
        diff = q_pos[:, :, None, :].astype(jnp.float32) - k_pos[:, None, :, :].astype(jnp.float32)
        dist = jnp.sqrt(jnp.sum(diff * diff, -1))
        dist = jnp.where(q_on[:, :, None] & k_on[:, None, :], dist, 0.0)
        return -self.slopes.astype(jnp.float32)[None, :, None, None] * dist[:, None]


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al. 2022): the geometric sequence 2^(-8/n)·… for a power of two n; otherwise
    those of the power of two below, then every other slope of the power of two above (TITAN uses these)."""
    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    low = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(low) + power_of_two(2 * low)[0::2][:n_heads - low]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array,
              q_segment: jax.Array | None = None, kv_segment: jax.Array | None = None, *,
              impl: str = "blockwise", block_q: int = 512, block_k: int = 1024,
              bias: DistanceBias | None = None, return_lse: bool = False):
    """Softmax(q kᵀ / √d + bias + mask) v over allowed pairs; returns [B, N, H, d] in q.dtype (and the lse)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}; choose one of {IMPLS}")
    if return_lse and impl != "blockwise":
        raise ValueError(f"return_lse needs impl='blockwise' (got {impl!r})")
    if (q_segment is None) != (kv_segment is None):
        raise ValueError("give both q_segment and kv_segment, or neither")
    if q_segment is None:
        q_segment = jnp.zeros(q.shape[:2], jnp.int32)
        kv_segment = jnp.zeros(k.shape[:2], jnp.int32)
    if impl == "blockwise":
        out, lse = _blockwise(q, k, v, kv_valid, q_segment, kv_segment, block_q, block_k, bias)
        return (out, lse) if return_lse else out
    return _dense(q, k, v, kv_valid, q_segment, kv_segment, impl, bias)


def allowed_mask(kv_valid, q_segment, kv_segment) -> jax.Array:
    """[B, Nq, Nk] bool: which (query, key) pairs may interact."""
    return kv_valid[:, None, :] & (q_segment[:, :, None] == kv_segment[:, None, :])


def _dense(q, k, v, kv_valid, q_segment, kv_segment, impl, bias):
    allowed = allowed_mask(kv_valid, q_segment, kv_segment)
    dtype = jnp.bfloat16 if impl == "cudnn" else q.dtype
    dense_bias = None if bias is None else bias.block(bias.pos, bias.on, bias.pos, bias.on).astype(dtype)
    out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), bias=dense_bias,
                                       mask=allowed[:, None], implementation=impl)
    has_key = jnp.any(allowed, axis=-1)[:, :, None, None]
    return jnp.where(has_key, out, 0).astype(q.dtype)


def _blockwise(q, k, v, kv_valid, q_segment, kv_segment, block_q, block_k, bias):
    b, n, h, d = q.shape
    s = k.shape[1]
    bq, bk = min(block_q, n), min(block_k, s)
    scale = jnp.asarray(d ** -0.5, q.dtype)
    big = jnp.iinfo(jnp.int32).max

    def key_block(j):
        # Blocks are read in place (no padded copies): the last block is shifted back to end at s, and
        # keys it shares with block j-1 are masked out as already counted.
        start = jnp.minimum(j * bk, s - bk)
        fresh = start + jnp.arange(bk) >= j * bk
        cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, bk, axis=1)
        kpos = None if bias is None else (cut(bias.pos), cut(bias.on))
        return cut(k), cut(v), cut(kv_valid) & fresh[None], cut(kv_segment), kpos

    @jax.checkpoint
    def key_step(qb, qsb, qpos, state, kk, vv, valid, seg, kpos):
        m, l, acc = state
        logits = jnp.einsum("bqhd,bkhd->bhqk", qb, kk, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias.block(*qpos, *kpos)
        ok = (valid[:, None, :] & (qsb[:, :, None] == seg[:, None, :]))[:, None]
        logits = jnp.where(ok, logits, _NEG)
        m_new = jnp.maximum(m, logits.max(-1))
        p = jnp.where(ok, jnp.exp(logits - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[..., None] + pv

    @jax.checkpoint
    def query_block(i, bufs):
        start = jnp.minimum(i * bq, n - bq)  # the last block overlaps its neighbour: recomputed, same values
        cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, bq, axis=1)
        qb, qsb = cut(q) * scale, cut(q_segment)
        qpos = None if bias is None else (cut(bias.pos), cut(bias.on))
        qmin, qmax = qsb.min(), qsb.max()

        def step(j, state):
            kk, vv, valid, seg, kpos = key_block(j)
            lo, hi = jnp.where(valid, seg, big).min(), jnp.where(valid, seg, -big).max()
            needed = (lo <= qmax) & (hi >= qmin)  # skip blocks no query here may attend
            return jax.lax.cond(needed, lambda st: key_step(qb, qsb, qpos, st, kk, vv, valid, seg, kpos),
                                lambda st: st, state)

        init = (jnp.full((b, h, bq), _NEG, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
                jnp.zeros((b, h, bq, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, -(-s // bk), step, init)
        o = jnp.moveaxis(acc / jnp.where(l > 0, l, 1.0)[..., None], 1, 2).astype(q.dtype)
        lse = jnp.moveaxis(jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), _NEG), 1, 2)
        return tuple(jax.lax.dynamic_update_slice_in_dim(buf, x, start, axis=1) for buf, x in zip(bufs, (o, lse)))

    return jax.lax.fori_loop(0, -(-n // bq), query_block, (jnp.zeros_like(q), jnp.zeros((b, n, h), jnp.float32)))
