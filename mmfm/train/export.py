"""Export a trained run for PyTorch: every tower and projection head as safetensors + a config JSON.

`export_run(run_dir, out_dir, step)` restores a checkpoint (latest, "best" or a step) and writes the export
directory described in `mmfm/models/export_format.py`: the slide encoder, the other modality encoders, the
projection heads, the case encoder when the run has one, and the run's fitted omics transforms (the RNA
tower is meaningless without its gene vocabulary and scaling). `mmfm/bridges/torch_slide.py` loads it.
The learned logit scale/bias of the objective are training state, not part of a model, and are not exported.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mmfm.models.export_format import write_export


@dataclass
class ExportConfig:
    run: str = ""                 # run directory of `mmfm pretrain`
    out: str = ""                 # export directory to write (created; files in it are replaced atomically)
    step: str = "latest"          # checkpoint: latest | best (train.best_metric) | a step number


def parse_step(step: str | int | None) -> str | int | None:
    """ExportConfig.step → load_for_inference's step (None = latest)."""
    if step is None or step == "latest":
        return None
    if step == "best" or isinstance(step, int):
        return step
    try:
        return int(step)
    except ValueError:
        raise ValueError(f"step={step!r}: expected latest, best or a step number") from None


def export_run(run_dir: str | Path, out_dir: str | Path, step: str | int | None = None) -> dict:
    """Write the export directory of `run_dir`'s checkpoint `step` (None/"latest", "best", or an int); → its config."""
    from mmfm.train.checkpoint import Checkpointer
    from mmfm.train.config import load_config
    from mmfm.train.loop import best_step, load_for_inference

    run_dir, out = Path(run_dir).absolute(), Path(out_dir)
    step = parse_step(step)
    model, cfg, _ = load_for_inference(run_dir, step=step)
    if not isinstance(step, int):  # resolve latest/best to the step actually restored, for the record
        run_cfg = load_config(run_dir / "config.yaml")
        ckpt = Checkpointer(run_dir, run_cfg.train, read_only=True)
        steps = ckpt.all_steps()
        ckpt.close()
        step = steps[-1] if step is None else best_step(run_dir, run_cfg.train.best_metric, run_cfg.train.best_mode,
                                                        steps)
    parts = {f"encoders.{m}": model.encoders[m] for m in model.modalities}
    parts.update({f"heads.{m}": model.heads[m] for m in model.modalities})
    if getattr(model, "case_encoder", None) is not None:
        parts["case_encoder"] = model.case_encoder
    shapes = json.loads((run_dir / "shapes.json").read_text())
    try:
        version = importlib.metadata.version("mmfm")
    except importlib.metadata.PackageNotFoundError:
        version = None
    source = {"run_dir": str(run_dir), "step": int(step), "mmfm_version": version,
              "modalities": list(model.modalities)}
    _copy_transforms(run_dir / "transforms", out / "transforms")
    return write_export(out, parts, cfg.model, shapes, source)


def _copy_transforms(src: Path, dst: Path) -> None:
    """The run's omics transforms, copied beside `dst` then renamed into place (never half a vocabulary)."""
    if not src.is_dir():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def run_export(cfg: ExportConfig) -> dict:
    """`mmfm export` body: checks the typed config, exports, returns the written config."""
    if not cfg.run or not cfg.out:
        raise ValueError("export: run and out are required")
    return export_run(cfg.run, cfg.out, cfg.step)
