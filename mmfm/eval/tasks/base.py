"""What every probe task shares: the spec base classes, features and labels read from the AnnData, folds per
target, and the collector of result rows.

Rows of a case are late-fused (mean of the row embeddings, Patho-Bench's default) for case-level probes; rows
whose vector holds NaN count as "modality absent".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd

from mmfm.eval import folds as folds_mod
from mmfm.eval import stats
from mmfm.eval.drawing import Drawer


class TaskError(ValueError):
    """A task definition or the data it points at is invalid; the message names the task and key."""


@dataclass(frozen=True)
class Target:
    """One thing a task predicts ('' or a mutation gene): its labels (or survival strata) and its folds."""

    name: str
    labels: pd.Series | None  # per case; None when the folds are not stratified
    folds: pd.DataFrame  # case × fold_i, 'train' / 'test'


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """Keys every task accepts. A task type that trains nothing (robustness) derives from this directly."""

    name: str  # unique task name, the `task` column of results.csv
    type: str  # a key of mmfm.eval.tasks.TASKS
    embeddings: tuple[str, ...] = ("X",)  # obsm keys, or "X"
    group: str = "case_id"  # obs column holding the case (patient) id; obs_names when absent
    seed: int = 0

    def obsm_keys(self) -> tuple[str, ...]:
        """The AnnData embeddings this task reads (checked before any task runs)."""
        return self.embeddings

    def plan(self, adata: ad.AnnData, shared: pd.DataFrame | None) -> tuple[list[Target], list[str]]:
        """(targets with their folds, notes); a task that fits nothing evaluates every row and has no folds."""
        return [], []

    def tested(self, adata: ad.AnnData, targets: list[Target]) -> set[str]:
        """Cases this task is scored on (checked against the pretraining cases): every case here."""
        return set(row_groups(adata, self))


@dataclass(frozen=True, kw_only=True)
class FoldSpec(TaskSpec):
    """A task fitted on training folds and scored on test folds (patient-level, stratified)."""

    site: str | None = None  # obs column of the centre; used by site-preserved folds
    baseline: tuple[str, ...] = ()  # numeric obs columns forming a covariate baseline, reported beside
    folds: int = 5  # k of k-fold, or the number of Monte-Carlo splits with test_size
    test_size: float | None = None  # Monte-Carlo folds with this test fraction instead of k-fold
    site_preserved: bool = False  # every case of a site on one side of each fold (needs `site`)
    splits: str | None = None  # Patho-Bench split file for this task (overrides the probe's `splits`)

    def targets(self, adata: ad.AnnData, notes: list[str]) -> dict[str, tuple[pd.Index, pd.Series | None]]:
        """Per target: the cases it can use and the series its folds are stratified by (default: every case,
        unstratified)."""
        return {"": (pd.Index(np.unique(row_groups(adata, self))), None)}

    def new_folds(self, cases: pd.Index, strata: pd.Series | None, sites: pd.Series | None,
                  where: str, notes: list[str]) -> pd.DataFrame:
        """Folds for one target when no split file is given; a small cohort gets fewer folds, with a note."""
        if self.site_preserved and sites is None:
            raise TaskError(f"task {self.name!r}: 'site_preserved' needs key 'site'")
        k = self.folds
        if self.test_size is None:
            counts = (pd.Series(1, index=cases).groupby(strata.reindex(cases).astype(str).to_numpy()).size()
                      if strata is not None else pd.Series({"cases": len(cases)}))
            k = min(self.folds, int(counts.max()))
            if k < 2:
                raise TaskError(f"task {where!r}: too few cases for 2 folds ({len(cases)} case(s); per class: "
                                f"{counts.to_dict()})")
            if k < self.folds:
                notes.append(f"{where}: {self.folds} folds reduced to {k}: the largest class has {k} case(s) "
                             f"(per class: {counts.to_dict()})")
        return folds_mod.generate_folds(cases, strata, sites, k=k, seed=self.seed,
                                        site_preserved=self.site_preserved, test_size=self.test_size)

    def plan(self, adata, shared):
        """The split file's folds restricted to each target's cases, or patient-level folds generated per
        target (each mutation gene stratified on itself)."""
        notes: list[str] = []
        given = folds_mod.read_split_file(self.splits) if self.splits else shared
        sites = case_values(adata, self, "site", self.site) if self.site else None
        out = []
        for target, (cases, strata) in self.targets(adata, notes).items():
            where = f"{self.name}{'/' + target if target else ''}"
            f = given if given is not None else self.new_folds(cases, strata, sites, where, notes)
            f, missing = folds_mod.restrict(f, cases, where)
            notes += missing
            out.append(Target(target, strata, f))
        return out, notes

    def tested(self, adata, targets):
        """The test cases of the folds."""
        return set().union(*(folds_mod.tested_cases(t.folds) for t in targets))

    def probe_embeddings(self) -> list[str]:
        """The embeddings, then the covariate baseline as one more 'embedding'."""
        return list(self.embeddings) + ([f"baseline:{'+'.join(self.baseline)}"] if self.baseline else [])


@dataclass(frozen=True)
class TaskType:
    """A registry entry: the spec TASKS.yaml entries of this type decode into, and the function that scores it;
    `units`, when given, splits a long task into independent pieces (each writes a Collector of its own; run one
    after another they write what `run` writes) that the probe runs side by side with `workers` > 1; `early` names
    the pieces that read only the cases' labels and the cohort (and the pretrained run, when the second argument
    says it exists) — no embedding — which may start before the embeddings exist (`mmfm.eval.probe.start_early`)."""

    spec: type[TaskSpec]
    run: Callable[[ad.AnnData, TaskSpec, list[Target], Collector], None]
    units: Callable[[ad.AnnData, TaskSpec, list[Target], Collector], list[Callable[[Collector], None]]] | None = None
    early: Callable[[TaskSpec, list[Target], bool], list[int]] | None = None


# ---------------------------------------------------------------- data access


def column(adata: ad.AnnData, spec: TaskSpec, key: str, col: str) -> pd.Series:
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
    return column(adata, spec, "group", spec.group).to_numpy()  # raises naming the key


def row_features(adata: ad.AnnData, spec: TaskSpec, key: str) -> np.ndarray:
    """[n_obs, D] float64 features from obsm[key] or X (or the `baseline` covariates); NaN rows = absent."""
    if key.startswith("baseline:"):
        cols = [column(adata, spec, "baseline", c) for c in spec.baseline]
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
    s = column(adata, spec, key, col)
    df = pd.DataFrame({"case": row_groups(adata, spec), "v": s.to_numpy()}).dropna()
    n = df.groupby("case")["v"].nunique()
    if (n > 1).any():
        case = n.index[n > 1][0]
        raise TaskError(f"task {spec.name!r}: column {col!r} (key {key!r}) has conflicting values "
                        f"{sorted(map(str, df.loc[df.case == case, 'v'].unique()))} for case {case!r}")
    return df.groupby("case")["v"].first()


def label_target(adata: ad.AnnData, spec: TaskSpec) -> dict[str, tuple[pd.Index, pd.Series]]:
    """The single target of a `label` task: labelled cases, stratified by the label (≥ 2 classes needed)."""
    lab = case_values(adata, spec, "label", spec.label)
    if lab.nunique() < 2:
        raise TaskError(f"task {spec.name!r}: key 'label' column {spec.label!r} has fewer than 2 classes "
                        f"({lab.unique().tolist()}) among {len(lab)} labelled cases")
    return {"": (lab.index, lab)}


def fold_sides(folds: pd.DataFrame, col: str, cases: pd.Index) -> tuple[pd.Index, pd.Index]:
    """(train cases, test cases) of fold `col` among `cases`."""
    f = folds[col].reindex(cases)
    return cases[(f == "train").to_numpy()], cases[(f == "test").to_numpy()]


# ---------------------------------------------------------------- results


def result_key(spec: TaskSpec, embedding: str, target: str = "", model: str = "", shots: int | None = None) -> dict:
    """The identifying columns of a results.csv row."""
    return {"task": spec.name, "type": spec.type, "target": target, "embedding": embedding, "model": model,
            "shots": "" if shots is None else int(shots)}


@dataclass
class Collector:
    """Accumulates metric rows, bootstrap draws, pooled survival predictions, per-target regression scores,
    robustness curves and notes."""

    n_bootstrap: int = 100
    plot_dir: Path | None = None  # where per-task plots go (None: no plots)
    projection: str = "umap"  # robustness embedding plot: 'umap' or 'pca'
    cohort: str | None = None  # where `mil` tasks find the tile bags (None: the cohort the embeddings record)
    drawer: Drawer | None = None  # the process drawing the figures (`mmfm.eval.drawing`; None: the task's thread)
    rows: list[dict] = field(default_factory=list)
    boot: list[dict] = field(default_factory=list)
    survival_preds: dict = field(default_factory=dict)
    per_target: list[pd.DataFrame] = field(default_factory=list)  # regression: one score row per target × fold
    robustness_curves: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def merge(self, other: Collector) -> None:
        """Append what `other` (a task run on its own) collected, as if it had run into this one."""
        self.rows += other.rows
        self.boot += other.boot
        self.survival_preds.update(other.survival_preds)
        self.per_target += other.per_target
        self.robustness_curves.update(other.robustness_curves)
        self.notes += other.notes

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
