"""Run monitoring: metrics.jsonl / eval.jsonl, TensorBoard events, a progress bar, a NaN guard.

Only process 0 writes. Each JSONL line is one complete JSON object written and flushed at
once, so a killed run leaves whole lines; on resume, lines past the restored step are dropped
so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np

from mmfm.io import write_text


class NonFiniteError(FloatingPointError):
    """Training produced NaN/inf; the last good checkpoint is left as it was."""


def check_finite(metrics: dict, step: int) -> None:
    bad = sorted(k for k, v in metrics.items() if np.ndim(v) == 0 and not math.isfinite(float(v)))
    if bad:
        raise NonFiniteError(f"non-finite value at step {step} in {', '.join(bad)} "
                             f"(e.g. {bad[0]}={float(metrics[bad[0]])}); training stopped, last checkpoint kept")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn final line from a killed run
    return out


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only records with step <= last_step (resume rewinds to the checkpoint)."""
    if path.exists():
        keep = [r for r in read_jsonl(path) if r.get("step", -1) <= last_step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


class MetricsWriter:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, progress: bool = True):
        self.active = jax.process_index() == 0
        self.run_dir = Path(run_dir)
        self.bar = self.tb = None
        if not self.active:
            return
        for name in ("metrics.jsonl", "eval.jsonl"):
            truncate_jsonl(self.run_dir / name, start_step)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                            dynamic_ncols=True, mininterval=1.0)

    def _append(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def log(self, step: int, metrics: dict, file: str = "metrics.jsonl", prefix: str = "train") -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._append(file, record)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
