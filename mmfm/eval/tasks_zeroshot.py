"""Zero-shot classification through a run's text tower: class prompts against slide (or case) embeddings.

Prompt ensembles as in CONCH / TITAN: every class has one or more names, every name is put in every template,
each prompt is encoded and L2-normalised, the class embedding is their mean, renormalised. A case's score for a
class is the cosine similarity of its (late-fused, normalised) embedding with the class embedding; the
prediction is the best-scoring class. Nothing is fitted, so every labelled case is a test case.

Metrics (point estimate on all cases, 95% percentile CI over `n_bootstrap` case resamples, seeded):
  auroc     binary: AUROC of s_pos − s_neg; multiclass: macro one-vs-rest AUROC of s_c − mean_c' s_c'
            (temperature-free: the ranking of a softmax of the scores at any temperature is the same for
            two classes, and at high temperature for more)
  bacc      balanced accuracy of argmax_c s_c
  recall[c] recall of each class (bacc is their mean over classes present)

TASKS.yaml entry (keys = `ZeroShotSpec` fields):

    - name: zero-shot necrosis
      type: zeroshot
      label: report_necrosis
      classes: {true: ["tumour necrosis is present"], false: ["no tumour necrosis is identified"]}
      templates: ["{}.", "Microscopic description: {}."]
      embeddings: [slide, report]
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from mmfm.eval import stats

DEFAULT_TEMPLATES = ("{}.", "An H&E image of {}.", "Histopathology showing {}.")


class ZeroShotError(ValueError):
    """A zero-shot task definition, or the data it points at, is invalid; the message names the task and key."""


def canonical(value: Any) -> str:
    """One spelling per label value, so YAML keys (true, 3) match obs cells (True, 'True', 3.0, '3')."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower()
    if isinstance(value, (int, float, np.integer, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


@dataclass(frozen=True)
class ZeroShotSpec:
    """One zero-shot task. Keys of the task file map 1:1 to these fields; unknown keys are an error."""

    name: str
    label: str                                      # obs column holding the true class of each case
    classes: Mapping[str, tuple[str, ...]]          # label value → class names/descriptions (ensembled)
    type: Literal["zeroshot"] = "zeroshot"
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # each holds one '{}' where a class name goes
    embeddings: tuple[str, ...] = ("slide",)        # obsm keys compared with the class embeddings
    group: str = "case_id"                          # obs column of the case id (rows of a case are averaged)
    run: str | None = None                          # run whose text tower encodes the prompts; default uns['run_dir']
    step: int | str | None = None                   # checkpoint step of that run (None latest, 'best')
    n_bootstrap: int = 100
    seed: int = 0

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "task") -> "ZeroShotSpec":
        if not isinstance(d, Mapping):
            raise ZeroShotError(f"{where}: a task must be a mapping, got {type(d).__name__}")
        where = f"{where} ({d['name']})" if "name" in d else where
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ZeroShotError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(sorted(names))}")
        missing = [k for k in ("name", "label", "classes") if k not in d]
        if missing:
            raise ZeroShotError(f"{where}: missing required key(s) {missing}")
        kw = dict(d)
        if kw.get("type", "zeroshot") != "zeroshot":
            raise ZeroShotError(f"{where}: key 'type' must be 'zeroshot', got {kw['type']!r}")
        if not isinstance(kw["classes"], Mapping) or len(kw["classes"]) < 2:
            raise ZeroShotError(f"{where}: key 'classes' must map ≥ 2 label values to class names")
        classes = {}
        for value, desc in kw["classes"].items():
            desc = (desc,) if isinstance(desc, str) else tuple(desc or ())
            if not desc or not all(isinstance(t, str) and t.strip() for t in desc):
                raise ZeroShotError(f"{where}: key 'classes' entry {value!r} needs ≥ 1 non-empty name")
            classes[canonical(value)] = desc
        if len(classes) != len(kw["classes"]):
            raise ZeroShotError(f"{where}: key 'classes' has label values that coincide ({list(kw['classes'])})")
        kw["classes"] = classes
        for key in ("templates", "embeddings"):
            if key in kw:
                kw[key] = (kw[key],) if isinstance(kw[key], str) else tuple(kw[key])
        spec = cls(**kw)
        bad = [t for t in spec.templates if t.count("{}") != 1]
        if not spec.templates or bad:
            raise ZeroShotError(f"{where}: key 'templates' entries need exactly one '{{}}' (bad: {bad})")
        for key in ("n_bootstrap", "seed"):
            if not isinstance(getattr(spec, key), int) or isinstance(getattr(spec, key), bool):
                raise ZeroShotError(f"{where}: key {key!r} must be an integer, got {getattr(spec, key)!r}")
        return spec


def load_specs(source: str | Path | list) -> list[ZeroShotSpec]:
    """The `type: zeroshot` entries of a task file (a list, or a mapping with key `tasks`), or of a list."""
    import yaml

    where = "tasks"
    if isinstance(source, (str, Path)):
        where = str(source)
        source = yaml.safe_load(Path(source).read_text())
        source = source.get("tasks") if isinstance(source, dict) else source
    if not isinstance(source, list):
        raise ZeroShotError(f"{where}: expected a list of tasks")
    return [ZeroShotSpec.from_dict(t, f"{where}: tasks[{i}]") for i, t in enumerate(source)
            if isinstance(t, Mapping) and t.get("type") == "zeroshot"]


# ---------------------------------------------------------------- prompts → class embeddings


def prompts(classes: Mapping[Any, Sequence[str] | str], templates: Sequence[str]) -> dict[Any, list[str]]:
    """Every class name in every template: {class: [prompt, ...]}."""
    return {c: [t.format(n) for n in ([names] if isinstance(names, str) else names) for t in templates]
            for c, names in classes.items()}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(encode, classes: Mapping[Any, Sequence[str] | str], templates: Sequence[str]) -> np.ndarray:
    """[C, E]: per class, the renormalised mean of its normalised prompt embeddings (`encode(texts) -> [n, E]`)."""
    per_class = prompts(classes, templates)
    flat = [p for ps in per_class.values() for p in ps]
    emb = _unit(encode(flat))
    out, i = [], 0
    for ps in per_class.values():
        out.append(emb[i:i + len(ps)].mean(0))
        i += len(ps)
    return _unit(np.stack(out))


def zero_shot(run, embeddings: np.ndarray, classes: Mapping[Any, Sequence[str] | str],
              templates: Sequence[str] = DEFAULT_TEMPLATES, step: int | str | None = None) -> pd.DataFrame:
    """[n, C] cosine scores of `embeddings` (rows; NaN rows stay NaN) with the class prompt ensembles of a run
    (a run directory or a `TextTower`); columns = the class keys, the prediction is the row's argmax."""
    from mmfm.eval.text_tower import load_tower

    tower = load_tower(run, step)
    cls_emb = class_embeddings(tower, classes, templates)
    return pd.DataFrame(_unit(np.asarray(embeddings, np.float64)) @ cls_emb.T, columns=list(classes))


# ---------------------------------------------------------------- metrics


def _auroc_binary(pos: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(pos, score)) if 0 < pos.sum() < len(pos) else float("nan")


def metrics(y: np.ndarray, scores: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """AUROC, balanced accuracy and per-class recall of cosine `scores` [n, C] for labels `y` in 0..C-1."""
    y, scores = np.asarray(y), np.asarray(scores, np.float64)
    n_classes = scores.shape[1]
    if n_classes == 2:
        auroc = _auroc_binary(y == 1, scores[:, 1] - scores[:, 0])
    else:
        centred = scores - scores.mean(1, keepdims=True)
        per = [_auroc_binary(y == c, centred[:, c]) for c in range(n_classes)]
        auroc = float(np.mean(per)) if all(np.isfinite(per)) else float("nan")
    pred = scores.argmax(1)
    recall = {f"recall[{names[c]}]": float((pred[y == c] == c).mean()) if (y == c).any() else float("nan")
              for c in range(n_classes)}
    present = [v for v in recall.values() if np.isfinite(v)]
    return {"auroc": auroc, "bacc": float(np.mean(present)), **recall}


# ---------------------------------------------------------------- the task


def _case_table(adata, spec: ZeroShotSpec, key: str) -> pd.DataFrame:
    """Late fusion: the mean of each case's finite rows of obsm[key] (cases without one are absent)."""
    if key not in adata.obsm:
        raise ZeroShotError(f"task {spec.name!r}: key 'embeddings' names {key!r}, not an obsm key "
                            f"(obsm: {', '.join(adata.obsm.keys()) or 'none'})")
    x = np.asarray(adata.obsm[key], np.float64)
    ok = np.isfinite(x).all(1)
    return pd.DataFrame(x[ok]).groupby(_groups(adata, spec)[ok], sort=True).mean()


def _groups(adata, spec: ZeroShotSpec) -> np.ndarray:
    if spec.group in adata.obs:
        return adata.obs[spec.group].astype(str).to_numpy()
    if spec.group == "case_id":
        return adata.obs_names.astype(str).to_numpy()
    raise ZeroShotError(f"task {spec.name!r}: key 'group' names obs column {spec.group!r}, which is absent")


def case_labels(adata, spec: ZeroShotSpec) -> pd.Series:
    """Class index (0..C-1, in `spec.classes` order) per case; unlabelled cases dropped, unknown values refused."""
    if spec.label not in adata.obs:
        raise ZeroShotError(f"task {spec.name!r}: key 'label' names obs column {spec.label!r}, which is not in the "
                            f"AnnData (columns: {', '.join(map(str, adata.obs.columns))})")
    raw = adata.obs[spec.label]
    df = pd.DataFrame({"case": _groups(adata, spec), "v": raw.to_numpy()})
    df = df[raw.notna().to_numpy() & (raw.astype(str).str.strip() != "").to_numpy()]
    df["v"] = df["v"].map(canonical)
    conflict = df.groupby("case")["v"].nunique()
    if (conflict > 1).any():
        case = conflict.index[conflict > 1][0]
        raise ZeroShotError(f"task {spec.name!r}: column {spec.label!r} has conflicting values for case {case!r}")
    order = list(spec.classes)
    unknown = sorted(set(df["v"]) - set(order))
    if unknown:
        raise ZeroShotError(f"task {spec.name!r}: column {spec.label!r} holds {unknown}, which key 'classes' "
                            f"does not name (classes: {order})")
    return df.groupby("case")["v"].first().map({c: i for i, c in enumerate(order)}).astype(int)


def evaluate(adata, spec: ZeroShotSpec, class_emb: np.ndarray, folds: pd.DataFrame | None = None
             ) -> tuple[list[dict], list[dict]]:
    """(metric rows, bootstrap rows) in `mmfm probe`'s results.csv / bootstrap.csv layout; pure given the class
    embeddings [C, E]. With `folds` (case × fold, 'test' cells), only cases tested in some fold are scored —
    the cases a linear probe on the same folds is scored on."""
    y_all = case_labels(adata, spec)
    if folds is not None:
        y_all = y_all[y_all.index.isin(folds.index[(folds == "test").any(axis=1).to_numpy()])]
    if y_all.nunique() < 2:
        raise ZeroShotError(f"task {spec.name!r}: key 'label' column {spec.label!r} has fewer than 2 classes "
                            f"among {len(y_all)} labelled cases")
    class_emb = np.asarray(class_emb, np.float64)
    if class_emb.shape[0] != len(spec.classes):
        raise ZeroShotError(f"task {spec.name!r}: {class_emb.shape[0]} class embeddings for "
                            f"{len(spec.classes)} classes")
    names = list(spec.classes)
    rows, boot = [], []
    for emb in spec.embeddings:
        feats = _case_table(adata, spec, emb)
        cases = feats.index.intersection(y_all.index)
        if feats.shape[1] != class_emb.shape[1]:
            raise ZeroShotError(f"task {spec.name!r}: embedding {emb!r} is {feats.shape[1]}-d but the text tower "
                                f"gives {class_emb.shape[1]}-d vectors (not in the run's shared space?)")
        key = {"task": spec.name, "type": spec.type, "target": spec.label, "embedding": emb, "model": "zero-shot",
               "shots": ""}
        if not len(cases):
            continue
        scores = _unit(feats.loc[cases].to_numpy()) @ class_emb.T
        y = y_all[cases].to_numpy()

        def score(idx, y=y, scores=scores):
            return metrics(y[idx], scores[idx], names)

        rows += [{**key, "draw": "", "metric": m, "fold": "all", "value": v}
                 for m, v in {**score(np.arange(len(y))), "n_test": float(len(y))}.items()]
        if spec.n_bootstrap:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a resample may miss a class: NaN, dropped
                draws = stats.bootstrap(score, len(y), n_boot=spec.n_bootstrap, seed=spec.seed)
            boot += [{**key, "metric": m, "boot": b, "value": v} for m, vals in draws.items()
                     for b, v in enumerate(vals)]
    return rows, boot


def run(adata, spec: ZeroShotSpec, folds: pd.DataFrame | None = None, encode=None) -> tuple[list[dict], list[dict]]:
    """Encode the task's prompts with its run's text tower (`spec.run`, else `adata.uns['run_dir']`, or an
    `encode(texts)` given) and evaluate."""
    if encode is None:
        from mmfm.eval.text_tower import load_tower

        run_dir = spec.run or adata.uns.get("run_dir")
        if not run_dir:
            raise ZeroShotError(f"task {spec.name!r}: no run to encode prompts with: set key 'run' (the embeddings "
                                "carry none in uns['run_dir'])")
        encode = load_tower(run_dir, spec.step)
    return evaluate(adata, spec, class_embeddings(encode, spec.classes, spec.templates), folds)
