"""Figures drawn in a process of their own (`mmfm.eval.drawing`): the probe's figures drawn by a Drawer are the
files it draws in its own threads, byte for byte; a figure that fails raises the worker's traceback; the worker
never outlives its Drawer."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from mmfm.eval import report
from mmfm.eval.drawing import Drawer, DrawingError
from mmfm.eval.probe import probe


def _adata(n=60, seed=0) -> ad.AnnData:
    """Two classes separable in `emb`, two sites, survival that follows the class: one row per case."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    obs = pd.DataFrame({"cls": np.where(y == 1, "pos", "neg"), "site": np.where(np.arange(n) % 3 == 0, "A", "B"),
                        "os_days": rng.exponential(1000, n) / (1 + 2 * y), "os_event": (rng.random(n) < 0.7) * 1},
                       index=[f"case{i:03d}" for i in range(n)])
    a = ad.AnnData(np.zeros((n, 1), np.float32), obs=obs)
    a.obsm["emb"] = rng.normal(size=(n, 4)) + 2.5 * y[:, None]
    return a


TASKS = [{"name": "cls", "type": "classification", "label": "cls", "embeddings": ["emb"], "folds": 3},
         {"name": "os", "type": "survival", "time": "os_days", "event": "os_event", "embeddings": ["emb"],
          "models": ["coxnet"], "alphas": [0.1], "folds": 3},
         {"name": "rob", "type": "robustness", "label": "cls", "site": "site", "embeddings": ["emb"], "ks": [3, 5]}]


def test_figures_drawn_apart_are_the_figures_drawn_in_place(tmp_path):
    a = _adata()
    here = probe(a, TASKS, tmp_path / "here", n_bootstrap=5, projection="pca", workers=2)
    with Drawer() as drawer:
        apart = probe(a, TASKS, tmp_path / "apart", n_bootstrap=5, projection="pca", workers=2, drawer=drawer)
        worker = drawer._proc
    assert worker.poll() is not None  # exited with its Drawer
    pngs = sorted(p.name for p in (tmp_path / "here").glob("*.png"))
    assert pngs == sorted(p.name for p in (tmp_path / "apart").glob("*.png"))
    assert {"cls.png", "os.png", "km_os_emb_coxnet.png", "rob_ri.png", "rob_emb_projection.png"} <= set(pngs)
    for name in pngs:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "apart" / name).read_bytes(), name
    drop = ["wall_s", "fit_s"]
    same = lambda r: r.results[~r.results.metric.isin(drop)].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(same(here), same(apart))


def test_a_figure_that_fails_raises_the_workers_traceback_after_the_others_are_drawn(tmp_path):
    good = report.summarize(*_one_task_rows())
    with Drawer() as drawer:
        drawer.submit(report.plot_task, good.drop(columns="type"), tmp_path / "bad.png")  # no 'type' column
        drawer.submit(report.plot_task, good, tmp_path / "good.png")
        with pytest.raises(DrawingError, match=r"(?s)1 figure\(s\) failed.*plot_task.*no attribute .type."):
            drawer.wait()
        assert (tmp_path / "good.png").stat().st_size > 1000 and not (tmp_path / "bad.png").exists()
        drawer.submit(report.plot_task, good, tmp_path / "again.png")  # the worker goes on after an error
        drawer.wait()
    assert (tmp_path / "again.png").exists()


def test_close_draws_what_was_submitted_a_failed_run_does_not_and_a_dead_worker_is_an_error(tmp_path):
    summary = report.summarize(*_one_task_rows())
    with Drawer() as drawer:
        for i in range(3):
            drawer.submit(report.plot_task, summary, tmp_path / f"kept{i}.png")
    assert drawer._proc.poll() is not None and len(list(tmp_path.glob("kept*.png"))) == 3  # drawn, then exited
    with pytest.raises(ValueError, match="the run failed"):
        with Drawer() as drawer:
            for i in range(20):
                drawer.submit(report.plot_task, summary, tmp_path / f"dropped{i}.png")
            raise ValueError("the run failed")
    assert drawer._proc.poll() is not None  # stopped, not left drawing
    assert len(list(tmp_path.glob("dropped*.png"))) < 20
    with Drawer() as drawer:
        drawer._proc.kill()
        drawer.submit(report.plot_task, report.summarize(*_one_task_rows()), tmp_path / "x.png")
        with pytest.raises(DrawingError, match="exited"):
            drawer.wait()


def _one_task_rows() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [{"task": "t", "type": "classification", "target": "", "embedding": e, "model": "", "shots": "",
             "draw": "", "metric": "auroc", "fold": str(f), "value": v}
            for e, base in (("emb", 0.8), ("other", 0.6)) for f, v in enumerate(base + np.array([0.0, 0.02, -0.02]))]
    return pd.DataFrame(rows), pd.DataFrame(columns=["task", "type", "target", "embedding", "model", "shots",
                                                     "metric", "boot", "value"])
