"""Orbax checkpoints of a run: train state, loader iterator states, step metadata.

Layout: RUN_DIR/checkpoints/<step>/{state, loader, meta}. Orbax writes each step into a
`<step>.orbax-checkpoint-tmp*` directory and renames it when complete, so a crash mid-save
leaves a tmp directory that is never listed as a step (tested). Saves are asynchronous; the
device→host copy is done before `save` returns, so the next step may donate the state.

The directory is an `epath.Path` (`mmfm.train.paths`), so `gs://` run directories work as orbax does.
Restore always targets an abstract state carrying the *current* mesh's shardings, so a
checkpoint written on a (4×2) mesh restores onto (8×1), 2 devices or 1.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

from mmfm import faults
from mmfm.train.config import TrainConfig
from mmfm.train.paths import run_path


def no_space(e: BaseException) -> bool:
    """A full disk or quota, whichever library raised it (OSError errno, or tensorstore's text)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "no space left" in str(e).lower() or (e.__cause__ is not None and no_space(e.__cause__))


class LoaderStateMismatch(ValueError):
    """A checkpoint saved by another number of processes with per-process loader states: intact, but unmappable."""


def abstract_target(abstract_state, shardings):
    """ShapeDtypeStructs that carry the target shardings (what orbax restores into)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def gather_json(obj) -> list:
    """Every process's JSON-able object, in process order (loader states differ per process)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    n = multihost_utils.process_allgather(np.array([len(data)], np.int32)).reshape(-1)
    buf = np.zeros(int(n.max()), np.uint8)
    buf[: len(data)] = data
    allb = multihost_utils.process_allgather(buf).reshape(len(n), -1)
    return [json.loads(allb[i, : n[i]].tobytes().decode()) for i in range(len(n))]


class _DropReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "is read only" not in text and "read_only=True" not in text


@contextlib.contextmanager
def _quiet_read_only():
    logger, notice = logging.getLogger("absl"), _DropReadOnlyNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class _MetaHandler(ocp.JsonCheckpointHandler):
    """The `meta` item's JSON handler, holding the `checkpoint.save` fault point (`mmfm.faults`, a testing aid):
    inside orbax's save of a step, its files being written under the temporary name and nothing committed."""

    async def async_save(self, directory, item=None, args=None):
        futures = await super().async_save(directory, item, args)
        faults.point("checkpoint.save", args.item["step"])
        return futures


def _handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry, meta = ocp.handlers.DefaultCheckpointHandlerRegistry(), _MetaHandler()
    registry.add("state", ocp.args.StandardSave)
    registry.add("state", ocp.args.StandardRestore)
    registry.add("loader", ocp.args.JsonSave)
    registry.add("loader", ocp.args.JsonRestore)
    registry.add("meta", ocp.args.JsonSave, meta)
    registry.add("meta", ocp.args.JsonRestore, meta)
    return registry


class Checkpointer:
    """Keep the last `keep_last` steps plus the best one by `best_metric` (when set)."""

    def __init__(self, run_dir, cfg: TrainConfig, *, read_only: bool = False):
        self.directory = run_path(run_dir) / "checkpoints"
        self.cfg = cfg
        policies = [cm.LatestN(max(1, cfg.keep_last))]
        if cfg.best_metric:
            key = cfg.best_metric
            policies.append(cm.BestN(get_metric_fn=lambda m: m[key], reverse=cfg.best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=cfg.async_checkpoint and not read_only,
            create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only)  # a save cut short (kill, full disk) leaves a *-tmp* step
        with _quiet_read_only():  # orbax warns "Given directory is read only" for what inference asked for
            self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handlers())

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, loader_states: list, meta: dict, metrics: dict | None = None) -> None:
        """Save (async); `loader_states` = every process's loader state (see `gather_json`). A full disk is an
        `OSError` naming the step's directory (the earlier steps stay; the partial one, never listed, is removed by
        the next run's `cleanup_tmp_directories`)."""
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                loader=ocp.args.JsonSave({"per_process": loader_states}),
                meta=ocp.args.JsonSave(dict(meta, step=int(step)))),
                metrics=metrics, force=True)
        except Exception as e:
            if not no_space(e):
                raise
            raise OSError(errno.ENOSPC, f"{self.directory / str(step)}: no space left on device while saving "
                                        f"checkpoint {step}; checkpoints {self.all_steps()} are intact") from e

    def restore(self, step: int, target):
        """→ (state on the target shardings, this process's loader state, meta)."""
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), loader=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        per = got["loader"]["per_process"]
        if len(per) == jax.process_count():
            mine = per[jax.process_index()]
        elif all(p == per[0] for p in per):  # step-addressed loader: the same state on every process
            mine = per[0]
        else:
            raise LoaderStateMismatch(f"{self.directory / str(step)}: saved by {len(per)} process(es) with different "
                             f"loader states, resuming with {jax.process_count()}; cannot map them")
        return got["state"], mine, got["meta"]

    def restore_state(self, step: int, target):
        """Model/optimizer state only (inference on any process count)."""
        got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return got["state"]

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def quarantine(self, step: int):
        """Move step `step` aside to RUN_DIR/checkpoints.corrupt/<step> (process 0; kept for a post-mortem, never
        listed or overwritten) and re-read the step list → the new path."""
        dest = self.directory.parent / "checkpoints.corrupt" / str(step)
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest = dest.with_name(f"{step}.{len(list(dest.parent.iterdir()))}")
            (self.directory / str(step)).rename(dest)
        multihost_utils.sync_global_devices(f"mmfm:quarantine-{step}")
        self.manager.reload()
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
