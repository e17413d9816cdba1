"""The probe task registry: TASKS.yaml entries decode into typed specs (old files still load, errors name the file,
task and key), and a new task type is one module + one registry entry, run by the unchanged driver."""

from dataclasses import dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from mmfm.eval.probe import TaskError, load_tasks, probe
from mmfm.eval.tasks import TASKS
from mmfm.eval.tasks.mil import MilSpec
from mmfm.eval.tasks.base import (Collector, FoldSpec, Target, TaskType, case_features, fold_sides, label_target,
                                  result_key)
from mmfm.eval.tasks.classification import ClassificationSpec, FewshotSpec, MutationSpec
from mmfm.eval.tasks.regression import RegressionSpec
from mmfm.eval.tasks.retrieval import RetrievalSpec
from mmfm.eval.tasks.robustness import RobustnessSpec
from mmfm.eval.tasks.survival import SurvivalSpec

REPO = Path(__file__).resolve().parents[1]


def _adata(n=60, seed=0) -> ad.AnnData:
    """Two classes, separable in `emb`; one row per case."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, 4)) + 2.5 * y[:, None]
    obs = pd.DataFrame({"cls": np.where(y == 1, "pos", "neg"), "mut_A": (np.arange(n) == 0).astype(int)},
                       index=[f"case{i:03d}" for i in range(n)])
    a = ad.AnnData(np.zeros((n, 1), np.float32), obs=obs)
    a.obsm["emb"] = x
    return a


def test_demo_task_file_loads_into_typed_specs():
    specs = {s.name: s for s in load_tasks(REPO / "configs" / "tasks" / "demo.yaml")}
    assert [type(s) for s in specs.values()] == [SurvivalSpec, ClassificationSpec, MilSpec, MutationSpec,
                                                 RegressionSpec, RetrievalSpec, RobustnessSpec]
    expr = specs["expression"]
    assert (expr.source, expr.hvg, expr.names, expr.baseline) == ("rna", 50, (), ("grade",))
    mil = specs["subtype MIL"]
    assert mil.beside == "subtype" and mil.inits == ("abmil", "finetune") and mil.train.batch_size == 8
    assert specs["overall survival"].models == ("coxnet",) and specs["overall survival"].baseline == ("grade",)
    assert specs["driver mutations"].labels == ("mut_*",) and specs["driver mutations"].min_positives == 5
    ret = specs["cross-modal retrieval"]
    assert ret.pairs == (("slide", "rna"), ("rna", "slide"), ("slide", "protein"))
    assert ret.embeddings == ("slide", "rna", "protein")  # default: the keys of the pairs
    assert specs["site robustness"].ks == (5, 10, 20)


def test_quick_task_file_is_the_demo_rows_with_3_folds_and_one_mil_bag_length():
    """configs/tasks/demo_quick.yaml (the quickstart notebook's small run, the README test's probe) states only its
    sizes: every other key is demo.yaml's."""
    tasks = REPO / "configs" / "tasks"
    quick, full = load_tasks(tasks / "demo_quick.yaml"), load_tasks(tasks / "demo.yaml")

    def sized(s, folds, min_bucket, per_call):
        s = replace(s, folds=folds) if isinstance(s, FoldSpec) and not isinstance(s, RetrievalSpec) else s  # fitted
        return replace(s, train=replace(s.train, min_bucket=min_bucket, max_tiles_per_call=per_call)) \
            if isinstance(s, MilSpec) else s

    mil = next(s.train for s in full if isinstance(s, MilSpec))
    assert [sized(s, 3, 128, 2048) for s in full] == quick
    assert [sized(s, 5, mil.min_bucket, mil.max_tiles_per_call) for s in quick] == full


def test_single_values_where_lists_are_expected_and_defaults():
    s, = load_tasks([{"name": "t", "type": "survival", "time": "t", "event": "e", "embeddings": "slide",
                      "models": "coxph", "alphas": 0.1}])
    assert (s.embeddings, s.models, s.alphas, s.alpha_select) == (("slide",), ("coxph",), (0.1,), "inner_cv")
    c, = load_tasks([{"name": "c", "type": "classification", "label": "y", "C": [1, 2]}])
    assert c.C == (1.0, 2.0) and c.embeddings == ("X",) and c.folds == 5
    r, = load_tasks([{"name": "r", "type": "retrieval", "label": "y"}])
    assert r.embeddings == ("X",) and r.metric == "l2"


@pytest.mark.parametrize("task, message", [
    ({"name": "s", "type": "survival", "time": "t", "event": "e", "shots": [1]},
     r"tasks\[0\] \(s\): unknown key 'shots' for type 'survival'; allowed keys: .*alpha_select"),
    ({"name": "f", "type": "fewshot", "label": "y", "C": "auto"},
     r"tasks\[0\] \(f\): few-shot needs a fixed numeric 'C'"),
    ({"name": "f", "type": "fewshot", "label": "y", "C": [0.1, 1.0]}, "few-shot needs a fixed numeric 'C'"),
    ({"name": "r", "type": "retrieval", "embeddings": ["a"]}, "needs 'pairs' .* and/or 'label'"),
    ({"name": "r", "type": "retrieval", "pairs": [["a", "b", "c"]]}, "pairs.0: Expected 2 items, got 3"),
    ({"name": "s", "type": "survival", "time": "t", "event": "e", "alpha_select": "best"},
     "alpha_select: .*'best'.* inner_cv, each"),
    ({"name": "s", "type": "survival", "time": "t", "event": "e", "models": ["cox"]}, "models.0: .*'cox'"),
    ({"name": "r", "type": "retrieval", "label": "y", "metric": "dot"}, "metric: .*'dot'"),
    ({"name": "x", "type": "robustness", "label": "y"}, r"required field\(s\) site"),
    ({"name": "x", "label": "y"}, "missing required key 'type'"),
])
def test_spec_errors_name_file_task_and_key(tmp_path, task, message):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump([task]))
    with pytest.raises(TaskError, match=message) as e:
        load_tasks(tmp_path / "t.yaml")
    assert str(e.value).startswith(f"{tmp_path / 't.yaml'}: tasks[0]")


def test_fewshot_spec_accepts_numeric_C():
    s, = load_tasks([{"name": "f", "type": "fewshot", "label": "y", "C": 2}])
    assert isinstance(s, FewshotSpec) and s.C == 2.0


@dataclass(frozen=True, kw_only=True)
class CentroidSpec(FoldSpec):
    """A toy task type defined outside the package, as a new module would: nearest class centroid."""

    label: str  # obs column of the class

    def targets(self, adata, notes):
        return label_target(adata, self)


def run_centroid(adata, spec: CentroidSpec, targets: list[Target], col: Collector) -> None:
    (t,) = targets
    for emb in spec.probe_embeddings():
        feats = case_features(adata, spec, emb)
        for i, fc in enumerate(t.folds.columns):
            tr, te = fold_sides(t.folds, fc, feats.index)
            y = t.labels
            cents = {c: feats.loc[tr][(y[tr] == c).to_numpy()].mean() for c in sorted(y[tr].unique())}
            pred = [min(cents, key=lambda c: ((feats.loc[case] - cents[c]) ** 2).sum()) for case in te]
            col.add(result_key(spec, emb), i, {"accuracy": np.mean(np.asarray(pred) == y[te].to_numpy())})


def test_new_task_type_is_one_registry_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "centroid", TaskType(CentroidSpec, run_centroid))
    a = _adata()
    r = probe(a, [{"name": "nc", "type": "centroid", "label": "cls", "embeddings": ["emb"], "folds": 3}], tmp_path)
    folds = pd.read_csv(tmp_path / "folds" / "nc.tsv", sep="\t", index_col="case_id").reindex(a.obs_names)
    assert folds.shape == (60, 3) and ((folds == "test").sum(axis=1) == 1).all()  # patient-level, every case once
    x, y = a.obsm["emb"], a.obs.cls.to_numpy()
    ref = []
    for fc in folds.columns:  # NumPy reference on the folds the driver wrote
        tr, te = (folds[fc] == "train").to_numpy(), (folds[fc] == "test").to_numpy()
        cents = np.stack([x[tr & (y == c)].mean(0) for c in ("neg", "pos")])
        pred = np.array(["neg", "pos"])[((x[te][:, None] - cents[None]) ** 2).sum(-1).argmin(1)]
        ref.append((pred == y[te]).mean())
    got = r.results[r.results.metric == "accuracy"].sort_values("fold").value.to_numpy()
    np.testing.assert_allclose(got, ref)
    assert min(ref) > 0.8  # the signal is real, so the comparison is not between two chance values
    assert "## nc (centroid, 3 fold(s))" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "nc.png").stat().st_size > 1000  # plotted with no entry in report.PRIMARY


def test_mutation_task_with_every_gene_skipped_tests_no_case(tmp_path):
    """A gene below min_positives has no folds, so nothing is scored and nothing can leak."""
    a = _adata()
    a.uns["pretrain_cases"] = list(a.obs_names)
    with pytest.warns(UserWarning, match="PRETRAINING OVERLAP"):
        r = probe(a, [{"name": "m", "type": "mutation", "labels": ["mut_*"], "embeddings": ["emb"]},
                      {"name": "rob", "type": "robustness", "label": "cls", "site": "cls", "embeddings": ["emb"]}],
                  tmp_path, plots=False, allow_overlap=True)
    assert "m/mut_A: skipped (1 mutant / 59 wild-type cases, min_positives=2)" in r.notes
    assert list(r.overlap) == ["rob"]  # robustness scores every row; the skipped mutation task scores none


def test_tasks_run_two_at_a_time_write_what_one_at_a_time_writes(tmp_path, monkeypatch):
    """`workers=2` runs tasks in threads, each into its own Collector merged in plan order: results, bootstrap
    draws and notes are those of the sequential run, row for row (a slow first task finishes last)."""
    import threading
    import time

    def slow_centroid(adata, spec, targets, col):
        if threading.current_thread() is not threading.main_thread() and spec.name == "first":
            time.sleep(0.5)  # the second task is done long before: merging must not follow completion order
        run_centroid(adata, spec, targets, col)

    monkeypatch.setitem(TASKS, "centroid", TaskType(CentroidSpec, slow_centroid))
    a = _adata()
    tasks = [{"name": "first", "type": "centroid", "label": "cls", "embeddings": ["emb"], "folds": 3},
             {"name": "cls", "type": "classification", "label": "cls", "embeddings": ["emb"], "folds": 3},
             {"name": "m", "type": "mutation", "labels": ["mut_*"], "embeddings": ["emb"]},
             {"name": "rob", "type": "robustness", "label": "cls", "site": "cls", "embeddings": ["emb"]}]
    one = probe(a, tasks, tmp_path / "one", plots=False, n_bootstrap=5)
    two = probe(a, tasks, tmp_path / "two", plots=False, n_bootstrap=5, workers=2)
    drop = ["wall_s", "fit_s"]  # timings
    same = lambda r: r.results[~r.results.metric.isin(drop)].reset_index(drop=True)
    pd.testing.assert_frame_equal(same(one), same(two))
    assert list(one.results.task.drop_duplicates()) == ["first", "cls", "rob"]  # plan order (m: skipped, no rows)
    assert one.notes == two.notes and any("mut_A" in n for n in two.notes)
    boot = (tmp_path / "one" / "bootstrap.csv").read_text()
    assert boot == (tmp_path / "two" / "bootstrap.csv").read_text() and "rob" in boot
