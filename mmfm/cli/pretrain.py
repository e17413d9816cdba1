"""`mmfm pretrain`: sharded multimodal contrastive pretraining from a YAML recipe."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from mmfm.config import narrow
from mmfm.train.config import RunConfig

DESCRIPTION = """\
Pretrain slide / omics / report encoders aligned by a multimodal contrastive objective, sharded over every
device (one CPU to a multi-host mesh). --config names a recipe (configs/*.yaml); any key can be overridden
as --train.steps=50 or --set train.steps=50. The run directory --out receives the resolved config, splits,
shapes, fitted transforms, orbax checkpoints and metrics; it must be new or empty unless --resume. Multi-host:
--coordinator host:port --num_processes N --process_id i (or the MMFM_* / JAX environment variables).

example: mmfm pretrain --config configs/demo.yaml --out runs/demo --set data.cohort=cohort"""


@dataclass
class Config(RunConfig):
    out: str = ""                      # run directory (new or empty, unless --resume)
    resume: bool = False               # continue from the latest checkpoint in --out
    coordinator: str | None = None     # multi-host: coordinator address host:port
    num_processes: int | None = None   # multi-host: number of processes
    process_id: int | None = None      # multi-host: this process's id


def run(cfg: Config) -> int:
    import jax

    from mmfm.train import NonFiniteError, pretrain
    from mmfm.train.config import check
    from mmfm.train.sharding import initialize_distributed

    if not cfg.out:
        raise ValueError("--out: required (the run directory)")
    run_cfg = check(narrow(cfg, RunConfig))
    initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)
    try:
        res = pretrain(run_cfg, cfg.out, resume=cfg.resume)
    except NonFiniteError as e:
        print(f"mmfm pretrain: {e}", file=sys.stderr)
        return 3
    if jax.process_index() == 0:
        print(json.dumps({"run_dir": str(res.run_dir), "step": res.step, "loss": res.metrics.get("loss"),
                          "eval": res.eval, "checkpoints": res.checkpoints}))
    return 0
