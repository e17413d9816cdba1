"""Notebook 04 (zero-shot, retrieval, heatmaps) executes top to bottom at small sizes and writes its outputs."""

import os
from pathlib import Path

import h5py
import pandas as pd
import pytest
from test_notebooks import execute

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_zero_shot_and_heatmaps_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))  # this tree
    execute("04_zero_shot_and_heatmaps.ipynb", tmp_path)
    out = tmp_path / "zero_shot"
    res = pd.read_csv(out / "report" / "results.csv")
    assert {"slide->report", "report->slide"} <= set(res.embedding)
    maps = sorted((out / "heatmaps").glob("*.tile_scores.h5"))
    assert len(maps) == 3  # two held-out simulated slides + the real CMU-1-Small-Region
    with h5py.File(out / "heatmaps" / "CMU-1-Small-Region.tile_scores.h5") as f:
        assert {"attention_head0", "similarity_prompt0"} <= set(f["scores"])
    assert (out / "heatmaps" / "CMU-1-Small-Region.attention_head0.overlay.png").exists()
