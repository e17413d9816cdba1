"""`mmfm import-encoder`: a user's PyTorch slide-encoder checkpoint → an mmfm export directory (Flax-loadable).

Reads a safetensors file or a `torch.load(weights_only=True)` state dict, maps it through a public layout
(`mmfm/models/slide_layouts.py`: clam, tangle, vit), loads it into mmfm's Flax slide encoder — every tensor
placed with its shape checked, or a `PortingError` naming each missing / unexpected / mis-shaped key — and
writes the export format (`mmfm/models/export_format.py`) holding just that slide encoder. From there
`mmfm.models.export_format.load_slide_encoder` gives the Flax encoder (probing, `mmfm embed`-style use,
initialising pretraining) and `mmfm.bridges.torch_slide.from_export(..., project=False)` its PyTorch twin.
Conversion happens on the user's machine, from weights the user obtained under their licence; mmfm never
downloads or ships converted weights (data_cards/public_slide_encoders.md lists the licences).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass
class ImportConfig:
    checkpoint: str = ""          # .safetensors, or a PyTorch state dict (.pt/.pth/.bin, read with weights_only=True)
    layout: Literal["clam", "tangle", "vit"] = "clam"  # naming of the checkpoint (see mmfm/models/slide_layouts.py)
    out: str = ""                 # export directory to write (slide encoder only)
    prefix: str = "auto"          # key prefix of the slide encoder (e.g. 'wsi_embedder.'); auto: found by the layout
    n_heads: int = 0              # vit only: attention heads (not recorded in a state dict)
    layer_pattern: Literal["none", "alternate", "rope"] = "none"  # vit only: position scheme of the blocks
    fragment_local: bool = True   # vit only: RoPE layers attend within one tissue fragment
    rope_base: float = 100.0      # vit only


def import_encoder(cfg: ImportConfig) -> dict:
    """Convert `cfg.checkpoint` into `cfg.out`; → {out, layout, slide config, feature_dim, n_tensors, left_alone}."""
    import jax.numpy as jnp
    from flax import nnx

    from mmfm.bridges.torch_slide import read_state_dict
    from mmfm.models.config import ModelConfig
    from mmfm.models.export_format import write_export
    from mmfm.models.multimodal import build_slide_encoder
    from mmfm.models.slide_layouts import convert
    from mmfm.models.weight_porting import port_state_dict

    if not cfg.checkpoint or not cfg.out:
        raise ValueError("import-encoder: checkpoint and out are required")
    state = read_state_dict(cfg.checkpoint)
    conv, outside = convert(state, cfg.layout, cfg.prefix, n_heads=cfg.n_heads, layer_pattern=cfg.layer_pattern,
                            fragment_local=cfg.fragment_local, rope_base=cfg.rope_base)
    encoder = build_slide_encoder(conv.slide, conv.feature_dim, dtype=jnp.float32, rngs=nnx.Rngs(0))
    port_state_dict(encoder, conv.state, conv.name_map, source=f"{cfg.checkpoint} (layout {cfg.layout})")
    model_cfg = ModelConfig(modalities=("slide",), slide=conv.slide)
    source = {"checkpoint": str(Path(cfg.checkpoint).absolute()), "layout": cfg.layout,
              "left_alone": outside[:50], "n_left_alone": len(outside)}
    config = write_export(cfg.out, {"encoders.slide": encoder}, model_cfg,
                          {"batch_size": 1, "feature_dim": conv.feature_dim}, source)
    return {"out": str(cfg.out), "layout": cfg.layout, "slide": config["model"]["slide"],
            "feature_dim": conv.feature_dim, "n_tensors": len(state) - len(outside), "left_alone": outside}
