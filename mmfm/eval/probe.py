"""`mmfm probe`: frozen-embedding probes (classification, mutation, survival, regression, retrieval, few-shot,
robustness) and,
beside them, supervised MIL / fine-tuning on the tile bags (`mil`, mmfm.eval.tasks.mil).

Input is ANY AnnData: features in `X` or `obsm[key]`, labels and outcomes in `obs`, one row per slide or per case
(`group` names the case column; obs_names are the cases when it is absent). Rows of a case are late-fused (mean of
the row embeddings, Patho-Bench's default) for case-level probes; rows whose vector holds NaN count as "modality
absent". Folds come from a Patho-Bench split file or are generated patient-level by `mmfm.data.splits.make_folds`.
Outputs: `results.csv` (one metric value per row), `bootstrap.csv` (single-fold tasks), `summary.md`, PNG plots,
`folds/<task>.tsv` (the exact case × fold assignment used), `per_target.csv` (regression: each target's r, ρ,
R², p and BH q per fold).

Leakage guards: a case on both sides of a fold is refused (mmfm.data.splits checks every split it reads or makes);
test cases that were seen in pretraining (`pretrain_cases`, or `uns['pretrain_cases']`) are refused unless
`allow_overlap`, and test cases that were the run's validation cases (`validation_cases`, or
`uns['validation_cases']`: they chose the checkpoint) unless `allow_validation_overlap`; either is then flagged in
summary.md.

The driver: load tasks → plan folds → leakage check → run each through the registry → write outputs. Task types,
their keys and how to add one: `mmfm.eval.tasks`; folds and leakage guards: `mmfm.eval.folds`.

TASKS.yaml (keys = the fields of the type's spec; unknown keys are an error naming the file, task and key):

    - {name: os, type: survival, time: os_days, event: os_event, embeddings: [slide, rna], baseline: [grade],
       models: [coxnet, coxph], alphas: [0.01, 0.02, 0.07], horizons: [365, 1095, 1825]}
    - {name: subtype, type: classification, label: subtype, embeddings: [slide], C: 0.5, folds: 5}
    - {name: expression, type: regression, source: rna, hvg: 50, embeddings: [slide, slide_meanpool],
       baseline: [grade], pca: 256}
    - {name: st_genes, type: spots, embeddings: [tiles], hvg: 50, pca: 256}
    - {name: drivers, type: mutation, labels: ["mut_*"], embeddings: [slide], min_positives: 5}
    - {name: subtype_fewshot, type: fewshot, label: subtype, embeddings: [slide], shots: [1, 4, 16], draws: 10}
    - {name: xmodal, type: retrieval, pairs: [[slide, rna], [rna, slide]], label: subtype, embeddings: [slide]}
    - {name: site_ri, type: robustness, label: subtype, site: site, embeddings: [slide], ks: [5, 10, 20]}
    - {name: subtype_mil, type: mil, label: subtype, beside: subtype, inits: [abmil, finetune, frozen],
       train: {epochs: 20, max_tiles: 2048}}
    - {name: grade_zs, type: zeroshot, label: grade, embeddings: [slide, report],
       classes: {1: [low grade, well differentiated], 3: [high grade, poorly differentiated]}}
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import anndata as ad
import pandas as pd
from threadpoolctl import threadpool_limits

from mmfm.eval import folds, report
from mmfm.eval.drawing import Drawer
from mmfm.eval.folds import LeakageError
from mmfm.eval.tasks import TASKS, load_tasks
from mmfm.eval.tasks.base import Collector, TaskError, row_features
from mmfm.eval.tasks.mil import check_beside, file_beside

log = logging.getLogger(__name__)

__all__ = ["LeakageError", "ProbeConfig", "ProbeResult", "Started", "TaskError", "load_tasks", "probe", "run_probe",
           "start_early"]


@dataclass
class ProbeConfig:
    """`mmfm probe`: run the TASKS.yaml probes on an AnnData of embeddings."""

    embeddings: str  # AnnData .h5ad: features in X / obsm, labels and outcomes in obs
    tasks: str  # TASKS.yaml (task types and keys: mmfm.eval.tasks)
    out: str  # output directory: results.csv, bootstrap.csv, summary.md, plots, folds/
    splits: str | None = None  # Patho-Bench split file (case_id, slide_id, fold_i = train/test) for all tasks
    allow_overlap: bool = False  # run even if test cases were seen in pretraining (recorded in summary.md)
    pretrain_cases: str | None = None  # case ids used in pretraining (one per line, or CSV with case_id)
    allow_validation_overlap: bool = False  # run even if test cases were validation cases (recorded in summary.md)
    validation_cases: str | None = None  # case ids that chose the checkpoint (default: uns['validation_cases'])
    n_bootstrap: int = 100  # bootstrap resamples for single-fold tasks
    plots: bool = True  # write PNG plots (per task, Kaplan–Meier, robustness curves and projections)
    projection: Literal["umap", "pca"] = "umap"  # robustness embedding plot
    cohort: str | None = None  # cohort of `mil` tile bags and `regression` omics (default: the embeddings' one)


@dataclass
class ProbeResult:
    results: pd.DataFrame
    summary: pd.DataFrame
    out: Path
    notes: list[str]
    overlap: dict[str, list[str]]  # task → its test cases seen in pretraining (allowed)
    validation_overlap: dict[str, list[str]]  # task → its test cases that were validation cases (allowed)


def probe(embeddings: ad.AnnData | str | Path, tasks, out: str | Path, *, splits: str | Path | None = None,
          allow_overlap: bool = False, pretrain_cases: set[str] | str | Path | None = None,
          allow_validation_overlap: bool = False, validation_cases: set[str] | str | Path | None = None,
          n_bootstrap: int = 100, plots: bool = True, projection: str = "umap",
          cohort: str | Path | None = None, workers: int = 1, started: dict | None = None,
          drawer: Drawer | None = None) -> ProbeResult:
    """Run every task on the embeddings and write results.csv, bootstrap.csv, summary.md and plots to `out`;
    `workers` tasks at a time, pieces `started` before (`start_early`) taken as they are (the same results, see
    `_run_tasks`). With a `drawer` (`mmfm.eval.drawing`) the figures are drawn by its process, each task's as soon
    as its table is complete, while the other tasks run; all are written when this returns."""
    adata = embeddings if isinstance(embeddings, ad.AnnData) else ad.read_h5ad(embeddings)
    specs = load_tasks(tasks)
    if cohort is not None:  # tasks reading the cohort (mil, regression): --cohort where the task names none
        specs = [dataclasses.replace(s, cohort=str(cohort)) if getattr(s, "cohort", "") is None else s for s in specs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shared_split = folds.read_split_file(splits) if splits else None

    plans = []
    for spec in specs:
        for emb in spec.obsm_keys():
            row_features(adata, spec, emb)  # fail early, naming the key
        plans.append((spec, *spec.plan(adata, shared_split)))
    check_beside(plans)
    tested = {s.name: s.tested(adata, t) for s, t, _ in plans}
    overlap = folds.check_overlap(tested, folds.seen_cases(pretrain_cases, adata.uns.get("pretrain_cases")),
                                  allow_overlap)
    val_overlap = folds.check_overlap(tested, folds.seen_cases(validation_cases, adata.uns.get("validation_cases")),
                                      allow_validation_overlap, "validation")
    for spec, targets, _ in plans:
        for t in targets:
            folds.write_folds(t.folds, out / "folds" / f"{report.slug(spec.name, t.name)}.tsv")

    col = Collector(n_bootstrap=n_bootstrap, plot_dir=out if plots else None, projection=projection,
                    cohort=None if cohort is None else str(cohort), drawer=drawer)
    apart = plots and drawer is not None  # each task's figures drawn as soon as its table is complete
    rows_of = {spec.name: {spec.name} | {s.name for s, _, _ in plans if getattr(s, "beside", None) == spec.name}
               for spec, _, _ in plans}  # the tasks whose rows a task's table holds (`mil` rows filed beside it)
    done: set[str] = set()
    with threadpool_limits(1, user_api="blas"):  # hundreds of small fits: BLAS threads only spin (≈15× CPU, loaded)
        for spec, parts in _run_tasks(adata, plans, col, workers, started):
            for part in parts:
                col.merge(part)
            done.add(spec.name)
            ready = {t for t, needs in rows_of.items() if needs <= done} if apart else set()
            _draw_tasks(drawer, out, col, ready)
            rows_of = {t: needs for t, needs in rows_of.items() if t not in ready}

    results, boot, summary = _tables(col.rows, col.boot)
    report.write_outputs(out, results, boot, summary, notes=col.notes, overlap=overlap,
                         validation_overlap=val_overlap,
                         survival_preds=col.survival_preds if plots else {},
                         robustness_curves=col.robustness_curves if plots else {}, plots=plots and not apart,
                         per_target=pd.concat(col.per_target, ignore_index=True) if col.per_target else None)
    if apart:
        drawer.wait()
    return ProbeResult(results, summary, out, col.notes, overlap, val_overlap)


RESULT_COLUMNS = ["task", "type", "target", "embedding", "model", "shots", "draw", "metric", "fold", "value"]
BOOT_COLUMNS = ["task", "type", "target", "embedding", "model", "shots", "metric", "boot", "value"]


def _tables(rows: list[dict], boot: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(results, bootstrap, summary) of collected rows (supervised survival rows filed beside each Cox model)."""
    results = pd.DataFrame(file_beside(rows), columns=RESULT_COLUMNS)
    boot = pd.DataFrame(file_beside(boot), columns=BOOT_COLUMNS)
    return results, boot, report.summarize(results, boot)


def _draw_tasks(drawer, out: Path, col: Collector, names: set[str]) -> None:
    """The figures of the tables of tasks `names` (complete), by `drawer`: what `write_outputs` draws of them."""
    if not names:
        return
    mine = lambda key: key[0] in names  # noqa: E731  (survival predictions and curves are keyed by task first)
    results, _, summary = _tables([r for r in col.rows if r["task"] in names], [b for b in col.boot
                                                                                 if b["task"] in names])
    per_target = [g[g.task.isin(names)] for g in col.per_target]
    report.draw_figures(drawer, out, summary, results, {k: v for k, v in col.survival_preds.items() if mine(k)},
                        {k: v for k, v in col.robustness_curves.items() if mine(k)},
                        pd.concat(per_target, ignore_index=True) if per_target else None)


@dataclass
class Started:
    """Pieces of a task started before the probe (`start_early`): the targets they were planned on, and by piece
    index the future of each one's Collector."""

    targets: list
    units: dict[int, Future]


def start_early(cases: ad.AnnData, tasks, pool: Executor, *, n_bootstrap: int = 100,
                started: dict[str, Started] | None = None) -> dict[str, Started]:
    """Start on `pool` the task pieces that read only the cases' labels and the cohort (`TaskType.early`: a mil
    task's abmil init; with `uns['run_dir']`, the pretrained run too: its finetune init) before the embeddings
    exist: `cases` holds the probe's cases with their labels (obs) and `uns['cohort']`. Returns `started` with
    them added (those already there are not started again). `probe(..., started=...)` takes a piece's rows where
    the targets and folds it plans on the embeddings are the ones the piece ran on, and runs it again otherwise."""
    like = Collector(n_bootstrap=n_bootstrap)
    out = dict(started or {})
    for spec in load_tasks(tasks):
        kind = TASKS[spec.type]
        if kind.early is None or kind.units is None:
            continue
        try:
            targets, _ = spec.plan(cases, None)
        except TaskError:  # a label the cases do not carry yet: the probe runs the whole task
            continue
        before = out.get(spec.name, Started(targets, {}))
        new = [j for j in kind.early(spec, targets, "run_dir" in cases.uns) if j not in before.units]
        if new and _same_targets(before.targets, targets):
            pieces = kind.units(cases, spec, targets, like)
            out[spec.name] = Started(targets, {**before.units,
                                               **{j: pool.submit(_collect, like, [], pieces[j]) for j in new}})
    return out


def _collect(like: Collector, notes: list[str], work) -> Collector:
    """`work` run into a fresh Collector of `like`'s settings, starting with `notes`."""
    col = dataclasses.replace(like, rows=[], boot=[], survival_preds={}, per_target=[], robustness_curves={},
                              notes=list(notes))
    work(col)
    return col


def _same_targets(a: list, b: list) -> bool:
    """The same targets, cases, labels and folds."""
    same = lambda x, y: (x is None and y is None) or (x is not None and y is not None  # noqa: E731
                                                      and x.sort_index().equals(y.sort_index()))
    return len(a) == len(b) and all(s.name == t.name and same(s.labels, t.labels) and same(s.folds, t.folds)
                                    for s, t in zip(a, b))


def _run_tasks(adata, plans: list, like: Collector, workers: int, started: dict | None = None) -> Iterator[tuple]:
    """Each task into Collectors of its own, yielded with its spec in plan order as each completes (its figures can be
    drawn while the others run), `workers` at a time (threads: the fits and XLA release the GIL). With workers, a
    task whose type splits into pieces (`TaskType.units`: a `mil` task's target × init) runs them as units of their
    own, into Collectors merged in the task's order; a piece in `started` (same targets and folds) is not run again.
    Units read the embeddings and write only their Collector, and seed their own randomness, so the merged rows are
    those of one task after another; the `mil` units (the longest: tile bags, training) start first. A unit's error
    is raised, in plan order, once the running ones are done."""
    def one(i: int, j: int, n: int, spec, work, notes) -> Collector:
        t0 = time.perf_counter()
        part = f" (part {j + 1}/{n})" if n > 1 else ""
        log.info("task %d/%d %s%s (%s) ...", i + 1, len(plans), spec.name, part, spec.type)
        col = _collect(like, notes if j == 0 else [], work)
        log.info("task %d/%d %s%s done in %.1fs", i + 1, len(plans), spec.name, part, time.perf_counter() - t0)
        return col

    def pieces(spec, targets) -> list:
        kind = TASKS[spec.type]
        if (workers > 1 or spec.name in early) and kind.units is not None:
            return kind.units(adata, spec, targets, like)
        return [functools.partial(kind.run, adata, spec, targets)]

    planned = {spec.name: targets for spec, targets, _ in plans}
    early = {name: s.units for name, s in (started or {}).items()
             if name in planned and _same_targets(s.targets, planned[name])}
    units = [(i, j, len(ws), spec, w, notes) for i, (spec, targets, notes) in enumerate(plans)
             for ws in [pieces(spec, targets)] for j, w in enumerate(ws)]
    todo = [u for u in units if u[1] not in early.get(u[3].name, {})]

    def result(u, futures) -> Collector:
        done = early.get(u[3].name, {}).get(u[1])
        if done is None:
            return futures[u[:2]].result() if futures is not None else one(*u)
        col = done.result()
        return dataclasses.replace(col, notes=list(u[5]) + col.notes) if u[1] == 0 else col

    if workers <= 1:
        yield from _by_task(plans, units, lambda u: result(u, None))
        return
    first = sorted(todo, key=lambda u: u[3].type != "mil")  # stable: plan order otherwise
    with ThreadPoolExecutor(workers, thread_name_prefix="probe") as pool:
        futures = {u[:2]: pool.submit(one, *u) for u in first}
        yield from _by_task(plans, units, lambda u: result(u, futures))


def _by_task(plans: list, units: list, result) -> Iterator[tuple]:
    """(spec, its Collectors) per task in plan order, each as soon as its last unit is in."""
    for i, (spec, _, _) in enumerate(plans):
        yield spec, [result(u) for u in units if u[0] == i]


def run_probe(cfg: ProbeConfig) -> ProbeResult:
    """`probe` from its typed command configuration."""
    return probe(cfg.embeddings, cfg.tasks, cfg.out, splits=cfg.splits, allow_overlap=cfg.allow_overlap,
                 pretrain_cases=cfg.pretrain_cases, allow_validation_overlap=cfg.allow_validation_overlap,
                 validation_cases=cfg.validation_cases, n_bootstrap=cfg.n_bootstrap, plots=cfg.plots,
                 projection=cfg.projection, cohort=cfg.cohort)
