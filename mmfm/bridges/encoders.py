"""Tile encoders: the field's timm architectures, their preprocessing, pooling, precision and offline weights.

Weights come from an explicit file (safetensors, or a state dict read with `torch.load(weights_only=True)`) or
from an already-populated Hugging Face cache; nothing is ever downloaded. Untrained weights only on request
(`random_init=True`), and the caller records that in the bag so such features are never mistaken for real ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked

from mmfm.bridges.encoder_layouts import ConchV15Vision, LayoutError, to_model_layout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class EncoderError(RuntimeError):
    """Unknown encoder, unusable weights file, or weights not available offline."""


@dataclass(frozen=True)
class EncoderSpec:
    """One published tile encoder as its authors (or TRIDENT, data_cards/tile_encoders.md) run it."""

    name: str
    arch: str  # timm architecture name (CONCH v1.5: its trunk)
    dim: int  # output feature size after pooling
    kwargs: dict = field(default_factory=dict)  # timm.create_model kwargs (published model configs)
    input_size: int = 224  # centre crop fed to the network
    resize: int = 224  # tiles are resized to this before the crop (GigaPath: 256 → 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    precision: str = "fp32"  # autocast dtype the authors run inference with
    pooling: str = "model"  # "model": the model's pooled output; "cls_mean": CLS ‖ mean of patch tokens
    hf_repo: str | None = None  # where an offline HF cache may hold the weights
    hf_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")  # the weights file's name there
    layout: str = "timm"  # key layout of the published file (mmfm/bridges/encoder_layouts.py)
    interpolation: str = "bilinear"  # resize filter of the authors' transform (bilinear | bicubic)
    mag: float | None = 20.0  # magnification it was trained and is run at (20× = 0.5 µm/px); None: test models


_VIT_TEST = dict(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0)
_SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
_VIRCHOW = dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
                dynamic_img_size=True, **_SWIGLU)
_HOPTIMUS = dict(mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, precision="fp16",
                 kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, global_pool="token"))
_KAIKO = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_HIBOU = dict(mean=HIBOU_MEAN, std=HIBOU_STD, layout="hf-dinov2", interpolation="bicubic")


def _kaiko(variant: str, arch: str, dim: int, img_size: int = 224) -> EncoderSpec:
    """Kaiko.ai's ViTs as timm ports (`1aurent/<arch>.kaiko_ai_towards_large_pathology_fms`); TRIDENT builds the
    L/14 at 518 px and feeds 224-px tiles (timm resamples the position embedding)."""
    return EncoderSpec(f"kaiko-{variant}", arch, dim,
                       hf_repo=f"1aurent/{arch}.kaiko_ai_towards_large_pathology_fms",
                       kwargs=dict(img_size=img_size, num_classes=0, dynamic_img_size=True), **_KAIKO)


REGISTRY: dict[str, EncoderSpec] = {s.name: s for s in [
    EncoderSpec("uni", "vit_large_patch16_224", 1024, precision="fp16", hf_repo="MahmoodLab/UNI",
                kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)),
    EncoderSpec("uni2-h", "vit_giant_patch14_224", 1536, precision="bf16", hf_repo="MahmoodLab/UNI2-h",
                kwargs=dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                            mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8,
                            dynamic_img_size=True, **_SWIGLU)),
    EncoderSpec("virchow", "vit_huge_patch14_224", 2560, precision="fp16", pooling="cls_mean",
                interpolation="bicubic", hf_repo="paige-ai/Virchow", kwargs=_VIRCHOW),
    EncoderSpec("virchow2", "vit_huge_patch14_224", 2560, precision="fp16", pooling="cls_mean",
                interpolation="bicubic", hf_repo="paige-ai/Virchow2",
                kwargs=dict(_VIRCHOW, reg_tokens=4)),
    EncoderSpec("h-optimus-0", "vit_giant_patch14_reg4_dinov2", 1536, hf_repo="bioptimus/H-optimus-0", **_HOPTIMUS),
    EncoderSpec("h-optimus-1", "vit_giant_patch14_reg4_dinov2", 1536, hf_repo="bioptimus/H-optimus-1", **_HOPTIMUS),
    EncoderSpec("gigapath", "vit_giant_patch14_dinov2", 1536, precision="fp16", resize=256,
                hf_repo="prov-gigapath/prov-gigapath",
                kwargs=dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                            init_values=1e-5, mlp_ratio=5.33334, num_classes=0)),
    # CONCH v1.5: 512-px tiles at 20× resized to 448; feature = the contrastive attentional pool, not the CLS
    EncoderSpec("conch-v1.5", "vit_large_patch16_224", 768, input_size=448, resize=448, precision="fp16",
                layout="conch-v1.5", hf_repo="MahmoodLab/conchv1_5", hf_files=("pytorch_model_vision.bin",),
                kwargs=dict(img_size=448, init_values=1.0, num_classes=0, global_pool="")),
    # Phikon-v2: HF Dinov2Model ViT-L/16 without registers; feature = CLS of last_hidden_state
    EncoderSpec("phikon-v2", "vit_large_patch16_224", 1024, layout="hf-dinov2", hf_repo="owkin/phikon-v2",
                kwargs=dict(img_size=224, init_values=1e-5, num_classes=0)),
    # Hibou: HF DINOv2 with 4 registers and SwiGLU (fc1 width = 2 × ⌈⅔·4·D⌉₈); feature = pooler_output (CLS)
    EncoderSpec("hibou-b", "vit_base_patch14_reg4_dinov2", 768, hf_repo="histai/hibou-b",
                kwargs=dict(img_size=224, num_classes=0, mlp_ratio=2 * 2048 / 768, **_SWIGLU), **_HIBOU),
    EncoderSpec("hibou-l", "vit_large_patch14_reg4_dinov2", 1024, hf_repo="histai/hibou-L",
                kwargs=dict(img_size=224, num_classes=0, mlp_ratio=2 * 2736 / 1024, **_SWIGLU), **_HIBOU),
    _kaiko("vits16", "vit_small_patch16_224", 384),
    _kaiko("vits8", "vit_small_patch8_224", 384),
    _kaiko("vitb16", "vit_base_patch16_224", 768),
    _kaiko("vitb8", "vit_base_patch8_224", 768),
    _kaiko("vitl14", "vit_large_patch14_reg4_dinov2", 1024, img_size=518),
    # ViT-Ti/16 (timm's augreg weights if cached) and a 2-block 64-d ViT: CPU tests and benchmarks.
    EncoderSpec("vit-tiny", "vit_tiny_patch16_224", 192, kwargs=dict(num_classes=0), mag=None,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), hf_repo="timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
    EncoderSpec("vit-test", "vit_tiny_patch16_224", 64, kwargs=_VIT_TEST, mag=None),
]}


def get_spec(name: str) -> EncoderSpec:
    if name not in REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build_model(spec: EncoderSpec, depth: int | None = None) -> torch.nn.Module:
    """The architecture with freshly initialised weights (no download: pretrained=False); `depth` overrides the
    number of blocks (tests compare shallow copies of the giant models against their references on CPU)."""
    kwargs = spec.kwargs if depth is None else {**spec.kwargs, "depth": depth}
    model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    return ConchV15Vision(model) if spec.layout == "conch-v1.5" else model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch state dict (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise various types for bad files
        raise EncoderError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderError(f"{path}: not a state dict of tensors")
    return sd


def cached_weights(spec: EncoderSpec) -> Path | None:
    """The weights file in the local Hugging Face cache, if one was populated beforehand (no network)."""
    if spec.hf_repo is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    for fname in spec.hf_files:
        got = try_to_load_from_cache(spec.hf_repo, fname)
        if isinstance(got, str):
            return Path(got)
    return None


class TileEncoder(torch.nn.Module):
    """uint8 tiles [B, H, W, 3] → float features [B, dim]: resize, centre-crop, normalise, forward, pool."""

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, weights: str, random_init: bool):
        super().__init__()
        self.spec, self.model = spec, model.eval()
        self.weights, self.random_init = weights, random_init
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """Antialiased resize with the authors' filter (torchvision's `Resize`), centre crop, normalise."""
        x = tiles.permute(0, 3, 1, 2)
        s = self.spec
        if x.shape[-1] != s.resize or x.shape[-2] != s.resize:
            # CPU has a fast uint8 kernel (~50× the float one, rounded and saturated like the authors' 8-bit PIL
            # resize); CUDA kernels take floats only, so they round and clip (bicubic overshoots) the same way
            kw = dict(size=(s.resize, s.resize), mode=s.interpolation, antialias=True, align_corners=False)
            x = F.interpolate(x, **kw) if x.device.type == "cpu" else \
                F.interpolate(x.float(), **kw).round().clamp(0, 255)
        x = x.float()
        if s.resize != s.input_size:
            o = (s.resize - s.input_size) // 2
            x = x[..., o: o + s.input_size, o: o + s.input_size]
        return (x - self.mean) / self.std

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        out = self.model(self.preprocess(tiles))
        if self.spec.pooling == "cls_mean":  # [B, T, D] tokens; skip CLS + register tokens for the mean
            n = self.model.num_prefix_tokens
            out = torch.cat([out[:, 0], out[:, n:].mean(1)], dim=-1)
        return out


def weights_source(spec: EncoderSpec, weights: str | Path | None, random_init: bool) -> str | None:
    """Where `load_encoder` will take weights from: an absolute file path or "random-init" (None: nowhere).
    Recorded in every bag, so a resumed run can tell features of other weights from its own."""
    if weights is not None:
        return str(Path(weights).resolve())
    if random_init:
        return "random-init"
    cached = cached_weights(spec)
    return None if cached is None else str(cached)


def load_encoder(name: str, weights: str | Path | None = None, *, random_init: bool = False,
                 seed: int = 0) -> TileEncoder:
    """Build `name` with weights from `weights`, else the offline HF cache, else (if asked) random init."""
    spec = get_spec(name)
    source = weights_source(spec, weights, random_init)
    if source is None:
        if spec.hf_repo:
            where = (f"pass --weights FILE (.safetensors or a torch state dict), or fill the local Hugging Face "
                     f"cache for {spec.hf_repo} beforehand (no weights file there; nothing is downloaded)")
        else:
            where = f"pass --weights FILE (.safetensors or a torch state dict); {name} has no published weights"
        raise EncoderError(f"encoder {name!r}: no weights: {where}; --random_init is for tests only "
                           "(features are then flagged untrained)")
    torch.manual_seed(seed)
    model = build_model(spec)
    if source != "random-init":
        load_weights(spec, model, source)
    return TileEncoder(spec, model, source, source == "random-init")


def load_weights(spec: EncoderSpec, model: torch.nn.Module, path: str | Path) -> None:
    """The file's tensors into `model` (built by `build_model(spec)`), converted from the published layout; any
    missing, extra or mis-shaped key is an EncoderError naming the file."""
    try:
        sd = to_model_layout(spec.layout, read_state_dict(path), model)
    except LayoutError as e:
        raise EncoderError(f"{path}: not a {spec.name} checkpoint ({spec.layout} layout): {e}") from e
    problem = state_dict_mismatch(model.state_dict(), sd)
    if problem:
        raise EncoderError(f"{path}: does not match {spec.name} ({spec.arch}): {problem}")
    model.load_state_dict(sd, strict=True)


def state_dict_mismatch(want: dict[str, torch.Tensor], have: dict[str, torch.Tensor]) -> str:
    """"" if `have` loads into a model with state dict `want`, else one line naming the first mismatching key
    (in the model's order) and counting the rest (torch's own message is many lines, truncated mid-key)."""
    shape = [k for k in want if k in have and tuple(have[k].shape) != tuple(want[k].shape)]
    missing = [k for k in want if k not in have]
    extra = sorted(k for k in have if k not in want)
    if not (shape or missing or extra):
        return ""
    parts = []
    if shape:
        k = shape[0]
        parts.append(f"first mismatching key {k!r} has shape {list(have[k].shape)} in the file, the model needs "
                     f"{list(want[k].shape)} ({len(shape)} key(s) of another shape)")
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the file, first {missing[0]!r}")
    if extra:
        parts.append(f"{len(extra)} key(s) the model does not have, first {extra[0]!r}")
    return "; ".join(parts)


def autocast_dtype(encoder: TileEncoder, device: torch.device, precision: str = "auto",
                   sample: torch.Tensor | None = None) -> torch.dtype:
    """The dtype to autocast to. `auto`: the authors' precision on accelerators; on CPU bf16 only when a timed
    trial on `sample` shows it is faster than fp32 (CPUs without bf16 units run it slower)."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise EncoderError(f"precision {precision!r} not in {sorted(PRECISIONS)} or 'auto'")
        return PRECISIONS[precision]
    want = PRECISIONS[encoder.spec.precision]
    if device.type != "cpu":
        return want
    if want == torch.float32 or sample is None:
        return torch.float32
    times = {}
    sample = sample[:8]  # enough to compare kernels, cheap even for a ViT-g on CPU
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):  # second round is the timed one
        t0 = time.perf_counter()
        encode(encoder, sample, dtype)
        times[dtype] = time.perf_counter() - t0
    return torch.bfloat16 if times[torch.bfloat16] < times[torch.float32] else torch.float32


def encode(encoder: TileEncoder, tiles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Features as float32 on the encoder's device, computed under autocast(`dtype`) and inference mode."""
    device = encoder.mean.device
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return encoder(tiles.to(device, non_blocking=True)).float()
