"""Transformer slide encoder over tile features with axial 2D RoPE and fragment-local layers.

Tiles are projected D → width (Linear + LayerNorm, unless `input_norm=False`), register tokens are
prepended, and pre-LN blocks (attention + GELU MLP) follow. `layer_pattern`:
  "alternate" (EXAONE Path 2.5 style): even layers are position-free global attention over tiles and
  registers; odd layers use 2D RoPE on the tiles' grid indices and, with `fragment_local`, let a tile
  attend only to tiles of its own tissue fragment. Registers sit out RoPE layers (their own segment):
  they carry no position, so letting them meet rotated tiles would break translation invariance.
  "rope": every layer uses RoPE (no registers allowed — they would never see a tile).
  "none": every layer is position-free and global.
  "alibi" (TITAN): every layer is global and adds 2D ALiBi, −slope_h·‖g_i − g_j‖₂ between tiles i, j (standard
  ALiBi head slopes; `mmfm.models.attention.DistanceBias`); registers carry no position (bias 0).
`input_act` applies an activation after the input projection (TITAN's patch embedding is Linear + GELU).
Readout "mean_concat" = concat(masked mean of raw tile features, masked mean of final tile tokens), the
cheap strong prior of EXAONE; "attention" = gated multi-head attention pooling over final tile tokens
(weights returned for heatmaps); "cls" = the final first register (a ViT's class token, for imported
checkpoints); "coca" = CoCa's contrastive attentional pooler (Yu et al. 2022; TITAN's slide embedding): one
learned query attends, with `readout_heads` heads, over the final registers and tiles (`coca_proj`: then × a
[width, width] matrix, TITAN's text-aligned space). All attention goes through `mmfm.models.attention` (blockwise by
default), so a 100k-tile bag never builds an N×N matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm.models.abmil import GatedAttentionPool, masked_softmax
from mmfm.models.attention import IMPLS, DistanceBias, alibi_slopes, attention
from mmfm.models.axes import EMBED, HEADS, HIDDEN, TILES
from mmfm.models.layers import Dense, Dropout, LayerNorm, activation, masked_mean, param
from mmfm.models.rope import apply_rope, rope_angles
from mmfm.models.slide import SlideOutput


@dataclass(frozen=True)
class TransformerConfig:
    width: int = 768
    depth: int = 6
    n_heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    n_registers: int = 4
    layer_pattern: str = "alternate"   # alternate | rope | none | alibi
    fragment_local: bool = True        # RoPE layers attend within one tissue fragment
    rope_base: float = 100.0
    readout: str = "mean_concat"       # mean_concat | attention | cls (first register, needs n_registers ≥ 1) | coca
    readout_heads: int = 4
    coca_proj: bool = False            # coca: multiply the pooled query by a learned [width, width] matrix
    attn_impl: str = "blockwise"       # blockwise | xla | cudnn
    block_q: int = 512
    block_k: int = 1024
    mlp_chunk: int = 4096              # MLPs run over token chunks: the N×4·width hidden is never whole
    act: str = "gelu"                  # MLP activation: gelu (tanh approximation) | gelu_exact (torch nn.GELU)
    input_norm: bool = True            # LayerNorm after the input projection (a timm ViT has none)
    input_act: str = "none"            # activation after the input projection (TITAN: gelu_exact)

    def layer_uses_rope(self, i: int) -> bool:
        return self.layer_pattern == "rope" or (self.layer_pattern == "alternate" and i % 2 == 1)

    def validate(self) -> None:
        errors = []
        if self.layer_pattern not in ("alternate", "rope", "none", "alibi"):
            errors.append(f"layer_pattern={self.layer_pattern!r} (alternate | rope | none | alibi)")
        if self.readout not in ("mean_concat", "attention", "cls", "coca"):
            errors.append(f"readout={self.readout!r} (mean_concat | attention | cls | coca)")
        if self.readout == "coca" and self.width % self.readout_heads:
            errors.append(f"width={self.width} must split into readout_heads={self.readout_heads} pooler heads")
        if self.readout == "cls" and not self.n_registers:
            errors.append("readout=cls reads the first register: needs n_registers ≥ 1")
        if self.coca_proj and self.readout != "coca":
            errors.append("coca_proj needs readout=coca")
        if self.input_act != "none":
            try:
                activation(self.input_act)
            except ValueError as e:
                errors.append(f"input_act: {e}")
        if self.attn_impl not in IMPLS:
            errors.append(f"attn_impl={self.attn_impl!r} {IMPLS}")
        if self.width % self.n_heads or (self.width // self.n_heads) % 4:
            errors.append(f"width={self.width} must split into n_heads={self.n_heads} heads of a size divisible by 4")
        if self.n_registers and self.layer_pattern == "rope":
            errors.append("n_registers > 0 needs a position-free layer (layer_pattern alternate or none)")
        if errors:
            raise ValueError("slide.transformer: " + "; ".join(errors))


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        w, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
        self.norm1, self.norm2 = LayerNorm(w, rngs=rngs), LayerNorm(w, rngs=rngs)
        self.qkv = Dense(w, 3 * w, (EMBED, HEADS), rngs=rngs)
        self.out = Dense(w, w, (HEADS, EMBED), rngs=rngs)
        self.fc1 = Dense(w, hidden, (EMBED, HIDDEN), rngs=rngs)
        self.fc2 = Dense(hidden, w, (HIDDEN, EMBED), rngs=rngs)
        self.drop = Dropout(cfg.dropout, rngs=rngs)
        self.n_heads, self.impl, self.block_q, self.block_k = cfg.n_heads, cfg.attn_impl, cfg.block_q, cfg.block_k
        self.mlp_chunk = cfg.mlp_chunk
        self.act = activation(cfg.act)

    def mlp(self, x):
        return self.fc2(self.act(self.fc1(self.norm2(x))))

    def __call__(self, x, valid, segment, rope, *, bias: DistanceBias | None = None, deterministic: bool):
        b, n, w = x.shape
        q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, n, 3 * self.n_heads, w // self.n_heads), 3, axis=2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a = attention(q, k, v, valid, segment, segment, impl=self.impl, block_q=self.block_q, block_k=self.block_k,
                      bias=bias)
        x = x + self.drop(self.out(a.reshape(b, n, w)), deterministic=deterministic)
        h = token_chunked(self.mlp, x, self.mlp_chunk)
        return x + self.drop(h, deterministic=deterministic)


class CocaPool(nnx.Module):
    """CoCa's contrastive attentional pooler: one learned query attends over a set → [B, width] (+ [B, heads, N]
    weights). The maths of torch's nn.MultiheadAttention as CoCa / TITAN use it: LayerNorm'd query and keys
    (torch's default ε 1e-5), one [width, 3·width] in-projection for q / k / v, an out-projection."""

    def __init__(self, width: int, n_heads: int, *, project: bool, rngs: nnx.Rngs):
        self.query = param(rngs, nnx.initializers.normal(1.0), (1, width), (TILES, EMBED))
        self.ln_q, self.ln_k = LayerNorm(width, rngs=rngs, eps=1e-5), LayerNorm(width, rngs=rngs, eps=1e-5)
        self.in_proj = Dense(width, 3 * width, (EMBED, HEADS), rngs=rngs)
        self.out = Dense(width, width, (HEADS, EMBED), rngs=rngs)
        self.proj = (param(rngs, nnx.initializers.normal(width ** -0.5), (width, width), (EMBED, HIDDEN))
                     if project else None)
        self.n_heads = n_heads

    def __call__(self, x: jax.Array, valid: jax.Array):
        b, n, w = x.shape
        h, d = self.n_heads, w // self.n_heads
        kernel, bias = self.in_proj.kernel[...].astype(x.dtype), self.in_proj.bias[...].astype(x.dtype)
        q = (self.ln_q(self.query[...].astype(x.dtype)) @ kernel[:, :w] + bias[:w]).reshape(h, d)
        kv = self.ln_k(x) @ kernel[:, w:] + bias[w:]
        k, v = kv[..., :w].reshape(b, n, h, d), kv[..., w:].reshape(b, n, h, d)
        logits = jnp.einsum("hd,bnhd->bhn", q, k, preferred_element_type=jnp.float32) * d ** -0.5
        attn = masked_softmax(logits, valid[:, None, :])
        pooled = jnp.einsum("bhn,bnhd->bhd", attn, v.astype(jnp.float32)).reshape(b, w)
        out = self.out(pooled.astype(x.dtype)).astype(jnp.float32)
        return (out if self.proj is None else out @ self.proj[...]), attn


def token_chunked(f, x: jax.Array, chunk: int) -> jax.Array:
    """f applied to x [B, N, W] one chunk of tokens at a time (f must be token-wise), same result as f(x)."""
    b, n, w = x.shape
    if n <= chunk:
        return f(x)
    n_chunks = -(-n // chunk)
    xp = jnp.pad(x, ((0, 0), (0, n_chunks * chunk - n), (0, 0))).reshape(b, n_chunks, chunk, w)
    y = jax.lax.map(f, jnp.moveaxis(xp, 1, 0))
    return jnp.moveaxis(y, 0, 1).reshape(b, n_chunks * chunk, -1)[:, :n]


class TransformerSlideEncoder(nnx.Module):
    def __init__(self, cfg: TransformerConfig, feature_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg, self.dtype = cfg, dtype
        self.proj = Dense(feature_dim, cfg.width, (EMBED, HIDDEN), rngs=rngs)
        self.proj_norm = LayerNorm(cfg.width, HIDDEN, rngs=rngs) if cfg.input_norm else None
        self.input_act = None if cfg.input_act == "none" else activation(cfg.input_act)
        self.registers = (param(rngs, nnx.initializers.normal(0.02), (cfg.n_registers, cfg.width), (TILES, EMBED))
                          if cfg.n_registers else None)
        self.blocks = nnx.data([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = LayerNorm(cfg.width, rngs=rngs)
        self.pool = (GatedAttentionPool(cfg.width, cfg.width // 2, cfg.readout_heads, rngs=rngs)
                     if cfg.readout == "attention" else
                     CocaPool(cfg.width, cfg.readout_heads, project=cfg.coca_proj, rngs=rngs)
                     if cfg.readout == "coca" else None)
        self.out_dim = feature_dim + cfg.width if cfg.readout == "mean_concat" else cfg.width

    def __call__(self, features, coords, mask, fragment=None, *, deterministic: bool = True) -> SlideOutput:
        cfg, r = self.cfg, self.cfg.n_registers
        b, n, _ = features.shape
        x = self.proj(features.astype(self.dtype))
        if self.proj_norm is not None:
            x = self.proj_norm(x)
        if self.input_act is not None:
            x = self.input_act(x)
        tile_seg = (fragment.astype(jnp.int32) + 1 if (cfg.fragment_local and fragment is not None)
                    else jnp.ones((b, n), jnp.int32))
        valid, global_seg, rope_seg = mask, jnp.zeros((b, n), jnp.int32), tile_seg
        cos, sin = rope_angles(coords, cfg.width // cfg.n_heads, cfg.rope_base)
        if r:
            # Registers: always valid, identity rotation, segment 0 (apart from tiles) in RoPE layers.
            x = jnp.concatenate([jnp.broadcast_to(self.registers[...].astype(x.dtype), (b, r, cfg.width)), x], 1)
            valid = jnp.concatenate([jnp.ones((b, r), bool), mask], 1)
            global_seg = jnp.zeros((b, r + n), jnp.int32)
            rope_seg = jnp.concatenate([jnp.zeros((b, r), jnp.int32), tile_seg], 1)
            cos = jnp.concatenate([jnp.ones((b, r, cos.shape[-1]), cos.dtype), cos], 1)
            sin = jnp.concatenate([jnp.zeros((b, r, sin.shape[-1]), sin.dtype), sin], 1)
        bias = self._alibi(coords) if cfg.layer_pattern == "alibi" else None
        if deterministic and cfg.depth > 1:
            x = self._scan_blocks(x, valid, global_seg, rope_seg, cos, sin, bias)
        else:
            for i, block in enumerate(self.blocks):
                use_rope = cfg.layer_uses_rope(i)
                x = block(x, valid, rope_seg if use_rope else global_seg, (cos, sin) if use_rope else None,
                          bias=bias, deterministic=deterministic)
        h = self.norm(x)
        tokens = h[:, r:]
        if cfg.readout == "cls":
            return SlideOutput(h[:, 0].astype(jnp.float32), tokens, None)
        if cfg.readout == "coca":  # the query attends over registers and tiles; weights reported for the tiles
            emb, attn = self.pool(h, valid)
            return SlideOutput(emb, tokens, attn[..., r:])
        if self.pool is not None:
            pooled, attn = self.pool(tokens, mask, deterministic=deterministic)
            return SlideOutput(pooled.mean(1), tokens, attn)
        emb = jnp.concatenate([masked_mean(features, mask), masked_mean(tokens, mask)], -1)
        return SlideOutput(emb, tokens, None)

    def _alibi(self, coords) -> DistanceBias:
        """2D ALiBi between tiles at their grid cells; registers (first) carry no position."""
        b, n, _ = coords.shape
        r = self.cfg.n_registers
        pos = jnp.concatenate([jnp.zeros((b, r, 2), jnp.float32), coords.astype(jnp.float32)], 1)
        on = jnp.concatenate([jnp.zeros((b, r), bool), jnp.ones((b, n), bool)], 1)
        return DistanceBias(jnp.asarray(alibi_slopes(self.cfg.n_heads), jnp.float32), pos, on)

    def _scan_blocks(self, x, valid, global_seg, rope_seg, cos, sin, bias):
        """Inference path: the same blocks as one `lax.scan` over their stacked weights.

        XLA packs the buffers of an unrolled layer stack into one arena that grows with depth; a scan
        body reuses one layer's buffers, which keeps a 100k-tile bag within a few GB. Position-free
        layers get the identity rotation (cos 1, sin 0), which is exact. Training keeps the Python loop
        so each layer's dropout stream advances.
        """
        splits = [nnx.split(block) for block in self.blocks]
        graphdef = splits[0][0]
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *[state for _, state in splits])
        flags = jnp.asarray([self.cfg.layer_uses_rope(i) for i in range(self.cfg.depth)])

        def body(x, layer):
            state, use_rope = layer
            seg = jnp.where(use_rope, rope_seg, global_seg)
            rope = (jnp.where(use_rope, cos, 1.0), jnp.where(use_rope, sin, 0.0))
            return nnx.merge(graphdef, state)(x, valid, seg, rope, bias=bias, deterministic=True), None

        return jax.lax.scan(body, x, (stacked, flags))[0]
