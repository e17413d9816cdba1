"""PyTorch twins of mmfm's slide encoders, loaded from an export directory (`mmfm export`): no JAX needed.

    from mmfm.bridges.torch_slide import from_export
    model = from_export("exports/run1").eval()                  # slide encoder + projection head (+ case encoder)
    emb = model(features, coords, patch_size_level0=512)        # [B, N, D] tile features, [B, N, 2] level-0 px
    emb = model({"features": f, "coords": c, "attributes": {"patch_size_level0": 512}})   # TRIDENT's batch dict

The call takes what a TRIDENT slide encoder takes: tile features, level-0 top-left pixel coordinates and
`patch_size_level0`, plus an optional tile mask [B, N] (False = padding) and tissue-fragment ids [B, N].
Coordinates become grid indices exactly as mmfm does (⌊xy / patch_size_level0⌋, shifted to the bag's
minimum over its real tiles), so the embedding equals the Flax model's on the same bag (fp32; tested to
1e-5). `from_export(dir, project=False)` returns the slide encoder's own embedding (`slide_backbone`
in `mmfm embed`); by default it is the unit vector in the shared slide–omics space, and with a case
encoder that of a case made of this slide alone. `model.aggregate(slide_embeddings, mask)` is the case
encoder over several slides.

Every module mirrors its Flax counterpart attribute for attribute (nn.Linear for `Dense`, nn.LayerNorm for
`LayerNorm`), so the exported safetensors load with `load_state_dict(strict=True)`. Attention runs in
query chunks (never an N×N matrix for the whole bag).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.io import sha256

FORMAT, VERSION = "mmfm-export", 1
_ACTIVATIONS = {"gelu": lambda x: F.gelu(x, approximate="tanh"), "gelu_exact": F.gelu, "relu": F.relu,
                "silu": F.silu}


def _masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """fp32 softmax over allowed entries; exactly 0 elsewhere and for rows with nothing allowed."""
    p = torch.softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.where(allowed.any(-1, keepdim=True), p, torch.zeros_like(p))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return (x.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


class MLPBlock(nn.Module):
    def __init__(self, din: int, dout: int, act: str, dropout: float, layer_norm: bool, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Linear(din, dout)
        self.norm = nn.LayerNorm(dout, eps=eps) if layer_norm else None
        self.act, self.drop = _ACTIVATIONS[act], nn.Dropout(dropout)

    def forward(self, x):
        x = self.linear(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(self.act(x))


class GatedAttentionPool(nn.Module):
    """[B, N, dim] + mask → pooled [B, heads, dim], weights [B, heads, N]."""

    def __init__(self, dim: int, attn_dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.tanh_branch = nn.Linear(dim, n_heads * attn_dim)
        self.gate_branch = nn.Linear(dim, n_heads * attn_dim)
        self.score = nn.Parameter(torch.zeros(n_heads, attn_dim))
        self.drop = nn.Dropout(dropout)
        self.n_heads, self.attn_dim = n_heads, attn_dim

    def forward(self, h, mask):
        b, n, _ = h.shape
        gated = torch.tanh(self.tanh_branch(h)) * torch.sigmoid(self.gate_branch(h))
        gated = self.drop(gated).reshape(b, n, self.n_heads, self.attn_dim)
        logits = torch.einsum("bnha,ha->bhn", gated, self.score)
        attn = _masked_softmax(logits, mask[:, None, :])
        return torch.einsum("bhn,bnd->bhd", attn, h.float()), attn


class ABMIL(nn.Module):
    def __init__(self, cfg: dict, feature_dim: int):
        super().__init__()
        dims = [feature_dim] + [cfg["hidden"]] * cfg["n_pre_layers"]
        self.pre = nn.ModuleList(MLPBlock(i, o, cfg["act"], cfg["dropout"], cfg.get("pre_norm", False),
                                          cfg.get("norm_eps", 1e-6)) for i, o in itertools.pairwise(dims))
        self.pool = GatedAttentionPool(dims[-1], cfg["attn_dim"], cfg["n_heads"], cfg["attn_dropout"])
        self.merge = cfg["merge"]
        self.out_dim = dims[-1] * (cfg["n_heads"] if self.merge == "concat" else 1)

    def forward(self, features, grid, mask, fragment=None):
        h = features.float()
        for block in self.pre:
            h = block(h)
        pooled, attn = self.pool(h, mask)
        emb = pooled.flatten(1) if self.merge == "concat" else pooled.mean(1)
        return emb, h, attn


def rope_angles(grid: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2D RoPE: the first head_dim/4 rotation pairs turn with the column, the last with the row."""
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float32, device=grid.device) / quarter)
    c = grid.float()
    angles = torch.cat([c[..., :1] * freqs, c[..., 1:2] * freqs], -1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)


def attention(q, k, v, valid, segment, max_elements: int = 1 << 28):
    """Query i attends key j iff j is valid and in i's segment; no allowed key → zeros. q/k/v [B, N, H, d];
    queries run in chunks so at most ~`max_elements` logits exist at once."""
    b, n, h, d = q.shape
    chunk = max(1, min(n, max_elements // max(1, b * h * k.shape[1])))
    out = []
    for start in range(0, n, chunk):
        qc = q[:, start:start + chunk] * d ** -0.5
        logits = torch.einsum("bqhd,bkhd->bhqk", qc, k)
        allowed = (valid[:, None, :] & (segment[:, start:start + chunk, None] == segment[:, None, :]))[:, None]
        out.append(torch.einsum("bhqk,bkhd->bqhd", _masked_softmax(logits, allowed), v.float()))
    return torch.cat(out, 1)


class Block(nn.Module):
    """Pre-LN transformer block: attention (optionally rotated, segment-restricted), then the MLP."""

    def __init__(self, cfg: dict):
        super().__init__()
        w, hidden = cfg["width"], int(cfg["width"] * cfg["mlp_ratio"])
        self.norm1, self.norm2 = nn.LayerNorm(w, eps=1e-6), nn.LayerNorm(w, eps=1e-6)
        self.qkv, self.out = nn.Linear(w, 3 * w), nn.Linear(w, w)
        self.fc1, self.fc2 = nn.Linear(w, hidden), nn.Linear(hidden, w)
        self.drop = nn.Dropout(cfg["dropout"])
        self.n_heads, self.mlp_chunk = cfg["n_heads"], cfg.get("mlp_chunk", 4096)
        self.act = _ACTIVATIONS[cfg.get("act", "gelu")]

    def forward(self, x, valid, segment, rope=None):
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3 * self.n_heads, w // self.n_heads).split(self.n_heads, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = x + self.drop(self.out(attention(q, k, v, valid, segment).reshape(b, n, w)))
        mlp = [self.fc2(self.act(self.fc1(self.norm2(x[:, i:i + self.mlp_chunk]))))
               for i in range(0, n, self.mlp_chunk)]
        return x + self.drop(torch.cat(mlp, 1))


class TransformerSlideEncoder(nn.Module):
    def __init__(self, cfg: dict, feature_dim: int):
        super().__init__()
        missing = [f"{key}={cfg.get(key)!r}" for key, twin_has in (
            ("layer_pattern", cfg["layer_pattern"] != "alibi"), ("readout", cfg["readout"] != "coca"),
            ("input_act", cfg.get("input_act", "none") == "none")) if not twin_has]
        if missing:
            raise ValueError(f"the PyTorch twin does not implement {', '.join(missing)} (a TITAN-style encoder): "
                             "use the Flax encoder (mmfm.models.export_format.load_slide_encoder, mmfm embed)")
        self.cfg, w = cfg, cfg["width"]
        self.proj = nn.Linear(feature_dim, w)
        self.proj_norm = nn.LayerNorm(w, eps=1e-6) if cfg.get("input_norm", True) else None
        self.registers = nn.Parameter(torch.zeros(cfg["n_registers"], w)) if cfg["n_registers"] else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["depth"]))
        self.norm = nn.LayerNorm(w, eps=1e-6)
        readout = cfg["readout"]
        self.pool = GatedAttentionPool(w, w // 2, cfg["readout_heads"]) if readout == "attention" else None
        self.out_dim = feature_dim + w if readout == "mean_concat" else w

    def uses_rope(self, i: int) -> bool:
        pattern = self.cfg["layer_pattern"]
        return pattern == "rope" or (pattern == "alternate" and i % 2 == 1)

    def forward(self, features, grid, mask, fragment=None):
        cfg, r = self.cfg, self.cfg["n_registers"]
        b, n, _ = features.shape
        x = self.proj(features.float())
        if self.proj_norm is not None:
            x = self.proj_norm(x)
        local = cfg["fragment_local"] and fragment is not None
        tile_seg = fragment.long() + 1 if local else torch.ones(b, n, dtype=torch.long, device=x.device)
        valid, rope_seg = mask, tile_seg
        cos, sin = rope_angles(grid, cfg["width"] // cfg["n_heads"], cfg["rope_base"])
        if r:  # registers: always valid, no rotation, their own segment in RoPE layers
            x = torch.cat([self.registers.expand(b, r, -1), x], 1)
            valid = torch.cat([torch.ones(b, r, dtype=torch.bool, device=x.device), mask], 1)
            rope_seg = torch.cat([torch.zeros(b, r, dtype=torch.long, device=x.device), tile_seg], 1)
            cos = torch.cat([torch.ones(b, r, cos.shape[-1], device=x.device), cos], 1)
            sin = torch.cat([torch.zeros(b, r, sin.shape[-1], device=x.device), sin], 1)
        global_seg = torch.zeros_like(rope_seg)
        for i, block in enumerate(self.blocks):
            rope = self.uses_rope(i)
            x = block(x, valid, rope_seg if rope else global_seg, (cos, sin) if rope else None)
        tokens = self.norm(x[:, r:])
        if cfg["readout"] == "cls":
            return self.norm(x[:, 0]), tokens, None
        if self.pool is not None:
            pooled, attn = self.pool(tokens, mask)
            return pooled.mean(1), tokens, attn
        return torch.cat([_masked_mean(features, mask), _masked_mean(tokens, mask)], -1), tokens, None


class CaseEncoder(nn.Module):
    """Case token + slide tokens (present slides only) → case embedding (`mmfm/models/case.py`)."""

    def __init__(self, cfg: dict, in_dim: int):
        super().__init__()
        w = cfg["width"]
        self.proj, self.proj_norm = nn.Linear(in_dim, w), nn.LayerNorm(w, eps=1e-6)
        self.case_token = nn.Parameter(torch.zeros(1, w))
        block = dict(cfg, act="gelu", mlp_chunk=4096)
        self.blocks = nn.ModuleList(Block(block) for _ in range(cfg["depth"]))
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.out_dim = w

    def forward(self, slide_emb, slide_mask):
        b = slide_emb.shape[0]
        x = torch.cat([self.case_token.expand(b, 1, -1), self.proj_norm(self.proj(slide_emb.float()))], 1)
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), slide_mask.bool()], 1)
        segment = torch.zeros(valid.shape, dtype=torch.long, device=x.device)
        for block in self.blocks:
            x = block(x, valid, segment)
        return self.norm(x[:, 0])


class ProjectionHead(nn.Module):
    def __init__(self, din: int, dout: int, hidden: int | None):
        super().__init__()
        self.fc1 = nn.Linear(din, hidden or dout)
        self.fc2 = nn.Linear(hidden, dout) if hidden else None

    def forward(self, x, normalize: bool = True):
        y = self.fc1(x.float())
        if self.fc2 is not None:
            y = self.fc2(F.gelu(y, approximate="tanh"))
        return y * torch.rsqrt((y * y).sum(-1, keepdim=True).clamp(min=1e-12)) if normalize else y


ENCODERS = {"abmil": ABMIL, "transformer": TransformerSlideEncoder}


def grid_indices(coords: torch.Tensor, patch_size_level0, mask: torch.Tensor) -> torch.Tensor:
    """Level-0 px [B, N, 2] → integer grid (col, row), per bag shifted so its real tiles start at 0."""
    psl0 = torch.as_tensor(patch_size_level0, device=coords.device).reshape(-1, 1, 1)
    if torch.any(psl0 < 1):
        raise ValueError(f"patch_size_level0 must be ≥ 1, got {patch_size_level0}")
    g = torch.div(coords.long(), psl0.long(), rounding_mode="floor")
    big = torch.iinfo(torch.long).max
    low = torch.where(mask[..., None], g, torch.full_like(g, big)).amin(1, keepdim=True)
    return g - torch.where(low == big, torch.zeros_like(low), low)


class MMFMSlideEncoder(nn.Module):
    """An exported slide encoder (+ projection head, + case encoder) behind a TRIDENT-style call."""

    def __init__(self, config: dict, with_head: bool = True):
        super().__init__()
        model, shapes = config["model"], config["shapes"]
        slide = model["slide"]
        kind = slide["kind"]
        if kind not in ENCODERS:
            raise ValueError(f"model.slide.kind={kind!r}: no PyTorch twin (have {sorted(ENCODERS)})")
        self.kind, self.config = kind, config
        self.encoder = ENCODERS[kind](slide[kind], int(shapes["feature_dim"]))
        parts = set(config["components"])
        self.case_encoder = (CaseEncoder(model["case"], self.encoder.out_dim)
                             if with_head and "case_encoder" in parts else None)
        head_in = self.case_encoder.out_dim if self.case_encoder is not None else self.encoder.out_dim
        self.head = (ProjectionHead(head_in, model["embed_dim"], model["head_hidden"])
                     if with_head and "heads.slide" in parts else None)

    def forward(self, features, coords=None, patch_size_level0=None, mask=None, fragment=None, *,
                project: bool | None = None, return_attention: bool = False):
        """[B, E] fp32 slide embeddings (and [B, heads, N] attention weights, or None, with `return_attention`).
        `project` defaults to whether the projection head was loaded (`from_export(..., project=...)`)."""
        if isinstance(features, dict):  # TRIDENT: {'features', 'coords', 'attributes': {'patch_size_level0'}}
            batch = features
            features, coords = batch["features"], batch.get("coords")
            patch_size_level0 = (batch.get("attributes") or {}).get("patch_size_level0", patch_size_level0)
        features = torch.as_tensor(features).float()
        b, n, _ = features.shape
        mask = torch.ones(b, n, dtype=torch.bool, device=features.device) if mask is None else mask.bool()
        if coords is None or patch_size_level0 is None:
            if self.kind != "abmil":
                raise ValueError("the transformer slide encoder needs coords and patch_size_level0")
            grid = torch.zeros(b, n, 2, dtype=torch.long, device=features.device)
        else:
            grid = grid_indices(torch.as_tensor(coords, device=features.device), patch_size_level0, mask)
        emb, _, attn = self.encoder(features, grid, mask, fragment)
        emb = emb.float()
        if project is None:
            project = self.head is not None
        if project:
            if self.head is None:
                raise ValueError("this export has no slide projection head; call with project=False")
            if self.case_encoder is not None:
                emb = self.case_encoder(emb[:, None], torch.ones(b, 1, dtype=torch.bool, device=emb.device))
            emb = self.head(emb)
        return (emb, attn) if return_attention else emb

    def aggregate(self, slide_emb: torch.Tensor, slide_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Case embeddings [B, E] from the slide-encoder embeddings [B, S, D] (project=False) of each case's slides."""
        if self.case_encoder is None or self.head is None:
            raise ValueError("this export has no case encoder (model.case.kind is 'mean': average the slides)")
        if slide_mask is None:
            slide_mask = torch.ones(slide_emb.shape[:2], dtype=torch.bool, device=slide_emb.device)
        return self.head(self.case_encoder(slide_emb, slide_mask))


def from_export(export_dir: str | Path, *, project: bool = True) -> MMFMSlideEncoder:
    """The slide encoder of an export directory (+ its projection head and case encoder unless `project=False`),
    weights loaded strictly, in eval mode."""
    from safetensors.torch import load_file

    d = Path(export_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (not an mmfm export directory)")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(f"{cfg_path}: format {config.get('format')!r} v{config.get('version')!r}; "
                         f"expected {FORMAT!r} v{VERSION}")
    weights = d / config["weights"]
    if sha256(weights) != config["sha256"]:
        raise ValueError(f"{weights}: sha256 differs from {cfg_path} (files from different exports)")
    if "encoders.slide" not in config["components"]:
        raise ValueError(f"{d}: the export has no slide encoder (components {config['components']})")
    state = load_file(str(weights))
    model = MMFMSlideEncoder(config, with_head=project)
    for prefix, part in (("encoders.slide.", model.encoder), ("heads.slide.", model.head),
                         ("case_encoder.", model.case_encoder)):
        if part is not None:
            part.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return model.eval()
