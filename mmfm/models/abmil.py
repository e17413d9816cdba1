"""Gated multi-head attention-based MIL (Ilse et al. 2018; the TANGLE / MADELEINE / Threads slide encoder).

Tiles pass a pre-attention MLP (Linear → [LayerNorm] → activation → Dropout); each head scores every tile with a gated
attention a = w_hᵀ(tanh(V h) ⊙ σ(U h)), softmax over the bag's *valid* tiles only, and pools the tile
embeddings with those weights. Heads are concatenated (or averaged). Memory and time are linear in N,
padding tiles get exactly zero weight (padding-invariant), and the weights are returned for heatmaps.
`GatedAttentionPool` is also the readout of the transformer slide encoder and the gene-set encoder.
`ABMIL.embed_chunked` computes the same embedding a chunk of tiles at a time, skipping padding, for the `mil`
probe's training step (one padded length, one compilation; mmfm.eval.probes.mil).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm.models.axes import EMBED, HEADS, HIDDEN
from mmfm.models.layers import Dense, Dropout, MLPBlock, param
from mmfm.models.slide import SlideOutput


@dataclass(frozen=True)
class ABMILConfig:
    hidden: int = 512
    n_heads: int = 2
    attn_dim: int = 256
    n_pre_layers: int = 1
    act: str = "gelu"
    dropout: float = 0.1        # pre-attention MLP
    attn_dropout: float = 0.25  # on the gated attention features
    merge: str = "concat"       # concat | mean over heads
    pre_norm: bool = False      # LayerNorm after each pre-attention Linear (TANGLE's pre_attn); off: CLAM's fc
    norm_eps: float = 1e-6      # that LayerNorm's epsilon (torch's default 1e-5 for imported TANGLE weights)


def masked_softmax(logits: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """fp32 softmax over mask=True entries; exactly 0 elsewhere and for all-masked rows."""
    x = jnp.where(mask, logits.astype(jnp.float32), -jnp.inf)
    x_max = jnp.max(x, axis=axis, keepdims=True)
    e = jnp.where(mask, jnp.exp(x - jnp.where(jnp.isfinite(x_max), x_max, 0.0)), 0.0)
    return e / jnp.maximum(e.sum(axis=axis, keepdims=True), 1e-30)


class GatedAttentionPool(nnx.Module):
    """Multi-head gated attention pooling over a masked set: [B, N, dim] → ([B, heads, dim], [B, heads, N])."""

    def __init__(self, dim: int, attn_dim: int, n_heads: int, *, dropout: float = 0.0, rngs: nnx.Rngs):
        self.tanh_branch = Dense(dim, n_heads * attn_dim, (EMBED, HEADS), rngs=rngs)
        self.gate_branch = Dense(dim, n_heads * attn_dim, (EMBED, HEADS), rngs=rngs)
        # one score vector per head, fan-in attn_dim (as torch's Linear(attn_dim, 1) of CLAM / TANGLE): lecun's
        # default axes would read the [heads, attn_dim] shape as fan-in = heads (std 1), a near one-hot initial
        # attention on a random tile that left from-scratch ABMIL at chance on the simulated cohort
        self.score = param(rngs, nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2), (n_heads, attn_dim),
                           (HEADS, HIDDEN))
        self.drop = Dropout(dropout, rngs=rngs)
        self.n_heads, self.attn_dim = n_heads, attn_dim

    def logits(self, h: jax.Array, *, deterministic: bool = True, rngs=None) -> jax.Array:
        """[B, heads, N] fp32 attention scores of every tile, padding included."""
        b, n, _ = h.shape
        gated = jnp.tanh(self.tanh_branch(h)) * jax.nn.sigmoid(self.gate_branch(h))
        gated = self.drop(gated, deterministic=deterministic, rngs=rngs).reshape(b, n, self.n_heads, self.attn_dim)
        return jnp.einsum("bnha,ha->bhn", gated, self.score[...].astype(h.dtype), preferred_element_type=jnp.float32)

    def __call__(self, h: jax.Array, mask: jax.Array, *, deterministic: bool = True):
        attn = masked_softmax(self.logits(h, deterministic=deterministic), mask[:, None, :])
        pooled = jnp.einsum("bhn,bnd->bhd", attn, h.astype(jnp.float32))
        return pooled, attn


class ABMIL(nnx.Module):
    """Slide encoder: pre-attention MLP + gated multi-head attention pooling. Coordinates are unused."""

    def __init__(self, cfg: ABMILConfig, feature_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.merge not in ("concat", "mean"):
            raise ValueError(f"slide.abmil.merge={cfg.merge!r}; choose concat or mean")
        dims = [feature_dim] + [cfg.hidden] * cfg.n_pre_layers
        self.pre = nnx.data([MLPBlock(i, o, act=cfg.act, dropout=cfg.dropout, layer_norm=cfg.pre_norm,
                                      eps=cfg.norm_eps, rngs=rngs)
                             for i, o in zip(dims[:-1], dims[1:])])
        self.pool = GatedAttentionPool(dims[-1], cfg.attn_dim, cfg.n_heads, dropout=cfg.attn_dropout, rngs=rngs)
        self.merge, self.dtype = cfg.merge, dtype
        self.out_dim = dims[-1] * (cfg.n_heads if cfg.merge == "concat" else 1)

    def __call__(self, features, coords, mask, fragment=None, *, deterministic: bool = True) -> SlideOutput:
        h = features.astype(self.dtype)
        for block in self.pre:
            h = block(h, deterministic=deterministic)
        pooled, attn = self.pool(h, mask, deterministic=deterministic)
        return SlideOutput(self._merge(pooled), h, attn)

    def _merge(self, pooled: jax.Array) -> jax.Array:
        return pooled.reshape(pooled.shape[0], -1) if self.merge == "concat" else pooled.mean(1)

    def embed_chunked(self, features: jax.Array, mask: jax.Array, chunk: int, *,
                      deterministic: bool = True) -> jax.Array:
        """`__call__(...).embedding`, computed `chunk` tiles at a time (`chunked_attention_pool`): a chunk that is
        padding in every row costs nothing, so one padded length serves bags of every size, each at the cost of its
        own tiles — one compiled training step instead of one per length bucket. Dropout draws one key per layer
        per call (as `__call__`) and folds in the chunk index."""
        drops = [blk.drop for blk in self.pre] + [self.pool.drop]
        keys = [None if deterministic or not d.rate else d.key() for d in drops]
        graphdef, params, rest = nnx.split(self, nnx.Param, ...)

        def score(params, aux, x, i):
            rest, keys = aux
            m = nnx.merge(graphdef, params, rest, copy=True)
            key = lambda j: None if keys[j] is None else jax.random.fold_in(keys[j], i)  # noqa: E731
            x = x.astype(m.dtype)
            for j, block in enumerate(m.pre):
                x = block(x, deterministic=deterministic, rngs=key(j))
            return x, m.pool.logits(x, deterministic=deterministic, rngs=key(-1))

        return self._merge(chunked_attention_pool(score, chunk, params, (rest, keys), features, mask))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def chunked_attention_pool(score, chunk: int, params, aux, features: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, heads, dim] attention pooling of `score(params, aux, x, i) -> (tiles [B, chunk, dim], logits
    [B, heads, chunk])` over the chunks i of `features` [B, N, D], softmax over `mask`: an online softmax (running
    max, normaliser and weighted sum per row, as flash attention) in a scan whose chunks that are padding in every
    row are skipped (lax.cond). The backward pass recomputes each busy chunk and skips the others too: JAX's own
    derivative of the scan stores every chunk's intermediates, padding included (about 2× slower at 2048 padded
    tiles for 330 real ones). Gradients reach `params` only — none to the tile features (training never asks)."""
    return _pool_fwd(score, chunk, params, aux, features, mask)[0]


def _chunks(chunk: int, features: jax.Array, mask: jax.Array, visit, carry):
    """scan `visit(x, valid, i, carry)` over the chunks of `features` that hold a valid tile in some row."""
    if features.shape[1] % chunk:
        raise ValueError(f"chunked pooling: bag length {features.shape[1]} is not a multiple of chunk={chunk}")

    def body(carry, i):
        x = jax.lax.dynamic_slice_in_dim(features, i * chunk, chunk, axis=1)
        valid = jax.lax.dynamic_slice_in_dim(mask, i * chunk, chunk, axis=1)
        return jax.lax.cond(valid.any(), partial(visit, x, valid, i), lambda c: c, carry), None

    return jax.lax.scan(body, carry, jnp.arange(features.shape[1] // chunk))[0]


def _pool_fwd(score, chunk, params, aux, features, mask):
    def visit(x, valid, i, carry):
        top, total, acc = carry
        h, logits = score(params, aux, x, i)
        logits = jnp.where(valid[:, None, :], logits, -jnp.inf)
        new_top = jnp.maximum(top, logits.max(-1))  # starts at -1e30: finite, so exp(top - new_top) is never nan
        p = jnp.exp(logits - new_top[..., None])  # padding: exp(-inf) = 0
        rescale = jnp.exp(top - new_top)
        acc = acc * rescale[..., None] + jnp.einsum("bhn,bnd->bhd", p, h.astype(jnp.float32))
        return new_top, total * rescale + p.sum(-1), acc

    b = features.shape[0]
    h, logits = jax.eval_shape(lambda: score(params, aux, features[:, :chunk], 0))
    heads, dim = logits.shape[1], h.shape[2]
    init = (jnp.full((b, heads), -1e30, jnp.float32), jnp.zeros((b, heads), jnp.float32),
            jnp.zeros((b, heads, dim), jnp.float32))
    top, total, acc = _chunks(chunk, features, mask, visit, init)
    pooled = acc / jnp.maximum(total, 1e-30)[..., None]  # a row without valid tiles: 0, as masked_softmax
    return pooled, (params, aux, features, mask, top, total, pooled)


def _pool_bwd(score, chunk, res, g):
    params, aux, features, mask, top, total, pooled = res
    inv = 1.0 / jnp.maximum(total, 1e-30)
    g_pooled = (g * pooled).sum(-1)  # [B, heads]

    def visit(x, valid, i, grads):
        (h, logits), vjp = jax.vjp(lambda p: score(p, aux, x, i), params)
        a = jnp.where(valid[:, None, :], jnp.exp(jnp.where(valid[:, None, :], logits, 0.0) - top[..., None]), 0.0)
        a = a * inv[..., None]  # the attention weights of this chunk's tiles
        d_h = jnp.einsum("bhn,bhd->bnd", a, g)
        d_logits = a * (jnp.einsum("bnd,bhd->bhn", h.astype(jnp.float32), g) - g_pooled[..., None])
        return jax.tree.map(jnp.add, grads, vjp((d_h.astype(h.dtype), d_logits.astype(logits.dtype)))[0])

    grads = _chunks(chunk, features, mask, visit, jax.tree.map(jnp.zeros_like, params))
    return grads, None, None, None


chunked_attention_pool.defvjp(_pool_fwd, _pool_bwd)
