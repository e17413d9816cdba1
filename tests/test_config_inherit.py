"""Recipes and task files inherit (`base:`): the merge rules on files written here, and the shipped files use them."""

from pathlib import Path

import pytest
import yaml

from mmfm.config import ConfigError, read_yaml
from mmfm.eval.tasks import TaskError, load_tasks
from mmfm.train.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_chain_deep_merges_mappings_and_replaces_lists(tmp_path):
    write(tmp_path / "root.yaml", "a: {x: 1, y: [1, 2], z: {p: 1, q: 2}}\nb: root\nkeep: 7\n")
    write(tmp_path / "mid" / "mid.yaml", "base: ../root.yaml\na: {y: [3], z: {q: 20}}\nb: mid\n")  # relative to itself
    top = write(tmp_path / "mid" / "top.yaml", "base: mid.yaml\na: {x: 10}\nnew: true\n")
    assert read_yaml(top) == {"a": {"x": 10, "y": [3], "z": {"p": 1, "q": 20}}, "b": "mid", "keep": 7, "new": True}
    assert read_yaml(tmp_path / "root.yaml")["a"]["y"] == [1, 2]  # the base itself is unchanged


def test_a_cycle_and_a_missing_base_name_the_files(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\nx: 1\n")
    write(tmp_path / "b.yaml", "base: a.yaml\ny: 2\n")
    with pytest.raises(ConfigError, match=r"cycle .*a\.yaml → .*b\.yaml → .*a\.yaml"):
        read_yaml(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base: no such file .*nowhere\.yaml"):
        read_yaml(tmp_path / "c.yaml")
    write(tmp_path / "d.yaml", "base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: base: expected the name of a YAML file"):
        read_yaml(tmp_path / "d.yaml")


def test_task_files_inherit_by_task_name(tmp_path):
    write(tmp_path / "root.yaml", "- {name: s, type: classification, label: subtype, embeddings: [slide], folds: 3}\n"
                                  "- {name: r, type: retrieval, pairs: [[slide, rna]]}\n")
    top = write(tmp_path / "top.yaml", "base: root.yaml\ntasks:\n- {name: s, embeddings: [slide, rna]}\n"
                                       "- {name: g, type: classification, label: grade}\n")
    tasks = load_tasks(top)
    assert [t.name for t in tasks] == ["s", "r", "g"]
    assert list(tasks[0].embeddings) == ["slide", "rna"] and tasks[0].folds == 3 and tasks[0].label == "subtype"
    write(tmp_path / "loop.yaml", "base: loop.yaml\ntasks: []\n")
    with pytest.raises(TaskError, match="cycle"):
        load_tasks(tmp_path / "loop.yaml")


def test_every_shipped_recipe_inherits_and_resolves():
    recipes = sorted(p for p in CONFIGS.glob("*.yaml") if p.stem != "base")
    assert len(recipes) >= 9
    for p in recipes:
        assert "base" in yaml.safe_load(p.read_text()), f"{p.name} names no base"
    demo, report = load_config(CONFIGS / "demo.yaml"), load_config(CONFIGS / "demo_report.yaml")
    assert report.data.modalities[-1] == "report" and report.model.report.trainable == "frozen"
    assert (report.train, report.model.slide, report.data.val_fraction) == (demo.train, demo.model.slide, 0.15)
    assert demo.objective.impl == "gather" and demo.train.log_every == 10  # from base.yaml; demo's own value
    tangle, brca = load_config(CONFIGS / "tangle_like.yaml"), load_config(CONFIGS / "tcga_brca_rna.yaml")
    assert tangle.model.slide.abmil.n_pre_layers == 2 and tangle.model.slide.abmil.hidden == 512 == \
        brca.model.slide.abmil.hidden and tangle.model.rna.act == "relu" and brca.objective.infonce_tau == 0.01
    tasks = {t.name: t for t in load_tasks(CONFIGS / "tasks" / "demo_report.yaml")}
    base_tasks = load_tasks(CONFIGS / "tasks" / "demo.yaml")
    assert [t.name for t in base_tasks] == list(tasks)[:len(base_tasks)]
    assert "report" in tasks["subtype"].embeddings and tasks["subtype"].folds == 5
