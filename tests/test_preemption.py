"""Pre-emption and the deferred NaN guard, end to end on a simulated cohort: SIGTERM mid-run → a checkpoint and
exit 75 → `--resume auto` reproduces the uninterrupted curve; a NaN between log steps still stops at its step."""

import json

import numpy as np
import pytest

from conftest import REFERENCE_STEPS, REPO, pretrain_process, tiny_cohort
from conftest import run_losses as losses
from conftest import tiny_sets as sets
from mmfm.train import config, loop, monitor
from mmfm.train.checkpoint import Checkpointer

cohort = pytest.fixture(scope="module")(tiny_cohort)  # one fresh cohort per module


def test_sigterm_checkpoints_exits_75_and_resume_auto_reproduces_the_curve(reference_run, tmp_path):
    """SIGTERM (SLURM's / Kubernetes' pre-emption notice) delivered right after step 5 is dispatched (`mmfm.faults`):
    the run finishes step 5, checkpoints it beside the regular checkpoint 4 and exits 75; resumed, the curve is the
    uninterrupted one (conftest's `reference_run`: the same recipe, cohort and steps)."""
    cohort, ref, _ = reference_run
    n, stop, cache = REFERENCE_STEPS, 5, tmp_path / "jit_cache"
    overrides = sets(cohort, f"train.steps={n}", "train.ckpt_every=4", "train.keep_last=10")
    run = tmp_path / "run"
    proc = pretrain_process(run, overrides, "--resume", "auto", cache=cache,  # auto on a new directory: fresh
                            faults=f"train.step@{stop}:SIGTERM")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75, out
    assert f"stopped by SIGTERM after step {stop};" in out, out
    assert Checkpointer(run, config.TrainConfig(), read_only=True).all_steps() == [4, stop]
    assert max(losses(run)) == stop  # every record up to it written, none after
    proc = pretrain_process(run, overrides, "--resume", "auto", cache=cache)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, n + 1))
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)
    assert len(set(np.round(list(want.values()), 4))) == n


def test_nan_between_log_steps_stops_at_its_step_and_is_never_checkpointed(cohort, tmp_path):
    cfg = config.load_config(REPO / "configs/demo.yaml", sets(cohort, "train.steps=8", "train.log_every=4",
                                                             "train.ckpt_every=2", "train.inject_nan_step=3"))
    with pytest.raises(monitor.NonFiniteError, match=r"non-finite value at step 3 in .*loss"):
        loop.pretrain(cfg, tmp_path / "run", device_prefetch=3)
    assert Checkpointer(tmp_path / "run", cfg.train, read_only=True).all_steps() == [2]
    assert [r["step"] for r in monitor.read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]  # step 4 not logged
    cfg = config.load_config(tmp_path / "run" / "config.yaml")
    assert json.loads((tmp_path / "run" / "splits.json").read_text())["train"]
