"""The host-free loop's parts: device prefetch, the on-device NaN watch, the stop request, buffered metrics on epath."""

import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfm.train import monitor, paths, preempt, sharding
from mmfm.train.prefetch import DevicePrefetcher


class FakeLoader:
    """Step-addressed like TileBagLoader: batch s holds rows s*100 + r; state = the next step."""

    def __init__(self, rows=8, fail_at=None):
        self.step, self.rows, self.fail_at = 0, rows, fail_at
        self.calls_from = set()

    def __next__(self):
        self.calls_from.add(threading.current_thread().name)
        if self.step == self.fail_at:
            raise OSError(f"bag unreadable at step {self.step}")
        s, self.step = self.step, self.step + 1
        x = (s * 100 + np.arange(self.rows, dtype=np.float32))[:, None] * np.ones((1, 3), np.float32)
        return {"slide/features": x, "slide/tile_mask": np.ones((self.rows, 3), bool),
                "case_index": np.where(np.arange(self.rows) < self.rows - 1, np.arange(self.rows), -1)}

    def get_state(self):
        return {"step": self.step}


@pytest.fixture(scope="module")
def bsh():
    return sharding.batch_sharding(sharding.make_mesh(sharding.MeshConfig()))


@pytest.mark.parametrize("depth", [0, 3])
def test_prefetch_delivers_each_step_on_device_with_its_loader_state(bsh, depth):
    loader = FakeLoader()
    seen = []
    prepare = lambda s, host: dict(host, **{"slide/features": host["slide/features"] * (-1 if s == 2 else 1)})
    with DevicePrefetcher(loader, bsh, depth=depth, start_step=5, prepare=prepare) as feed:
        for _ in range(4):
            item = next(feed)
            x = item.batch["slide/features"]
            assert isinstance(x, jax.Array) and x.sharding == bsh and x.shape == (8, 3)
            seen.append((item.step, float(x[0, 0]), item.loader_state["step"], item.tiles, item.cases))
    # step 6 is the loader's batch 0 (start_step=5), state after it = 1; prepare saw the 1-based step
    assert seen == [(6, 0.0, 1, 24, 7), (7, 100.0, 2, 24, 7), (8, 200.0, 3, 24, 7), (9, 300.0, 4, 24, 7)]
    if depth:
        assert loader.calls_from == {"mmfm-device-prefetch"} and loader.step >= 4  # ran ahead, off the main thread
    else:
        assert loader.calls_from == {threading.current_thread().name} and loader.step == 4


def test_prefetch_raises_the_loaders_error_in_the_consumer_and_closes_when_full(bsh):
    with DevicePrefetcher(FakeLoader(fail_at=2), bsh, depth=2) as feed:
        assert [next(feed).step for _ in range(2)] == [1, 2]
        with pytest.raises(OSError, match="bag unreadable at step 2"):
            next(feed)
    feed = DevicePrefetcher(FakeLoader(), bsh, depth=1)
    next(feed)
    feed.close()  # the thread is blocked on a full queue: close must still return
    assert feed._thread is None


def test_nonfinite_watch_reports_the_first_bad_step_without_syncing_each_step():
    watch = monitor.NonFiniteWatch()
    snaps = []
    for step, loss in enumerate([1.0, 0.5, np.nan, 0.2, np.inf], start=1):
        watch.update({"loss": jnp.float32(loss), "lr": jnp.float32(1e-3), "t": {"slide-rna": jnp.float32(step)},
                      "hist": jnp.zeros(4)}, step)
        snaps.append(watch.snapshot())
    first, values = jax.device_get(snaps[1])
    assert int(first) == 0  # as of step 2 all was well
    first, values = jax.device_get(snaps[4])
    assert int(first) == 3 and np.isnan(values["loss"]) and values["t/slide-rna"] == 3.0  # the first bad step kept
    assert watch.first_bad_step() == 3
    with pytest.raises(monitor.NonFiniteError, match=r"non-finite value at step 3 in loss \(e\.g\. loss=nan\)"):
        watch.check()
    clean = monitor.NonFiniteWatch()
    clean.update({"loss": jnp.float32(1.0)}, 1)
    clean.check()
    assert clean.first_bad_step() is None


def test_stop_request_turns_signals_into_a_step_boundary_and_restores_handlers():
    before = {s: signal.getsignal(s) for s in preempt.STOP_SIGNALS}
    with preempt.StopRequest() as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop(2) and stop.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # more signals change nothing
        assert stop.received == "SIGUSR1"
    assert {s: signal.getsignal(s) for s in preempt.STOP_SIGNALS} == before
    with pytest.raises(KeyboardInterrupt), preempt.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: out at once
        for _ in range(100):
            pass
    assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]
    e = preempt.Preempted(7, "SIGTERM", "/runs/x")
    assert "after step 7" in str(e) and "--resume auto" in str(e) and preempt.EXIT_PREEMPTED == 75


def _mock_gs(root):
    """epath's own test hook: every backend call for gs://bucket/... lands under `root`."""
    from etils.epath import testing

    def local(p):
        p = os.fspath(p)
        return os.path.join(root, p[len("gs://"):]) if p.startswith("gs://") else p

    def wrap(fn, path, *a, **k):
        return fn(local(path), *[local(x) if isinstance(x, (str, os.PathLike)) else x for x in a], **k)

    names = ("exists", "isdir", "listdir", "glob", "makedirs", "mkdir", "open", "remove", "rename", "replace",
             "rmtree", "stat")
    return testing.mock_epath(**{n: wrap for n in names})


def test_run_files_and_metrics_go_through_epath_to_a_gs_url(tmp_path):
    """The run directory's writers and readers with `gs://bucket/run` (epath mocked onto tmp_path): nothing
    assumes a local path (tensorboard and orbax bring their own gs:// support)."""
    from mmfm.data.omics import OmicsTransform
    from mmfm.train import rundir
    from mmfm.train.config import DataConfig

    run = "gs://bucket/run"
    tr = OmicsTransform(genes=["A", "B"], mean=np.array([0.5, 1 / 3]), std=np.array([1.0, 2.0]), normalize=True,
                        target_sum=1e4)
    with _mock_gs(str(tmp_path)):
        out = paths.run_path(run)
        assert str(out) == run and str(out / "checkpoints") == run + "/checkpoints"
        rundir.prepare(out, resume=False)
        rundir.write_splits(out, {"train": ["c1", "c2"], "val": [], "heldout": ["c3"]}, DataConfig())
        rundir.save_transforms(out / "transforms", {"rna": tr, "protein": None})
        w = monitor.MetricsWriter(run, 10, progress=False, flush_every_s=3600, tensorboard=False)
        w.log(1, {"loss": 2.0})
        w.log(2, {"loss": np.float32(1.5)})
        assert not (out / "metrics.jsonl").exists()  # buffered until a flush (every checkpoint, close)
        w.flush()
        assert monitor.read_jsonl(run + "/metrics.jsonl") == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
        assert rundir.read_splits(run)["heldout"] == ["c3"]
        got = rundir.load_transforms(run + "/transforms")["rna"]
        with pytest.raises(rundir.RunDirError, match="run directory is not empty"):
            rundir.prepare(out, resume=False)
        assert not [p for p in (out / "transforms").iterdir() if p.name.endswith(".tmp")]  # no temporaries left
    assert (tmp_path / "bucket/run/metrics.jsonl").exists() and (tmp_path / "bucket/run/transforms/rna").exists()
    assert got.genes == ["A", "B"] and np.array_equal(got.mean, tr.mean) and np.array_equal(got.std, tr.std)
    assert OmicsTransform.load(tmp_path / "bucket/run/transforms/rna").genes == ["A", "B"]  # the save() format
