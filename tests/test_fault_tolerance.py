"""Faults survived, nothing lost: one writer per run directory (a live job's lock refused, a dead job's taken over
and said so) and a damaged latest checkpoint (`--resume` falls back to the newest intact one, loses only the steps
after it, and moves the damaged one aside)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, tiny_cohort, tiny_sets, writable_copy
from conftest import run_losses as losses
from mmfm.cli import main
from mmfm.locks import LockedError, Owner, OwnerLock, _start_ticks
from mmfm.train import config, loop
from mmfm.train.checkpoint import Checkpointer
from mmfm.train.monitor import read_jsonl

cohort = pytest.fixture(scope="module")(tiny_cohort)


def record(path: Path, host: str, pid: int, start: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "start": start, "since": "2026-01-01T00:00:00"}))


@pytest.fixture
def sleeper():
    """A live process of this host that is not us (the owner of a lock a test writes by hand)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_lock_is_refused_naming_the_owner_until_the_first_is_released(tmp_path):
    first = OwnerLock(tmp_path / ".lock", what="run directory R")
    first.acquire()
    record_ = json.loads((tmp_path / ".lock").read_text())
    assert record_["pid"] == os.getpid() and record_["host"] == socket.gethostname()
    assert record_["start"] == _start_ticks(os.getpid())
    first.acquire()  # the same process again: already its own
    first.release()
    assert not (tmp_path / ".lock").exists()
    assert os.listdir(tmp_path) == []  # no temporary or stale file left behind


def test_a_live_owner_on_this_host_is_refused(tmp_path, sleeper):
    record(tmp_path / ".lock", socket.gethostname(), sleeper.pid, _start_ticks(sleeper.pid))
    with pytest.raises(LockedError, match=rf"run directory R: in use by pid {sleeper.pid} on "
                                          rf"{socket.gethostname()} \(since 2026-01-01T00:00:00\)"):
        OwnerLock(tmp_path / ".lock", what="run directory R").acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == sleeper.pid  # untouched


@pytest.mark.parametrize("how", ["dead pid", "recycled pid", "silent other host"])
def test_a_gone_owner_is_taken_over_and_named(tmp_path, how):
    if how == "dead pid":
        record(tmp_path / ".lock", socket.gethostname(), gone := dead_pid(), None)
    elif how == "recycled pid":  # our own pid, but started at another time: not us, and that process is gone
        record(tmp_path / ".lock", socket.gethostname(), gone := os.getpid(), "1")
    else:  # another host: only its heartbeat tells, and it stopped 20 minutes ago
        record(tmp_path / ".lock", "node-17", gone := 4242, None)
        old = time.time() - 1200
        os.utime(tmp_path / ".lock", (old, old))
    said = []
    lock = OwnerLock(tmp_path / ".lock", what="R", report=said.append)
    lock.acquire()
    assert len(said) == 1 and f"R: taking over the lock of pid {gone} on " in said[0] and "which is gone" in said[0]
    assert Owner(**json.loads((tmp_path / ".lock").read_text())).same_process(Owner.me())
    lock.release()
    assert os.listdir(tmp_path) == []


def test_another_hosts_lock_with_a_live_heartbeat_is_refused(tmp_path):
    record(tmp_path / ".lock", "node-17", 4242, None)  # mtime now: its owner beat a moment ago
    with pytest.raises(LockedError, match="in use by pid 4242 on node-17"):
        OwnerLock(tmp_path / ".lock", what="R", stale_after=600).acquire()


def test_the_owner_keeps_its_lock_fresh(tmp_path):
    lock = OwnerLock(tmp_path / ".lock", heartbeat=0.05)
    lock.acquire()
    old = time.time() - 1200
    os.utime(tmp_path / ".lock", (old, old))
    deadline = time.monotonic() + 30
    while (tmp_path / ".lock").stat().st_mtime == old and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / ".lock").stat().st_mtime > old + 600
    lock.release()


def test_pretrain_into_a_live_run_directory_is_refused_before_it_writes(cohort, tmp_path, sleeper, capsys):
    run = tmp_path / "run"
    record(run / ".lock", socket.gethostname(), sleeper.pid, _start_ticks(sleeper.pid))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in run.iterdir()}
    rc = main(["pretrain", "--config", str(REPO / "configs/demo.yaml"), "--out", str(run), "--resume", "auto",
               *[a for s in tiny_sets(cohort, "train.steps=2") for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc == 2 and f"{run}: run directory: in use by pid {sleeper.pid} on {socket.gethostname()}" in err
    assert "Traceback" not in err
    assert {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in run.iterdir()} == before


def damage_state(step_dir: Path, how: str) -> None:
    """Every data file of the step's state cut to half its bytes, or the state's tree metadata deleted."""
    state = step_dir / "state"
    if how == "truncated":
        for f in (p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        (state / "_METADATA").unlink()


@pytest.fixture(scope="module")
def four_steps(cohort, tmp_path_factory):
    """(config, run dir, losses) of one uninterrupted 4-step run, checkpoints at steps 2 and 4 (read-only)."""
    cfg = config.load_config(REPO / "configs/demo.yaml", tiny_sets(
        cohort, "train.steps=4", "train.ckpt_every=2", "train.keep_last=10", "train.async_checkpoint=false"))
    run = tmp_path_factory.mktemp("four") / "run"
    assert loop.pretrain(cfg, run).checkpoints == [2, 4]
    return cfg, run, losses(run)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_resume_falls_back_past_a_damaged_latest_checkpoint(four_steps, tmp_path, damage, capsys):
    """Step 4's checkpoint cut short (a full disk, a copy interrupted) or missing its metadata: `--resume` says so,
    moves it to checkpoints.corrupt/, continues from step 2 and reproduces the uninterrupted curve; the run's lock
    is released when it ends (a dead lock from the first run — as after kill -9 — is taken over)."""
    cfg, ref, want = four_steps
    run = writable_copy(ref, tmp_path / "run")
    damage_state(run / "checkpoints" / "4", damage)
    record(run / ".lock", socket.gethostname(), dead_pid(), None)  # the first job died holding it
    capsys.readouterr()
    res = loop.pretrain(cfg, run, resume="auto")
    err = capsys.readouterr().err
    assert f"{run}/checkpoints/4: unreadable (" in err and f"moved to {run}/checkpoints.corrupt/4" in err
    assert "resuming from step 2" in err and "taking over the lock of pid" in err
    assert res.checkpoints == [2, 4] and (run / "checkpoints.corrupt" / "4").is_dir()
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)
    assert not (run / ".lock").exists()


def test_resume_with_no_intact_checkpoint_names_them_and_moves_nothing(four_steps, tmp_path):
    cfg, ref, _ = four_steps
    run = writable_copy(ref, tmp_path / "run")
    damage_state(run / "checkpoints" / "4", "missing")
    damage_state(run / "checkpoints" / "2", "truncated")
    with pytest.raises(ValueError, match=rf"{run}/checkpoints: no checkpoint restores \(step 4: .*; step 2: "):
        loop.pretrain(cfg, run, resume="auto")
    assert Checkpointer(run, cfg.train, read_only=True).all_steps() == [2, 4]
    assert not (run / "checkpoints.corrupt").exists() and not (run / ".lock").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (a real file system that fills up); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (the full-disk case)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int = 8192) -> Path:
    st = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_a_full_disk_names_the_path_keeps_the_last_checkpoint_and_resumes_when_space_is_back(
        four_steps, small_disk, capsys):
    """Checkpoint 2 written, then the disk fills: steps 3-4 end in an error naming the checkpoint and "no space"
    (not in a later error of the clean-up), with checkpoint 2 and metrics.jsonl intact and no temporary file left;
    once space is back `--resume auto` removes the partial step and ends exactly as the uninterrupted run."""
    cfg4, ref, want = four_steps
    run = writable_copy(ref, small_disk / "run")
    shutil.rmtree(run / "checkpoints" / "4")  # as if killed after checkpoint 2
    kept = snapshot_files(run)
    kept.pop("metrics.jsonl")  # the resume keeps the records up to its checkpoint (checked below)
    filler = fill(small_disk)
    with pytest.raises(OSError) as err:
        loop.pretrain(cfg4, run, resume="auto")
    msg = str(err.value)
    assert f"{run}/checkpoints/4: no space left on device while saving checkpoint 4; checkpoints [2] are intact" \
        in msg, msg
    after = snapshot_files(run)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    partial = [k for k in after if k.startswith("checkpoints/4.orbax-checkpoint-tmp")]  # never listed as a step
    assert {k: v for k, v in after.items() if k != "metrics.jsonl" and k not in partial} == kept
    filler.unlink()
    capsys.readouterr()
    res = loop.pretrain(cfg4, run, resume="auto")
    assert res.checkpoints == [2, 4] and not list((run / "checkpoints").glob("*tmp*"))  # the partial one removed
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)


def snapshot_files(root: Path) -> dict[str, str]:
    """Every file under `root` with its hash (tensorboard's event files aside: appended by design)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "tb" not in p.relative_to(root).parts}


def test_every_atomic_writer_names_the_file_and_no_space_and_keeps_the_old_one(small_disk):
    from mmfm import io

    target = small_disk / "cases.csv"
    target.write_text("case_id\nA\n")
    fill(small_disk, leave=0)
    with pytest.raises(OSError, match=rf"{target}: no space left on device .*the previous cases\.csv is intact"):
        io.write_text(target, "case_id\n" + "B\n" * 100_000)
    assert target.read_text() == "case_id\nA\n"
    assert sorted(p.name for p in small_disk.iterdir()) == ["cases.csv", "filler"]  # no temporary file left


def test_a_new_run_directory_holding_only_process_0s_lock_is_still_new(tmp_path):
    """Every process of a run checks that --out is new while process 0 may already hold RUN/.lock (found as a race
    by scripts/flake_check.sh: process 1 refused the directory process 0 had just locked)."""
    from mmfm.train import rundir
    from mmfm.train.paths import run_path

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("{}")
    (out / "..lock.host.123").write_text("{}")  # the lock's transient temporary name
    rundir.prepare(run_path(out), resume=False)
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"run directory is not empty \(metrics\.jsonl\)"):
        rundir.prepare(run_path(out), resume=False)
