"""Sharded multimodal pretraining: typed run configs, mesh + logical sharding rules, AdamW, orbax
checkpoints with exact resume, monitoring and held-out retrieval/RankMe evaluation.

Stable entry points (used by `mmfm embed` / `mmfm demo`):
  pretrain(config, out_dir, resume=False) -> PretrainResult
  load_for_inference(run_dir, step=None|int|"best", mesh=None) -> (model, run_config, transforms)
  load_config(path, overrides=()) -> RunConfig
"""

from mmfm.train.config import ConfigError, RunConfig, load_config
from mmfm.train.loop import PretrainResult, pretrain
from mmfm.train.rundir import RunDirError, load_for_inference
from mmfm.train.monitor import NonFiniteError

__all__ = ["ConfigError", "NonFiniteError", "PretrainResult", "RunConfig", "RunDirError", "load_config",
           "load_for_inference", "pretrain"]
