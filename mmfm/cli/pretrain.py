"""`mmfm pretrain`: sharded multimodal contrastive pretraining from a YAML recipe."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Literal

from mmfm.config import narrow
from mmfm.train.config import RunConfig
from mmfm.train.rundir import Resume

DESCRIPTION = """\
Pretrain slide / omics / report encoders aligned by a multimodal contrastive objective, sharded over every
device (one CPU to a multi-host mesh). --config names a recipe (configs/*.yaml); any key can be overridden
as --train.steps=50 or --set train.steps=50. The run directory --out (a path or gs://bucket/run) receives the
resolved config, splits, shapes, fitted transforms, orbax checkpoints and metrics; it must be new or empty
unless --resume. Multi-host: started by srun / mpirun / a TPU pod / GKE, processes find each other by
themselves; elsewhere pass --coordinator host:port --num_processes N --process_id i (or MMFM_* variables).
SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 finish the current step, write a checkpoint and exit 75 (re-queue me);
--resume auto then continues from it. Exit 3: the loss diverged (NaN/inf), last good checkpoint kept.

example: mmfm pretrain --config configs/demo.yaml --out runs/demo --set data.cohort=cohort --resume auto"""

Distributed = Literal["auto", "off"]  # an alias keeps the field line free of quotes (draccus reads its comment)


@dataclass
class Config(RunConfig):
    out: str = ""                      # run directory or gs:// URL (new or empty, unless --resume)
    resume: Resume = False             # auto (or true): continue from the newest complete checkpoint, else start fresh
    device_prefetch: int = 2           # batches put on the devices ahead of the step (0: none)
    distributed: Distributed = "auto"  # auto: join a multi-process run when launched as one; off: one process
    coordinator: str | None = None     # multi-host: coordinator address host:port
    num_processes: int | None = None   # multi-host: number of processes
    process_id: int | None = None      # multi-host: this process's id


def train(cfg: Config):
    """Join the multi-process run (if launched as one) and pretrain → `PretrainResult`; raises the loop's
    `NonFiniteError` / `Preempted` (what `run` turns into exit codes, what `mmfm launch` jobs act on)."""
    from mmfm.train import pretrain
    from mmfm.train.config import check
    from mmfm.train.sharding import initialize_distributed

    if not cfg.out:
        raise ValueError("--out: required (the run directory)")
    run_cfg = check(narrow(cfg, RunConfig))
    initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id, mode=cfg.distributed)
    return pretrain(run_cfg, cfg.out, resume=cfg.resume, device_prefetch=cfg.device_prefetch)


def run(cfg: Config) -> int:
    import jax

    from mmfm.train import NonFiniteError
    from mmfm.train.preempt import EXIT_PREEMPTED, Preempted

    try:
        res = train(cfg)
    except NonFiniteError as e:
        print(f"mmfm pretrain: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        print(f"mmfm pretrain: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    if jax.process_index() == 0:
        print(json.dumps({"run_dir": str(res.run_dir), "step": res.step, "loss": res.metrics.get("loss"),
                          "eval": res.eval, "checkpoints": res.checkpoints}))
    return 0
