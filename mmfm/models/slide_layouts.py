"""Public PyTorch slide-encoder layouts → mmfm's Flax slide encoders (name maps through `weight_porting`).

A layout names where a family of public checkpoints keeps each tensor; the architecture is read off the
tensor shapes, and every tensor must land in a model variable of the same shape (or be explicitly
irrelevant), so a checkpoint either loads exactly or the error names each missing, unexpected and
mis-shaped key. Names were taken from the papers' descriptions and the public repositories' module
attributes; no code was copied.

  clam    gated ABMIL as in CLAM (Lu et al. 2021) and CHIEF: `attention_net.0` = Linear(D→H) (+ReLU, Dropout),
          `attention_net.<i>.attention_a.0` / `attention_b.0` = the tanh / sigmoid branches (H→A),
          `attention_net.<i>.attention_c` = Linear(A→heads) scoring tiles. CLAM's multi-branch model (one row
          of attention_c per class) shares the two branches across heads: they are repeated per head, exact.
          attention_c's bias adds a constant to every tile's logit of a head, which the softmax removes: dropped.
          Task heads (`classifiers`, `instance_classifiers`) are ignored. CHIEF pools the *raw* tile features
          with these weights, mmfm pools the Linear's output: its weights import, its embedding differs.
  tangle  TANGLE's slide encoder (Jaume et al. 2024): `pre_attn` = k × [Linear, LayerNorm, GELU, Dropout]
          (torch LayerNorm ε = 1e-5, exact GELU), `attn.attention_a.0` / `attention_b.0` / `attention_c` as
          above, softmax pooling of the pre_attn output (the published 'softmax' activation). TANGLEv2's
          multi-head variant (per-head slices, `attn.<h>.*`, `proj_multihead`) is not representable: refused.
  vit     a timm-style slide ViT: `patch_embed.proj` = Linear(D→W) (optional `patch_embed.norm`),
          `cls_token` [1, 1, W] (+ `reg_token` [1, R, W]) → mmfm's registers, `blocks.<i>.{norm1, attn.qkv,
          attn.proj, norm2, mlp.fc1, mlp.fc2}`, final `norm`; readout = the final class token; exact GELU,
          LayerNorm ε = 1e-6. Attention heads are not in a state dict (`n_heads`), nor is the positional scheme:
          a checkpoint with `pos_embed` (absolute positions) is refused; one trained with another relative
          scheme (ALiBi: MOOZY; Prov-GigaPath has its own layout below) has different keys or maths, and
          imports, if at all, as an initialisation — only position-free ("none") or mmfm's own 2D RoPE
          blocks reproduce the source model's function.
  titan   TITAN's slide encoder (Ding et al. 2025; HF `MahmoodLab/TITAN`, keys under `vision_encoder.`):
          `patch_embed.0` = Linear(D→W) followed by exact GELU, `cls_token` [1, 1, W], timm-style blocks under
          `blocks.modules_list.<i>.*` (LayerNorm ε 1e-6, qkv bias, exact GELU), final `norm`, 2D ALiBi in every
          layer (no position tensor: layer_pattern "alibi"), and the CoCa poolers: `attn_pool_contrastive`
          (1 query; `query`, `ln_q`, `ln_k`, `attn.in_proj_*`, `attn.out_proj`) gives the slide embedding
          (`encode_slide_from_patch_features`, what TRIDENT returns); `proj` maps it into TITAN's text-aligned
          space (its zero-shot use; imported with `project`); `attn_pool` (128 captioning queries for the
          removed report decoder) is ignored. Heads are not in the state dict: TITAN's 12 (blocks) and 8
          (poolers) unless `n_heads` / `pool_heads` say otherwise.
  gigapath Prov-GigaPath's slide encoder (`LongNetViT`, mmfm/models/gigapath.py): `patch_embed.proj`, `cls_token`,
          `encoder.layers.<i>.self_attn.{q,k,v,out}_proj` + `.inner_attn_ln`, `.self_attn_layer_norm`,
          `.ffn.{fc1, ffn_layernorm, fc2}`, `.final_layer_norm`, `encoder.layer_norm`, `norm`. Heads, segment
          lengths and dilation ratios are not in a state dict: the released model's (16; 1024 … 1048576;
          1, 2, 4, 8, 16) unless given. Its fixed sin-cos `pos_embed` is recomputed, never read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mmfm.models.abmil import ABMILConfig
from mmfm.models.config import SlideConfig
from mmfm.models.gigapath import GigaPathConfig
from mmfm.models.transformer import TransformerConfig
from mmfm.models.weight_porting import NameMap, PortingError, Rule, identity, transpose

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Converted:
    slide: SlideConfig       # the architecture the checkpoint describes
    feature_dim: int         # tile-feature dimension it expects
    state: State             # the checkpoint's tensors (combined where mmfm keeps one variable for several keys)
    name_map: NameMap


@dataclass(frozen=True)
class Layout:
    anchor: str                                    # regex every checkpoint of the layout has (finds the prefix)
    convert: Callable[..., Converted]
    unsupported: tuple[tuple[str, str], ...] = ()  # (key regex, why) refused with an explanation


def _need(state: State, key: str, ndim: int, layout: str) -> np.ndarray:
    if key not in state:
        raise PortingError(f"layout {layout}: required key {key!r} missing; the checkpoint has "
                           f"{', '.join(sorted(state)[:12])}{' …' if len(state) > 12 else ''}")
    if state[key].ndim != ndim:
        raise PortingError(f"layout {layout}: {key} has shape {state[key].shape}, expected {ndim} dims")
    return state[key]


def _linear(src: str, dst: str, fn_w=transpose, fn_b=identity) -> tuple[Rule, ...]:
    return (Rule(re.escape(src) + r"\.weight", dst + ".kernel", fn_w),
            Rule(re.escape(src) + r"\.bias", dst + ".bias", fn_b))


def _norm(src: str, dst: str) -> tuple[Rule, ...]:
    return Rule(re.escape(src) + r"\.weight", dst + ".scale"), Rule(re.escape(src) + r"\.bias", dst + ".bias")


def _gated(src: str, heads: int) -> tuple[Rule, ...]:
    """attention_a / attention_b / attention_c under `src` → GatedAttentionPool; shared branches repeated per head."""
    per_head_w = lambda w: np.tile(np.asarray(w).T, (1, heads))
    per_head_b = lambda b: np.tile(np.asarray(b), heads)
    return (*_linear(f"{src}.attention_a.0", "pool.tanh_branch", per_head_w, per_head_b),
            *_linear(f"{src}.attention_b.0", "pool.gate_branch", per_head_w, per_head_b),
            Rule(re.escape(f"{src}.attention_c.weight"), "pool.score"))


def _clam(state: State, **_) -> Converted:
    fc = _need(state, "attention_net.0.weight", 2, "clam")
    gated = sorted({m.group(1) for k in state
                    if (m := re.fullmatch(r"attention_net\.(\d+)\.attention_a\.0\.weight", k))})
    if len(gated) != 1:
        raise PortingError(f"layout clam: expected one attention_net.<i>.attention_a block, found {gated or 'none'}")
    src = f"attention_net.{gated[0]}"
    a = _need(state, f"{src}.attention_a.0.weight", 2, "clam")
    c = _need(state, f"{src}.attention_c.weight", 2, "clam")
    cfg = ABMILConfig(hidden=fc.shape[0], n_heads=c.shape[0], attn_dim=a.shape[0], n_pre_layers=1, act="relu",
                      dropout=0.25, attn_dropout=0.25, merge="concat")
    rules = (*_linear("attention_net.0", "pre.0.linear"), *_gated(src, c.shape[0]))
    ignore = (re.escape(f"{src}.attention_c.bias"), r"classifiers\..*", r"instance_classifiers\..*")
    return Converted(SlideConfig(kind="abmil", abmil=cfg), fc.shape[1], state, NameMap(rules, ignore))


def _tangle(state: State, **_) -> Converted:
    layers = sorted(int(m.group(1)) for k, v in state.items()
                    if (m := re.fullmatch(r"pre_attn\.(\d+)\.weight", k)) and v.ndim == 2)
    if not layers:
        raise PortingError("layout tangle: no pre_attn.<i>.weight Linear found")
    widths = {state[f"pre_attn.{i}.weight"].shape[0] for i in layers}
    if len(widths) != 1 or layers != list(range(0, 4 * len(layers), 4)):
        raise PortingError(f"layout tangle: pre_attn Linears at {layers} with widths {sorted(widths)}; mmfm's "
                           "ABMIL needs k × [Linear, LayerNorm, GELU, Dropout] of one width")
    a = _need(state, "attn.attention_a.0.weight", 2, "tangle")
    c = _need(state, "attn.attention_c.weight", 2, "tangle")
    hidden = widths.pop()
    cfg = ABMILConfig(hidden=hidden, n_heads=c.shape[0], attn_dim=a.shape[0], n_pre_layers=len(layers),
                      act="gelu_exact", dropout=0.1, attn_dropout=0.25, merge="concat", pre_norm=True, norm_eps=1e-5)
    rules = [r for j, i in enumerate(layers)
             for r in (*_linear(f"pre_attn.{i}", f"pre.{j}.linear"), *_norm(f"pre_attn.{i + 1}", f"pre.{j}.norm"))]
    rules += _gated("attn", c.shape[0])
    ignore = (r"attn\.attention_c\.bias",)
    feature_dim = state[f"pre_attn.{layers[0]}.weight"].shape[1]
    return Converted(SlideConfig(kind="abmil", abmil=cfg), feature_dim, state, NameMap(tuple(rules), ignore))


def _timm_blocks(src: str) -> tuple[Rule, ...]:
    """timm ViT blocks `<src>.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}` → mmfm's Block."""
    b = re.escape(src) + r"\.(\d+)\."
    return (Rule(b + r"norm1\.weight", r"blocks.\1.norm1.scale"), Rule(b + r"norm1\.bias", r"blocks.\1.norm1.bias"),
            Rule(b + r"norm2\.weight", r"blocks.\1.norm2.scale"), Rule(b + r"norm2\.bias", r"blocks.\1.norm2.bias"),
            Rule(b + r"attn\.qkv\.weight", r"blocks.\1.qkv.kernel", transpose),
            Rule(b + r"attn\.qkv\.bias", r"blocks.\1.qkv.bias"),
            Rule(b + r"attn\.proj\.weight", r"blocks.\1.out.kernel", transpose),
            Rule(b + r"attn\.proj\.bias", r"blocks.\1.out.bias"),
            Rule(b + r"mlp\.fc(1|2)\.weight", r"blocks.\1.fc\2.kernel", transpose),
            Rule(b + r"mlp\.fc(1|2)\.bias", r"blocks.\1.fc\2.bias"))


def _mlp_ratio(state: State, fc1: str, width: int, layout: str) -> float:
    hidden = _need(state, fc1, 2, layout).shape[0]
    if int(width * (hidden / width)) != hidden:
        raise PortingError(f"layout {layout}: MLP width {hidden} is not representable as width {width} × mlp_ratio")
    return hidden / width


def _vit(state: State, *, n_heads: int = 0, layer_pattern: str = "none", fragment_local: bool = True,
         rope_base: float = 100.0, **_) -> Converted:
    if n_heads < 1:
        raise PortingError("layout vit: set n_heads (attention heads are not recorded in a state dict)")
    state = dict(state)
    cls = _need(state, "cls_token", 3, "vit")
    tokens = [state.pop("cls_token")] + ([state.pop("reg_token")] if "reg_token" in state else [])
    state["registers"] = np.concatenate([t.reshape(-1, cls.shape[-1]) for t in tokens])  # class token first
    proj = "patch_embed.proj" if "patch_embed.proj.weight" in state else "patch_embed"
    w_in = _need(state, f"{proj}.weight", 2, "vit")
    depth = len({m.group(1) for k in state if (m := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.weight", k))})
    width = w_in.shape[0]
    cfg = TransformerConfig(width=width, depth=depth, n_heads=n_heads,
                            mlp_ratio=_mlp_ratio(state, "blocks.0.mlp.fc1.weight", width, "vit"),
                            n_registers=len(state["registers"]), layer_pattern=layer_pattern,
                            fragment_local=fragment_local, rope_base=rope_base, readout="cls", act="gelu_exact",
                            input_norm="patch_embed.norm.weight" in state)
    cfg.validate()
    rules = (*_linear(proj, "proj"), *_norm("patch_embed.norm", "proj_norm"), Rule("registers", "registers"),
             *_timm_blocks("blocks"), *_norm("norm", "norm"))
    return Converted(SlideConfig(kind="transformer", transformer=cfg), w_in.shape[1], state,
                     NameMap(rules, ignore=(r"head\..*",)))


def _titan(state: State, *, n_heads: int = 0, pool_heads: int = 0, project: bool = False, **_) -> Converted:
    w_in = _need(state, "patch_embed.0.weight", 2, "titan")
    width = w_in.shape[0]
    if width != 768 and not (n_heads and pool_heads):
        raise PortingError(f"layout titan: width {width} is not TITAN's 768; set n_heads and pool_heads")
    state = dict(state)
    state["registers"] = _need(state, "cls_token", 3, "titan").reshape(-1, width)
    del state["cls_token"]
    depth = len({m.group(1) for k in state
                 if (m := re.fullmatch(r"blocks\.modules_list\.(\d+)\.attn\.qkv\.weight", k))})
    _need(state, "attn_pool_contrastive.query", 2, "titan")
    cfg = TransformerConfig(width=width, depth=depth, n_heads=n_heads or 12, dropout=0.0,
                            mlp_ratio=_mlp_ratio(state, "blocks.modules_list.0.mlp.fc1.weight", width, "titan"),
                            n_registers=1, layer_pattern="alibi", readout="coca", readout_heads=pool_heads or 8,
                            coca_proj=project, act="gelu_exact", input_norm=False, input_act="gelu_exact")
    cfg.validate()
    pool = "attn_pool_contrastive"
    rules = (*_linear("patch_embed.0", "proj"), Rule("registers", "registers"), *_timm_blocks("blocks.modules_list"),
             *_norm("norm", "norm"), Rule(re.escape(f"{pool}.query"), "pool.query"),
             *_norm(f"{pool}.ln_q", "pool.ln_q"), *_norm(f"{pool}.ln_k", "pool.ln_k"),
             Rule(re.escape(f"{pool}.attn.in_proj_weight"), "pool.in_proj.kernel", transpose),
             Rule(re.escape(f"{pool}.attn.in_proj_bias"), "pool.in_proj.bias"),
             *_linear(f"{pool}.attn.out_proj", "pool.out"), *((Rule("proj", "pool.proj"),) if project else ()))
    ignore = (r"attn_pool\..*",) + (() if project else ("proj",))
    return Converted(SlideConfig(kind="transformer", transformer=cfg), w_in.shape[1], state, NameMap(rules, ignore))
def _gigapath(state: State, *, n_heads: int = 0, segment_lengths: tuple[int, ...] = (),
              dilation_ratios: tuple[int, ...] = (), layer: int = 11, global_pool: bool = True, **_) -> Converted:
    state = dict(state)
    w_in = _need(state, "patch_embed.proj.weight", 2, "gigapath")
    state["cls_token"] = _need(state, "cls_token", 3, "gigapath").reshape(1, -1)
    layer_re = r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight"
    depth = len({m.group(1) for k in state if (m := re.fullmatch(layer_re, k))})
    default = GigaPathConfig()
    cfg = GigaPathConfig(width=w_in.shape[0], depth=depth, n_heads=n_heads or default.n_heads,
                         ffn_dim=_need(state, "encoder.layers.0.ffn.fc1.weight", 2, "gigapath").shape[0],
                         segment_lengths=tuple(segment_lengths) or default.segment_lengths,
                         dilation_ratios=tuple(dilation_ratios) or default.dilation_ratios, layer=layer,
                         global_pool=global_pool)
    cfg.validate()
    b, a = r"encoder\.layers\.(\d+)\.", r"encoder\.layers\.(\d+)\.self_attn\."
    rules = (*_linear("patch_embed.proj", "proj"), Rule("cls_token", "cls"),
             Rule(a + r"(q|k|v)_proj\.weight", r"blocks.\1.\2.kernel", transpose),
             Rule(a + r"(q|k|v)_proj\.bias", r"blocks.\1.\2.bias"),
             Rule(a + r"out_proj\.weight", r"blocks.\1.out.kernel", transpose),
             Rule(a + r"out_proj\.bias", r"blocks.\1.out.bias"),
             Rule(b + r"ffn\.fc(1|2)\.weight", r"blocks.\1.fc\2.kernel", transpose),
             Rule(b + r"ffn\.fc(1|2)\.bias", r"blocks.\1.fc\2.bias"),
             *(Rule(src + r"\.weight", rf"blocks.\1.{dst}.scale") for src, dst in _GIGAPATH_NORMS),
             *(Rule(src + r"\.bias", rf"blocks.\1.{dst}.bias") for src, dst in _GIGAPATH_NORMS),
             *_norm("encoder.layer_norm", "encoder_norm"), *_norm("norm", "norm"))
    return Converted(SlideConfig(kind="gigapath", gigapath=cfg), w_in.shape[1], state,
                     NameMap(rules, ignore=(r"pos_embed",)))


_GIGAPATH_NORMS = ((r"encoder\.layers\.(\d+)\.self_attn_layer_norm", "attn_norm"),
                   (r"encoder\.layers\.(\d+)\.self_attn\.inner_attn_ln", "inner_norm"),
                   (r"encoder\.layers\.(\d+)\.final_layer_norm", "ffn_norm"),
                   (r"encoder\.layers\.(\d+)\.ffn\.ffn_layernorm", "ffn_inner_norm"))


LAYOUTS: dict[str, Layout] = {
    "clam": Layout(r"attention_net\.\d+\.attention_a\.0\.weight", _clam),
    "tangle": Layout(r"pre_attn\.0\.weight", _tangle, (
        (r"attn\.\d+\..*|proj_multihead\..*", ("TANGLEv2 multi-head ABMIL (per-head feature slices) has no "
                                               "counterpart in mmfm's ABMIL, whose heads pool the same features")),)),
    "vit": Layout(r"blocks\.0\.attn\.qkv\.weight", _vit, (
        (r"pos_embed", "absolute position embeddings: mmfm's transformer is position-free or uses 2D RoPE"),
        (r"fc_norm\..*", "average-pool readout norm: mmfm reads the class token"),
        (r"blocks\.\d+\.ls[12]\..*", "LayerScale is not part of mmfm's blocks"),
        (r"blocks\.\d+\.attn\.[qk]_norm\..*", "QK-norm is not part of mmfm's blocks"))),
    "titan": Layout(r"blocks\.modules_list\.0\.attn\.qkv\.weight", _titan, (
        (r"pos_embed", "absolute position embeddings (pos_encode_type 'abs'): the layout reproduces TITAN's ALiBi"),
        (r"fc_norm\..*", "average-pool readout norm (global_pool 'avg'): TITAN reads its CoCa pooler"),
        (r"blocks\.modules_list\.\d+\.ls[12]\..*", "LayerScale is not part of mmfm's blocks"),
        (r"blocks\.modules_list\.\d+\.attn\.[qk]_norm\..*", "QK-norm is not part of mmfm's blocks"))),
    "gigapath": Layout(r"encoder\.layers\.0\.self_attn\.q_proj\.weight", _gigapath),
}


def find_prefix(state: State, layout: str) -> str:
    """The key prefix under which the layout's tensors sit ('' , 'wsi_embedder.', 'module.', …)."""
    anchor = LAYOUTS[layout].anchor
    found = sorted({m.group(1) for k in state if (m := re.fullmatch(rf"(.*?){anchor}", k))})
    if len(found) != 1:
        raise PortingError(f"layout {layout}: {'no' if not found else 'several'} key(s) match {anchor!r}"
                           + (f" (prefixes {found}); set the prefix" if found else
                              f"; is it a {layout} checkpoint? keys: {', '.join(sorted(state)[:12])}"))
    return found[0]


def convert(state: State, layout: str, prefix: str = "auto", **options) -> tuple[Converted, list[str]]:
    """(the converted checkpoint, keys outside `prefix` that were left alone, e.g. an RNA tower)."""
    if layout not in LAYOUTS:
        raise PortingError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    if prefix == "auto":
        prefix = find_prefix(state, layout)
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outside = sorted(k for k in state if not k.startswith(prefix))
    refused = [f"{prefix}{k} ({why})" for pattern, why in LAYOUTS[layout].unsupported
               for k in sorted(inside) if re.fullmatch(pattern, k)]
    if refused:
        raise PortingError(f"layout {layout}: unsupported tensors: " + "; ".join(refused))
    return LAYOUTS[layout].convert(inside, **options), outside
