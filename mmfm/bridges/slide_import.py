"""A user's PyTorch slide-encoder checkpoint → an mmfm export directory (Flax-loadable): `mmfm import-encoder`.

Reads a safetensors file or a `torch.load(weights_only=True)` state dict (`mmfm.bridges.encoders.read_state_dict`),
maps it through a public layout (`mmfm/models/slide_layouts.py`: clam, tangle, vit, titan, gigapath), loads it
into mmfm's Flax slide encoder — every tensor placed with its shape checked, or a `PortingError` naming each
missing / unexpected / mis-shaped key — and writes the export format (`mmfm/models/export_format.py`) holding
just that slide encoder.
From there `mmfm.models.export_format.load_slide_encoder` gives the Flax encoder, `train.init_slide_encoder`
starts pretraining from it, and `mmfm.bridges.torch_slide.from_export(..., project=False)` gives its PyTorch twin.
Conversion happens on the user's machine, from weights the user obtained under their licence; mmfm never
downloads or ships converted weights (data_cards/public_slide_encoders.md lists the licences).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Positions = Literal["none", "alternate", "rope"]  # an alias keeps the field line free of quotes (for --help)


@dataclass(frozen=True)
class LayoutOptions:
    prefix: str = "auto"          # key prefix of the slide encoder (e.g. 'wsi_embedder.'); auto: found by the layout
    n_heads: int = 0              # vit/titan/gigapath: heads (not in a state dict); 0: TITAN's 12, GigaPath's 16
    layer_pattern: Positions = "none"  # vit only: position scheme of the blocks
    fragment_local: bool = True   # vit only: RoPE layers attend within one tissue fragment
    rope_base: float = 100.0      # vit only: RoPE frequency base
    pool_heads: int = 0           # titan only: heads of the CoCa pooler (0 = TITAN's 8)
    project: bool = False         # titan only: embed × TITAN's `proj` (its zero-shot space), not its slide embedding
    segment_lengths: tuple[int, ...] = ()  # gigapath only: LongNet segment lengths; () = the released model's
    dilation_ratios: tuple[int, ...] = ()  # gigapath only: one per segment length; () = (1, 2, 4, 8, 16)
    layer: int = 11               # gigapath only: blocks whose output is read (TRIDENT: 11); -1 = final output
    global_pool: bool = True      # gigapath only: mean of tile tokens (TRIDENT), false = the class token


def import_encoder(checkpoint: str | Path, layout: str, out: str | Path,
                   options: LayoutOptions = LayoutOptions()) -> dict:
    """Convert `checkpoint` (naming `layout`) into the export directory `out`;
    → {out, layout, slide config, feature_dim, n_tensors, left_alone}."""
    import jax.numpy as jnp
    from flax import nnx

    from mmfm.bridges.encoders import read_state_dict
    from mmfm.config import to_dict
    from mmfm.models.config import ModelConfig
    from mmfm.models.export_format import write_export
    from mmfm.models.multimodal import build_slide_encoder
    from mmfm.models.slide_layouts import convert
    from mmfm.models.weight_porting import port_state_dict

    state = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
             for k, v in read_state_dict(checkpoint).items()}
    conv, outside = convert(state, layout, **asdict(options))
    encoder = build_slide_encoder(conv.slide, conv.feature_dim, dtype=jnp.float32, rngs=nnx.Rngs(0))
    port_state_dict(encoder, conv.state, conv.name_map, source=f"{checkpoint} (layout {layout})")
    source = {"checkpoint": str(Path(checkpoint).absolute()), "layout": layout, "modalities": ["slide"],
              "left_alone": outside[:50], "n_left_alone": len(outside)}
    write_export(out, {"encoders.slide": encoder}, ModelConfig(slide=conv.slide),
                 {"batch_size": 1, "feature_dim": conv.feature_dim}, source)
    return {"out": str(out), "layout": layout, "slide": to_dict(conv.slide), "feature_dim": conv.feature_dim,
            "n_tensors": len(state) - len(outside), "left_alone": outside}
