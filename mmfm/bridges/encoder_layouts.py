"""Public tile-encoder checkpoints that are not timm state dicts, brought onto timm modules.

Two layouts (facts and sources: data_cards/tile_encoders.md):
- `hf-dinov2`: Hugging Face `Dinov2Model` / DINOv2-with-registers checkpoints (Phikon-v2, Hibou-B/L). Keys are
  renamed onto timm's ViT (q/k/v fused into `qkv`, SwiGLU `weights_in` = timm's packed `fc1`); with registers the
  CLS token's position embedding is folded into the token, because timm's register ViTs embed positions of patch
  tokens only (the same fold timm applies to Meta's DINOv2-reg weights). Both the transformers-4 spelling that the
  published files use and the transformers-5 spelling are read.
- `conch-v1.5`: CONCH v1.5's vision tower (`trunk.*` timm-named ViT-L/16, `attn_pool_contrast.*` CoCa attentional
  pooler with one query, `ln_contrast`). TRIDENT builds the trunk at 224 px, resamples the file's position
  embedding to 14×14 (timm `resample_abs_pos_embed`, bilinear) and, at its 448-px input, interpolates it again in
  every forward the DINO way (bicubic, scale factor (28 + 0.1) / 14). The input size is fixed, so that second
  interpolation is done once here, at load, and the trunk is built at 448 px: the same numbers, computed once.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

LAYOUTS = ("timm", "hf-dinov2", "conch-v1.5")
CONCH_TRAIN_GRID = 14  # TRIDENT's CONCH v1.5 trunk is built at 224 px (patch 16)
DINO_INTERPOLATE_OFFSET = 0.1


class LayoutError(ValueError):
    """A checkpoint that does not have the layout its encoder expects."""


class AttentionalPool(torch.nn.Module):
    """CoCa's attentional pooler (learned queries cross-attend the token sequence), CONCH v1.5's key names."""

    def __init__(self, dim: int, context_dim: int, n_heads: int, n_queries: int):
        super().__init__()
        self.n_heads = n_heads
        self.query = torch.nn.Parameter(torch.zeros(n_queries, dim))
        self.ln_k, self.ln_q = torch.nn.LayerNorm(context_dim), torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_kv = torch.nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C] → [B, Q, D]
        b, h = x.shape[0], self.n_heads
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchV15Vision(torch.nn.Module):
    """CONCH v1.5 image tower: timm ViT-L/16 tokens → one-query attentional pool (768) → LayerNorm."""

    def __init__(self, trunk: torch.nn.Module, dim: int = 768, n_heads: int = 8):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPool(dim, trunk.embed_dim, n_heads, n_queries=1)
        self.ln_contrast = torch.nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


def conch_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """The position embedding TRIDENT's CONCH v1.5 adds at a `grid`×`grid` input: the file's square grid resampled
    to 14×14 (bilinear, as at load), then DINO-interpolated (bicubic, offset 0.1) to `grid`×`grid`."""
    n = pos.shape[1] - 1
    side = math.isqrt(n)
    if pos.ndim != 3 or pos.shape[0] != 1 or side * side != n:
        raise LayoutError(f"trunk.pos_embed has shape {list(pos.shape)}: expected [1, 1 + s*s, D]")
    pos = pos.float()
    if side != CONCH_TRAIN_GRID:
        pos = resample_abs_pos_embed(pos, new_size=(CONCH_TRAIN_GRID,) * 2, num_prefix_tokens=1,
                                     interpolation="bilinear", antialias=False, verbose=False)
    cls, patch = pos[:, :1], pos[:, 1:]
    if grid == CONCH_TRAIN_GRID:
        return pos
    d = pos.shape[-1]
    patch = patch.reshape(1, CONCH_TRAIN_GRID, CONCH_TRAIN_GRID, d).permute(0, 3, 1, 2)
    scale = (grid + DINO_INTERPOLATE_OFFSET) / CONCH_TRAIN_GRID
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic")
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, grid * grid, d)], dim=1)


# transformers-4 names (published files) and transformers-5 names → timm names, per block
_HF_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2",
    "mlp.down_proj": "mlp.fc2",
}
_HF_QKV = (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
           ("attention.q_proj", "attention.k_proj", "attention.v_proj"))
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "reg_token",
           "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}


def hf_dinov2_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face DINOv2(-with-registers) state dict in timm ViT names. Keys it does not know are kept as they
    are, so the caller's key check names them."""
    sd = dict(sd)
    sd.pop("embeddings.mask_token", None)  # used only in masked-image pretraining
    out: dict[str, torch.Tensor] = {}
    for hf, tm in _HF_TOP.items():
        if hf in sd:
            out[tm] = sd.pop(hf)
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in blocks:
        pre = f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            for names in _HF_QKV:
                keys = [f"{pre}{n}.{p}" for n in names]
                if all(k in sd for k in keys):
                    out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd.pop(k) for k in keys])
            gate, up = f"{pre}mlp.gate_proj.{p}", f"{pre}mlp.up_proj.{p}"
            if gate in sd and up in sd:  # transformers 5 split the packed SwiGLU input projection
                out[f"blocks.{i}.mlp.fc1.{p}"] = torch.cat([sd.pop(gate), sd.pop(up)])
        for hf, tm in _HF_BLOCK.items():
            for p in ("weight", "bias", ""):
                k = f"{pre}{hf}.{p}" if p else f"{pre}{hf}"
                if k in sd:
                    out[f"blocks.{i}.{tm}.{p}" if p else f"blocks.{i}.{tm}"] = sd.pop(k)
    if "reg_token" in out and "pos_embed" in out:  # timm register ViTs: positions of patch tokens only
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return {**out, **sd}


def to_model_layout(layout: str, sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The file's state dict in the key names and shapes of `model` (built by `encoders.build_model`)."""
    if layout == "timm":
        return sd
    if layout == "hf-dinov2":
        return hf_dinov2_to_timm(sd)
    if layout == "conch-v1.5":
        sd = dict(sd)
        if "trunk.pos_embed" in sd:
            sd["trunk.pos_embed"] = conch_pos_embed(sd["trunk.pos_embed"], model.trunk.patch_embed.grid_size[0])
        return sd
    raise LayoutError(f"unknown checkpoint layout {layout!r}; known: {', '.join(LAYOUTS)}")
