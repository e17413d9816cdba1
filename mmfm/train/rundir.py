"""The run directory: what `mmfm pretrain` writes and what every later step (`embed`, `probe`, export) reads.

    RUN/config.yaml        resolved RunConfig          RUN/env.json        versions, devices, mesh
    RUN/splits.json        train / val / held-out      RUN/shapes.json     BatchShapes the model was built for
    RUN/transforms/        fitted omics transforms     RUN/checkpoints/    orbax steps (+ loader state)
    RUN/metrics.jsonl, eval.jsonl, tb/                 training and held-out curves

One module owns these names so the trainer and inference cannot disagree about them. Every reader raises
`RunDirError` naming the run directory and the missing piece (a run from a failed pretrain, a wrong path).
Every path is an `epath.Path` (`mmfm.train.paths`): a run directory may be local, on shared NFS/Lustre or
`gs://bucket/run`, through the same code.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import sys
import tempfile
from pathlib import Path
from typing import Literal

import jax
import numpy as np
import yaml
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from mmfm import memo
from mmfm.config import ConfigError, decode, to_dict, yaml_problem
from mmfm.data.batch import BatchShapes
from mmfm.locks import LockedError, OwnerLock
from mmfm.train.checkpoint import Checkpointer, LoaderStateMismatch
from mmfm.train.config import RunConfig, check, dump_config
from mmfm.train.monitor import read_jsonl
from mmfm.train.optim import make_optimizer
from mmfm.train.paths import read_json, run_path, write_json, write_text
from mmfm.train.sharding import make_mesh
from mmfm.train.state import abstract_state, build_module

RESUME_MAY_CHANGE = ("train.steps", "train.progress", "train.async_checkpoint", "train.log_every",
                     "train.eval_every", "train.ckpt_every", "train.keep_last")  # never the numerics


class RunDirError(ValueError):
    """A run directory that is missing, incomplete or not what the caller needs; the message says which file."""


Resume = bool | Literal["auto"]


def resume_flag(resume: Resume) -> bool:
    """`--resume`: False (a new run), True or "auto" (continue from the newest complete checkpoint, or start
    fresh when there is none — what a re-queued job runs every time). Orbax lists only finished steps."""
    if resume not in (True, False, "auto"):
        raise ConfigError(f"--resume {resume!r}: expected true, false or auto")
    return resume is not False


LOCK = ".lock"


def _lock_file(name: str) -> bool:
    """RUN/.lock and its transient siblings (`mmfm.locks`: the hidden temporary and stale names)."""
    return name == LOCK or name.startswith(f".{LOCK}.")


def prepare(out: epath.Path, resume: bool) -> None:
    """Refuse to train into a used directory unless resuming — before any work, so nothing is overwritten."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: --out is a file, not a run directory")
    used = [p.name for p in out.iterdir() if not _lock_file(p.name)] if out.exists() else []
    if not resume and used:  # process 0's lock may already be there: the lock itself decides about live jobs
        names = ", ".join(sorted(used)[:6])
        raise RunDirError(f"{out}: run directory is not empty ({names}); pass --resume auto to continue it, "
                          f"or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)


def lock(out: epath.Path) -> OwnerLock | None:
    """Process 0 holds RUN/.lock while the run trains (`mmfm.locks`): a second job into a live run directory is
    refused before it writes anything, a dead job's lock (kill -9, a lost node) is taken over and said so. Every
    process learns the outcome, so a refused multi-process job stops everywhere. Object-store run directories
    (gs://) have no atomic create: they are not locked."""
    held, err = None, ""
    if jax.process_index() == 0 and "://" not in os.fspath(out):
        try:
            held = OwnerLock(Path(os.fspath(out)) / LOCK, what=f"{out}: run directory")
            held.acquire()
        except LockedError as e:
            held, err = None, str(e)
    if jax.process_count() > 1 and int(multihost_utils.broadcast_one_to_all(np.int32(bool(err)))) and not err:
        err = f"{out}: run directory is in use by another job (process 0 names it)"
    if err:
        raise RunDirError(err)
    return held


def restore_newest_intact(ckpt: Checkpointer, target):
    """(step, `Checkpointer.restore` output) of the newest checkpoint that restores. Newer ones that do not
    (truncated or missing files: a disk that filled, a copy cut short) are moved to RUN/checkpoints.corrupt/ and
    named on stderr, so only the steps after the intact one are lost and no later save collides with them. When
    none restores, nothing is moved and the error names them all. Every process agrees on each step's verdict."""
    failed: list[tuple[int, str]] = []
    for step in reversed(ckpt.all_steps()):
        try:
            got, why = ckpt.restore(step, target), ""
        except LoaderStateMismatch:
            raise
        except Exception as e:  # orbax / tensorstore raise many types for a damaged step
            got, why = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if jax.process_count() > 1:
            why = why or ("unreadable on another process" if int(np.max(multihost_utils.process_allgather(
                np.int32(bool(why))))) else "")
        if not why:
            for bad, reason in failed:
                moved = ckpt.quarantine(bad)
                if jax.process_index() == 0:
                    print(f"mmfm pretrain: {ckpt.directory / str(bad)}: unreadable ({reason}); moved to {moved}, "
                          f"resuming from step {step}", file=sys.stderr, flush=True)
            return step, got
        failed.append((step, why))
    raise RunDirError(f"{ckpt.directory}: no checkpoint restores (" +
                      "; ".join(f"step {s}: {w}" for s, w in failed) + "); start a new run directory")


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("mmfm", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "h5py", "anndata"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def write_run_files(out: epath.Path, cfg: RunConfig, mesh, resume: bool) -> None:
    """config.yaml and env.json (process 0); on resume only the harmless keys may differ from the saved config."""
    if jax.process_index() != 0:
        return
    prev = out / "config.yaml"
    if resume and prev.exists():
        old, new = _flat(to_dict(read_config(out))), _flat(to_dict(cfg))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUME_MAY_CHANGE)
        if diff:
            raise ConfigError(f"{prev}: --resume with a different config ({', '.join(diff)}); "
                              f"only {', '.join(RESUME_MAY_CHANGE)} may change")
    write_text(prev, dump_config(cfg))
    write_json(out / "env.json", {
        "versions": versions(), "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
        "mesh": {k: int(v) for k, v in mesh.shape.items()}})


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _need(run_dir, name: str) -> epath.Path:
    run_dir = run_path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory (the --out of `mmfm pretrain`)")
    path = run_dir / name
    if not path.exists():
        raise RunDirError(f"{run_dir}: {name} is missing — not a finished `mmfm pretrain` run directory "
                          f"(did pretraining fail before its first step?)")
    return path


def read_config(run_dir) -> RunConfig:
    path = _need(run_dir, "config.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(e)})") from e
    try:
        return check(decode(RunConfig, raw, str(path)))
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from e


def read_shapes(run_dir) -> BatchShapes:
    return BatchShapes(**read_json(_need(run_dir, "shapes.json")))


def write_shapes(run_dir: epath.Path, shapes: BatchShapes) -> None:
    write_json(run_dir / "shapes.json", dataclasses.asdict(shapes))


def read_splits(run_dir) -> dict:
    """{'train', 'val', 'heldout': case ids, ...}: pretraining, validation (held-out evaluation, `best`) and the
    probes' test cases. A run written before validation cases existed has 'val' = [] (it evaluated on held-out)."""
    return {"val": [], **read_json(_need(run_dir, "splits.json"))}


def write_splits(run_dir: epath.Path, parts: dict[str, list[str]], data) -> None:
    """`parts` = {'train', 'val', 'heldout'} case ids; `data` = the run's DataConfig (fractions, seed, by site)."""
    write_json(run_dir / "splits.json", {**parts, "heldout_fraction": data.heldout_fraction,
                                         "val_fraction": data.val_fraction, "split_by_site": data.split_by_site,
                                         "seed": data.split_seed})


def save_transforms(directory: epath.Path, transforms: dict) -> None:
    """The loader's fitted omics transforms (gene vocabulary, scaling) so inference matches training:
    `OmicsTransform.to_dict()` as JSON, the format `OmicsTransform.save` writes."""
    names = {}
    for name, tr in (transforms or {}).items():
        if tr is not None:
            write_json(directory / name, tr.to_dict(), indent=None)
            names[name] = name
    write_json(directory / "index.json", names)


def load_transforms(directory) -> dict:
    """Each transform is read through epath and checked by `OmicsTransform.load` (from a local copy)."""
    from mmfm.data.omics import OmicsTransform

    directory = run_path(directory)
    index = directory / "index.json"
    if not index.exists():
        return {}
    out = {}
    with tempfile.TemporaryDirectory(prefix="mmfm-transforms-") as tmp:
        for name, fn in read_json(index).items():
            local = Path(tmp) / fn
            local.write_text((directory / fn).read_text())
            try:
                out[name] = OmicsTransform.load(local)
            except ValueError as e:
                raise RunDirError(str(e).replace(str(local), str(directory / fn))) from e
    return out


def best_step(run_dir: epath.Path, metric: str, mode: str, available: list[int]) -> int:
    rows = [r for r in read_jsonl(run_dir / "eval.jsonl") if r.get("step") in available and metric in r] \
        if (run_dir / "eval.jsonl").exists() else []
    if not rows:
        raise RunDirError(f"{run_dir}: no checkpoint with eval metric {metric!r} (train.best_metric) in "
                          f"eval.jsonl; use a step number or the latest checkpoint")
    pick = max if mode == "max" else min
    return pick(rows, key=lambda r: r[metric])["step"]


def resolve_step(run_dir: epath.Path, cfg: RunConfig, step: int | str | None, steps: list[int]) -> int:
    """None = latest, "best" = train.best_metric's best, or an existing step number."""
    if not steps:
        raise RunDirError(f"{run_dir / 'checkpoints'}: no finished checkpoint")
    if step is None or step == "latest":
        return steps[-1]
    if step == "best":
        if not read_splits(run_dir)["val"]:
            raise RunDirError(f"{run_dir}: no validation cases (data.val_fraction = 0, or a run from before they "
                              f"existed, which evaluated on its held-out cases); choosing 'best' would pick on the "
                              f"probes' test cases — use a step number or the latest checkpoint")
        return best_step(run_dir, cfg.train.best_metric, cfg.train.best_mode, steps)
    try:
        step = int(step)
    except (TypeError, ValueError):
        raise RunDirError(f"--step {step!r}: expected a step number, 'best' or 'latest'") from None
    if step not in steps:
        raise RunDirError(f"{run_dir}: no checkpoint for step {step} (have {steps})")
    return step


def checkpoint_step(run_dir, step: int | str | None = None) -> int:
    """The step `load_for_inference(run_dir, step)` restores (latest, best or a number), for the record."""
    run_dir = run_path(run_dir)
    cfg = read_config(run_dir)
    ckpt = Checkpointer(run_dir, cfg.train, read_only=True)
    try:
        return resolve_step(run_dir, cfg, step, ckpt.all_steps())
    finally:
        ckpt.close()


def load_for_inference(run_dir: str | Path, step: int | str | None = None, mesh=None):
    """→ (model, run_config, transforms): the trained `MultimodalModel` (eval with deterministic=True),
    the resolved RunConfig and the fitted omics transforms ({'rna': OmicsTransform, ...}).

    `step`: None = latest checkpoint, an int, or "best" (train.best_metric in eval.jsonl). The
    model is restored onto `mesh` (default: every local device on the data axis), whatever mesh
    it was trained on.
    """
    run_dir = run_path(run_dir)
    graphdef, state, cfg, transforms = memo.once(_inference_key(run_dir, step, mesh),
                                                 lambda: _restore(run_dir, step, mesh))
    return nnx.merge(graphdef, state)[0].model, cfg, transforms  # new objects around the (immutable) arrays


def _inference_key(run_dir: epath.Path, step, mesh) -> tuple:
    return "load_for_inference", str(run_dir), None if step == "latest" else step, mesh  # "latest" is None's step


def _inference_mesh(cfg: RunConfig, mesh=None):
    return mesh if mesh is not None else make_mesh(dataclasses.replace(cfg.train.mesh, data=-1, fsdp=1),
                                                   jax.local_devices())


def offer_trained(run_dir, graphdef: nnx.GraphDef, state, mesh) -> None:
    """The state a run has just finished training with, which it saved as its latest checkpoint, kept as what
    `load_for_inference(run_dir)` would restore when that restores onto the same mesh (`mmfm.memo`: inside a
    pipeline's scope; nothing outside one). The pipeline's embed, heatmap and probe steps then do not read back the
    checkpoint it has just written: the same arrays, ~1 s less."""
    run_dir = run_path(run_dir)
    cfg = read_config(run_dir)
    if mesh == _inference_mesh(cfg):
        memo.offer(_inference_key(run_dir, None, None), (graphdef, state, cfg, load_transforms(run_dir / "transforms")))


def _restore(run_dir: epath.Path, step: int | str | None, mesh):
    """(graphdef, state, config, transforms) of a checkpoint: once per run directory and step inside
    `memo.reusing()` (a pipeline's steps restore the same finished run)."""
    from mmfm.models.multimodal import INPUTS

    cfg = read_config(run_dir)
    shapes = read_shapes(run_dir)
    ckpt = Checkpointer(run_dir, cfg.train, read_only=True)
    try:
        step = resolve_step(run_dir, cfg, step, ckpt.all_steps())
        mesh = _inference_mesh(cfg, mesh)
        modalities = tuple(m for m in cfg.data.modalities if getattr(shapes, INPUTS[m][1]))
        ts = abstract_state(build_module(cfg, shapes, modalities), make_optimizer(cfg.train), mesh,
                            cfg.train.axis_rules, cfg.train.shard_min_size, inputs={})  # the checkpoint holds all
        state = ckpt.restore_state(step, ts.abstract)
    finally:
        ckpt.close()
    return ts.graphdef, state, cfg, load_transforms(run_dir / "transforms")
