"""Two JAX processes on loopback (gloo) train exactly like one process with two devices: each process
feeds only its half of every batch (`make_array_from_process_local_data`), checkpoints are written
jointly, held-out evaluation gathers across processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmfm.train import monitor

sys.path.insert(0, str(Path(__file__).resolve().parent / "multiprocess"))
from launch import launch  # noqa: E402

from conftest import host_devices  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from mmfm.simulate import SimConfig, simulate_cohort

    out = tmp_path_factory.mktemp("mp") / "cohort"
    simulate_cohort(out, SimConfig(n_cases=40, n_sites=3, feature_dim=16, n_genes=32, n_proteins=8,
                                   bag_size_median=48, bag_size_max=128))  # default missing rates
    return out


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(cohort, tmp_path):
    sets = [f"data.cohort={cohort}", "loader.batch_size=8", "loader.tiles_per_slide=16", "loader.n_genes=32",
            "train.steps=4", "train.ckpt_every=2", "train.eval_every=4", "train.log_every=1", "train.progress=false",
            "data.heldout_fraction=0.25", "data.val_fraction=0.25", "model.embed_dim=16", "model.slide.abmil.hidden=16",
            "model.slide.abmil.attn_dim=8", "model.rna.hidden=16", "model.protein.hidden=16"]
    base = [sys.executable, "-m", "mmfm.cli", "pretrain", "--config", str(REPO / "configs/demo.yaml")]
    flags = [a for s in sets for a in ("--set", s)]
    code, outs = launch(base + ["--out", str(tmp_path / "two")] + flags, n=2, timeout=600, xla_flags=host_devices(1))
    assert code == 0, "\n".join(outs)
    env = dict(os.environ, XLA_FLAGS=host_devices(2), JAX_PLATFORMS="cpu")
    one = subprocess.run(base + ["--out", str(tmp_path / "one")] + flags, env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    two_env = json.loads((tmp_path / "two" / "env.json").read_text())
    assert two_env["process_count"] == 2 and len(two_env["devices"]) == 2
    a = monitor.read_jsonl(tmp_path / "two" / "metrics.jsonl")
    b = monitor.read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in a], [r["grad_norm"] for r in b], rtol=1e-4)
    ea = monitor.read_jsonl(tmp_path / "two" / "eval.jsonl")[-1]
    eb = monitor.read_jsonl(tmp_path / "one" / "eval.jsonl")[-1]
    assert ea["n_cases/slide-rna"] == eb["n_cases/slide-rna"] >= 5
    np.testing.assert_allclose(ea["recall@5/slide->rna"], eb["recall@5/slide->rna"])
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
