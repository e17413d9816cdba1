"""The small pieces of the launch kits: the extraction shard of a SLURM array task, the MFU arithmetic and peak
table, and the shell recipes (syntax, re-queue, `--resume auto`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmfm.cli.extract import shard_from_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import mfu  # noqa: E402


@pytest.mark.parametrize("env, want", [
    ({}, "0/1"),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_COUNT": "8"}, "5/8"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8"}, "2/8"),  # no COUNT
    ({"SLURM_ARRAY_TASK_ID": "20", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "30",
      "SLURM_ARRAY_TASK_STEP": "10", "SLURM_ARRAY_TASK_COUNT": "4"}, "2/4"),  # --array=0-30:10
])
def test_extract_shard_follows_the_slurm_array_task(env, want):
    assert shard_from_env(env) == want


def test_every_array_task_gets_a_distinct_shard_covering_all():
    from mmfm.bridges.extract import parse_shard, shard_of

    slides = [f"s{i:03d}" for i in range(23)]
    got = [shard_of(slides, parse_shard(shard_from_env({"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_MIN": "4",
                                                          "SLURM_ARRAY_TASK_MAX": "8"}))) for t in range(4, 9)]
    assert sorted(s for part in got for s in part) == slides and all(got)


def test_mfu_divides_model_flops_by_time_and_the_devices_peak(tmp_path):
    assert mfu.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert mfu.peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert mfu.peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12 and mfu.peak_bf16("NVIDIA A10G") == 125e12
    assert mfu.peak_bf16("NVIDIA L40S") == 362e12 and mfu.peak_bf16("NVIDIA L4") == 121e12
    assert mfu.peak_bf16("NVIDIA H200") == 989e12 and mfu.peak_bf16("TPU v5 lite") == 197e12
    assert mfu.peak_bf16("cpu") is None
    bench = {"jax_step_s": 0.02, "devices": 2, "step_flops_analytic": 4e12, "step_flops_xla": 5e12}
    got = mfu.mfu(bench, 989e12)
    assert got["mfu"] == pytest.approx(4e12 / (0.02 * 2 * 989e12)) and got["hfu"] == pytest.approx(5e12 / (0.04 * 989e12))
    path = tmp_path / "bench_train.json"
    path.write_text(json.dumps(bench))
    out = subprocess.run([sys.executable, str(REPO / "scripts/mfu.py"), "--bench", str(path), "--device-kind",
                          "NVIDIA H100 80GB HBM3"], capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["mfu"] == pytest.approx(got["mfu"])
    out = subprocess.run([sys.executable, str(REPO / "scripts/mfu.py"), "--bench", str(path), "--device-kind", "cpu"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--peak" in out.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts/launch").iterdir()) + ["../device_check.sh"])
def test_launch_recipes_parse_and_resume(script):
    path = REPO / "scripts/launch" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    if "mmfm pretrain" in text:
        assert "--resume auto" in text
    if path.suffix == ".sbatch":
        assert "#SBATCH --requeue" in text
