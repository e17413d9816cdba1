"""The export directory: mmfm weights as PyTorch-named safetensors plus the JSON config that rebuilds them.

    DIR/model.safetensors   every weight under mmfm's PyTorch names (`weight_porting.to_torch_state`):
                            encoders.<modality>.*, heads.<modality>.*, case_encoder.* (Linear weights [out, in])
    DIR/config.json         {"format": "mmfm-export", "version", "model": ModelConfig as a dict, "shapes": BatchShapes,
                            "components": ["encoders.slide", "heads.slide", ...], "weights": file name,
                            "sha256": of the weights file, "source": where they came from, "inputs": conventions}
    DIR/transforms/         the run's fitted omics transforms (gene vocabulary, scaling), when exported from a run

Read by `mmfm/bridges/torch_slide.py` (PyTorch, no JAX) and by `load_slide_encoder` here (Flax), which is
also how imported public checkpoints (`mmfm/bridges/slide_import.py`) enter mmfm. The weights are written
before the config, each atomically, and the config pins the weights' hash, so a reader never pairs a config
with weights from another export.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm.config import ConfigError, decode, to_dict
from mmfm.io import atomic_path, sha256, write_json
from mmfm.models.config import ModelConfig
from mmfm.models.weight_porting import (
    load_safetensors,
    port_state_dict,
    to_torch_state,
    torch_name_map,
)

FORMAT, VERSION = "mmfm-export", 1
WEIGHTS = "model.safetensors"
INPUTS = ("slide encoders take tile features [B, N, D], a tile mask [B, N] and integer grid coords [B, N, 2] = "
          "(x, y) level-0 pixels // patch_size_level0 (col, row); fragment ids [B, N] optional; all fp32")


class ExportFormatError(ValueError):
    """An export directory that is incomplete, from another format version, or whose files disagree."""


def write_export(out_dir: str | Path, parts: dict[str, nnx.Module], model_cfg: ModelConfig, shapes: dict,
                 source: dict) -> dict:
    """Write `parts` ({"encoders.slide": module, "heads.slide": module, ...}) as DIR/model.safetensors + config.json."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights: dict[str, np.ndarray] = {}
    for prefix, module in parts.items():
        weights.update(to_torch_state(module, prefix + "."))
    with atomic_path(out / WEIGHTS, suffix=".safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    config = {"format": FORMAT, "version": VERSION, "model": to_dict(model_cfg), "shapes": dict(shapes),
              "components": sorted(parts), "weights": WEIGHTS, "sha256": sha256(out / WEIGHTS),
              "n_parameters": int(sum(v.size for v in weights.values())), "source": source, "inputs": INPUTS}
    write_json(out / "config.json", config)
    return config


def read_export(export_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, weights) of an export directory, checked: format, version, weights hash."""
    d = Path(export_dir)
    path = d / "config.json"
    if not path.is_file():
        raise ExportFormatError(f"{path}: missing (not an mmfm export directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportFormatError(f"{path}: not JSON ({e})") from e
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ExportFormatError(f"{path}: format {config.get('format')!r} version {config.get('version')!r}; "
                                f"this mmfm reads {FORMAT!r} version {VERSION}")
    weights = d / config["weights"]
    if not weights.is_file():
        raise ExportFormatError(f"{weights}: missing")
    if sha256(weights) != config["sha256"]:
        raise ExportFormatError(f"{weights}: sha256 differs from {path} (weights and config from different exports)")
    return config, load_safetensors(weights)


def model_config(config: dict, where: str = "config.json") -> ModelConfig:
    """The export's ModelConfig, decoded by the same typed schema as a recipe's `model:` section."""
    try:
        return decode(ModelConfig, config["model"], f"{where}: model")
    except ConfigError as e:
        raise ExportFormatError(str(e)) from e


def load_slide_encoder(export_dir: str | Path, rngs: nnx.Rngs | None = None):
    """→ (Flax slide encoder with the exported weights, its SlideConfig, tile-feature dim) from an export directory."""
    from mmfm.models.multimodal import build_slide_encoder

    config, weights = read_export(export_dir)
    if "encoders.slide" not in config["components"]:
        raise ExportFormatError(f"{export_dir}: no slide encoder (components: {config['components']})")
    cfg = model_config(config, f"{export_dir}/config.json")
    feature_dim = int(config["shapes"]["feature_dim"])
    enc = build_slide_encoder(cfg.slide, feature_dim, dtype=jnp.float32, rngs=rngs or nnx.Rngs(0))
    _port_slide(enc, weights, f"{export_dir}/{config['weights']}")
    return enc, cfg.slide, feature_dim


RUNTIME_ONLY = {"dropout", "attn_dropout", "attn_impl", "block_q", "block_k", "mlp_chunk"}  # not the function


def init_slide_encoder(encoder: nnx.Module, slide_cfg, export_dir: str | Path) -> None:
    """Overwrite `encoder` (built from `slide_cfg`, e.g. a MultimodalModel's before pretraining continues) with an
    export's slide encoder (an imported public checkpoint, say). The architectures must agree field by field;
    dropout rates and attention kernels may differ."""
    config, weights = read_export(export_dir)
    want = model_config(config, f"{export_dir}/config.json").slide
    if want.kind != slide_cfg.kind:
        diff = [f"kind: export {want.kind!r} vs config {slide_cfg.kind!r}"]
    else:
        have = dataclasses.asdict(getattr(slide_cfg, slide_cfg.kind))
        theirs = dataclasses.asdict(getattr(want, want.kind))
        diff = [f"{k}: export {theirs[k]!r} vs config {v!r}" for k, v in have.items()
                if k not in RUNTIME_ONLY and theirs[k] != v]
    if diff:
        raise ExportFormatError(f"{export_dir}: its slide encoder differs from model.slide ({'; '.join(diff)})")
    _port_slide(encoder, weights, f"{export_dir}/{config['weights']}")


def _port_slide(encoder: nnx.Module, weights: dict[str, np.ndarray], source: str) -> None:
    prefix = "encoders.slide."
    port_state_dict(encoder, weights, torch_name_map(encoder, prefix, ignore=(rf"(?!{re.escape(prefix)}).*",)),
                    source=source)
