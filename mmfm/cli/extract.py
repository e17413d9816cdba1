"""`mmfm extract`: whole-slide images → tile-feature bags with a PyTorch tile encoder."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

from mmfm.bridges.extract import ExtractConfig, extract

DESCRIPTION = """\
Segment tissue, tile every slide of --wsi_dir at --mag / --patch_size, encode the tiles with a timm tile
encoder (UNI, Virchow2, H-optimus, CONCH, …; weights from a local file, never downloaded) and write one
TRIDENT h5 bag per slide into the cohort directory --out. Resumable: finished bags are kept. Shard a large
folder over jobs with --shard i/n; inside a SLURM job array (sbatch --array=0-N) the shard defaults to
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (scripts/launch/extract_array.sbatch). Needs the PyTorch extra:
pip install 'mmfm[bridges]'.

example: mmfm extract --wsi_dir slides/ --out cohort --encoder uni --weights uni.safetensors --mag 20 --patch_size 256"""

ALIASES = {"min_tissue": "tissue.min_tissue_fraction", "fill_holes": "tissue.fill_holes"}


@dataclass(frozen=True)
class Config(ExtractConfig):
    shard: str = ""                   # i/n: this job's share of the sorted slides ("" = the SLURM array task, else 0/1)


def shard_from_env(env=None) -> str:
    """'i/n' for a SLURM job array task (ids may start anywhere and step, e.g. --array=1-8 or 0-30:10), else '0/1'."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env:
        return "0/1"
    try:
        task, first = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", 1))
        count = int(env.get("SLURM_ARRAY_TASK_COUNT") or (int(env["SLURM_ARRAY_TASK_MAX"]) - first) // step + 1)
    except (KeyError, ValueError) as e:
        raise ValueError(f"SLURM job array variables ({e}): pass --shard i/n") from None
    return f"{(task - first) // step}/{count}"


def run(cfg: Config) -> int:
    cfg = dataclasses.replace(cfg, shard=cfg.shard or shard_from_env())
    summary = extract(cfg)
    for r in summary["slides"]:
        if r["status"] == "failed":
            print(f"FAILED {r['slide_id']}: {r['reason']}", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("shard", "n_ok", "n_skipped", "n_failed", "tiles_per_s")}))
    return 1 if summary["n_failed"] else 0
