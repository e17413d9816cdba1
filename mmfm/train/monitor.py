"""Run monitoring: metrics.jsonl / eval.jsonl, TensorBoard events, a progress bar, a NaN guard.

Only process 0 writes. The JSONL files are kept in memory and rewritten whole and atomically
(`mmfm.train.paths.write_text`) at most every `flush_every_s` seconds, before each checkpoint and on
close — the same code for a local directory and an object store, which cannot append. A killed run
therefore loses at most the lines since the last flush, none at or before its last checkpoint; on
resume, lines past the restored step are dropped so the file reads as one uninterrupted run.

The NaN guard never stops the device: `NonFiniteWatch` folds every step's scalar metrics into a
device-side record of the first non-finite step, and the loop reads it only when it fetches anyway.
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmfm.train.paths import run_path, write_text


class NonFiniteError(FloatingPointError):
    """Training produced NaN/inf; the last good checkpoint is left as it was."""


def check_finite(metrics: dict, step: int) -> None:
    bad = sorted(k for k, v in metrics.items() if np.ndim(v) == 0 and not math.isfinite(float(v)))
    if bad:
        raise NonFiniteError(f"non-finite value at step {step} in {', '.join(bad)} "
                             f"(e.g. {bad[0]}={float(metrics[bad[0]])}); training stopped, last checkpoint kept")


def _watch_update(first, values, metrics, step):
    vec = jnp.stack([v.astype(jnp.float32) for _, v in sorted(metrics.items()) if v.ndim == 0])
    new = (first == 0) & ~jnp.all(jnp.isfinite(vec))
    return jnp.where(new, step, first), jnp.where(new, vec, values)


@jax.tree_util.register_pytree_node_class
class _Named:
    """The watched scalar metrics as one float32 vector, read by name (`items`, `[key]`). One buffer, not one per
    metric: XLA's CPU backend compiled a dict of ~60 scalar outputs ~15× slower than this (seconds per run)."""

    def __init__(self, keys: tuple[str, ...], vec):
        self.keys, self.vec = keys, vec

    def tree_flatten(self):
        return (self.vec,), self.keys

    @classmethod
    def tree_unflatten(cls, keys, leaves):
        return cls(keys, leaves[0])

    def items(self):
        return zip(self.keys, self.vec)

    def __getitem__(self, key: str):
        return self.vec[self.keys.index(key)]


class NonFiniteWatch:
    """The first step whose scalar metrics are not all finite, and those metrics, kept on the devices.

    `update(metrics, step)` is one asynchronous dispatch (no host sync); `check()` fetches two scalars'
    worth and raises the guard's `NonFiniteError` for the first bad step, so a run stops with the same
    message whenever it looks.
    """

    def __init__(self):
        self._update = jax.jit(_watch_update)
        self.first = self.values = None

    def update(self, metrics: dict, step: int) -> None:
        flat = {jax.tree_util.keystr(p, simple=True, separator="/"): v
                for p, v in jax.tree_util.tree_flatten_with_path(metrics)[0]}
        if self.first is None:  # placed as the update's outputs will be, so it compiles once, not twice
            where = next((v.sharding for v in flat.values() if isinstance(v, jax.Array) and v.ndim == 0), None)
            keys = tuple(k for k, v in sorted(flat.items()) if v.ndim == 0)  # the order the update stacks them
            self.first, vec = jax.device_put((np.int32(0), np.zeros(len(keys), np.float32)), where)
            self.values = _Named(keys, vec)
        self.first, vec = self._update(self.first, self.values.vec, flat, np.int32(step))
        self.values = _Named(self.values.keys, vec)

    def snapshot(self):
        """(first bad step, its metrics) as of the last update, still on the devices (arrays are immutable)."""
        return self.first, self.values

    def first_bad_step(self) -> int | None:
        """Blocks until the last updated step is done; None while every step was finite."""
        first = 0 if self.first is None else int(jax.device_get(self.first))
        return first or None

    def check(self) -> None:
        step = self.first_bad_step()
        if step is not None:
            check_finite({k: float(v) for k, v in jax.device_get(self.values).items()}, step)


def read_jsonl(path) -> list[dict]:
    path = run_path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn final line from a killed run
    return out


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


class MetricsWriter:
    FILES = ("metrics.jsonl", "eval.jsonl")

    def __init__(self, run_dir, total_steps: int, start_step: int = 0, progress: bool = True,
                 flush_every_s: float = 10.0, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.run_dir = run_path(run_dir)
        self.flush_every_s = flush_every_s
        self.bar = self.tb = None
        self._rows: dict[str, list[dict]] = {}
        self._dirty: set[str] = set()
        self._flushed = time.monotonic()
        if not self.active:
            return
        for name in self.FILES:  # resume: keep what precedes the restored step, as one uninterrupted run
            rows = [r for r in read_jsonl(self.run_dir / name) if r.get("step", -1) <= start_step]
            self._rows[name] = rows
            if (self.run_dir / name).exists():
                write_text(self.run_dir / name, _jsonl(rows))
        if tensorboard:  # tensorboardX writes gs:// itself (with google-cloud-storage installed)
            self.tb = _summary_writer()(str(self.run_dir / "tb"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                            dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, metrics: dict, file: str = "metrics.jsonl", prefix: str = "train") -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._rows.setdefault(file, []).append(record)
        self._dirty.add(file)
        for k, v in record.items():
            if self.tb is not None and k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if time.monotonic() - self._flushed >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Rewrite the changed JSONL files (whole, atomically); the loop calls it before every checkpoint."""
        for name in sorted(self._dirty):
            write_text(self.run_dir / name, _jsonl(self._rows[name]))
        self._dirty.clear()
        self._flushed = time.monotonic()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.active:
            return
        self.flush()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without torch where torch is not loaded yet: tensorboardX imports it
    only to accept torch tensors (the loop logs floats), and that import costs ~2 CPU-s in every training process.
    While tensorboardX loads, `import torch` raises ImportError, which tensorboardX catches; torch itself stays
    importable afterwards."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # the import system's "not importable" marker
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
