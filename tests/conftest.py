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


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    if not (WSI_DIR / "CMU-1-Small-Region.svs").exists():
        pytest.fail(f"real slide fixtures missing at {WSI_DIR}")
    return WSI_DIR
