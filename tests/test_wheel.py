"""`pip install mmfm` from a wheel, then `mmfm demo` from outside the repository: recipes and task files
must ship as package data, nothing may find its files by repository path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import host_devices

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from a copy of the sources (the checkout stays clean), unpacked as a site dir."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mmfm", src / "mmfm", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True, text=True)
    wheel = next((tmp / "dist").glob("mmfm-*.whl"))
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    return site, names


def test_wheel_ships_recipes_and_task_files(installed):
    _, names = installed
    for f in ("base.yaml", "demo.yaml", "demo_report.yaml", "tangle_like.yaml", "tasks/demo.yaml",
              "tasks/demo_quick.yaml", "tasks/demo_report.yaml", "tasks/demo_report_quick.yaml", "pipelines/demo.yaml",
              "pipelines/demo_quick.yaml"):  # with what they inherit
        assert f"mmfm/configs/{f}" in names


def test_wheel_installed_demo_runs_outside_the_repo(installed, tmp_path):
    site, _ = installed
    env = {**os.environ, "PYTHONPATH": str(site), "XLA_FLAGS": host_devices(2)}
    where = subprocess.run([sys.executable, "-c", "import mmfm; print(mmfm.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where  # the wheel's copy, not the checkout
    res = subprocess.run(
        [sys.executable, "-m", "mmfm.cli", "demo", "--quick", "--out", str(tmp_path / "demo"), "--cases", "60",
         "--sim.feature_dim", "16", "--sim.bag_size_median", "40", "--sim.n_genes", "300",
         "--set", "train.steps=2", "--set", "train.eval_every=0", "--set", "train.progress=false",
         "--set", "loader.batch_size=8", "--set", "loader.tiles_per_slide=16", "--set", "loader.n_genes=50",
         "--n_bootstrap", "5", "--no-plots"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "demo" / "run" / "config.yaml").exists()  # demo_quick.yaml's `base: demo.yaml`, from the wheel
    assert "| task | target | metric | chance |" in (tmp_path / "demo" / "report" / "README.md").read_text()
