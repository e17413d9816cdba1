"""Masked multi-head attention that stays linear in memory for 100k-tile bags.

`attention(q, k, v, kv_valid, q_segment, kv_segment, impl=...)` with q, k, v [B, N, H, d]. Query i may
attend key j iff key j is valid and, when segments are given, segment_q[i] == segment_kv[j] (tissue
fragments; registers get their own segment). A query with no allowed key returns zeros.

impl="blockwise" (default, any backend): flash-style online softmax in pure JAX. A `lax.map` over query
blocks runs a `lax.scan` over key blocks carrying the running max m, normaliser l and fp32 accumulator,
so at most [B, H, block_q, block_k] logits exist at once — never N×N. Both loops are rematerialised
(`jax.checkpoint`), so the backward pass also keeps O(N) state per query block. Key blocks that no query
of the block may attend (all padding, or fragment ranges that do not overlap) are skipped by `lax.cond`,
which makes fragment-local layers over fragment-sorted tiles cheap.
impl="xla" / "cudnn": `jax.nn.dot_product_attention` with a dense [B, 1, N, N] mask — for small N
(training bags of a few thousand tiles); "cudnn" needs a GPU and runs in bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("blockwise", "xla", "cudnn")
_NEG = -1e30  # finite, so fully masked blocks never produce inf - inf


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array,
              q_segment: jax.Array | None = None, kv_segment: jax.Array | None = None, *,
              impl: str = "blockwise", block_q: int = 512, block_k: int = 1024) -> jax.Array:
    """Softmax(q kᵀ / √d + mask) v over allowed pairs; returns [B, N, H, d] in q.dtype."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}; choose one of {IMPLS}")
    if (q_segment is None) != (kv_segment is None):
        raise ValueError("give both q_segment and kv_segment, or neither")
    if q_segment is None:
        q_segment = jnp.zeros(q.shape[:2], jnp.int32)
        kv_segment = jnp.zeros(k.shape[:2], jnp.int32)
    if impl == "blockwise":
        return _blockwise(q, k, v, kv_valid, q_segment, kv_segment, block_q, block_k)
    return _dense(q, k, v, kv_valid, q_segment, kv_segment, impl)


def allowed_mask(kv_valid, q_segment, kv_segment) -> jax.Array:
    """[B, Nq, Nk] bool: which (query, key) pairs may interact."""
    return kv_valid[:, None, :] & (q_segment[:, :, None] == kv_segment[:, None, :])


def _dense(q, k, v, kv_valid, q_segment, kv_segment, impl):
    allowed = allowed_mask(kv_valid, q_segment, kv_segment)
    dtype = jnp.bfloat16 if impl == "cudnn" else q.dtype
    out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                       mask=allowed[:, None], implementation=impl)
    has_key = jnp.any(allowed, axis=-1)[:, :, None, None]
    return jnp.where(has_key, out, 0).astype(q.dtype)


def _pad_to(x: jax.Array, n: int, value=0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """[B, N, ...] → [N/size, B, size, ...] (block axis first, for scan/map)."""
    b, n = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n // size, size, *x.shape[2:]), 1, 0)


def _blockwise(q, k, v, kv_valid, q_segment, kv_segment, block_q, block_k):
    b, n, h, d = q.shape
    s = k.shape[1]
    block_q, block_k = min(block_q, n), min(block_k, s)
    nq, nk = -(-n // block_q) * block_q, -(-s // block_k) * block_k
    scale = d ** -0.5
    qs = _blocks(_pad_to(q * jnp.asarray(scale, q.dtype), nq), block_q)
    qseg = _blocks(_pad_to(q_segment, nq), block_q)
    ks, vs = _blocks(_pad_to(k, nk), block_k), _blocks(_pad_to(v, nk), block_k)
    kval = _blocks(_pad_to(kv_valid, nk, False), block_k)
    kseg = _blocks(_pad_to(kv_segment, nk), block_k)
    # Per key block: segment range over valid keys, for skipping blocks nobody may attend.
    big = jnp.iinfo(jnp.int32).max
    kmin = jnp.where(kval, kseg, big).min(axis=(1, 2))
    kmax = jnp.where(kval, kseg, -big).max(axis=(1, 2))

    @jax.checkpoint
    def key_step(qb, qsb, state, kk, vv, valid, seg):
        m, l, acc = state
        logits = jnp.einsum("bqhd,bkhd->bhqk", qb, kk, preferred_element_type=jnp.float32)
        ok = (valid[:, None, :] & (qsb[:, :, None] == seg[:, None, :]))[:, None]
        logits = jnp.where(ok, logits, _NEG)
        m_new = jnp.maximum(m, logits.max(-1))
        p = jnp.where(ok, jnp.exp(logits - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[..., None] + pv

    @jax.checkpoint
    def query_block(args):
        qb, qsb = args
        qmin, qmax = qsb.min(), qsb.max()
        init = (jnp.full((b, h, block_q), _NEG, jnp.float32), jnp.zeros((b, h, block_q), jnp.float32),
                jnp.zeros((b, h, block_q, d), jnp.float32))

        def step(state, kb):
            kk, vv, valid, seg, lo, hi = kb
            needed = (lo <= qmax) & (hi >= qmin)
            state = jax.lax.cond(needed, lambda st: key_step(qb, qsb, st, kk, vv, valid, seg), lambda st: st, state)
            return state, None

        (m, l, acc), _ = jax.lax.scan(step, init, (ks, vs, kval, kseg, kmin, kmax))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        return jnp.moveaxis(out, 1, 2).astype(q.dtype)  # [B, bq, H, d]

    out = jax.lax.map(query_block, (qs, qseg))  # [nq/bq, B, bq, H, d]
    return jnp.moveaxis(out, 0, 1).reshape(b, nq, h, d)[:, :n]

