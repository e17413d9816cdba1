"""`mmfm extract`: whole-slide images → tile-feature bags with a PyTorch tile encoder."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mmfm.bridges.extract import ExtractConfig, extract

DESCRIPTION = """\
Segment tissue, tile every slide of --wsi_dir at --mag / --patch_size, encode the tiles with a timm tile
encoder (UNI, Virchow2, H-optimus, CONCH, …; weights from a local file, never downloaded) and write one
TRIDENT h5 bag per slide into the cohort directory --out. Resumable: finished bags are kept. Shard a large
folder over jobs with --shard i/n; inside a SLURM job array (sbatch --array=0-N) the shard defaults to
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (scripts/launch/extract_array.sbatch). Exit 1 if any slide failed
(each listed on stderr); a run where no slide gave a bag writes no cohort files. Needs the PyTorch extra:
pip install 'mmfm[bridges]'.

example: mmfm extract --wsi_dir slides/ --out cohort --encoder uni --weights uni.safetensors --mag 20 --patch_size 256"""

ALIASES = {"min_tissue": "tissue.min_tissue_fraction", "fill_holes": "tissue.fill_holes"}
PROG = "mmfm extract"


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, printed above any progress bar."""
    tqdm.write(f"{PROG}: warning: {message}", file=sys.stderr)


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
    with warnings.catch_warnings():
        warnings.showwarning = _show
        summary = extract(cfg)
    for r in summary["slides"]:
        if r["status"] == "failed":
            print(f"FAILED {r['slide_id']}: {r['reason']}", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("shard", "n_ok", "n_skipped", "n_failed", "tiles_per_s")}))
    if summary["n_bags"] == 0:
        out = Path(cfg.out)
        kept = "its cohort tables are unchanged" if (out / "cohort.yaml").exists() else "no cohort files were written"
        i, n = summary["shard"].split("/")
        print(f"{PROG}: error: no slide gave a bag ({summary['n_failed']} failed, listed above); {kept}; "
              f"details in {out / f'extract_summary_{i}-of-{n}.json'}", file=sys.stderr)
    return 1 if summary["n_failed"] else 0
