"""The demo as data: pipeline files decode into typed configs (an unknown key names its dotted key), `mmfm run` of
the quick pipeline writes the report `mmfm demo --quick` writes, and runs on an existing cohort without simulating.

One tiny run of configs/pipelines/demo_quick.yaml (shrunk further with --set) is shared by the tests that run."""

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from mmfm.cli import main
from mmfm.cli.pipeline import PIPELINES, CohortStep, Pipeline, load_pipeline, recipe
from mmfm.config import ConfigError
from mmfm.data.simulate import SimConfig

QUICK = str(PIPELINES / "demo_quick.yaml")
TINY = [f"--{k}={v}" for k, v in {  # full pipeline keys: `mmfm run` and `mmfm demo` both accept them
    "cohort.simulate.n_cases": 60, "cohort.simulate.feature_dim": 16, "cohort.simulate.bag_size_median": 32,
    "cohort.simulate.n_genes": 100, "cohort.simulate.n_proteins": 8, "probe.n_bootstrap": 5,
    "pretrain.overrides.train.steps": 2, "pretrain.overrides.train.eval_every": 2,
    "pretrain.overrides.train.ckpt_every": 2, "pretrain.overrides.train.progress": "false",
    "pretrain.overrides.loader.batch_size": 8, "pretrain.overrides.loader.tiles_per_slide": 16,
    "pretrain.overrides.loader.n_genes": 50, "pretrain.overrides.model.embed_dim": 16}.items()]
SAME = ["README.md", "references_seeds.csv", "paired_seeds.csv", "per_seed.csv", "results.csv", "summary.md"]


def test_shipped_pipelines_decode_typed_and_quick_states_only_its_differences():
    full, quick = load_pipeline(PIPELINES / "demo.yaml"), load_pipeline(QUICK)
    assert isinstance(full, Pipeline) and isinstance(full.cohort.simulate, SimConfig)
    assert (full.cohort.simulate.n_cases, full.heatmaps.slides, full.report.projection) == (500, 2, "umap")
    # quick: its own keys over demo.yaml's, the rest inherited key by key (seed, task file, recipe, queries)
    assert quick.cohort.simulate.n_cases < 500 and quick.cohort.simulate.seed == full.cohort.simulate.seed == 0
    assert (quick.probe.tasks, quick.pretrain.recipe, quick.heatmaps.queries) == \
           (full.probe.tasks, full.pretrain.recipe, full.heatmaps.queries)
    assert Path(full.pretrain.recipe) == (PIPELINES.parent / "demo_report.yaml").resolve()  # relative to the file
    run = recipe(quick)
    assert run.train.steps == 20 and run.loader.tiles_per_slide == 32  # quick's overrides
    assert tuple(run.data.modalities) == ("slide", "rna", "protein", "report") and run.model.embed_dim == 64  # the recipe's


def test_unknown_keys_are_refused_naming_the_file_and_dotted_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {os.path.relpath(QUICK, tmp_path)}\nprobe: {{n_bootstrp: 3}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key\(s\) probe\.n_bootstrp"):
        load_pipeline(bad)
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "probe.n_bootstrp" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"pretrain\.overrides: unknown config key\(s\) train\.stepz"):
        load_pipeline(QUICK, ["pretrain.overrides.train.stepz=3"])
    assert main(["demo", "--quick", "--set", "train.stepz=3"]) == 2  # the demo's --set is pretrain.overrides.*
    assert "train.stepz" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"cohort: give cohort\.path"):
        load_pipeline(QUICK, ["cohort.simulate=null"])
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "quick"
    assert main(["run", QUICK, "--out", str(out), *TINY]) == 0
    return out


def _same_report(a: Path, b: Path) -> None:
    for name in SAME:
        x, y = (p.read_text().splitlines() for p in (a / name, b / name))
        assert [s for s in x if not s.startswith("Total time")] == [s for s in y if not s.startswith("Total time")], name


@pytest.mark.slow
def test_run_of_the_quick_pipeline_is_demo_quick(quick, tmp_path):
    shutil.copytree(quick / "report", tmp_path / "report")
    ckpts = sorted((quick / "run" / "checkpoints").rglob("*"))
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    assert main(["demo", "--quick", "--out", str(quick), *TINY]) == 0
    assert [p.stat().st_mtime_ns for p in sorted((quick / "run" / "checkpoints").rglob("*"))] == stamps  # reused
    _same_report(tmp_path / "report", quick / "report")
    readme = (quick / "report" / "README.md").read_text()
    rows = pd.read_csv(quick / "report" / "references_seeds.csv", keep_default_na=False)
    tasks = set(rows.task)  # every task type of the task file is a row, the oracle beside it
    assert {"overall survival", "subtype", "driver mutations", "site robustness", "necrosis (zero-shot)"} <= tasks
    assert "60 simulated cases (seed 0)" in readme and "`oracle` = the same probe" in readme
    heat = sorted((quick / "report" / "heatmaps").rglob("*.png"))  # one slide: attention + RNA, report, prompt
    assert len({p.parent for p in heat}) == 1 and len(heat) == 4
    assert "similarity to the case's RNA, its report and the prompt 'Tumour necrosis is present.'" in readme


@pytest.mark.slow
def test_run_on_an_existing_cohort_does_not_simulate(quick, tmp_path):
    cohort = next(quick.glob("cohort-*"))
    shutil.copytree(quick / "run", tmp_path / "out" / "run")  # same recipe, same cohort: the run is reused
    assert main(["run", QUICK, "--out", str(tmp_path / "out"), "--cohort.path", str(cohort), *TINY,
                 "--report.plots=false"]) == 0
    assert not list((tmp_path / "out").glob("cohort-*"))
    readme = (tmp_path / "out" / "report" / "README.md").read_text()
    assert f"The cohort {cohort}; pretraining on" in readme
    a, b = (pd.read_csv(d / "report" / "references_seeds.csv", keep_default_na=False) for d in (quick, tmp_path / "out"))
    pd.testing.assert_frame_equal(a, b)  # the same cohort and run: the same table as when it was simulated


def test_existing_cohort_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="cohort.path: .*nope is not a directory"):
        load_pipeline(QUICK, [f"cohort.path={tmp_path / 'nope'}"])
    assert CohortStep().simulate is None  # nothing is simulated unless the file says so
