"""Export a trained run for PyTorch: every tower and projection head as safetensors + a config JSON.

`export_run(run_dir, out_dir, step)` restores a checkpoint through the run directory's own reader
(`mmfm.train.rundir.load_for_inference`: latest, "best" or a step) and writes the export directory described
in `mmfm/models/export_format.py`: the slide encoder, the other modality encoders, the projection heads, the
case encoder when the run has one, and the run's fitted omics transforms (the RNA tower is meaningless
without its gene vocabulary and scaling). `mmfm/bridges/torch_slide.py` loads it without JAX. The learned
logit scale/bias of the objective are training state, not part of a model, and are not exported.

The other way round, `train.init_slide_encoder: DIR` starts a pretraining run from an export's slide encoder
(`mmfm export` of another run, or a public checkpoint through `mmfm import-encoder`): `slide_weights` checks
it against `model.slide` before anything is written, `place_weights` puts it into the fresh sharded state.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm.models.export_format import init_slide_encoder, write_export
from mmfm.train import rundir
from mmfm.train.paths import run_path


def export_run(run_dir, out_dir: str | Path, step: int | str | None = None) -> dict:
    """Write the export directory of `run_dir`'s checkpoint `step` (None/"latest", "best", or a number);
    → the written config.json as a dict. `run_dir` may be any epath (`gs://…`); `out_dir` is a local folder."""
    run_dir = run_path(run_dir)
    step = rundir.checkpoint_step(run_dir, step)
    model, cfg, transforms = rundir.load_for_inference(run_dir, step=step)
    parts = {f"encoders.{m}": model.encoders[m] for m in model.modalities}
    parts.update({f"heads.{m}": model.heads[m] for m in model.modalities})
    if model.case_encoder is not None:
        parts["case_encoder"] = model.case_encoder
    source = {"run_dir": str(run_dir), "step": int(step), "mmfm_version": rundir.versions()["mmfm"],
              "modalities": list(model.modalities)}
    out = Path(out_dir)
    rundir.save_transforms(run_path(out / "transforms"), transforms)
    return write_export(out, parts, cfg.model, dataclasses.asdict(rundir.read_shapes(run_dir)), source)


def slide_weights(export_dir, slide_cfg, feature_dim: int) -> dict[tuple, np.ndarray]:
    """The slide-encoder weights an export gives a new run (`train.init_slide_encoder`), as host arrays keyed by
    their path in the train state; raises before any training if the architecture or a shape differs."""
    from mmfm.models.multimodal import build_slide_encoder

    encoder = build_slide_encoder(slide_cfg, feature_dim, dtype=jnp.float32, rngs=nnx.Rngs(0))
    init_slide_encoder(encoder, slide_cfg, export_dir)
    return {(0, "model", "encoders", "slide", *path): np.asarray(var.get_value())
            for path, var in nnx.to_flat_state(nnx.state(encoder, nnx.Param))}


def place_weights(ts, weights: dict[tuple, np.ndarray]) -> None:
    """Overwrite those parameters of the (sharded) train state, each placed with its own sharding."""
    shardings = dict(nnx.to_flat_state(ts.shardings))
    flat = nnx.to_flat_state(ts.state)
    for path, var in flat:
        if path in weights:
            var.set_value(jax.device_put(weights[path].astype(var.get_value().dtype), shardings[path].get_value()))
    missing = sorted(set(weights) - {path for path, _ in flat})
    if missing:
        raise ValueError(f"train state has no parameter {'.'.join(map(str, missing[0]))} (and {len(missing) - 1} more)")
    ts.state = nnx.from_flat_state(flat)
