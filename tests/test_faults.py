"""The fault-injection points (`mmfm.faults`): parsing, firing once at the chosen step or hit, a no-op when unset,
a clear error for a bad spec, and the write point inside `atomic_path` (the old file stays whole)."""

import os
import signal
import subprocess
import sys

import pytest

from mmfm import faults, io


@pytest.fixture(autouse=True)
def disarmed():
    yield
    faults.arm(os.environ.get(faults.ENV))


def test_parse_names_point_step_and_action():
    got = faults.parse("train.step@4:SIGTERM, write:*.h5@3:raise,checkpoint.save@12:exit=7")
    assert [(f.point, f.at, f.action) for f in got] == [("train.step", 4, "SIGTERM"), ("write:*.h5", 3, "raise"),
                                                       ("checkpoint.save", 12, "exit=7")]
    assert str(got[1]) == "write:*.h5@3:raise"
    assert faults.parse("") == []


@pytest.mark.parametrize("bad", ["train.step:SIGTERM", "train.step@x:SIGTERM", "train.step@4", "train.step@4:SIGHUP",
                                 "train.step@4:explode", "@4:raise", "train.step@4:SIGTERM;write:a@1:raise"])
def test_a_bad_spec_is_an_error_naming_the_variable(bad):
    with pytest.raises(ValueError, match=rf"MMFM_FAULTS=.*bad fault .*POINT@N:ACTION"):
        faults.arm(bad)


def test_unset_is_a_no_op():
    faults.arm(None)
    assert faults._FAULTS is None
    for step in range(10):
        faults.point("train.step", step)
    faults.arm("")
    assert faults._FAULTS is None


def test_a_step_point_fires_once_at_its_step():
    faults.arm("train.step@3:raise")
    faults.point("train.step", 1)
    faults.point("checkpoint.save", 3)  # another point, same step: nothing
    with pytest.raises(faults.InjectedFault, match=r"MMFM_FAULTS: train.step@3:raise fired at train.step"):
        faults.point("train.step", 3)
    faults.point("train.step", 3)  # once per process


def test_a_counted_glob_point_fires_at_its_nth_hit_and_a_signal_runs_its_handler_before_returning():
    faults.arm("write:*.csv@2:SIGUSR1")
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        faults.point("write:cases.csv")
        faults.point("write:slides.json")  # no match: not counted
        assert seen == []
        faults.point("write:slides.csv")
        assert seen == [signal.SIGUSR1]
        faults.point("write:more.csv")
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_kill_inside_an_atomic_write_keeps_the_old_file(tmp_path):
    """The env var crosses into a subprocess; killed between the temp file and the rename, the old file stays."""
    target = tmp_path / "cases.csv"
    target.write_text("old\n")
    code = f"from mmfm import io; io.write_text({str(target)!r}, 'new\\n')"
    env = dict(os.environ, MMFM_FAULTS="write:cases.csv@1:SIGKILL")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cases.csv.")]  # the temp file, never renamed
    env["MMFM_FAULTS"] = "write:cases.csv@1:exit=5"
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 5
    faults.arm("write:cases.csv@2:raise")
    io.write_text(target, "first\n")
    with pytest.raises(faults.InjectedFault):
        io.write_text(target, "second\n")
    assert target.read_text() == "first\n"


def test_a_trace_lists_every_point_reached_with_its_step_or_count(tmp_path):
    faults.arm(None, trace=str(tmp_path / "trace"))
    faults.point("train.step", 1)
    faults.point("write:cases.csv")
    faults.point("write:cases.csv")
    faults.point("checkpoint.save", 2)
    assert (tmp_path / "trace").read_text().split() == ["train.step@1", "write:cases.csv@1", "write:cases.csv@2",
                                                        "checkpoint.save@2"]
