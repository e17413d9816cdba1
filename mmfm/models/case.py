"""Case-level aggregation: one embedding per patient from the embeddings of its slides.

`kind="mean"` is late fusion (the mean of the slide embeddings, Patho-Bench's default) and leaves the
model exactly as it is without a case encoder: one slide per row in training, the mean in `mmfm embed`.
`kind="transformer"` is a small set transformer (MOOZY's case transformer): each present slide's encoder
embedding is projected to a slide token, a learned case token is prepended, pre-LN blocks attend over
the case token and the present slides only (absent slots are masked keys), and the final case token is
the case embedding that the projection head maps into the shared space. Slide tokens carry no position,
so the output does not depend on the order of the slides, and any number of slides can be aggregated at
inference. A case without slides gives the case token alone (finite; such rows are masked in the loss).

Training sees every slide of a case: the loader's `multi_slide: pool` samples the row's tiles from all
of the case's slides and says which slide each tile came from (`slide/slide_index`); the model encodes
each of the first `max_slides` slides as its own masked bag (the slide encoders are padding-invariant,
so this equals encoding the slide alone) and aggregates them here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm.models.axes import EMBED, HIDDEN, TILES
from mmfm.models.layers import Dense, LayerNorm, param
from mmfm.models.transformer import Block, TransformerConfig


@dataclass(frozen=True)
class CaseConfig:
    kind: Literal["mean", "transformer"] = "mean"  # mean: late fusion (baseline); transformer: learned case encoder
    max_slides: int = 4                            # slides of a case encoded per training row (more are not seen)
    width: int = 256                               # case-transformer width (= case embedding size)
    depth: int = 2
    n_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1

    def __post_init__(self):
        if self.kind not in ("mean", "transformer"):
            raise ValueError(f"case.kind={self.kind!r}; choose mean or transformer")
        if self.max_slides < 1 or self.depth < 1 or self.width < 1:
            raise ValueError(f"case: max_slides, depth and width must be ≥ 1 (got {self.max_slides}, "
                             f"{self.depth}, {self.width})")
        if self.width % self.n_heads:
            raise ValueError(f"case.width={self.width} must split into n_heads={self.n_heads}")

    def block_config(self) -> TransformerConfig:
        """The slide transformer's block, position-free, dense attention (a case has a handful of slides)."""
        return TransformerConfig(width=self.width, depth=self.depth, n_heads=self.n_heads, mlp_ratio=self.mlp_ratio,
                                 dropout=self.dropout, n_registers=0, layer_pattern="none", attn_impl="xla")


class CaseEncoder(nnx.Module):
    """[B, S, in_dim] slide embeddings + [B, S] presence → [B, width] fp32 case embeddings."""

    def __init__(self, cfg: CaseConfig, in_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = Dense(in_dim, cfg.width, (EMBED, HIDDEN), rngs=rngs)
        self.proj_norm = LayerNorm(cfg.width, HIDDEN, rngs=rngs)
        self.case_token = param(rngs, nnx.initializers.normal(0.02), (1, cfg.width), (TILES, EMBED))
        self.blocks = nnx.data([Block(cfg.block_config(), rngs=rngs) for _ in range(cfg.depth)])
        self.norm = LayerNorm(cfg.width, rngs=rngs)
        self.dtype, self.out_dim = dtype, cfg.width

    def __call__(self, slide_emb: jax.Array, slide_mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
        b = slide_emb.shape[0]
        x = self.proj_norm(self.proj(slide_emb.astype(self.dtype)))
        token = jnp.broadcast_to(self.case_token[...].astype(x.dtype)[None], (b, 1, x.shape[-1]))
        x = jnp.concatenate([token, x], 1)
        valid = jnp.concatenate([jnp.ones((b, 1), bool), slide_mask.astype(bool)], 1)
        segment = jnp.zeros(valid.shape, jnp.int32)
        for block in self.blocks:
            x = block(x, valid, segment, None, deterministic=deterministic)
        return self.norm(x[:, 0]).astype(jnp.float32)
