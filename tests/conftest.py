"""Tests run with 8 forced CPU devices so sharding is real; set before jax is imported."""

import os
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WSI_DIR = SHARED / "data" / "wsi"


TINY_RUN = ["loader.batch_size=16", "loader.tiles_per_slide=32", "loader.n_genes=64", "train.log_every=1",
            "train.progress=false", "data.heldout_fraction=0.25", "train.eval_every=0", "train.warmup=2",
            "model.embed_dim=32", "model.slide.abmil.hidden=32", "model.slide.abmil.attn_dim=16",
            "model.rna.hidden=32", "model.protein.hidden=32", "train.shard_min_size=256"]  # any recipe → seconds


def pretrain_process(out, sets, *flags, cache, devices=8) -> subprocess.Popen:
    """`mmfm pretrain` of the demo recipe with `--set` overrides in a subprocess (so it can be signalled or killed),
    sharing a persistent compilation cache `cache` across runs of the same shapes."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "-m", "mmfm.cli", "pretrain", "--config", str(REPO / "configs/demo.yaml"),
           "--out", str(out), *[a for s in sets for a in ("--set", s)], *flags]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def tiny_sets(cohort, *extra) -> list[str]:
    """`--set` overrides: TINY_RUN on `cohort`, then `extra`."""
    return [f"data.cohort={cohort}", *TINY_RUN, *extra]


def run_losses(run_dir) -> dict[int, float]:
    """step → logged loss of a run directory's metrics.jsonl."""
    from mmfm.train.monitor import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")}


def tiny_cohort(tmp_path_factory) -> Path:
    """48 simulated cases with small shapes (default missing rates), the cohort of TINY_RUN runs."""
    from mmfm.simulate import SimConfig, simulate_cohort

    out = tmp_path_factory.mktemp("tiny") / "cohort"
    simulate_cohort(out, SimConfig(n_cases=48, n_sites=3, feature_dim=32, n_genes=64, n_proteins=16,
                                   bag_size_median=64, bag_size_max=256))
    return out


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    if not (WSI_DIR / "CMU-1-Small-Region.svs").exists():
        pytest.fail(f"real slide fixtures missing at {WSI_DIR}")
    return WSI_DIR
