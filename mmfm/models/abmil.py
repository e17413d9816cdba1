"""Gated multi-head attention-based MIL (Ilse et al. 2018; the TANGLE / MADELEINE / Threads slide encoder).

Tiles pass a pre-attention MLP (Linear → [LayerNorm] → activation → Dropout); each head scores every tile with a gated
attention a = w_hᵀ(tanh(V h) ⊙ σ(U h)), softmax over the bag's *valid* tiles only, and pools the tile
embeddings with those weights. Heads are concatenated (or averaged). Memory and time are linear in N,
padding tiles get exactly zero weight (padding-invariant), and the weights are returned for heatmaps.
`GatedAttentionPool` is also the readout of the transformer slide encoder and the gene-set encoder.
`ABMIL.embed_chunked` computes the same embeddings a chunk of tiles at a time for slides packed back to back in a
row, stopping at the row's last tile, for the `mil` probe's training step (one padded length, one compilation;
mmfm.eval.probes.mil).
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
        # both branches as one product twice as wide: one GEMM (and one in the backward pass) instead of two
        kernel = jnp.concatenate([self.tanh_branch.kernel[...], self.gate_branch.kernel[...]], 1).astype(h.dtype)
        bias = jnp.concatenate([self.tanh_branch.bias[...], self.gate_branch.bias[...]]).astype(h.dtype)
        a, g = jnp.split(h @ kernel + bias, 2, axis=-1)
        gated = jnp.tanh(a) * jax.nn.sigmoid(g)
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
        """[..., heads, dim] → [..., out_dim]."""
        return pooled.reshape(*pooled.shape[:-2], -1) if self.merge == "concat" else pooled.mean(-2)

    def embed_chunked(self, features: jax.Array, mask: jax.Array, slide: jax.Array, n_slides: int,
                      chunks: tuple[int, ...], *, index: jax.Array | None = None,
                      deterministic: bool = True) -> jax.Array:
        """[B, n_slides, out_dim] embeddings of the slides whose tiles share a row back to back (`slide` [B, N]: which
        of the row's slides each tile belongs to), as `__call__(...).embedding` of each slide alone, computed a chunk
        of tiles at a time (`chunked_attention_pool`, chunks of the sizes `chunks`): the tiles past a row's last cost
        nothing and one row holds a case's slides without padding between them, so one padded length serves cases
        of every size, each at the cost of its own tiles — one compiled training step instead of one per length
        bucket and slide count. `index` [B, N]: `features` is a table [T, D] whose rows `index` names are the rows'
        tiles, read a chunk at a time (only the chunks visited are read). Dropout draws one key per layer per call
        (as `__call__`) and folds in the chunk's first tile."""
        drops = [blk.drop for blk in self.pre] + [self.pool.drop]
        keys = [None if deterministic or not d.rate else d.key() for d in drops]
        graphdef, params, rest = nnx.split(self, nnx.Param, ...)

        def score(params, aux, x, start):
            rest, keys = aux
            m = nnx.merge(graphdef, params, rest, copy=True)
            key = lambda j: None if keys[j] is None else jax.random.fold_in(keys[j], start)  # noqa: E731
            x = x.astype(m.dtype)
            for j, block in enumerate(m.pre):
                x = block(x, deterministic=deterministic, rngs=key(j))
            return x, m.pool.logits(x, deterministic=deterministic, rngs=key(-1))

        if index is None:
            b, n, d = features.shape
            features, index = features.reshape(b * n, d), jnp.arange(b * n).reshape(b, n)
        return self._merge(chunked_attention_pool(score, chunks, n_slides, params, (rest, keys), features, index, mask,
                                                  slide))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def chunked_attention_pool(score, chunks: tuple[int, ...], n_segments: int, params, aux, table: jax.Array,
                           index: jax.Array, mask: jax.Array, segment: jax.Array) -> jax.Array:
    """[B, n_segments, heads, dim] attention pooling of each segment of each row (`segment` [B, N] in [0, n_segments);
    softmax over the segment's `mask`ed tiles) of `score(params, aux, x, start) -> (tiles [B, size, dim], logits
    [B, heads, size])` over the chunks of the rows' tiles `table[index]` (`table` [T, D], `index` [B, N]; `_chunks`:
    sizes `chunks`, from the first tile to the last valid one, each chunk's tiles gathered when it is visited): an
    online softmax (running max, normaliser and weighted sum per segment, as flash attention). The backward pass
    recomputes each chunk: JAX's own derivative of a scan stores every chunk's intermediates, padding included
    (about 2× slower at 2048 padded tiles for 330 real ones), and loops with a data-dependent trip count have none;
    keeping a chunk's VJP residuals instead (~4.6k floats per tile at CLAM's sizes as `jax.vjp` chooses them: the
    input, pre-activations, masks, both branches) would need buffers for the padded row zero-filled every step —
    ~75 MB at 4096 tiles. Gradients reach `params` only — none to the tile features (training never asks). A
    segment without tiles pools to 0."""
    return _pool_fwd(score, chunks, n_segments, params, aux, table, index, mask, segment)[0]


def _chunks(chunks: tuple[int, ...], table: jax.Array, index: jax.Array, mask: jax.Array, segment: jax.Array,
            n_segments: int, visit, carry):
    """`visit(x, valid, onehot, start, carry)` over consecutive chunks of the rows' tiles (`x`: their rows of `table`)
    from tile 0 to the last valid tile of any row (rounded up to the last chunk size): as many of the largest chunk
    size as fit, then of the next — large matrix products for the bulk of a bag, little padding at its end (while
    loops: their trip counts are data). `onehot` [B, size, n_segments] marks each valid tile's segment; `start` is
    the chunk's first tile."""
    if index.shape[1] % chunks[-1]:
        raise ValueError(f"chunked pooling: bag length {index.shape[1]} is not a multiple of chunk={chunks[-1]}")
    end = jnp.max(jnp.where(mask, jnp.arange(1, mask.shape[1] + 1), 0))  # one past the last valid tile
    end = (end + chunks[-1] - 1) // chunks[-1] * chunks[-1]
    first = jnp.zeros((), end.dtype)
    for size in chunks:

        def body(i, carry, first=first, size=size):
            start = first + i * size
            x = table[jax.lax.dynamic_slice_in_dim(index, start, size, axis=1)]
            valid = jax.lax.dynamic_slice_in_dim(mask, start, size, axis=1)
            seg = jax.lax.dynamic_slice_in_dim(segment, start, size, axis=1)
            onehot = ((seg[..., None] == jnp.arange(n_segments)) & valid[..., None]).astype(jnp.float32)
            return visit(x, valid, onehot, start, carry)

        n = (end - first) // size
        carry = jax.lax.fori_loop(0, n, body, carry)
        first = first + n * size
    return carry


def _pool_fwd(score, chunks, n_segments, params, aux, table, index, mask, segment):
    def visit(x, valid, onehot, start, carry):
        top, total, acc = carry  # [B, S, heads] ×2, [B, S, heads, dim]
        h, logits = score(params, aux, x, start)
        seg_logits = jnp.where(onehot[:, None] > 0, logits[..., None], -jnp.inf)  # [B, heads, n, S]
        new_top = jnp.maximum(top, seg_logits.max(2).transpose(0, 2, 1))  # starts at -1e30: exp(top - new_top) finite
        tile_top = jnp.einsum("bns,bsh->bhn", onehot, new_top)  # each valid tile's segment max (padding: 0)
        p = jnp.where(valid[:, None, :], jnp.exp(jnp.where(valid[:, None, :], logits, 0.0) - tile_top), 0.0)
        rescale = jnp.exp(top - new_top)
        acc = acc * rescale[..., None] + jnp.einsum("bhn,bns,bnd->bshd", p, onehot, h.astype(jnp.float32))
        return new_top, total * rescale + jnp.einsum("bhn,bns->bsh", p, onehot), acc

    b = index.shape[0]
    h, logits = jax.eval_shape(lambda: score(params, aux, table[index[:, :chunks[-1]]], 0))
    heads, dim = logits.shape[1], h.shape[2]
    init = (jnp.full((b, n_segments, heads), -1e30, jnp.float32), jnp.zeros((b, n_segments, heads), jnp.float32),
            jnp.zeros((b, n_segments, heads, dim), jnp.float32))
    top, total, acc = _chunks(chunks, table, index, mask, segment, n_segments, visit, init)
    pooled = acc / jnp.maximum(total, 1e-30)[..., None]  # a segment without valid tiles: 0, as masked_softmax
    return pooled, (params, aux, table, index, mask, segment, top, total, pooled)


def _pool_bwd(score, chunks, n_segments, res, g):
    params, aux, table, index, mask, segment, top, total, pooled = res
    inv = 1.0 / jnp.maximum(total, 1e-30)
    g_pooled = (g * pooled).sum(-1)  # [B, S, heads]

    def visit(x, valid, onehot, start, grads):
        (h, logits), vjp = jax.vjp(lambda p: score(p, aux, x, start), params)
        tile = lambda a: jnp.einsum("bns,bsh->bhn", onehot, a)  # noqa: E731  per-segment value at each valid tile
        a = jnp.where(valid[:, None, :], jnp.exp(jnp.where(valid[:, None, :], logits, 0.0) - tile(top)), 0.0)
        a = a * tile(inv)  # the attention weights of this chunk's tiles within their segments
        g_tile = jnp.einsum("bns,bshd->bhnd", onehot, g)  # each tile's segment's cotangent
        d_h = jnp.einsum("bhn,bhnd->bnd", a, g_tile)
        d_logits = a * (jnp.einsum("bnd,bhnd->bhn", h.astype(jnp.float32), g_tile) - tile(g_pooled))
        return jax.tree.map(jnp.add, grads, vjp((d_h.astype(h.dtype), d_logits.astype(logits.dtype)))[0])

    grads = _chunks(chunks, table, index, mask, segment, n_segments, visit, jax.tree.map(jnp.zeros_like, params))
    return grads, None, None, None, None, None


chunked_attention_pool.defvjp(_pool_fwd, _pool_bwd)
