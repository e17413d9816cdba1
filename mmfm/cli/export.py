"""`mmfm export`: a trained run → a self-contained encoder directory (safetensors + config JSON) for PyTorch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DESCRIPTION = """\
Export a checkpoint of a pretraining run: every modality encoder, projection head and (when the run has one) the
case encoder as OUT/model.safetensors under PyTorch names ([out, in] Linear weights), OUT/config.json (the model
config, batch shapes, components and the weights' sha256) and OUT/transforms/ (the fitted omics transforms).
PyTorch loads it without JAX: `mmfm.bridges.torch_slide.from_export(OUT)` is a TRIDENT-style slide encoder
(tile features + level-0 coords + patch_size_level0) that returns the same embedding as mmfm (fp32, ≤ 1e-5);
`train.init_slide_encoder=OUT` starts a new pretraining run from its slide encoder.

example: mmfm export --run runs/demo --step best --out exports/demo"""


Step = Literal["latest", "best"] | int  # an alias keeps the field line free of quotes (draccus reads its comment)


@dataclass(frozen=True)
class Config:
    run: str = ""                      # run directory of `mmfm pretrain` (a local path or gs://…)
    out: str = ""                      # export directory to write (local; each file in it replaced atomically)
    step: Step = "latest"              # checkpoint: latest, best (train.best_metric) or a step number


def run(cfg: Config) -> int:
    from mmfm.train.export import export_run

    for key in ("run", "out"):
        if not getattr(cfg, key):
            raise ValueError(f"--{key}: required")
    config = export_run(cfg.run, cfg.out, cfg.step)
    print(f"wrote {cfg.out}: {', '.join(config['components'])} from step {config['source']['step']} "
          f"({config['n_parameters']:,} parameters)")
    return 0
