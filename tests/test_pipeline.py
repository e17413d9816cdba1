"""The demo as data: pipeline files decode into typed configs (`base:` inheritance, paths relative to the file, an
unknown key refused naming the file and dotted key) and are checked before anything is written. The runs of a
pipeline are tested in test_demo_report.py (`mmfm run` on an existing cohort, `mmfm demo --quick`) and
test_wheel.py (`mmfm demo --quick` from the installed wheel)."""

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mmfm.cli import main
from mmfm.cli.pipeline import PIPELINES, CohortStep, HeatmapStep, Pipeline, load_pipeline, recipe, similarity_to
from mmfm.config import ConfigError
from mmfm.eval.tasks import load_tasks
from mmfm.simulate import SimConfig

QUICK = str(PIPELINES / "demo_quick.yaml")


def test_shipped_pipelines_decode_typed_and_quick_states_only_its_differences():
    full, quick = load_pipeline(PIPELINES / "demo.yaml"), load_pipeline(QUICK)
    assert isinstance(full, Pipeline) and isinstance(full.cohort.simulate, SimConfig)
    assert (full.cohort.simulate.n_cases, full.heatmaps.slides, full.report.projection) == (500, 2, "umap")
    # quick: its own keys over demo.yaml's, the rest inherited key by key (seed, task file, recipe, queries)
    assert quick.cohort.simulate.n_cases < 500 and quick.cohort.simulate.seed == full.cohort.simulate.seed == 0
    assert (quick.pretrain.recipe, quick.heatmaps.queries) == (full.pretrain.recipe, full.heatmaps.queries)
    # its task file: the full demo's tasks (same rows) with 3 folds, the MIL row's bags padded to one length and
    # encoded 16 (of 128 tiles) per evaluation call
    def same(s):
        s = replace(s, folds=5) if hasattr(s, "folds") else s
        return replace(s, train=replace(s.train, min_bucket=128, max_tiles_per_call=2048)) if s.type == "mil" else s
    assert [same(s) for s in load_tasks(quick.probe.tasks)] == [same(s) for s in load_tasks(full.probe.tasks)]
    assert [s.train.min_bucket for s in load_tasks(quick.probe.tasks) if s.type == "mil"] == [128]
    fitted = [s for s in load_tasks(quick.probe.tasks) if s.type not in ("retrieval", "zeroshot", "robustness")]
    assert {s.folds for s in fitted} == {3}
    assert Path(full.pretrain.recipe) == (PIPELINES.parent / "demo_report.yaml").resolve()  # relative to the file
    run = recipe(quick)
    assert run.train.steps == 20 and run.loader.tiles_per_slide == 32  # quick's overrides
    assert tuple(run.data.modalities) == ("slide", "rna", "protein", "report") and run.model.embed_dim == 64  # the recipe's
    assert quick.fast_compile and not full.fast_compile  # the full demo's table is compiled as ever


@pytest.mark.xla_optimized  # starts from a process compiling with XLA's optimisations, as a user's does
def test_fast_compile_holds_for_the_run_only(monkeypatch):
    """`fast_compile` sets jax_disable_most_optimizations while the steps run (they read it at each compile) and
    puts the setting back afterwards, also when a step fails, so a notebook or test process is left as it was."""
    import jax

    from mmfm.cli import pipeline

    seen = []

    def steps(p, log, child=None):
        seen.append(jax.config.read("jax_disable_most_optimizations"))
        if log == "fail":
            raise RuntimeError("a step failed")
        return {}

    monkeypatch.setattr(pipeline, "_run_steps", steps)
    quick = load_pipeline(QUICK)
    assert not jax.config.read("jax_disable_most_optimizations")
    pipeline.run_pipeline(quick)
    with pytest.raises(RuntimeError, match="a step failed"):
        pipeline.run_pipeline(quick, log="fail")
    pipeline.run_pipeline(replace(quick, fast_compile=False))
    assert seen == [True, True, False] and not jax.config.read("jax_disable_most_optimizations")


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


def test_heatmap_readme_line_names_the_case_modalities_and_the_prompts():
    embedded = {"rna": np.zeros((3, 2)), "report": np.zeros((3, 2))}  # the case embeddings' obsm
    assert similarity_to(HeatmapStep().queries, embedded) == \
           "the case's RNA, its report and the prompt 'Tumour necrosis is present.'"  # the demo's README line
    assert similarity_to(["rna"], embedded) == "the case's RNA"


def test_existing_cohort_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="cohort.path: .*nope is not a directory"):
        load_pipeline(QUICK, [f"cohort.path={tmp_path / 'nope'}"])
    assert CohortStep().simulate is None  # nothing is simulated unless the file says so
