"""`mmfm import-encoder`: a public PyTorch slide-encoder checkpoint → an mmfm export directory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import yaml

from mmfm.bridges.slide_import import LayoutOptions

DESCRIPTION = """\
Convert a slide-encoder checkpoint you have on disk (.safetensors, or a PyTorch state dict read with
weights_only=True; nothing is downloaded) into mmfm's Flax slide encoder and write it as an export directory
(the format of `mmfm export`). Layouts: clam (gated ABMIL of CLAM / CHIEF), tangle (TANGLE's ABMIL), vit (a
timm-style slide ViT with a class token; give --n_heads), titan (TITAN's slide encoder: 2D ALiBi, CoCa pooler;
--project true for its zero-shot space), gigapath (Prov-GigaPath's LongNet slide encoder, slide_encoder.pth:
layer 11 mean-pooled as TRIDENT reads it; --layer, --global_pool; no PyTorch twin). Every tensor is placed
with its shape checked; a mismatch names each missing, unexpected and mis-shaped key. Use the result to continue
pretraining (`mmfm pretrain --train.init_slide_encoder OUT` with the same model.slide), in `mmfm embed
--extra_encoders`, or in PyTorch (`mmfm.bridges.torch_slide.from_export(OUT, project=False)`).
Licences: data_cards/public_slide_encoders.md.
Needs the PyTorch extra: pip install 'mmfm[bridges]'.

example: mmfm import-encoder --checkpoint tangle_brca.pt --layout tangle --out exports/tangle_brca"""


# an alias keeps the field line free of quotes (draccus reads its comment)
Layout = Literal["clam", "tangle", "vit", "titan", "gigapath"]


@dataclass(frozen=True)
class Config(LayoutOptions):
    checkpoint: str = ""               # .safetensors or a PyTorch state dict (.pt/.pth/.bin)
    layout: Layout = "clam"            # naming of the checkpoint (mmfm/models/slide_layouts.py)
    out: str = ""                      # export directory to write (slide encoder only)


def run(cfg: Config) -> int:
    from mmfm.bridges.slide_import import import_encoder
    from mmfm.config import narrow

    for key in ("checkpoint", "out"):
        if not getattr(cfg, key):
            raise ValueError(f"--{key}: required")
    res = import_encoder(cfg.checkpoint, cfg.layout, cfg.out, narrow(cfg, LayoutOptions))
    slide = {k: v for k, v in res["slide"].items() if k in ("kind", res["slide"]["kind"])}
    print(f"wrote {cfg.out}: {cfg.layout} checkpoint → {slide['kind']} slide encoder on {res['feature_dim']}-d tile "
          f"features ({res['n_tensors']} tensors; {len(res['left_alone'])} outside the slide encoder left alone).\n"
          f"Its architecture, for a recipe that starts from it (train.init_slide_encoder: {cfg.out}):\n"
          + yaml.safe_dump({"model": {"slide": slide}}, sort_keys=False))
    return 0
