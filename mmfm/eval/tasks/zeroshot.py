"""`zeroshot`: classification without labels, through a run's text tower — class descriptions against slide (or
case) embeddings, as CONCH / TITAN do.

Prompt ensembles: every class has one or more names, every name goes into every template, each prompt is encoded
and L2-normalised, the class embedding is their mean, renormalised. A case's score for a class is the cosine
similarity of its (late-fused, normalised) embedding with the class embedding; the prediction is the best-scoring
class. Nothing is fitted, so every labelled case is a test case: one fold, bootstrap 95% CIs over cases — the
cases a `classification` task on the same label tests across its folds (with a split file: its test folds).

Metrics per embedding:
  auroc        binary: AUROC of s_1 − s_0; multiclass: macro one-vs-rest AUROC of s_c − mean_c' s_c' (free of a
               softmax temperature, which would change a multiclass ranking but never a binary one)
  bacc         balanced accuracy of argmax_c s_c (mean recall over the classes present)
  chance_bacc  1 / number of classes: what guessing scores, drawn beside bacc in the task's plot
  recall[c]    recall of each class

TASKS.yaml entry (label values are matched as spelled: `true` = True = 'True'; `3` = 3.0 = '3'):

    - name: necrosis (zero-shot)
      type: zeroshot
      label: report_necrosis
      classes: {true: ["tumour necrosis is present"], false: ["no tumour necrosis is identified"]}
      templates: ["{}.", "Microscopic description: {}."]
      embeddings: [slide, report]

The prompts are encoded by the run that made the embeddings (`uns['run_dir']` and `uns['step']`, written by
`mmfm embed`) unless the task names `run` / `step`. For notebooks: `zero_shot(run, embeddings, classes)` and
`mmfm.eval.text_tower.encode_text(run, texts)`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from mmfm.eval import folds as folds_mod
from mmfm.eval.probes.classification import binary_auroc
from mmfm.eval.tasks.base import (Collector, FoldSpec, Target, TaskError, case_features, fold_sides, label_target,
                                  result_key)
from mmfm.metrics import l2_normalize

DEFAULT_TEMPLATES = ("{}.", "An H&E image of {}.", "Histopathology showing {}.")


def canonical(value: Any) -> str:
    """One spelling per label value, so YAML keys (true, 3) match obs cells (True, 'True', 3.0, '3')."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower()
    if isinstance(value, (int, float, np.integer, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


@dataclass(frozen=True, kw_only=True)
class ZeroshotSpec(FoldSpec):
    label: str  # obs column holding each case's true class
    classes: dict[str, list[str] | str]  # label value → class names / descriptions (one prompt ensemble)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # each holds one '{}' where a class name goes
    embeddings: tuple[str, ...] = ("slide",)  # obsm keys in the run's shared space (slide, report, ...)
    run: str | None = None  # run whose text tower encodes the prompts; default: the embeddings' uns['run_dir']
    step: Literal["latest", "best"] | int | None = None  # that run's checkpoint; default: uns['step'] (else latest)

    def __post_init__(self):
        classes = {}
        for value, names in self.classes.items():
            names = (names,) if isinstance(names, str) else tuple(names)
            if not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise ValueError(f"'classes' entry {value!r} needs at least one non-empty class name")
            classes[canonical(value)] = names
        if len(classes) != len(self.classes):
            raise ValueError(f"'classes' has label values that mean the same ({list(self.classes)})")
        if len(classes) < 2:
            raise ValueError(f"'classes' must map at least 2 label values to class names, got {list(self.classes)}")
        object.__setattr__(self, "classes", classes)
        bad = [t for t in self.templates if t.count("{}") != 1]
        if not self.templates or bad:
            raise ValueError(f"'templates' entries need exactly one '{{}}' (bad: {bad or 'none given'})")
        if self.baseline:
            raise ValueError("'baseline': a zero-shot task fits nothing; put the covariate baseline in a "
                             "classification task on the same label")

    def targets(self, adata, notes):
        """The labelled cases, their label spelled as a key of `classes` (a value it does not name is an error)."""
        ((cases, labels),) = label_target(adata, self).values()
        labels = labels.map(canonical)
        unknown = sorted(set(labels) - set(self.classes))
        if unknown:
            raise TaskError(f"task {self.name!r}: column {self.label!r} holds {unknown}, which key 'classes' does "
                            f"not name (classes: {list(self.classes)})")
        return {"": (cases, labels)}

    def new_folds(self, cases, strata, sites, where, notes):
        return folds_mod.all_test(cases)  # nothing is fitted: every labelled case is a test case


# ---------------------------------------------------------------- prompts → class embeddings


def prompts(classes: Mapping[Any, Sequence[str] | str], templates: Sequence[str]) -> dict[Any, list[str]]:
    """Every class name in every template: {class: [prompt, ...]}."""
    return {c: [t.format(n) for n in ([names] if isinstance(names, str) else names) for t in templates]
            for c, names in classes.items()}


def class_embeddings(encode, classes: Mapping[Any, Sequence[str] | str], templates: Sequence[str]) -> np.ndarray:
    """[C, E]: per class, the renormalised mean of its normalised prompt embeddings (`encode(texts) -> [n, E]`)."""
    per_class = prompts(classes, templates)
    emb = l2_normalize(np.asarray(encode([p for ps in per_class.values() for p in ps]), np.float64))
    bounds = np.cumsum([0] + [len(ps) for ps in per_class.values()])
    return l2_normalize(np.stack([emb[a:b].mean(0) for a, b in itertools.pairwise(bounds)]))


def zero_shot(run, embeddings: np.ndarray, classes: Mapping[Any, Sequence[str] | str],
              templates: Sequence[str] = DEFAULT_TEMPLATES, step: int | str | None = None) -> pd.DataFrame:
    """[n, C] cosine scores of `embeddings` (rows; NaN rows stay NaN) with the class prompt ensembles of a run
    (a run directory or a `TextTower`); columns = the class keys, the prediction is the row's argmax."""
    from mmfm.eval.text_tower import load_tower

    cls = class_embeddings(load_tower(run, step), classes, templates)
    return pd.DataFrame(l2_normalize(np.asarray(embeddings, np.float64)) @ cls.T, columns=list(classes))


# ---------------------------------------------------------------- metrics and the task


def metrics(y: np.ndarray, scores: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """AUROC, balanced accuracy (and its chance level) and per-class recall of cosine `scores` [n, C] for labels
    `y` in 0..C-1; a value undefined on these cases (a class absent) is NaN."""
    y, scores = np.asarray(y), np.asarray(scores, np.float64)
    n_classes = scores.shape[1]
    centred = scores - scores.mean(1, keepdims=True)  # two classes: column 1 is (s_1 − s_0) / 2
    per = [binary_auroc(y == c, centred[:, c]) if 0 < (y == c).sum() < len(y) else float("nan")
           for c in range(n_classes)]
    auroc = per[1] if n_classes == 2 else float(np.mean(per))
    pred = scores.argmax(1)
    recall = [float((pred[y == c] == c).mean()) if (y == c).any() else float("nan") for c in range(n_classes)]
    present = [r for r in recall if np.isfinite(r)]
    return {"auroc": auroc, "bacc": float(np.mean(present)), "chance_bacc": 1.0 / n_classes,
            **{f"recall[{n}]": r for n, r in zip(names, recall)}}


def text_tower(adata, spec: ZeroshotSpec):
    """The text tower of the task's run: `run` / `step`, else the run and step the embeddings were made with."""
    from mmfm.eval.text_tower import load_tower

    run = spec.run or adata.uns.get("run_dir")
    if not run:
        raise TaskError(f"task {spec.name!r}: no run to encode the prompts with: set key 'run' (the embeddings "
                        "carry no uns['run_dir'])")
    step = spec.step if spec.run or spec.step is not None else adata.uns.get("step")
    try:
        return load_tower(Path(run), step)
    except (ValueError, OSError) as e:
        raise TaskError(f"task {spec.name!r}: key 'run' {str(run)!r}: {e}") from e


def run(adata, spec: ZeroshotSpec, targets: list[Target], col: Collector) -> None:
    """Encode the prompt ensembles with the run's text tower, then score every embedding."""
    score(adata, spec, targets, col, class_embeddings(text_tower(adata, spec), spec.classes, spec.templates))


def score(adata, spec: ZeroshotSpec, targets: list[Target], col: Collector, class_emb: np.ndarray) -> None:
    """Metric rows per embedding × test fold (bootstrap CIs on a single fold), given class embeddings [C, E]."""
    (t,) = targets
    names = list(spec.classes)
    y_all = t.labels.map({c: i for i, c in enumerate(names)})
    single = t.folds.shape[1] == 1
    for emb in spec.embeddings:
        feats = case_features(adata, spec, emb)
        if feats.shape[1] != class_emb.shape[1]:
            raise TaskError(f"task {spec.name!r}: embedding {emb!r} is {feats.shape[1]}-d but the text tower gives "
                            f"{class_emb.shape[1]}-d vectors (only embeddings in the run's shared space compare)")
        cases = feats.index.intersection(y_all.index)
        key = result_key(spec, emb, target=spec.label, model="zero-shot")
        for i, fc in enumerate(t.folds.columns):
            _, te = fold_sides(t.folds, fc, cases)
            if not len(te):
                col.notes.append(f"{spec.name} {emb} {fc}: no labelled test case has this embedding")
                continue
            s = l2_normalize(feats.loc[te].to_numpy()) @ class_emb.T
            y = y_all[te].to_numpy()
            col.evaluate(key, i, len(te), lambda idx, y=y, s=s: metrics(y[idx], s[idx], names), single, spec.seed)
            col.add(key, i, {"n_test": len(te)})
