"""A pipeline's cohort simulated in a forked child process while the parent imports (mmfm.cli.pipeline.cohort_ahead,
mmfm.cli.forked): the same files and cache entry as the in-process step, its validation handed over (not done
again), a failing child raised naming the cohort folder with the child's error, a child killed or abandoned leaving
nothing a later run mistakes for a cohort, no child where nothing is gained, none outliving its parent.

The test process has imported JAX, so `imports_ahead` (a fresh `mmfm` process only) is patched to fork here. JAX
warns at a fork once its backend runs (XLA's threads, copied without their locks); the child here runs no XLA code
and loads no new library (the simulator, the cohort reader and the prctl call are loaded in this process first), so
the warning is silenced for this file."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmfm import memo
from mmfm.cli import pipeline
from mmfm.cli.pipeline import CohortStep, Pipeline, cohort, cohort_ahead, cohort_path
from mmfm.data import cohort as cohort_mod
from mmfm.data import scan_cache
from mmfm.simulate import cache, writer

from test_simulate_cache import TINY, digests

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fresh machine cohort cache; forking allowed in this (JAX-importing) test process."""
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "true")
    monkeypatch.setattr(pipeline, "imports_ahead", lambda: True)
    return tmp_path / "jax" / "cohorts"


def files(root: Path) -> dict[str, str]:
    return {k: v for k, v in digests(root).items() if k != scan_cache.FILE}  # the scan file holds bag mtimes


def test_the_child_writes_the_in_process_cohort_and_hands_over_its_validation(tmp_path, machine, monkeypatch,
                                                                               capfd):
    p = Pipeline(out=str(tmp_path / "out"), cohort=CohortStep(simulate=TINY))
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "false")
    here, restored = pipeline.simulated(TINY, tmp_path / "here", "t")  # the in-process step, uncached
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "true")
    assert not restored and not machine.exists()
    capfd.readouterr()
    with memo.reusing(), cohort_ahead(p, "t") as ahead:
        assert ahead is not None and ahead.pid != os.getpid()
        path, about = cohort(p, Path(p.out), "t", ahead)
        assert path == cohort_path(TINY, Path(p.out)) and "in a child process" in about and "cache" not in about
        assert capfd.readouterr().out == "[t] cohort valid: 0 warning(s)\n"  # the child's line, printed once
        # its validation serves this process's later opens: nothing is read or scanned here again
        monkeypatch.setattr(cohort_mod, "_check", lambda *a, **k: pytest.fail("validated a second time"))
        opened = cohort_mod.Cohort.open(path, scan_features=False, scan_cache=False)
        assert cohort_mod.Cohort.open(path).cases is opened.cases
        assert cohort_mod.validate(path).ok
    monkeypatch.undo()
    assert files(path) == files(here)  # every file the same bytes as the in-process step's
    fresh = cohort_mod.Cohort.open(path)  # outside the scope: read afresh from the files
    assert fresh.cases.equals(opened.cases) and fresh.slides.equals(opened.slides)
    assert (fresh.rna.X == opened.rna.X).all() and fresh.reports.equals(opened.reports)
    entry = machine / cache.cache_key(TINY)  # the child stored its validated cohort in the machine's cache
    assert (entry / scan_cache.FILE).is_file() and files(entry).keys() - files(here).keys() == {cache.MANIFEST}
    assert {k: v for k, v in files(entry).items() if k != cache.MANIFEST} == files(here)


def test_a_failing_child_is_raised_naming_the_cohort_folder_with_its_error(tmp_path, machine):
    p = Pipeline(out=str(tmp_path / "out"), cohort=CohortStep(simulate=dataclasses.replace(TINY, n_cases=0)))
    with cohort_ahead(p, "t") as ahead:  # `check_steps` refuses this config before a run forks; here it gets through
        with pytest.raises(RuntimeError) as e:
            cohort(p, Path(p.out), "t", ahead)
    folder = cohort_path(p.cohort.simulate, Path(p.out))
    assert str(e.value) == (f"{folder}: simulating the cohort failed in a child process: "
                            "ValueError: SimConfig: n_cases=0 must be >= 1")
    assert "sim_config.py" in e.value.__notes__[0]  # the child's traceback, for MMFM_DEBUG
    with pytest.raises(ValueError, match=r"cohort\.simulate: .*n_cases=0"):
        pipeline.check_steps(p)


def _slow_second_slide(monkeypatch, asleep: Path):
    """A child forked after this writes its first slide (bag, spots), then waits, saying so in the file `asleep`:
    it is caught mid-simulation, between two files. Returns the writer's own function."""
    write = writer._write_slide
    calls = []

    def slow(*args):
        calls.append(1)
        if len(calls) == 2:
            asleep.touch()
            time.sleep(60)
        return write(*args)

    monkeypatch.setattr(writer, "_write_slide", slow)
    return write


def _wait_for(asleep: Path) -> None:
    for _ in range(600):
        if asleep.exists():
            return
        time.sleep(0.05)
    pytest.fail("the child never reached its second slide")


def test_a_killed_child_is_reported_and_the_next_run_resumes_its_cohort(tmp_path, machine, monkeypatch):
    p = Pipeline(out=str(tmp_path / "out"), cohort=CohortStep(simulate=TINY))
    folder = cohort_path(TINY, Path(p.out))
    write = _slow_second_slide(monkeypatch, tmp_path / "asleep")
    with cohort_ahead(p, "t") as ahead:
        monkeypatch.setattr(writer, "_write_slide", write)  # this process writes as ever
        _wait_for(tmp_path / "asleep")
        assert list((folder / "bags").glob("*.h5"))
        os.kill(ahead.pid, signal.SIGKILL)  # the OOM killer, say
        with pytest.raises(RuntimeError, match=f"{folder}: simulating the cohort failed in a child process: "
                                               "killed by SIGKILL"):
            cohort(p, Path(p.out), "t", ahead)
    assert not (folder / "cohort.yaml").exists() and not cache.cached(machine, TINY)  # unfinished: no cohort
    with cohort_ahead(p, "t") as ahead:
        assert ahead is None  # the cohort folder is there: it resumes in place
        again, about = cohort(p, Path(p.out), "t", ahead)
    assert again == folder and files(again) == files(pipeline.simulated(TINY, tmp_path / "here", "t")[0])


def test_a_run_stopped_before_its_cohort_step_ends_the_child_and_leaves_no_cohort(tmp_path, machine, monkeypatch):
    p = Pipeline(out=str(tmp_path / "out"), cohort=CohortStep(simulate=TINY))
    folder = cohort_path(TINY, Path(p.out))
    _slow_second_slide(monkeypatch, tmp_path / "asleep")
    with pytest.raises(KeyboardInterrupt):
        with cohort_ahead(p, "t") as ahead:
            _wait_for(tmp_path / "asleep")
            assert list((folder / "bags").glob("*.h5"))
            raise KeyboardInterrupt  # Ctrl-C, or a bad recipe, while the parent imports
    assert not Path(f"/proc/{ahead.pid}").exists()  # ended and reaped
    assert not Path(p.out).exists()  # its half-written cohort and the output folder it made are gone


def test_no_child_where_nothing_is_gained(tmp_path, machine, monkeypatch):
    p = Pipeline(out=str(tmp_path / "out"), cohort=CohortStep(simulate=TINY))
    cache.simulate_cached(tmp_path / "elsewhere", TINY, machine)
    for case in (p, dataclasses.replace(p, cohort=CohortStep(path=str(tmp_path / "elsewhere")))):
        with cohort_ahead(case, "t") as ahead:  # a cache hit (a copy), a cohort given by path
            assert ahead is None
    (machine / cache.cache_key(TINY) / cache.MANIFEST).unlink()
    cohort_path(TINY, Path(p.out)).mkdir(parents=True)
    with cohort_ahead(p, "t") as ahead:  # a cohort folder there already (resumed in place)
        assert ahead is None
    monkeypatch.undo()  # this process has imported JAX (conftest): nothing left to overlap
    with cohort_ahead(dataclasses.replace(p, out=str(tmp_path / "other")), "t") as ahead:
        assert ahead is None


def test_the_child_does_not_outlive_a_killed_parent(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", "import time; from mmfm.cli.forked import Forked; "
                               "print(Forked('sleeping', time.sleep, 60).pid, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(100):
        stat = Path(f"/proc/{child}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


def test_a_fresh_mmfm_process_can_fork_before_its_heavy_imports():
    """What `mmfm demo` / `mmfm run` import before `cohort_ahead` forks (their modules, the cache probe): none of
    the libraries the child is meant to overlap, nor the simulator, which the child imports itself."""
    code = ("import sys; from mmfm.cli import load_command; load_command('demo'); load_command('run'); "
            "from mmfm.cli.pipeline import imports_ahead; from mmfm.simulate.cache import cached; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'sklearn', 'matplotlib', "
            "'scanpy', 'torch', 'anndata'}), 'mmfm.simulate.writer' in sys.modules, imports_ahead())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}).stdout
    assert out.split() == ["[]", "False", str(len(os.sched_getaffinity(0)) > 1)]
