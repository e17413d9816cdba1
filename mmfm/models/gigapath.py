"""Prov-GigaPath's slide encoder (Xu et al., Nature 2024): a LongNet ViT over tile features, in Flax.

Reimplemented from the public description and module structure of prov-gigapath's `gigapath/slide_encoder.py`
(`LongNetViT`, `gigapath_slide_enc12l768d`) and its torchscale encoder (Apache-2.0 / MIT; no code copied):
  tiles     Linear(D → W) (`patch_embed.proj`) + a fixed 2D sin-cos position of each tile's grid cell (MAE's
            table over a 1000 × 1000 grid: first half of the channels encodes the row index y, second half the
            column x, each [sin(pos·ω), cos(pos·ω)] with ω_i = 10000^(−i/(W/4))); computed per tile here, never
            as the 10⁶ × W table. The class token (`cls_token`) gets the zero position and comes first.
  blocks    torchscale's encoder layer with `subln` (its default): pre-LN, q/k/v/out projections with biases,
            LongNet dilated attention (`mmfm.models.dilated`) followed by a LayerNorm over the concatenated heads
            (`inner_attn_ln`) before `out_proj`; FFN fc1 → exact GELU → LayerNorm(ffn) (`ffn_layernorm`) → fc2.
            Encoder LayerNorms use ε = 1e-5; the readout norm (`norm`) ε = 1e-6.
  readout   the state after `layer` blocks (TRIDENT and GigaPath's fine-tuning read layer 11 of 12 with
            `all_layer_embed`), mean over the tiles then `norm` (`global_pool`, TRIDENT) or `norm` of the class
            token; `layer = -1` is the final output, which first passes the encoder's own LayerNorm
            (`encoder.layer_norm`). Prov-GigaPath's README notes the class token was not trained in pretraining.
Positions: mmfm passes grid cells (level-0 px // patch_size_level0, origin at the bag's minimum); GigaPath
(TRIDENT sets its tile_size to patch_size_level0) uses ⌊px / tile_size⌋ without moving the origin, so the two
agree on bags whose minimum cell is (0, 0) and otherwise see the same tiles shifted on the fixed grid.
Padding tiles are moved behind the real ones (order kept), so they never change the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm.models.axes import EMBED, HEADS, HIDDEN, TILES
from mmfm.models.dilated import dilated_attention
from mmfm.models.layers import Dense, Dropout, LayerNorm, activation, masked_mean, param
from mmfm.models.slide import SlideOutput
from mmfm.models.transformer import token_chunked


def released_segment_lengths(max_wsi_size: int = 262144, tile_size: int = 256) -> tuple[int, ...]:
    """LongNetViT's segment lengths: 5 powers of two spaced evenly in log2 from 1024 to (max_wsi_size // tile)²,
    truncated to integers → (1024, 5792, 32768, 185363, 1048576) for the released model."""
    top = int(np.log2((max_wsi_size // tile_size) ** 2))
    return tuple(int(x) for x in np.power(2, np.linspace(np.log2(1024), top, 5)).astype(int))


@dataclass(frozen=True)
class GigaPathConfig:
    width: int = 768
    depth: int = 12
    n_heads: int = 16
    ffn_dim: int = 3072
    segment_lengths: tuple[int, ...] = released_segment_lengths()
    dilation_ratios: tuple[int, ...] = (1, 2, 4, 8, 16)
    layer: int = 11                    # blocks whose output is read (0 = input embedding); -1: final output + LN
    global_pool: bool = True           # mean of the tile tokens (TRIDENT), else the class token
    dropout: float = 0.0               # after attention and FFN (torchscale's dropout), training only
    block_q: int = 512
    block_k: int = 1024
    mlp_chunk: int = 4096

    def validate(self) -> None:
        errors = []
        if self.width % self.n_heads or self.width % 4:
            errors.append(f"width={self.width} must split into n_heads={self.n_heads} and be divisible by 4")
        if len(self.segment_lengths) != len(self.dilation_ratios) or not self.segment_lengths:
            errors.append(f"segment_lengths {self.segment_lengths} / dilation_ratios {self.dilation_ratios}: "
                          "one of each per branch")
        if min(self.segment_lengths + self.dilation_ratios, default=1) < 1:
            errors.append("segment lengths and dilation ratios must be ≥ 1")
        if not -1 <= self.layer <= self.depth:
            errors.append(f"layer={self.layer} must be -1 (final output) or 0..depth={self.depth}")
        if errors:
            raise ValueError("slide.gigapath: " + "; ".join(errors))


def sincos_2d(coords: jax.Array, width: int) -> jax.Array:
    """MAE's 2D sin-cos embedding of grid cells coords [..., 2] = (x, y) → [..., width]: (y half, x half)."""
    omega = 1.0 / 10000 ** (jnp.arange(width // 4, dtype=jnp.float32) / (width / 4))
    half = lambda p: jnp.concatenate([jnp.sin(p[..., None] * omega), jnp.cos(p[..., None] * omega)], -1)
    c = coords.astype(jnp.float32)
    return jnp.concatenate([half(c[..., 1]), half(c[..., 0])], -1)


class LongNetBlock(nnx.Module):
    def __init__(self, cfg: GigaPathConfig, *, rngs: nnx.Rngs):
        w = cfg.width
        self.cfg = cfg
        self.attn_norm, self.ffn_norm = LayerNorm(w, rngs=rngs, eps=1e-5), LayerNorm(w, rngs=rngs, eps=1e-5)
        self.q, self.k, self.v = (Dense(w, w, (EMBED, HEADS), rngs=rngs) for _ in range(3))
        self.inner_norm = LayerNorm(w, HEADS, rngs=rngs, eps=1e-5)
        self.out = Dense(w, w, (HEADS, EMBED), rngs=rngs)
        self.fc1 = Dense(w, cfg.ffn_dim, (EMBED, HIDDEN), rngs=rngs)
        self.ffn_inner_norm = LayerNorm(cfg.ffn_dim, HIDDEN, rngs=rngs, eps=1e-5)
        self.fc2 = Dense(cfg.ffn_dim, w, (HIDDEN, EMBED), rngs=rngs)
        self.drop = Dropout(cfg.dropout, rngs=rngs)
        self.act = activation("gelu_exact")

    def ffn(self, x):
        return self.fc2(self.ffn_inner_norm(self.act(self.fc1(self.ffn_norm(x)))))

    def __call__(self, x, length, *, deterministic: bool):
        cfg, (b, t, w) = self.cfg, x.shape
        h = self.attn_norm(x)
        heads = lambda proj: proj(h).reshape(b, t, cfg.n_heads, w // cfg.n_heads)
        a = dilated_attention(heads(self.q), heads(self.k), heads(self.v), length, cfg.segment_lengths,
                              cfg.dilation_ratios, block_q=cfg.block_q, block_k=cfg.block_k)
        x = x + self.drop(self.out(self.inner_norm(a.reshape(b, t, w))), deterministic=deterministic)
        return x + self.drop(token_chunked(self.ffn, x, cfg.mlp_chunk), deterministic=deterministic)


class GigaPathSlideEncoder(nnx.Module):
    def __init__(self, cfg: GigaPathConfig, feature_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg, self.dtype = cfg, dtype
        self.proj = Dense(feature_dim, cfg.width, (EMBED, HIDDEN), rngs=rngs)
        self.cls = param(rngs, nnx.initializers.normal(0.02), (1, cfg.width), (TILES, EMBED))
        self.blocks = nnx.data([LongNetBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.encoder_norm = LayerNorm(cfg.width, rngs=rngs, eps=1e-5)
        self.norm = LayerNorm(cfg.width, rngs=rngs, eps=1e-6)
        self.out_dim = cfg.width

    def __call__(self, features, coords, mask, fragment=None, *, deterministic: bool = True) -> SlideOutput:
        """`fragment` is not used: GigaPath attends across the whole slide."""
        cfg = self.cfg
        b, n, _ = features.shape
        order = jnp.argsort(~mask, axis=1, stable=True)          # real tiles first, in their order
        take = lambda a: jnp.take_along_axis(a, order.reshape(b, n, *([1] * (a.ndim - 2))), axis=1)
        x = self.proj(take(features).astype(self.dtype)) + sincos_2d(take(coords), cfg.width).astype(self.dtype)
        cls = jnp.broadcast_to(self.cls[...].astype(x.dtype)[None], (b, 1, cfg.width))
        x = jnp.concatenate([cls, x], 1)
        length = 1 + mask.sum(1).astype(jnp.int32)
        blocks = self.blocks[:cfg.depth if cfg.layer < 0 else cfg.layer]
        if deterministic and len(blocks) > 1:
            x = _scan_blocks(blocks, x, length)
        else:
            for block in blocks:
                x = block(x, length, deterministic=deterministic)
        if cfg.layer < 0:
            x = self.encoder_norm(x)
        sorted_mask = take(mask)
        tokens = jnp.zeros_like(x[:, 1:]).at[jnp.arange(b)[:, None], order].set(x[:, 1:])  # original tile order
        pooled = masked_mean(x[:, 1:], sorted_mask) if cfg.global_pool else x[:, 0].astype(jnp.float32)
        return SlideOutput(self.norm(pooled).astype(jnp.float32), tokens, None)


def _scan_blocks(blocks, x, length):
    """Inference: the blocks as one `lax.scan` over their stacked weights — one compiled block instead of `depth`
    (each holds the dilated attention's blockwise kernel), and one block's buffers reused (as the transformer)."""
    splits = [nnx.split(block) for block in blocks]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[state for _, state in splits])
    body = lambda x, state: (nnx.merge(splits[0][0], state)(x, length, deterministic=True), None)
    return jax.lax.scan(body, x, stacked)[0]
