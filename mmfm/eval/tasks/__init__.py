"""Probe task types: one module per type, a typed spec each, and the registry `TASKS` that `mmfm probe` dispatches on.

A task in TASKS.yaml is a mapping whose `type` picks the registry entry; its other keys are the fields of that
entry's spec dataclass, decoded by `mmfm.config.decode` (draccus): unknown keys, missing required keys, wrong
types and cross-field problems are a `TaskError` naming the file, the task (index and name) and the key.

    type            module            spec                 needs
    classification  classification    ClassificationSpec   label
    mutation        classification    MutationSpec         labels (glob patterns allowed)
    fewshot         classification    FewshotSpec          label (numeric C)
    survival        survival          SurvivalSpec         time, event
    retrieval       retrieval         RetrievalSpec        pairs and/or label
    robustness      robustness        RobustnessSpec       label, site
    zeroshot        zeroshot          ZeroshotSpec         label, classes (a run's text tower encodes them)
    mil             mil               MilSpec              label | labels | time + event; tile bags of the cohort
    regression      regression        RegressionSpec       source (rna | protein | obs), names or hvg
    spots           spots             SpotsSpec            spot tables of the cohort (slides.csv `spots`)

Adding a task type is one new module and one line in `TASKS` — as zeroshot was (abridged):

    # mmfm/eval/tasks/zeroshot.py
    @dataclass(frozen=True, kw_only=True)
    class ZeroshotSpec(FoldSpec):              # FoldSpec: folds (split file or generated); TaskSpec: no folds
        label: str                              # a field without default is a required key
        templates: tuple[str, ...] = ("{}.",)   # the `# comment` is the key's help

        def __post_init__(self):                # cross-field checks: raise ValueError("... 'key' ...")
            ...

        def targets(self, adata, notes):        # cases to use and what stratifies their folds
            return label_target(adata, self)    # (default: every case, unstratified)

        def new_folds(self, cases, strata, sites, where, notes):  # fits nothing: all cases are test cases
            return folds.all_test(cases)                           # unless a split file is given

    def run(adata, spec: ZeroshotSpec, targets: list[Target], col: Collector) -> None:
        for t in targets:                       # Target(name, labels, folds: case × fold_i train/test)
            ...                                 # col.evaluate(result_key(spec, emb, t.name), fold, n, score, ...)

    # here, in TASKS:
    "zeroshot": TaskType(zeroshot.ZeroshotSpec, zeroshot.run),

Results get the summary table, bootstrap CIs and a per-task plot with no further wiring; list the type's headline
metric in `mmfm.eval.report.PRIMARY` (otherwise its first metric is plotted).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path


from mmfm.config import ConfigError, decode, inherit, merge
from mmfm.eval.tasks import classification, mil, regression, retrieval, robustness, spots, survival, zeroshot
from mmfm.eval.tasks.base import TaskError, TaskSpec, TaskType

TASKS: dict[str, TaskType] = {
    "classification": TaskType(classification.ClassificationSpec, classification.run),
    "mutation": TaskType(classification.MutationSpec, classification.run),
    "fewshot": TaskType(classification.FewshotSpec, classification.run),
    "survival": TaskType(survival.SurvivalSpec, survival.run),
    "retrieval": TaskType(retrieval.RetrievalSpec, retrieval.run),
    "robustness": TaskType(robustness.RobustnessSpec, robustness.run),
    "zeroshot": TaskType(zeroshot.ZeroshotSpec, zeroshot.run),
    "mil": TaskType(mil.MilSpec, mil.run, mil.units, mil.early),
    "regression": TaskType(regression.RegressionSpec, regression.run),
    "spots": TaskType(spots.SpotsSpec, spots.run),
}


def decode_task(raw, where: str) -> TaskSpec:
    """One TASKS.yaml entry → the spec of its type. `where` names the file and index for messages."""
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: a task must be a mapping, got {type(raw).__name__}")
    where = f"{where} ({raw['name']})" if "name" in raw else where
    if "type" not in raw:
        raise TaskError(f"{where}: missing required key 'type' (one of {', '.join(TASKS)})")
    if raw["type"] not in TASKS:
        raise TaskError(f"{where}: type {raw['type']!r} is not one of {', '.join(TASKS)}")
    cls = TASKS[raw["type"]].spec
    allowed = [f.name for f in fields(cls)]
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise TaskError(f"{where}: unknown key {', '.join(map(repr, unknown))} for type {raw['type']!r}; "
                        f"allowed keys: {', '.join(sorted(allowed))}")
    try:
        return decode(cls, raw, where)  # a single value where a list is expected is a one-item list
    except ConfigError as e:
        raise TaskError(str(e)) from e


def load_tasks(source: str | Path | list) -> list[TaskSpec]:
    """Tasks from a YAML file (a list, or a mapping with key `tasks`) or from a list of dicts / specs.

    A file that is a mapping may name `base: OTHER.yaml` (relative to it): it gets the base's tasks, a task of the
    same name deep-merged with its own entry (so it states only what differs), new names appended in order."""
    where = "tasks"
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            source = inherit(source, _merge_tasks)
        except ConfigError as e:
            raise TaskError(f"cannot read tasks: {e}") from e
        if isinstance(source, dict):
            if "tasks" not in source:
                raise TaskError(f"{where}: expected a list of tasks or a mapping with key 'tasks'")
            source = source["tasks"]
    if not isinstance(source, list) or not source:
        raise TaskError(f"{where}: no tasks defined")
    specs = [s if isinstance(s, TaskSpec) else decode_task(s, f"{where}: tasks[{i}]") for i, s in enumerate(source)]
    dupes = sorted({s.name for s in specs if [t.name for t in specs].count(s.name) > 1})
    if dupes:
        raise TaskError(f"{where}: duplicate task names {dupes}")
    return specs


def _merge_tasks(base: list | dict, top: dict) -> dict:
    """A task file over its base: tasks merge by name (see `load_tasks`), other keys as in `mmfm.config.merge`."""
    tasks = list(base.get("tasks") or []) if isinstance(base, dict) else list(base)
    names = [t.get("name") if isinstance(t, dict) else None for t in tasks]
    for t in top.get("tasks") or []:
        name = t.get("name") if isinstance(t, dict) else None
        if name is not None and name in names:
            tasks[names.index(name)] = merge(tasks[names.index(name)], t)
        else:
            tasks.append(t)
    return {**(merge(base, top) if isinstance(base, dict) else top), "tasks": tasks}
