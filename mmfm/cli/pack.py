"""`mmfm pack`: a cohort's h5 bags → the packed tile store the loader reads windows from (`mmfm.data.packed`)."""

from __future__ import annotations

from dataclasses import dataclass

from mmfm.data.cohort import Cohort
from mmfm.data.packed import pack_cohort

DESCRIPTION = """\
Write COHORT/packed/: the tiles of every slide in large shard files (plain .npy) with an index, each slide's tiles
in a seeded random permutation, so the pretraining loader reads a sample of k tiles as one contiguous window —
bytes read proportional to bytes used — instead of sampling rows of HDF5 bags. The loader uses it when present
(`--set loader.tile_store=h5` to read the bags); embedding, probes and heatmaps read the bags, which stay the
interchange format. Re-running keeps every shard already complete for the same slides and bags (resumable);
a slide whose bag changed after packing is read from its bag, with a warning, until the next pack.

example: mmfm pack cohort --seed 0 --shard-gb 1"""

POSITIONAL = "cohort"


@dataclass
class Config:
    cohort: str = ""                   # cohort directory (positional)
    seed: int = 0                      # seeds each slide's tile permutation (part of the loader's resume state)
    shard_gb: float = 1.0              # target shard size in GiB (a slide is never split)


def run(cfg: Config) -> int:
    if not cfg.cohort:
        raise ValueError("the cohort directory is required: mmfm pack COHORT")
    if cfg.shard_gb <= 0:
        raise ValueError(f"--shard-gb must be positive, got {cfg.shard_gb}")
    cohort = Cohort.open(cfg.cohort, packed=False)  # a damaged store is what a re-pack repairs
    out = pack_cohort(cohort, seed=cfg.seed, shard_gb=cfg.shard_gb)
    print(f"wrote {out}")
    return 0
