"""Tests run with 8 forced CPU devices so sharding is real; set before jax is imported.

The run compiles through one persistent compilation cache of its own (fresh per `pytest` run, shared by the xdist
workers and every `mmfm` subprocess, removed at the end): tests stay independent of the user's ~/.cache and of
earlier runs, yet a function compiled by one test is loaded, not recompiled, by the next. Export
MMFM_COMPILATION_CACHE=DIR to keep a cache across runs instead (e.g. `.jax_cache/`, ignored by git)."""

import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
if "MMFM_COMPILATION_CACHE" not in os.environ:  # the controller (or a plain run) sets it; xdist workers inherit it
    os.environ["MMFM_COMPILATION_CACHE"] = _RUN_CACHE = tempfile.mkdtemp(prefix="mmfm-pytest-jax-")
else:
    _RUN_CACHE = None
# Keep only compiles of ≥ 0.1 s in the run's cache (mmfm's default keeps every one): many tests run models eagerly,
# thousands of one-op compiles, and JAX's cache lists its whole folder on every write to enforce its size bound —
# with every one-op compile kept the suite took 1,057 s instead of ~640 s (idle, two workers sharing the cache).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
from mmfm.cli import jit_cache  # noqa: E402

jit_cache.configure()

import jax  # noqa: E402

from mmfm.cli import settle_collector  # noqa: E402

settle_collector()  # the collector as the `mmfm` process sets it: JAX's tracing garbage dies young, no full collections

# Tiny shapes, a few steps per compiled function: XLA's optimisation passes cost more than they save, and XLA:CPU's
# classic emitters compile these small programs in half the time of its fusion emitters (a recipe's train step 12.9
# → 6.5 CPU s), the same math. Both go to this process and, through the environment, to every `mmfm` subprocess,
# launcher task and notebook kernel a test starts: what those tests check (curves equal across processes or
# through a resume, a kill, a requeue; a pipeline's outputs) holds at either setting, and both sides of a
# comparison run alike. A test of the optimised path says so (`xla_optimized` below).
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns both off for a comparison.
NO_OPT = os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1").lower() not in ("0", "false")
jax.config.update("jax_disable_most_optimizations", NO_OPT)
CHEAP_XLA = " --xla_cpu_use_fusion_emitters=false" if NO_OPT else ""
if CHEAP_XLA not in os.environ["XLA_FLAGS"]:  # xdist workers inherit the controller's
    os.environ["XLA_FLAGS"] += CHEAP_XLA


def host_devices(n: int) -> str:
    """XLA_FLAGS for a subprocess with `n` CPU devices, compiling as this process does."""
    return f"--xla_force_host_platform_device_count={n}{CHEAP_XLA}"


from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import submitit  # noqa: E402, F401  (its logging handlers bind to the session's streams, never to a test's
#                   capsys buffer, closed after that test: `mmfm launch --help` under capsys imports it otherwise)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WSI_DIR = SHARED / "data" / "wsi"


TINY_RUN = ["loader.batch_size=16", "loader.tiles_per_slide=32", "loader.n_genes=64", "train.log_every=1",
            "train.progress=false", "data.heldout_fraction=0.25", "train.eval_every=0", "train.warmup=2",
            "model.embed_dim=32", "model.slide.abmil.hidden=32", "model.slide.abmil.attn_dim=16",
            "model.rna.hidden=32", "model.protein.hidden=32", "train.shard_min_size=256"]  # any recipe → seconds


def pretrain_process(out, sets, *flags, cache, devices=8, faults: str = "") -> subprocess.Popen:
    """`mmfm pretrain` of the demo recipe with `--set` overrides in a subprocess, sharing a persistent compilation
    cache `cache` across runs of the same shapes; `faults`: its $MMFM_FAULTS (`mmfm.faults`: a signal or kill at a
    chosen step or write, never a race with the run)."""
    env = dict(os.environ, XLA_FLAGS=host_devices(devices), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jit_cache_dir(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", MMFM_FAULTS=faults)
    cmd = [sys.executable, "-m", "mmfm.cli", "pretrain", "--config", str(REPO / "configs/demo.yaml"),
           "--out", str(out), *[a for s in sets for a in ("--set", s)], *flags]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def jit_cache_dir(default) -> str:
    """The compilation cache for `mmfm` subprocesses: `default`, unless JAX_COMPILATION_CACHE_DIR is set (a warm
    cache kept across runs: scripts/flake_check.sh)."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(default)


def tiny_sets(cohort, *extra) -> list[str]:
    """`--set` overrides: TINY_RUN on `cohort`, then `extra`."""
    return [f"data.cohort={cohort}", *TINY_RUN, *extra]


def run_losses(run_dir) -> dict[int, float]:
    """step → logged loss of a run directory's metrics.jsonl."""
    from mmfm.train.monitor import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")}


def tiny_cohort(tmp_path_factory) -> Path:
    """48 simulated cases with small shapes (default missing rates), the cohort of TINY_RUN runs."""
    return simulate_tiny(tmp_path_factory.mktemp("tiny") / "cohort")


def simulate_tiny(out: Path) -> Path:
    from mmfm.simulate import SimConfig, simulate_cohort

    simulate_cohort(out, SimConfig(n_cases=48, n_sites=3, feature_dim=32, n_genes=64, n_proteins=16,
                                   bag_size_median=64, bag_size_max=256))
    return out


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(dir)` once per pytest run, shared by the xdist workers: the first worker builds under the run's common
    temporary folder while holding a file lock, the others wait and reuse it. Tests must not write into it — copy it
    first (`writable_copy`)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, above each worker's popen-gwK/
    out = root / f"shared-{name}"
    with FileLock(f"{out}.lock"):
        if not (out / ".built").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            build(out)
            (out / ".built").touch()
    return out


def writable_copy(src: Path, dst: Path) -> Path:
    """A private copy of a shared fixture's folder, for a test that writes into it."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".built"))
    return dst


@pytest.fixture(scope="session")
def report_run(tmp_path_factory) -> tuple[Path, Path]:
    """(cohort dir, run dir) of one tiny trained run with report text (tests/_report_run.py), built once per run."""
    from _report_run import tiny_report_run

    base = built_once(tmp_path_factory, "report_run", tiny_report_run)
    return base / "cohort", base / "run"


REFERENCE_STEPS = 8


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """(cohort, run dir, its output) of one uninterrupted `mmfm pretrain` subprocess: TINY_RUN on a tiny cohort,
    REFERENCE_STEPS steps, a checkpoint every 2 (kept). The curve the SIGTERM and SIGKILL resume tests must
    reproduce — built once per pytest run for both (a run's curve does not depend on its checkpoint cadence).
    Read-only: a test that writes copies it first."""

    def build(out):
        cohort = simulate_tiny(out / "cohort")
        proc = pretrain_process(out / "run", tiny_sets(cohort, f"train.steps={REFERENCE_STEPS}", "train.ckpt_every=2",
                                                       "train.keep_last=10"), cache=out / "jit_cache")
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log
        (out / "run.log").write_text(log)

    base = built_once(tmp_path_factory, "reference_run", build)
    return base / "cohort", base / "run", (base / "run.log").read_text()


# `make test` hands whole files to the xdist workers (`--dist loadfile`) in collection order (`--no-loadscope-reorder`;
# xdist's own order, most tests first, put the one-test notebook and wheel files last): the slowest files first, so
# the run ends on short ones and the two workers finish together. Slowest first as measured (`--durations`, s per
# file: 96 s for test_mil.py to 14 s for the last, main 6890c7b); files not listed follow in name order. A stale list
# costs only balance. Files sharing a `built_once` fixture stay apart in it: no worker waits on the other one's build.
SLOW_FIRST = ("test_mil.py", "test_train_recipes.py", "test_notebooks.py", "test_demo_report.py", "test_train_loop.py",
              "test_export.py", "test_zeroshot.py", "test_launch.py", "test_heatmap.py", "test_notebook_zero_shot.py",
              "test_embed.py", "test_report_cache.py", "test_simulate.py", "test_new_user.py", "test_wheel.py",
              "test_slide_encoders.py", "test_kill_anywhere.py", "test_objective_sharded.py",
              "test_multimodal_model.py",
              "test_train_multiprocess.py", "test_preemption.py", "test_simulate_options.py", "test_fault_tolerance.py",
              "test_train_core.py", "test_tile_encoder_refs.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


def pytest_configure(config):
    config.addinivalue_line("markers", "xla_optimized: compiled with XLA's optimisations (a test whose compiled "
                                       "loops run long enough to repay them)")


@pytest.fixture(autouse=True)
def _xla_optimized(request):
    """Turns jax_disable_most_optimizations off for the duration of a test marked `xla_optimized`."""
    if request.node.get_closest_marker("xla_optimized") is None:
        yield
        return
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def pytest_unconfigure(config):
    if _RUN_CACHE is not None:  # only the process that made it (the controller under xdist) removes it
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    if not (WSI_DIR / "CMU-1-Small-Region.svs").exists():
        pytest.fail(f"real slide fixtures missing at {WSI_DIR}")
    return WSI_DIR
