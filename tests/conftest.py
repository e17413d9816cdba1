"""Tests run with 8 forced CPU devices so sharding is real; set before jax is imported."""

import os

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


def tiny_cohort(tmp_path_factory) -> Path:
    """48 simulated cases with small shapes (default missing rates), the cohort of TINY_RUN runs."""
    from mmfm.data.simulate import SimConfig, simulate_cohort

    out = tmp_path_factory.mktemp("tiny") / "cohort"
    simulate_cohort(out, SimConfig(n_cases=48, n_sites=3, feature_dim=32, n_genes=64, n_proteins=16,
                                   bag_size_median=64, bag_size_max=256))
    return out


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    if not (WSI_DIR / "CMU-1-Small-Region.svs").exists():
        pytest.fail(f"real slide fixtures missing at {WSI_DIR}")
    return WSI_DIR
