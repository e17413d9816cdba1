"""`mmfm probe`: frozen-embedding probes (classification, mutation, survival, retrieval, few-shot, robustness).

Input is ANY AnnData: features in `X` or `obsm[key]`, labels and outcomes in `obs`, one row per slide or per case
(`group` names the case column; obs_names are the cases when it is absent). Rows of a case are late-fused (mean of
the row embeddings, Patho-Bench's default) for case-level probes; rows whose vector holds NaN count as "modality
absent". Folds come from a Patho-Bench split file or are generated patient-level by `mmfm.data.splits.make_folds`.
Outputs: `results.csv` (one metric value per row), `bootstrap.csv` (single-fold tasks), `summary.md`, PNG plots,
`folds/<task>.tsv` (the exact case × fold assignment used).

Leakage guards: a case on both sides of a fold is refused (mmfm.data.splits checks every split it reads or makes);
test cases that were seen in pretraining (`pretrain_cases`, or `uns['pretrain_cases']`) are refused unless
`allow_overlap`, and then flagged in summary.md.

TASKS.yaml (keys = `TaskSpec` fields; unknown keys are an error naming the task and key):

    - {name: os, type: survival, time: os_days, event: os_event, embeddings: [slide, rna], baseline: [grade],
       models: [coxnet, coxph], alphas: [0.01, 0.02, 0.07], horizons: [365, 1095, 1825]}
    - {name: subtype, type: classification, label: subtype, embeddings: [slide], C: 0.5, folds: 5}
    - {name: drivers, type: mutation, labels: ["mut_*"], embeddings: [slide], min_positives: 5}
    - {name: subtype_fewshot, type: fewshot, label: subtype, embeddings: [slide], shots: [1, 4, 16], draws: 10}
    - {name: xmodal, type: retrieval, pairs: [[slide, rna], [rna, slide]], label: subtype, embeddings: [slide]}
    - {name: site_ri, type: robustness, label: subtype, site: site, embeddings: [slide], ks: [5, 10, 20]}
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd
import yaml

from mmfm.eval import classification, fewshot, report, retrieval, robustness, stats, survival
from mmfm.io import atomic_path

log = logging.getLogger(__name__)

TASK_TYPES = ("classification", "mutation", "survival", "retrieval", "fewshot", "robustness")
REQUIRED = {
    "classification": ("label",),
    "fewshot": ("label",),
    "mutation": ("labels",),
    "survival": ("time", "event"),
    "retrieval": (),  # `pairs` and/or `label`, checked below
    "robustness": ("label", "site"),
}


class TaskError(ValueError):
    """A task definition or the data it points at is invalid; the message names the task and key."""


class LeakageError(RuntimeError):
    """Probe test cases were seen in pretraining (refused unless allow_overlap)."""


@dataclass(frozen=True)
class TaskSpec:
    """One probe task. Keys of TASKS.yaml map 1:1 to these fields; unknown keys are an error."""

    name: str
    type: str
    embeddings: tuple[str, ...] = ("X",)  # obsm keys, or "X"
    group: str = "case_id"  # obs column holding the case (patient) id
    label: str | None = None  # classification / fewshot / same-label retrieval / robustness biology
    labels: tuple[str, ...] = ()  # mutation panel: obs columns (0/1, empty = unknown); glob patterns allowed
    time: str | None = None  # survival time column (days)
    event: str | None = None  # survival event column (0/1)
    pairs: tuple[tuple[str, str], ...] = ()  # cross-modal retrieval [query_key, gallery_key]
    site: str | None = None  # robustness center column; also used by site-preserved folds
    subset: str | None = None  # robustness: evaluate per subset and pool (PathoROB paired mode)
    baseline: tuple[str, ...] = ()  # numeric obs columns forming a covariate baseline, reported beside
    C: float | str | tuple[float, ...] = 0.5  # number, 'auto' (45-value sweep) or a list, swept by inner CV
    balanced: bool = True
    standardize: bool = False  # z-score features with each training fold's mean/SD before the fit (recorded)
    models: tuple[str, ...] = survival.MODELS
    alphas: tuple[float, ...] = survival.ALPHAS  # one value = fixed; several = inner-CV choice on train
    alpha_select: str = "inner_cv"  # or "each": one result row per α, as Patho-Bench reports its grid
    l1_ratio: float = 0.5
    tau: float | None = None  # Uno's C truncation (days); default 80th percentile of training time
    horizons: tuple[float, ...] = ()  # time-dependent AUC horizons (days), e.g. [365, 1095, 1825]
    ks: tuple[int, ...] = retrieval.KS
    metric: str = "l2"  # same-label retrieval distance ('l2' Patho-Bench default, or 'cosine')
    shots: tuple[int, ...] = fewshot.SHOTS
    draws: int = 10
    min_positives: int = 2  # mutation genes with fewer positives (or negatives) are skipped
    folds: int = 5
    test_size: float | None = None  # Monte-Carlo folds with this test fraction instead of k-fold
    site_preserved: bool = False
    seed: int = 0
    splits: str | None = None  # Patho-Bench split file for this task (overrides --splits)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "TaskSpec":
        if not isinstance(d, dict):
            raise TaskError(f"{where}: a task must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        where = f"{where} ({d['name']})" if "name" in d else where
        for key in d:
            if key not in names:
                raise TaskError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(sorted(names))}")
        for key in ("name", "type"):
            if key not in d:
                raise TaskError(f"{where}: missing required key {key!r}")
        if d["type"] not in TASK_TYPES:
            raise TaskError(f"{where}: type {d['type']!r} is not one of {TASK_TYPES}")
        scalar = {"bool": (bool,), "int": (int,), "float": (int, float), "float | None": (int, float, type(None))}
        for f in dataclasses.fields(cls):  # plain int/float/bool keys are type-checked (YAML "5" is a string)
            got = d.get(f.name)
            if f.name in d and f.type in scalar and (
                    not isinstance(got, scalar[f.type]) or (f.type != "bool" and isinstance(got, bool))):
                raise TaskError(f"{where}: key {f.name!r} must be {f.type.replace(' | None', ' or null')}, got {got!r}")
        kw = dict(d)
        for key in ("embeddings", "labels", "baseline", "models", "alphas", "ks", "shots", "horizons"):
            if key in kw:
                kw[key] = tuple(kw[key]) if isinstance(kw[key], (list, tuple)) else (kw[key],)
        if isinstance(kw.get("C"), list):
            kw["C"] = tuple(float(c) for c in kw["C"])
        if "pairs" in kw:
            pairs = kw["pairs"]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise TaskError(f"{where}: 'pairs' must be a list of [query_key, gallery_key] pairs")
            kw["pairs"] = tuple(tuple(p) for p in pairs)
            kw.setdefault("embeddings", tuple(dict.fromkeys(k for p in kw["pairs"] for k in p)))
        spec = cls(**kw)
        for key in REQUIRED[spec.type]:
            if not getattr(spec, key):
                raise TaskError(f"{where}: type {spec.type!r} needs key {key!r}")
        if spec.type == "retrieval" and not (spec.pairs or spec.label):
            raise TaskError(f"{where}: type 'retrieval' needs 'pairs' (cross-modal) and/or 'label' (same-label)")
        bad_models = set(spec.models) - set(survival.MODELS)
        if bad_models:
            raise TaskError(f"{where}: 'models' has {sorted(bad_models)}; allowed: {survival.MODELS}")
        if spec.alpha_select not in ("inner_cv", "each"):
            raise TaskError(f"{where}: 'alpha_select' must be 'inner_cv' or 'each', got {spec.alpha_select!r}")
        if spec.metric not in ("l2", "cosine"):
            raise TaskError(f"{where}: 'metric' must be 'l2' or 'cosine', got {spec.metric!r}")
        if isinstance(spec.C, str) and spec.C != "auto":
            raise TaskError(f"{where}: 'C' must be a number, a list, or 'auto', got {spec.C!r}")
        if spec.type == "fewshot" and (isinstance(spec.C, (str, tuple)) or isinstance(spec.C, bool)):
            raise TaskError(f"{where}: few-shot needs a fixed numeric 'C' (no inner CV with 1 case per class)")
        return spec


def load_tasks(source: str | Path | list) -> list[TaskSpec]:
    """Tasks from a YAML file (a list, or a mapping with key `tasks`) or from a list of dicts."""
    where = "tasks"
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            source = yaml.safe_load(Path(source).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise TaskError(f"{where}: cannot read tasks: {e}") from e
        if isinstance(source, dict):
            if "tasks" not in source:
                raise TaskError(f"{where}: expected a list of tasks or a mapping with key 'tasks'")
            source = source["tasks"]
    if not isinstance(source, list) or not source:
        raise TaskError(f"{where}: no tasks defined")
    specs = [s if isinstance(s, TaskSpec) else TaskSpec.from_dict(s, f"{where}: tasks[{i}]")
             for i, s in enumerate(source)]
    dupes = sorted({s.name for s in specs if [t.name for t in specs].count(s.name) > 1})
    if dupes:
        raise TaskError(f"{where}: duplicate task names {dupes}")
    return specs


# ---------------------------------------------------------------- data access


def _column(adata: ad.AnnData, spec: TaskSpec, key: str, col: str) -> pd.Series:
    if col not in adata.obs:
        raise TaskError(f"task {spec.name!r}: key {key!r} names obs column {col!r}, which is not in the AnnData "
                        f"(columns: {', '.join(map(str, adata.obs.columns))})")
    return adata.obs[col]


def row_groups(adata: ad.AnnData, spec: TaskSpec) -> np.ndarray:
    """Case id of every row: obs[group], or obs_names when group is the default and absent."""
    if spec.group in adata.obs:
        return adata.obs[spec.group].astype(str).to_numpy()
    if spec.group == "case_id":
        return adata.obs_names.astype(str).to_numpy()
    return _column(adata, spec, "group", spec.group).to_numpy()  # raises naming the key


def row_features(adata: ad.AnnData, spec: TaskSpec, key: str) -> np.ndarray:
    """[n_obs, D] float64 features from obsm[key] or X (or the `baseline` covariates); NaN rows = absent."""
    if key.startswith("baseline:"):
        cols = [_column(adata, spec, "baseline", c) for c in spec.baseline]
        try:
            return np.stack([pd.to_numeric(c).to_numpy(float) for c in cols], axis=1)
        except (TypeError, ValueError) as e:
            raise TaskError(f"task {spec.name!r}: key 'baseline' columns must be numeric: {e}") from e
    if key == "X":
        x = adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X
    elif key in adata.obsm:
        x = adata.obsm[key]
        x = x.to_numpy() if isinstance(x, pd.DataFrame) else x
    else:
        raise TaskError(f"task {spec.name!r}: key 'embeddings' names {key!r}, which is neither 'X' nor an obsm key "
                        f"(obsm: {', '.join(adata.obsm.keys()) or 'none'})")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise TaskError(f"task {spec.name!r}: embedding {key!r} must be 2-D [n_obs, D], got shape {x.shape}")
    return x


def case_features(adata: ad.AnnData, spec: TaskSpec, key: str) -> pd.DataFrame:
    """Late fusion: mean of the valid (NaN-free) rows of each case; cases without a valid row are absent."""
    x = row_features(adata, spec, key)
    ok = np.isfinite(x).all(1)
    return pd.DataFrame(x[ok]).groupby(row_groups(adata, spec)[ok], sort=True).mean()


def case_values(adata: ad.AnnData, spec: TaskSpec, key: str, col: str) -> pd.Series:
    """One value per case from an obs column; rows of a case must agree (missing rows are ignored)."""
    s = _column(adata, spec, key, col)
    df = pd.DataFrame({"case": row_groups(adata, spec), "v": s.to_numpy()}).dropna()
    n = df.groupby("case")["v"].nunique()
    if (n > 1).any():
        case = n.index[n > 1][0]
        raise TaskError(f"task {spec.name!r}: column {col!r} (key {key!r}) has conflicting values "
                        f"{sorted(map(str, df.loc[df.case == case, 'v'].unique()))} for case {case!r}")
    return df.groupby("case")["v"].first()


# ---------------------------------------------------------------- folds and leakage


def case_folds(split: pd.DataFrame) -> pd.DataFrame:
    """Patho-Bench split table (one row per slide, already leakage-checked by mmfm.data.splits) → one row per
    case × fold_i ('train' / 'test'; 'val' rows are not used by the probes)."""
    from mmfm.data.splits import fold_columns

    return split.assign(case_id=split["case_id"].astype(str)).groupby("case_id")[fold_columns(split)].first()


def read_split_file(path: str | Path) -> pd.DataFrame:
    """Case × fold table from a Patho-Bench split file (read_splits refuses a file that leaks a case)."""
    from mmfm.data import splits

    return case_folds(splits.read_splits(path))


def generate_folds(spec: TaskSpec, cases: pd.Index, strata: pd.Series | None, sites: pd.Series | None) -> pd.DataFrame:
    """Patient-level folds for the task's cases (stratified by `strata`, site-preserved when asked)."""
    from mmfm.data import splits

    table = pd.DataFrame(index=pd.Index(cases, name="case_id"))
    label = None
    if strata is not None:
        table["_stratum"] = strata.reindex(table.index).astype(str).to_numpy()
        label = "_stratum"
    if sites is not None:
        table["site"] = sites.reindex(table.index).astype(str).to_numpy()
    elif spec.site_preserved:
        raise TaskError(f"task {spec.name!r}: 'site_preserved' needs key 'site'")
    df = splits.make_folds(table, label=label, k=spec.folds, seed=spec.seed, site_preserved=spec.site_preserved,
                           test_size=spec.test_size)
    return case_folds(df)


def pretrain_overlap(test_cases: set[str], pretrain: set[str]) -> list[str]:
    return sorted(test_cases & pretrain)


def read_pretrain_cases(path: str | Path) -> set[str]:
    """Case ids, one per line, or a CSV/TSV with a `case_id` column."""
    path = Path(path)
    text = path.read_text().splitlines()
    if text and ("case_id" in text[0].split(",") or "case_id" in text[0].split("\t")):
        sep = "\t" if "\t" in text[0] else ","
        return set(pd.read_csv(path, sep=sep, dtype=str)["case_id"].dropna())
    return {line.strip() for line in text if line.strip() and not line.startswith("#")}


# ---------------------------------------------------------------- evaluation


@dataclass
class Collector:
    """Accumulates metric rows, bootstrap draws, pooled survival predictions and notes."""

    n_bootstrap: int = 100
    rows: list[dict] = field(default_factory=list)
    boot: list[dict] = field(default_factory=list)
    survival_preds: dict = field(default_factory=dict)
    robustness_curves: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: dict, fold, values: dict):
        self.rows += [{**key, "metric": m, "fold": str(fold), "value": float(v)} for m, v in values.items()]

    def evaluate(self, key: dict, fold, n_test: int, score: Callable[[np.ndarray], dict], single_fold: bool,
                 seed: int):
        """Score the whole test fold (`score(idx)` metrics of test rows idx, called here and never kept);
        for a single-fold task also bootstrap the test rows."""
        self.add(key, fold, score(np.arange(n_test)))
        if single_fold and self.n_bootstrap:
            for m, vals in stats.bootstrap(score, n_test, n_boot=self.n_bootstrap, seed=seed).items():
                self.boot += [{**key, "metric": m, "boot": b, "value": v} for b, v in enumerate(vals)]


def _key(spec: TaskSpec, embedding: str, target: str = "", model: str = "", shots: int | None = None) -> dict:
    return {"task": spec.name, "type": spec.type, "target": target, "embedding": embedding, "model": model,
            "shots": "" if shots is None else int(shots)}


def _embeddings(spec: TaskSpec) -> list[str]:
    return list(spec.embeddings) + ([f"baseline:{'+'.join(spec.baseline)}"] if spec.baseline else [])


def _fold_sides(folds: pd.DataFrame, col: str, cases: pd.Index) -> tuple[pd.Index, pd.Index]:
    f = folds[col].reindex(cases)
    return cases[(f == "train").to_numpy()], cases[(f == "test").to_numpy()]


def _encode(labels: pd.Series) -> tuple[pd.Series, list]:
    classes = sorted(labels.unique(), key=lambda v: (str(type(v)), v))
    return labels.map({c: i for i, c in enumerate(classes)}).astype(int), classes


def run_classification(adata, spec, folds, col: Collector, target: str, labels: pd.Series):
    """Linear probe (or few-shot draws) per embedding × fold on case-level (late-fused) features; returns classes."""
    y_all, classes = _encode(labels)
    single = folds.shape[1] == 1
    for emb in _embeddings(spec):
        feats = case_features(adata, spec, emb)
        cases = feats.index.intersection(y_all.index)
        for i, fc in enumerate(folds.columns):
            tr, te = _fold_sides(folds, fc, cases)
            ytr, yte = y_all[tr].to_numpy(), y_all[te].to_numpy()
            if len(np.unique(ytr)) < 2 or len(te) == 0:
                col.notes.append(f"{spec.name}/{target} {emb} {fc}: skipped (one class in train or "
                                 f"empty test)")
                continue
            key = _key(spec, emb, target)
            if spec.type == "fewshot":
                for rec in fewshot.run(feats.loc[tr].to_numpy(), ytr, feats.loc[te].to_numpy(), yte, len(classes),
                                       shots=spec.shots, draws=spec.draws, seed=spec.seed + i, C=spec.C,
                                       balanced=spec.balanced, standardize=spec.standardize):
                    k = rec.pop("shots")
                    col.add({**_key(spec, emb, target, shots=k), "draw": rec.pop("draw")}, i, rec)
                continue
            proba, C = classification.fit_predict(feats.loc[tr].to_numpy(), ytr, feats.loc[te].to_numpy(),
                                                  len(classes), C=spec.C, balanced=spec.balanced, seed=spec.seed,
                                                  standardize=spec.standardize)
            col.evaluate(key, i, len(te), lambda idx: classification.metrics(yte[idx], proba[idx]), single,
                         spec.seed)
            col.add(key, i, {"C": C, "n_test": len(te), "n_train": len(tr), "n_classes": len(classes),
                             "standardized": float(spec.standardize)})
    return classes


def run_survival(adata, spec, folds, col: Collector):
    """Cox probes per embedding × model × fold; pooled test risks (split at each fold's median training risk)
    feed the Kaplan–Meier plot and log-rank p."""
    time = pd.to_numeric(case_values(adata, spec, "time", spec.time), errors="coerce")
    event = pd.to_numeric(case_values(adata, spec, "event", spec.event), errors="coerce")
    df = pd.concat({"time": time, "event": event}, axis=1).dropna()
    if (df.time < 0).any():
        raise TaskError(f"task {spec.name!r}: key 'time' column {spec.time!r} is negative for case "
                        f"{df.index[(df.time < 0).to_numpy()][0]!r}")
    if not df.event.isin([0, 1]).all():
        bad = df[~df.event.isin([0, 1])]
        raise TaskError(f"task {spec.name!r}: key 'event' column {spec.event!r} must be 0/1; case "
                        f"{bad.index[0]!r} has {bad.event.iloc[0]}")
    y_all = survival.surv(df.event.to_numpy(), df.time.to_numpy())
    pos = pd.Series(np.arange(len(df)), index=df.index)
    single = folds.shape[1] == 1
    for emb in _embeddings(spec):
        feats = case_features(adata, spec, emb)
        cases = feats.index.intersection(df.index)
        runs = ([(m, spec.alphas) for m in spec.models] if spec.alpha_select == "inner_cv" else
                [(m, (a,)) for m in spec.models for a in spec.alphas])
        for kind, alphas in runs:
            model = kind if spec.alpha_select == "inner_cv" else f"{kind} alpha={alphas[0]:g}"
            pooled = []
            for i, fc in enumerate(folds.columns):
                tr, te = _fold_sides(folds, fc, cases)
                ytr, yte = y_all[pos[tr].to_numpy()], y_all[pos[te].to_numpy()]
                key = _key(spec, emb, model=model)
                if ytr["event"].sum() < 2 or len(te) == 0:
                    col.notes.append(f"{spec.name} {emb} {model} {fc}: skipped (<2 training events or empty test)")
                    continue
                try:
                    risk, risk_tr, alpha = survival.fit_risk(kind, feats.loc[tr].to_numpy(), ytr,
                                                             feats.loc[te].to_numpy(), alphas=alphas,
                                                             l1_ratio=spec.l1_ratio, seed=spec.seed,
                                                             standardize=spec.standardize)
                except (ArithmeticError, ValueError) as e:
                    col.notes.append(f"{spec.name} {emb} {model} {fc}: fit failed ({e}); recorded as N/A")
                    col.add(key, i, {m: np.nan for m in survival.METRICS})
                    continue
                col.evaluate(key, i, len(te), lambda idx: survival.metrics(
                    ytr, yte[idx], risk[idx], tau=spec.tau, horizons=spec.horizons), single, spec.seed)
                col.add(key, i, {"alpha": alpha, "n_test": len(te), "n_train": len(tr),
                                 "standardized": float(spec.standardize)})
                pooled.append(pd.DataFrame({"case_id": te, "fold": i, "time": yte["time"], "event": yte["event"],
                                            "risk": risk, "high_risk": risk > np.median(risk_tr)}))
            if pooled:
                p = pd.concat(pooled, ignore_index=True)
                col.survival_preds[(spec.name, emb, model)] = p
                col.add(_key(spec, emb, model=model), "pooled",
                        {"logrank_p": survival.logrank_p(survival.surv(p.event, p.time), p.high_risk.to_numpy())})


def run_retrieval(adata, spec, folds, col: Collector):
    """Cross-modal retrieval among each test fold's rows (gallery = the fold's other-modality rows), and
    same-label retrieval with the training fold as database."""
    single = folds.shape[1] == 1
    groups = row_groups(adata, spec)
    for q_key, k_key in spec.pairs:
        q, k = row_features(adata, spec, q_key), row_features(adata, spec, k_key)
        q_ok, k_ok = np.isfinite(q).all(1), np.isfinite(k).all(1)
        for i, fc in enumerate(folds.columns):
            test = set(folds.index[(folds[fc] == "test").to_numpy()])
            in_test = np.isin(groups, list(test))
            qi, ki = np.flatnonzero(q_ok & in_test), np.flatnonzero(k_ok & in_test)
            key = _key(spec, f"{q_key}->{k_key}")
            if not len(qi) or not len(ki):
                col.notes.append(f"{spec.name} {q_key}->{k_key} {fc}: no test rows with both modalities")
                continue
            col.evaluate(key, i, len(qi), lambda idx: retrieval.cross_modal(
                q[qi[idx]], groups[qi[idx]], k[ki], groups[ki], ks=spec.ks, metric="cosine"), single, spec.seed)
    if spec.label:
        labels = case_values(adata, spec, "label", spec.label)
        for emb in _embeddings(spec):
            feats = case_features(adata, spec, emb)
            cases = feats.index.intersection(labels.index)
            for i, fc in enumerate(folds.columns):
                tr, te = _fold_sides(folds, fc, cases)
                if not len(tr) or not len(te):
                    continue
                xtr, ltr = feats.loc[tr].to_numpy(), labels[tr].to_numpy()
                xte, lte = feats.loc[te].to_numpy(), labels[te].to_numpy()
                col.evaluate(_key(spec, emb, target=spec.label), i, len(te), lambda idx: retrieval.same_label(
                    xtr, ltr, xte[idx], lte[idx], ks=spec.ks, metric=spec.metric), single, spec.seed)


def run_robustness(adata, spec, col: Collector, plot_dir: Path | None, projection: str):
    """Robustness index over all rows (no training involved), with a site/biology projection plot."""
    bio, site = _column(adata, spec, "label", spec.label), _column(adata, spec, "site", spec.site)
    known = (bio.notna() & site.notna()).to_numpy()
    bio, site = bio.astype(str).to_numpy(), site.astype(str).to_numpy()
    subset = _column(adata, spec, "subset", spec.subset).to_numpy() if spec.subset else None
    groups = row_groups(adata, spec)
    for emb in spec.embeddings:
        x = row_features(adata, spec, emb)
        ok = np.isfinite(x).all(1) & known
        if len(np.unique(groups[ok])) < 2:
            raise TaskError(f"task {spec.name!r}: fewer than 2 cases have embedding {emb!r}, 'label' and 'site'")
        sub = None if subset is None else subset[ok]
        qc = robustness.query_counts(x[ok], bio[ok], site[ok], groups[ok], max(spec.ks), subset=sub)
        ks = np.asarray(spec.ks) - 1
        refs = {"": qc, **{f"{p}_": robustness.expected_query_counts(bio[ok], site[ok], groups[ok], max(spec.ks),
                                                                      subset=sub, mode=m)
                           for p, m in robustness.REFERENCES.items()}}

        def score(idx):  # the embedding's RI and, on the same query rows, the chance and site-only references
            return robustness.scores(refs, spec.ks, idx)

        # query rows are the bootstrap unit (PathoROB bootstraps queries), so RI gets a CI like single-fold probes
        col.evaluate(_key(spec, emb, target=spec.label), "all", int(ok.sum()), score, True, spec.seed)
        col.add(_key(spec, emb, target=spec.label), "all", {"n_test": int(ok.sum())})
        col.robustness_curves[(spec.name, emb)] = robustness.indices(
            pd.DataFrame(qc.sum(0)[ks], columns=list(robustness.KINDS), index=pd.Index(spec.ks, name="k")))
        if plot_dir is not None:
            report.plot_embedding(x[ok], bio[ok], site[ok], plot_dir / f"{report.slug(spec.name, emb)}_projection.png",
                                  title=f"{spec.name}: {emb}", method=projection, seed=spec.seed)


# ---------------------------------------------------------------- driver


@dataclass
class ProbeResult:
    results: pd.DataFrame
    summary: pd.DataFrame
    out: Path
    notes: list[str]
    overlap: dict[str, list[str]]


def _targets(adata, spec, notes: list[str]) -> dict[str, tuple[pd.Index, pd.Series | None]]:
    """Per target ('' or a mutation gene): the cases it can use and the series its folds are stratified by
    (the label itself for classification/mutation, Patho-Bench's time-quartile × event code for survival)."""
    if spec.type in ("classification", "fewshot") or (spec.type == "retrieval" and spec.label and not spec.pairs):
        lab = case_values(adata, spec, "label", spec.label)
        if lab.nunique() < 2:
            raise TaskError(f"task {spec.name!r}: key 'label' column {spec.label!r} has fewer than 2 classes "
                            f"({lab.unique().tolist()}) among {len(lab)} labelled cases")
        return {"": (lab.index, lab)}
    if spec.type == "mutation":
        out = {}
        for gene in spec.labels:
            lab = pd.to_numeric(case_values(adata, spec, "labels", gene), errors="coerce").dropna()
            if not lab.isin([0, 1]).all():
                raise TaskError(f"task {spec.name!r}: key 'labels' column {gene!r} must be 0/1 (empty = unknown)")
            n_pos, n_neg = int(lab.sum()), int((lab == 0).sum())
            if min(n_pos, n_neg) < spec.min_positives:
                notes.append(f"{spec.name}/{gene}: skipped ({n_pos} mutant / {n_neg} wild-type cases, "
                             f"min_positives={spec.min_positives})")
                continue
            out[gene] = (lab.index, lab.astype(int))
        return out
    if spec.type == "survival":
        from mmfm.data.splits import survival_strata

        df = pd.concat({"t": pd.to_numeric(case_values(adata, spec, "time", spec.time), errors="coerce"),
                        "e": pd.to_numeric(case_values(adata, spec, "event", spec.event), errors="coerce")},
                       axis=1).dropna()
        if df.e.sum() < 2:
            raise TaskError(f"task {spec.name!r}: key 'event' column {spec.event!r} has {int(df.e.sum())} event(s) "
                            f"among {len(df)} cases; a survival probe needs events")
        return {"": (df.index, survival_strata(df, time="t", event="e"))}
    return {"": (pd.Index(np.unique(row_groups(adata, spec))), None)}


def plan_folds(adata, spec: TaskSpec, shared: pd.DataFrame | None) -> tuple[dict, dict, list[str]]:
    """({target: case × fold table}, {target: labels or strata}, notes): the split file's folds restricted to
    the target's cases, or patient-level folds generated per target (each mutation gene stratified on itself)."""
    notes: list[str] = []
    given = read_split_file(spec.splits) if spec.splits else shared
    sites = case_values(adata, spec, "site", spec.site) if spec.site else None
    folds, labels = {}, {}
    for target, (cases, strata) in _targets(adata, spec, notes).items():
        if given is not None:
            f = given
        elif spec.type == "retrieval" and not spec.label:
            # cross-modal retrieval fits nothing: one gallery of every case, bootstrap CI over the queries
            f = pd.DataFrame({"fold_0": "test"}, index=pd.Index(cases, name="case_id"))
        else:
            f = generate_folds(spec, cases, strata, sites)
        missing = cases.difference(f.index)
        if len(missing):
            notes.append(f"{spec.name}{'/' + target if target else ''}: {len(missing)} case(s) with data are not "
                         f"in the folds and are left out (e.g. {', '.join(map(str, missing[:3]))})")
            warnings.warn(notes[-1])
        folds[target], labels[target] = f.loc[f.index.intersection(cases)], strata
    return folds, labels, notes


def _resolve_labels(adata, spec) -> TaskSpec:
    genes = []
    for pat in spec.labels:
        hits = [c for c in map(str, adata.obs.columns) if fnmatch.fnmatchcase(c, pat)]
        if not hits:
            raise TaskError(f"task {spec.name!r}: key 'labels' entry {pat!r} matches no obs column")
        genes += [h for h in hits if h not in genes]
    return dataclasses.replace(spec, labels=tuple(genes))


def probe(embeddings: ad.AnnData | str | Path, tasks, out: str | Path, *, splits: str | Path | None = None,
          allow_overlap: bool = False, pretrain_cases: set[str] | str | Path | None = None, n_bootstrap: int = 100,
          plots: bool = True, projection: str = "umap") -> ProbeResult:
    """Run every task on the embeddings and write results.csv, bootstrap.csv, summary.md and plots to `out`."""
    adata = embeddings if isinstance(embeddings, ad.AnnData) else ad.read_h5ad(embeddings)
    specs = load_tasks(tasks)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(pretrain_cases, (str, Path)):
        pretrain_cases = read_pretrain_cases(pretrain_cases)
    pretrain = set(map(str, pretrain_cases or ())) | set(map(str, adata.uns.get("pretrain_cases", ())))
    shared_split = read_split_file(splits) if splits else None

    plans, overlap = [], {}
    for spec in specs:
        if spec.type == "mutation":
            spec = _resolve_labels(adata, spec)
        for emb in spec.embeddings:
            row_features(adata, spec, emb)  # fail early, naming the key
        if spec.type == "robustness":
            plans.append((spec, {}, {}, []))
            tested = set(row_groups(adata, spec))
        else:
            folds, labels, notes = plan_folds(adata, spec, shared_split)
            plans.append((spec, folds, labels, notes))
            tested = {c for f in folds.values() for c in f.index[(f == "test").any(axis=1).to_numpy()]}
        seen = pretrain_overlap(tested, pretrain)
        if seen:
            overlap[spec.name] = seen
    if overlap:
        msg = "; ".join(f"{t}: {len(c)} test case(s) seen in pretraining (e.g. {', '.join(c[:3])})"
                        for t, c in overlap.items())
        if not allow_overlap:
            raise LeakageError(f"probe test cases overlap the pretraining cases — {msg}. Probe on held-out cases, "
                               "or pass --allow-overlap to run anyway (the overlap is then recorded in summary.md)")
        log.warning("PRETRAINING OVERLAP (allowed): %s", msg)
        warnings.warn(f"PRETRAINING OVERLAP (allowed by --allow-overlap): {msg}")

    for spec, folds, _, _ in plans:  # the exact folds used, for reproducibility and audit
        for target, f in folds.items():
            with atomic_path(out / "folds" / f"{report.slug(spec.name, target)}.tsv", suffix=".tsv") as tmp:
                f.to_csv(tmp, sep="\t", index_label="case_id")

    col = Collector(n_bootstrap=n_bootstrap)
    plot_dir = out if plots else None
    for spec, folds, labels, notes in plans:
        col.notes += notes
        if spec.type == "robustness":
            run_robustness(adata, spec, col, plot_dir, projection)
        elif spec.type in ("classification", "fewshot", "mutation"):
            for target, f in folds.items():
                classes = run_classification(adata, spec, f, col, target or spec.label, labels[target])
                if spec.type != "mutation":
                    col.notes.append(f"{spec.name}: classes {list(map(str, classes))}; {f.shape[1]} fold(s)")
        elif spec.type == "survival":
            run_survival(adata, spec, folds[""], col)
        elif spec.type == "retrieval":
            run_retrieval(adata, spec, folds[""], col)

    results = pd.DataFrame(col.rows, columns=["task", "type", "target", "embedding", "model", "shots", "draw",
                                              "metric", "fold", "value"])
    boot = pd.DataFrame(col.boot, columns=["task", "type", "target", "embedding", "model", "shots", "metric",
                                           "boot", "value"])
    summary = report.summarize(results, boot)
    report.write_outputs(out, results, boot, summary, notes=col.notes, overlap=overlap,
                         survival_preds=col.survival_preds if plots else {},
                         robustness_curves=col.robustness_curves if plots else {}, plots=plots)
    return ProbeResult(results, summary, out, col.notes, overlap)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True, help="AnnData .h5ad: features in X/obsm, labels in obs")
    p.add_argument("--tasks", required=True, help="TASKS.yaml (see mmfm.eval.probe.TaskSpec for the keys)")
    p.add_argument("--splits", help="Patho-Bench split file (case_id, slide_id, fold_i = train/test) for all tasks")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--allow-overlap", action="store_true",
                   help="run even if test cases were seen in pretraining (recorded in summary.md)")
    p.add_argument("--pretrain-cases", help="case ids used in pretraining (one per line, or CSV with case_id)")
    p.add_argument("--n-bootstrap", type=int, default=100, help="bootstrap resamples for single-fold tasks")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--projection", choices=("umap", "pca"), default="umap", help="robustness embedding plot")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = probe(args.embeddings, args.tasks, args.out, splits=args.splits, allow_overlap=args.allow_overlap,
                    pretrain_cases=args.pretrain_cases, n_bootstrap=args.n_bootstrap, plots=not args.no_plots,
                    projection=args.projection)
    except (ValueError, LeakageError, OSError) as e:  # bad task/split/file, leakage: one clear line, no traceback
        log.error("%s", e)
        return 2
    print(f"wrote {res.out / 'results.csv'} and {res.out / 'summary.md'}")
    return 0
