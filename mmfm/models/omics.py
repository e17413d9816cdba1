"""Encoders for vector modalities: RNA, protein, mutation flags.

Absent ≠ zero. Every input comes with a mask (gene not measured in this cohort, protein not on the panel,
mutation status unknown):
- `MaskedMLP` (kind "mlp"): values are zeroed where masked AND the mask itself is concatenated to the
  input, so the first layer sees [values·mask, mask] and can tell "measured 0" from "not measured".
  Blocks are Linear → LayerNorm → activation → Dropout (TANGLE's RNA MLP). One class serves RNA, protein
  and mutations; only the config differs (a mutation encoder is a small one).
- `GeneSetEncoder` (kind "geneset"): each measured gene is a token = gene-id embedding + value embedding,
  pooled by gated multi-head attention over measured genes only. Unmeasured genes are not tokens at all,
  so cohorts with different gene panels share one model (pass `gene_ids` to map another panel's columns
  into the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm.models.abmil import GatedAttentionPool
from mmfm.models.axes import EMBED, FEATURE, VOCAB
from mmfm.models.layers import MLPBlock, param


@dataclass(frozen=True)
class OmicsConfig:
    kind: str = "mlp"       # mlp | geneset
    hidden: int = 512       # mlp width / gene-token dim
    n_layers: int = 2       # mlp blocks
    act: str = "gelu"
    dropout: float = 0.2
    n_heads: int = 4        # geneset pooling heads
    attn_dim: int = 64      # geneset pooling attention dim
    vocab_size: int = 0     # geneset vocabulary; 0 = the batch's feature count


class MaskedMLP(nnx.Module):
    def __init__(self, cfg: OmicsConfig, n_features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        dims = [2 * n_features] + [cfg.hidden] * cfg.n_layers
        self.blocks = nnx.data([MLPBlock(i, o, act=cfg.act, dropout=cfg.dropout, rngs=rngs)
                                for i, o in zip(dims[:-1], dims[1:])])
        self.dtype, self.out_dim = dtype, dims[-1]

    def __call__(self, values: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
        m = mask.astype(self.dtype)
        x = jnp.concatenate([jnp.where(mask, values, 0).astype(self.dtype), m], axis=-1)
        for block in self.blocks:
            x = block(x, deterministic=deterministic)
        return x.astype(jnp.float32)


class GeneSetEncoder(nnx.Module):
    def __init__(self, cfg: OmicsConfig, n_features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        vocab = cfg.vocab_size or n_features
        self.gene_embed = param(rngs, nnx.initializers.normal(0.02), (vocab, cfg.hidden), (VOCAB, EMBED))
        self.value_embed = MLPBlock(1, cfg.hidden, act=cfg.act, names=(FEATURE, EMBED), rngs=rngs)
        self.token_mlp = MLPBlock(cfg.hidden, cfg.hidden, act=cfg.act, dropout=cfg.dropout, rngs=rngs)
        self.pool = GatedAttentionPool(cfg.hidden, cfg.attn_dim, cfg.n_heads, dropout=cfg.dropout, rngs=rngs)
        self.dtype, self.out_dim, self.n_features = dtype, cfg.n_heads * cfg.hidden, n_features

    def __call__(self, values: jax.Array, mask: jax.Array, gene_ids: jax.Array | None = None, *,
                 deterministic: bool = True) -> jax.Array:
        """values, mask [B, G]; gene_ids [G] rows of the vocabulary (default: column j ↦ gene j)."""
        ids = jnp.arange(values.shape[-1]) if gene_ids is None else gene_ids
        tokens = self.gene_embed[...][ids].astype(self.dtype) + self.value_embed(
            jnp.where(mask, values, 0)[..., None].astype(self.dtype))
        tokens = self.token_mlp(tokens, deterministic=deterministic)
        pooled, _ = self.pool(tokens, mask, deterministic=deterministic)
        return pooled.reshape(pooled.shape[0], -1)


def build_omics_encoder(cfg: OmicsConfig, n_features: int, *, dtype, rngs: nnx.Rngs):
    if cfg.kind == "mlp":
        return MaskedMLP(cfg, n_features, dtype=dtype, rngs=rngs)
    if cfg.kind == "geneset":
        return GeneSetEncoder(cfg, n_features, dtype=dtype, rngs=rngs)
    raise ValueError(f"omics encoder kind={cfg.kind!r}; choose mlp or geneset")
