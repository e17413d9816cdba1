"""Gated multi-head attention-based MIL (Ilse et al. 2018; the TANGLE / MADELEINE / Threads slide encoder).

Tiles pass a pre-attention MLP (Linear → [LayerNorm] → activation → Dropout); each head scores every tile with a gated
attention a = w_hᵀ(tanh(V h) ⊙ σ(U h)), softmax over the bag's *valid* tiles only, and pools the tile
embeddings with those weights. Heads are concatenated (or averaged). Memory and time are linear in N,
padding tiles get exactly zero weight (padding-invariant), and the weights are returned for heatmaps.
`GatedAttentionPool` is also the readout of the transformer slide encoder and the gene-set encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def __call__(self, h: jax.Array, mask: jax.Array, *, deterministic: bool = True):
        b, n, _ = h.shape
        gated = jnp.tanh(self.tanh_branch(h)) * jax.nn.sigmoid(self.gate_branch(h))
        gated = self.drop(gated, deterministic=deterministic).reshape(b, n, self.n_heads, self.attn_dim)
        logits = jnp.einsum("bnha,ha->bhn", gated, self.score[...].astype(h.dtype),
                            preferred_element_type=jnp.float32)
        attn = masked_softmax(logits, mask[:, None, :])
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
        emb = pooled.reshape(pooled.shape[0], -1) if self.merge == "concat" else pooled.mean(1)
        return SlideOutput(emb, h, attn)
