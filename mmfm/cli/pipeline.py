"""The demo as data: a pipeline file (cohort → validate → pretrain → embed → probe → heatmaps → report) and its runner.

`mmfm demo` runs the shipped configs/pipelines/demo.yaml, `mmfm run PIPELINE.yaml` any pipeline file, on a simulated
cohort or an existing one. Every step is the public API a researcher would call on their own cohort; this module only
wires them together. Probes run on the cases held out from pretraining and from checkpoint choice (patient-level),
the pretrained embedding beside the mean-pool and random-init baselines, chance and — when the cohort carries its
latent truth (simulated cohorts do) — the simulator's oracle, with CIs and paired differences whatever the numbers
show. `pretrain.seeds: N` pretrains N times (same split and folds) and reports the spread across seeds. Re-running
reuses finished steps (the cohort is deterministic for its config; pretraining resumes from its last checkpoint).
A new cohort is simulated in a child process while the `mmfm` process imports JAX and the rest for the later steps
(`cohort_ahead`: the same files, validated once, in the child). Within a run the cohort is checked and each
checkpoint restored once (`mmfm.memo`), the heatmaps are drawn beside the embed and probe steps and the probe tasks
run `probe.workers` at a time (threads; the results do not depend on it). Probe pieces that need no embedding start
earlier, in a thread (`early_probes`): a mil task's abmil init beside the report features and pretraining (labels
and tile bags of the cases it holds out), its finetune init beside the embedding; the probe takes their rows where
its own folds are theirs, so the tables are the same. Pretraining hands its final state to the next steps (no
checkpoint read back), and the report's figures are drawn by a worker process of their own (`mmfm.eval.drawing`),
each task's as its table completes.

A pipeline file may start from another (`base: demo.yaml`, relative to the file) and state only its differences;
the recipe and task file it names are relative to the file too, paths given on the command line to the current
directory.

Site robustness: the recipe's site options (`loader.site_balance`, `objective.site_adversary`, …; set them with
`pretrain.overrides`) are named in the report's setup line, and `embed.combat: [slide]` adds the ComBat-corrected
embedding (mmfm.eval.combat, fitted on the pretraining cases only) as its own column of every task's row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from mmfm import memo
from mmfm.config import ConfigError, apply_override, decode, inherit, merge, read_yaml
from mmfm.eval.drawing import Drawer
from mmfm.io import write_text
from mmfm.simulate.sim_config import SimConfig

if TYPE_CHECKING:  # imported where used: `mmfm demo` simulates its cohort beside these imports (`cohort_ahead`)
    from mmfm.cli.forked import Forked
    from mmfm.train.config import RunConfig

PIPELINES = Path(str(resources.files("mmfm") / "configs" / "pipelines"))  # package data: works from a wheel
MODEL = "slide"  # the pretrained embedding the report compares with the baselines
SITE_OPTIONS = ("loader.site_balance", "loader.site_augment", "loader.site_augment_scale",
                "objective.same_site_weight", "objective.other_site_weight", "objective.site_adversary")
ORACLE = "oracle"  # the simulator's latent programmes + subtype, probed on the same cases (the ceiling)


@dataclass
class CohortStep:
    path: str = ""                     # an existing cohort directory (validated, never written); set: no simulation
    simulate: SimConfig | None = None  # else the simulator's config; the cohort goes to OUT/cohort-<config hash>


@dataclass
class PretrainStep:
    recipe: str = ""                   # the pretraining recipe (YAML; data.cohort is set by the pipeline)
    overrides: dict[str, Any] = field(default_factory=dict)  # recipe keys changed here, nested like the recipe
    seeds: int = 1                     # pretraining seeds (train.seed, +1, …); the report gives their spread


@dataclass
class EmbedStep:
    combat: list[str] = field(default_factory=list)  # columns also ComBat-corrected for site → '<col>_combat' rows
    #                                    beside '<col>' in every task (fitted on the pretraining cases only)


@dataclass
class ProbeStep:
    tasks: str = ""                    # the probe task file (YAML list of tasks)
    n_bootstrap: int = 100             # bootstrap resamples for single-fold probes
    workers: int = 1                   # tasks run at a time (threads; the same results for any number): 2 overlaps
    #                                    one task's compiles with another's fits on two idle cores, ~15% more CPU


@dataclass
class HeatmapStep:
    slides: int = 2                    # held-out slides drawn (the first with every queried modality); 0: none
    queries: list[str] = field(default_factory=lambda: ["rna", "report", "Tumour necrosis is present."])


@dataclass
class ReportStep:
    plots: bool = True                 # PNG plots, training curves and heatmaps in the report
    projection: Literal["umap", "pca"] = "umap"  # the robustness task's 2-D embedding plots


@dataclass
class Pipeline:
    out: str = ""                      # output folder (cohort, runs, embeddings, report/)
    cohort: CohortStep = field(default_factory=CohortStep)
    pretrain: PretrainStep = field(default_factory=PretrainStep)
    embed: EmbedStep = field(default_factory=EmbedStep)
    probe: ProbeStep = field(default_factory=ProbeStep)
    heatmaps: HeatmapStep = field(default_factory=HeatmapStep)
    report: ReportStep = field(default_factory=ReportStep)
    fast_compile: bool = False         # jax_disable_most_optimizations and, when the run starts JAX's backend, XLA:CPU's
    #                                    classic emitters: for runs so short that compiling costs more than it saves
    #                                    (demo --quick); numbers move in the last bits


FILE_PATHS = (("pretrain", "recipe"), ("probe", "tasks"))  # relative to the pipeline file that names them


def read_pipeline(path: str | Path) -> dict:
    """A pipeline file as a mapping: its `base:` chain merged key by key (`mmfm.config.inherit`), the files each
    document names made absolute relative to that document first."""
    return inherit(path, merge, prepare=_absolute_paths)


def _absolute_paths(path: Path, raw: dict) -> dict:
    raw = dict(raw)
    for section, key in FILE_PATHS:
        value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
        if value:
            raw[section] = {**raw[section], key: str((path.parent / value).resolve())}
    return raw


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> Pipeline:
    """A checked Pipeline (see `check`): unknown keys name the file and dotted key."""
    raw = read_pipeline(path)
    for o in overrides:
        apply_override(raw, o)
    return check(decode(Pipeline, raw, str(path)), str(path))


def check(p: Pipeline, where: str = "") -> Pipeline:
    """Refuse a pipeline that cannot run before anything is written: no output, no cohort, bad recipe or tasks."""
    check_files(check_steps(p, where))
    return p


def check_steps(p: Pipeline, where: str = "") -> Pipeline:
    """`check`'s part that imports nothing heavy: output, cohort, seeds, the files named."""
    prefix = f"{where}: " if where else ""
    if not p.out:
        raise ConfigError(f"{prefix}out: required (the output folder)")
    if not p.cohort.path and p.cohort.simulate is None:
        raise ConfigError(f"{prefix}cohort: give cohort.path (an existing cohort) or cohort.simulate (a SimConfig)")
    if p.cohort.path and not Path(p.cohort.path).is_dir():
        raise ConfigError(f"{prefix}cohort.path: {p.cohort.path} is not a directory")
    if not p.cohort.path:
        try:
            p.cohort.simulate.check()
        except ValueError as e:
            raise ConfigError(f"{prefix}cohort.simulate: {e}") from e
    if p.pretrain.seeds < 1:
        raise ConfigError(f"{prefix}pretrain.seeds: {p.pretrain.seeds} must be >= 1")
    for name, value in (("pretrain.recipe", p.pretrain.recipe), ("probe.tasks", p.probe.tasks)):
        if not value:
            raise ConfigError(f"{prefix}{name}: required (a YAML file)")
    return p


def check_files(p: Pipeline) -> None:
    """`check`'s part that decodes the recipe and the task file (importing JAX)."""
    from mmfm.eval.tasks import load_tasks

    recipe(p)
    load_tasks(p.probe.tasks)


def recipe(p: Pipeline) -> RunConfig:
    """The pretraining recipe with the pipeline's overrides; an unknown key names pretrain.overrides and its key."""
    from mmfm.train.config import RunConfig

    raw = merge(read_yaml(p.pretrain.recipe), p.pretrain.overrides)
    try:
        return decode(RunConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"pretrain.recipe {p.pretrain.recipe} + pretrain.overrides: {e}") from e


def run_pipeline(p: Pipeline, log: str = "run", where: str = "") -> dict:
    """`check` (`where`: the pipeline file its errors name), then every step in order; returns the report's tables,
    per-seed summaries, seeds, the first run and report dirs. A cohort to simulate is simulated in a child process
    beside the imports of the checks and steps where that gains (`cohort_ahead`)."""
    with cohort_ahead(check_steps(p, where), log) as child, \
            memo.reusing():  # the cohort is checked and each checkpoint restored once, not at every step
        import jax

        from mmfm.cli.jit_cache import start_backend

        if p.fast_compile:
            start_backend(cheap_emitters=True)
        warm = ThreadPoolExecutor(1, thread_name_prefix="warm")  # the report trunk read while the checks import the
        warm.submit(warm_report_trunk, p)  # rest; the report features take what it built (`mmfm.memo`) or raise
        warm.shutdown(wait=False)          # its error again from their own call; its thread ends with that work
        check_files(p)
        with xla_optimisations(not (jax.config.read("jax_disable_most_optimizations") or p.fast_compile)):
            return _run_steps(p, log, child)


@contextlib.contextmanager
def cohort_ahead(p: Pipeline, log: str):
    """The cohort step's simulation (`simulated`: the same cohort, validation and cohort cache), started now in a
    forked child process (`mmfm.cli.forked`) to run on a second core while this process imports JAX, flax, sklearn…
    for the checks and steps; the cohort step takes its answer. None where nothing is gained: a cohort given by
    path or already in the output folder (it resumes there), a copy from the machine's cohort cache, JAX imported
    already (a notebook, a test: no imports left to overlap), one core, or a process that cannot fork safely. If the
    run stops before its cohort step (a bad recipe, an interrupt), the child is ended and its unfinished cohort
    folder removed: nothing is left that the run did not take."""
    from mmfm.cli.forked import Forked
    from mmfm.cli.jit_cache import machine_dir
    from mmfm.simulate.cache import cached

    out = cohort_path(p.cohort.simulate, Path(p.out)) if not p.cohort.path else None
    if out is None or out.exists() or not imports_ahead() or cached(machine_dir("cohorts"), p.cohort.simulate):
        yield None
        return
    fresh = not Path(p.out).exists()
    child = Forked(f"{out}: simulating the cohort", _simulated_and_validation, p.cohort.simulate, out, log)
    try:
        yield child
    finally:
        child.stop()
        if not child.answered:  # the run stopped before its cohort step had the cohort
            shutil.rmtree(out, ignore_errors=True)
            if fresh:
                with contextlib.suppress(OSError):
                    Path(p.out).rmdir()  # the output folder the child made, unless something else is in it


@contextlib.contextmanager
def xla_optimisations(on: bool):
    """XLA's optimisation passes on or off (`jax_disable_most_optimizations`, read at each compile) inside."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", not on)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def imports_ahead() -> bool:
    """Whether this process has JAX's imports still ahead (a fresh `mmfm` process, not a notebook or a test) and
    can fork (`mmfm.cli.forked.can_fork`)."""
    from mmfm.cli.forked import can_fork

    return "jax" not in sys.modules and can_fork()


def _run_steps(p: Pipeline, log: str, child: Forked | None = None) -> dict:
    from mmfm.eval.tasks import load_tasks
    from mmfm.train.config import check as check_run

    out = Path(p.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cpu = [time.process_time()]

    def step(name: str, t: float) -> float:  # wall and CPU seconds (all threads): on a shared machine they differ
        now, used = time.perf_counter(), time.process_time()
        print(f"[{log}] {name} done in {now - t:.1f}s (CPU {used - cpu[0]:.1f}s)", flush=True)
        cpu[0] = used
        return now

    cohort_dir, about = cohort(p, out, log, child)
    t = step(about, t0)
    truth = (cohort_dir / "truth" / "cases.csv").exists()  # a simulated cohort: oracle and report facts
    tasks = with_combat(with_oracle(p.probe.tasks) if truth else load_tasks(p.probe.tasks), p.embed.combat)

    base_cfg = recipe(p)
    base_cfg = check_run(dataclasses.replace(base_cfg, data=dataclasses.replace(base_cfg.data,
                                                                                cohort=str(cohort_dir))))
    seeds = [base_cfg.train.seed + i for i in range(p.pretrain.seeds)]
    results, first, shown, pending = [], None, [], None
    with ThreadPoolExecutor(1, thread_name_prefix="heatmaps") as beside, \
            ThreadPoolExecutor(1, thread_name_prefix="early") as ahead, \
            (Drawer() if p.report.plots else contextlib.nullcontext()) as drawer:  # all exit once their work is done
        labels_only = early_probes(tasks, cohort_dir, base_cfg, truth, ahead, p.probe.n_bootstrap)
        if report_features(base_cfg):
            t = step("report features", t)
        for i, seed in enumerate(seeds):  # same split and folds for every seed: only the pretraining run differs
            tag = "" if i == 0 else f"-seed{seed}"
            run_cfg = dataclasses.replace(base_cfg, train=dataclasses.replace(base_cfg.train, seed=seed))
            run_dir = out / f"run{tag}"
            pretrain(run_cfg, run_dir)
            t = step(f"pretrain (seed {seed})", t)
            started = early_probes(tasks, cohort_dir, base_cfg, truth, ahead, p.probe.n_bootstrap, run_dir,
                                   labels_only)  # this run's pieces (finetune) beside the embedding
            splits = json.loads((run_dir / "splits.json").read_text())
            if i == 0 and p.report.plots and p.heatmaps.slides:  # the first run's, beside embed and probes (all read)
                shown = heatmap_slides(cohort_dir, list(splits["heldout"]), run_cfg.data.modalities, p.heatmaps)
                pending = beside.submit(_timed, heatmaps, run_dir, cohort_dir, shown, p.heatmaps.queries,
                                        out / "report" / "heatmaps")
            adata, slides = embedded(run_dir, cohort_dir, out / f"embeddings{tag}.h5ad", list(splits["heldout"]),
                                     first, truth, combat=tuple(p.embed.combat))
            first = first if first is not None else adata
            t = step(f"embed (seed {seed}: {adata.n_obs} held-out cases, {slides.n_obs} slides, all tiles)", t)
            results.append(probed(adata, tasks, out / "report" / (f"seed-{seed}" if i else ""), p, plots=i == 0,
                                  started=started, drawer=drawer))
            t = step(f"probe (seed {seed})", t)

        heat = []
        if p.report.plots:
            training_curves(out / "run", out / "report")
        if pending is not None:  # its error, if any, is raised here
            heat, secs = pending.result()
            t = step(f"heatmaps ({', '.join(shown)}; {secs:.1f}s beside embed and probes)", t)
    tables = report_tables([r.summary for r in results], results[0].results, results[0].out, seeds)
    text = report_text(f"mmfm {log}", p, out, tables, results, seeds, run_cfg, splits, adata, slides, heat, truth,
                       cv_folds(tasks))
    text.append(f"Total time: {time.perf_counter() - t0:.0f}s")
    write_text(out / "report" / "README.md", "\n".join(text) + "\n")
    print("\n".join(text))
    return {"tables": tables, "summaries": [r.summary for r in results], "seeds": seeds, "run_dir": out / "run",
            "report": out / "report"}


def cohort(p: Pipeline, out: Path, log: str = "run", child: Forked | None = None) -> tuple[Path, str]:
    """The cohort folder, validated: the existing one, or one simulated per simulator config (`simulated`), here or
    by the child process `child` (`cohort_ahead`; its validation then serves this process's later steps)."""
    from mmfm.data.cohort import adopt_validation

    if p.cohort.path:
        validated(Path(p.cohort.path), log)
        return Path(p.cohort.path), f"cohort {p.cohort.path} (existing, not simulated)"
    sim, beside = p.cohort.simulate, ""
    if child is None:
        path, restored = simulated(sim, cohort_path(sim, out), log)
    else:
        path, restored, answer = child.result()
        adopt_validation(path, answer)
        beside = f"; in a child process beside the imports: {child.wall:.1f}s, CPU {child.cpu:.1f}s"
    return path, f"simulate ({sim.n_cases} cases{', copied from the cohort cache' if restored else ''}{beside})"


def cohort_path(sim: SimConfig, out: Path) -> Path:
    """OUT/cohort-<hash of the simulator config>: a run with the same config finds its cohort (and resumes it)."""
    return out / f"cohort-{hashlib.sha1(json.dumps(dataclasses.asdict(sim), sort_keys=True).encode()).hexdigest()[:8]}"


def simulated(sim: SimConfig, out: Path, log: str) -> tuple[Path, bool]:
    """The cohort at `out` simulated (resumed if there), validated and (out, copied from the cache): a new one is
    copied from the machine's cohort cache beside the compilation cache (`jit_cache.machine_dir`, off with it) when
    this config and simulator code were simulated and validated before: the same bytes, and the validation's scan of
    every bag with them (`mmfm.simulate.cache`)."""
    from mmfm.cli.jit_cache import machine_dir
    from mmfm.simulate.cache import simulate_cached

    return simulate_cached(out, sim, machine_dir("cohorts"), check=lambda d: validated(d, log))


def _simulated_and_validation(sim: SimConfig, out: Path, log: str) -> tuple[Path, bool, tuple]:
    """The child's cohort step (`cohort_ahead`): `simulated`, and its validation for the parent (validated once)."""
    from mmfm.data.cohort import validation

    with memo.reusing():
        path, restored = simulated(sim, out, log)
        return path, restored, validation(path)


def validated(cohort_dir: Path, log: str) -> None:
    from mmfm.data.cohort import CohortError, validate

    report = validate(cohort_dir)
    print(report.format() if not report.ok else f"[{log}] cohort valid: {len(report.warnings)} warning(s)")
    if not report.ok:
        raise CohortError(f"{cohort_dir}: the cohort does not validate (see above)")


def with_oracle(path: str) -> list:
    """The task file with the oracle beside every embedding-level task (retrieval pairs and zero-shot, which
    needs the text tower's space, stay as they are)."""
    from mmfm.eval.tasks import load_tasks

    return [s if s.type in ("retrieval", "zeroshot") else dataclasses.replace(s, embeddings=(*s.embeddings, ORACLE))
            for s in load_tasks(path)]


def cv_folds(specs: list) -> str:
    """The k of the fitted tasks' k-fold CV as the report's setup line states it ('5', or '3/5' when they differ;
    retrieval and zero-shot fit nothing: every case is a test case)."""
    from mmfm.eval.tasks.base import FoldSpec

    ks = sorted({s.folds for s in specs if isinstance(s, FoldSpec) and s.type not in ("retrieval", "zeroshot")})
    return "/".join(map(str, ks)) or "no"


def with_combat(specs: list, columns: list[str]) -> list:
    """Each ComBat-corrected column '<col>_combat' right after '<col>' wherever a task lists it (not retrieval or
    zero-shot: their other side stays in the uncorrected shared space)."""
    def beside(embs):
        return tuple(e for c in embs for e in ((c, f"{c}_combat") if c in columns else (c,)))

    return [s if s.type in ("retrieval", "zeroshot") else dataclasses.replace(s, embeddings=beside(s.embeddings))
            for s in specs]


def site_options(cfg: RunConfig) -> str:
    """The site-robustness switches of the recipe that differ from the plain recipe, as `key=value` (or 'none')."""
    from mmfm.train.config import RunConfig

    plain = RunConfig()
    on = []
    for key in SITE_OPTIONS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != getattr(getattr(plain, section), name):
            on.append(f"{key}={value}")
    return ", ".join(on) or "none (plain recipe)"


def caches_reports(cfg: RunConfig) -> bool:
    """Whether pretraining reads the report trunk's cached features (`report_features` fills them first)."""
    return bool(cfg.loader.report_cache) and "report" in cfg.data.modalities


def warm_report_trunk(p: Pipeline) -> None:
    """The report trunk's weights and their digest (`mmfm.models.text_cache.warm`), ready for `report_features`
    when the recipe caches report features."""
    from mmfm.models.text_cache import warm

    if caches_reports(cfg := recipe(p)):
        warm(cfg.model.report, cfg.loader.report_max_len)


def report_features(cfg: RunConfig) -> bool:
    """Fill the frozen report trunk's feature cache (`loader.report_cache`, what pretraining reads) before
    pretraining. Computed once per machine and cohort: copied from a table beside the compilation cache
    (`jit_cache.machine_dir`), one per set of report texts — a report's features depend in their last bits on the
    batch it was computed in, so rows are only shared between identical cohorts (a second demo), which compute them
    in the same batches. Always with XLA's optimisations (`mmfm.models.text_cache.OPTIMISED`, whatever
    `fast_compile` says): a BERT forward over every report is compute-bound. False when the recipe caches no report
    features."""
    from mmfm.cli.jit_cache import machine_dir
    from mmfm.data import report_cache
    from mmfm.data.cohort import Cohort
    from mmfm.models.text_cache import fill_report_cache

    if not caches_reports(cfg):
        return False
    cohort = Cohort.open(cfg.data.cohort, scan_features=False, scan_cache=False)
    if cohort.reports is None:
        return False
    folder = report_cache.resolve_folder(cohort.root, cfg.loader.report_cache)
    texts = cohort.reports.astype(str).tolist()
    shared = machine_dir("report-features")
    if shared is not None:
        shared = shared / hashlib.sha256(report_cache.text_digests(texts).tobytes()).hexdigest()[:20]
    fill = fill_report_cache(cohort, cfg.model.report, shared or folder, cfg.loader.report_max_len)
    if shared is not None:
        if not report_cache.lookup(folder, fill.key, texts)[1].all():
            report_cache.store(folder, fill.key, texts, report_cache.lookup(shared, fill.key, texts)[0],
                               meta={"weights_dir": cfg.model.report.weights_dir,
                                     "max_len": cfg.loader.report_max_len})
    return True


def pretrain(run_cfg: RunConfig, run_dir: Path) -> None:
    """Train, or reuse a finished run of the same config (resume an unfinished one)."""
    from mmfm.train.config import dump_config
    from mmfm.train.loop import pretrain as train

    same_run = (run_dir / "config.yaml").exists() and (run_dir / "config.yaml").read_text() == dump_config(run_cfg)
    if run_dir.exists() and not same_run:
        shutil.rmtree(run_dir)  # the pipeline's own output from another configuration
    train(run_cfg, run_dir, resume=same_run and (run_dir / "checkpoints").exists())


def embedded(run_dir: Path, cohort_dir: Path, path: Path, held: list[str], first, truth: bool,
             combat: tuple[str, ...] = ()):
    """The held-out cases' embeddings, with the oracle and the report facts when the cohort has its truth. The
    baselines do not depend on the pretraining seed: embedded for the first seed, copied to the others; the
    `combat` columns are refitted per seed (on that run's pretraining cases)."""
    from mmfm.eval.embed import EmbedConfig, embed
    from mmfm.eval.references import attach_oracle
    from mmfm.simulate.truth import join_truth
    from mmfm.io import write_h5ad

    adata, slides = embed(run_dir, cohort_dir, path, case_ids=held,
                          cfg=EmbedConfig(combat=combat, **({} if first is None else {"baselines": ()})))
    if first is None and truth:
        attach_oracle(adata, cohort_dir, like=MODEL)
    for key in set(first.obsm if first is not None else ()) - set(adata.obsm):
        adata.obsm[key] = first.obsm[key]
    if truth:
        adata = join_truth(adata, cohort_dir)  # the facts the simulated reports state: labels of the report tasks
    write_h5ad(path, adata)
    return adata, slides


def probed(adata, tasks: list, out: Path, p: Pipeline, plots: bool, started: dict | None = None, drawer=None):
    from mmfm.eval.probe import probe

    return probe(adata, tasks, out, n_bootstrap=p.probe.n_bootstrap, plots=p.report.plots and plots,
                 projection=p.report.projection, workers=p.probe.workers, started=started, drawer=drawer)


def early_probes(tasks: list, cohort_dir: Path, cfg: RunConfig, truth: bool, pool, n_bootstrap: int,
                 run_dir: Path | None = None, started: dict | None = None) -> dict:
    """The probe pieces that need no embedding, started on `pool` (`start_early`) on the cases pretraining holds
    out (`pretrain_split`: the same split, known before it starts): without `run_dir` those that need no run either
    (a mil task's abmil init: labels and tile bags), beside pretraining; with it, that run's (finetune), beside the
    embedding. `started` are kept; the probe takes their rows where its folds are theirs."""
    import anndata as ad

    from mmfm.data.cohort import Cohort
    from mmfm.data.splits import pretrain_split
    from mmfm.eval.probe import start_early
    from mmfm.simulate.truth import join_truth
    from mmfm.train.paths import run_path

    cases = Cohort.open(cohort_dir, scan_features=False, scan_cache=False).cases
    obs = cases.loc[pretrain_split(cases, cfg.data)[2]].copy()
    obs.index = obs.index.astype(str)
    held = ad.AnnData(obs=obs, uns={"cohort": str(cohort_dir),
                                    **({} if run_dir is None else {"run_dir": str(run_path(run_dir).absolute())})})
    return start_early(join_truth(held, cohort_dir) if truth else held, tasks, pool, n_bootstrap=n_bootstrap,
                       started=started)


def _timed(fn, *args):
    """(fn(*args), its wall seconds): a step run beside another reports its own time."""
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def heatmap_slides(cohort_dir: Path, held: list[str], modalities, cfg: HeatmapStep) -> list[str]:
    """The first held-out slides (≥ 1 tile, cohort order) whose case has every modality of the run that a query
    names (a heatmap query needs its data): read from the cohort, as `mmfm embed` reads presence, so the heatmaps
    need not wait for the embeddings."""
    from mmfm.data.cohort import Cohort
    from mmfm.data.loader import case_presence

    cohort = Cohort.open(cohort_dir)
    queried = [q for q in cfg.queries if q in modalities]
    present = case_presence(cohort, held, queried)
    full = [c for i, c in enumerate(held) if all(present[m][i] for m in queried)]
    return cohort.slides.index[cohort.slides["case_id"].astype(str).isin(full) & (cohort.slides["n_tiles"] > 0)
                               ][:cfg.slides].astype(str).tolist()


def heatmaps(run_dir: Path, cohort_dir: Path, slide_ids: list[str], queries: list[str], out: Path) -> list[Path]:
    """Attention and similarity (to the case's own modalities and to typed prompts) of a few held-out slides, on
    their tile grid (a simulated cohort has no slide images)."""
    from mmfm.bridges.heatmap_render import HeatmapConfig, heatmap

    pngs = []
    for sid in slide_ids:
        res = heatmap(HeatmapConfig(run=str(run_dir), cohort=str(cohort_dir), slide=sid, out=str(out / sid),
                                    queries=tuple(queries)))
        pngs += [p for figs in res.figures.values() for p in figs]
    return pngs


def report_text(title: str, p: Pipeline, out: Path, tables: dict, results: list, seeds: list[int], run_cfg: RunConfig,
                splits: dict, adata, slides, heat: list[Path], truth: bool, folds: str) -> list[str]:
    """report/README.md: the setup, the reference and paired tables, reading notes, plots and heatmaps."""
    from mmfm.eval.report import plot_captions, reading_notes

    fewer = any("folds reduced" in n for r in results for n in r.notes)
    spread = (f"mean ± SD across the {len(seeds)} pretraining seeds {seeds} (each seed: mean over its folds, or its "
              "point estimate for retrieval and robustness)" if len(seeds) > 1 else
              "mean ± SE over folds (SE = sample SD / √k); retrieval and robustness: mean [95% bootstrap CI]")
    sim = p.cohort.simulate
    source = (f"The cohort {p.cohort.path}" if p.cohort.path else
              f"{sim.n_cases} simulated cases (seed {sim.seed})")
    setup = (f"{source}; pretraining on {len(splits['train'])} cases "
             f"({run_cfg.train.steps} steps, {run_cfg.model.slide.kind} slide encoder, {run_cfg.objective.kind}; "
             f"site-robustness options: {site_options(run_cfg)}; "
             f"{len(seeds)} seed(s)), {len(splits['val'])} validation cases for the training curve and checkpoint "
             f"choice; probes on the {adata.n_obs} held-out cases ({slides.n_obs} slides; a case's slides are "
             f"averaged) that neither saw, patient-level CV ({folds} folds"
             f"{'; fewer where a task has few cases, see the notes in summary.md' if fewer else ''}). "
             f"Cells: {spread}.")
    oracle = (f", `{ORACLE}` = the same probe on the simulator's latent programmes and subtype (the ceiling)"
              if truth else "")
    combat = "".join(f", `{c}_combat` = `{c}` ComBat-corrected for site (fitted on the pretraining cases only)"
                     for c in p.embed.combat)
    legend = (f"`{MODEL}` = pretrained (projected), `slide_backbone` = pretrained before the head, `slide_meanpool` "
              f"/ `slide_random` = baselines{combat}{oracle}; chance: AUROC and C-index 0.5, retrieval = a random "
              "ranking, robustness = a random ranking and a site-only embedding of the same query rows, regression "
              "(e.g. `expression`: mean Pearson r per gene over each training fold's top highly variable genes, and "
              "the genes significant after Benjamini–Hochberg 5%) = the same model fitted on shuffled training "
              "targets; `baseline:grade` = the grade covariate alone (an RNA-free baseline).")
    text = [f"# {title}", "", setup, "", legend, "",
            "## Chance · baselines · model · oracle", "", tables["references"], "",
            "Cross-modal retrieval (recall@5):", "", tables["retrieval"], "",
            f"## Paired differences: {MODEL} − baseline", "",
            ("Unit = pretraining seed: Δ per seed (mean over its folds), mean [95% t-interval] and paired t-test over "
             "the seeds." if len(seeds) > 1 else
             "Same folds for both: Δ = mean of the per-fold differences [95% t-interval], paired t-test p, and p (NB) "
             "= Nadeau–Bengio corrected (folds share training cases); single-fold metrics: paired bootstrap."),
            "", tables["paired"], ""]
    if len(seeds) > 1:
        text += [f"Per seed ({MODEL}):", "", tables["per_seed"], ""]
    notes = reading_notes(results[0].summary)
    if notes:
        text += ["Reading notes:", ""] + [f"- {n}" for n in notes] + [""]
    captions = plot_captions(out / "report")
    if captions:
        text += ["Plots:", ""] + [f"- [`{name}`]({name}): {caption}" for name, caption in captions] + [""]
    if heat:
        rel = [h.relative_to(out / "report") for h in heat]
        said = similarity_to(p.heatmaps.queries, adata.obsm)
        text += [f"Heatmaps of held-out slides (tile grid; attention of each head, similarity to {said}; tile scores "
                 "in the h5 beside):", ""] + [f"- [`{r}`]({r})" for r in rel] + [""]
    others = "; other seeds under report/seed-*/" if len(seeds) > 1 else ""
    text += [f"Full results: `{out / 'report' / 'summary.md'}` (every metric, fold and note{others})."]
    return text


def similarity_to(queries: list[str], modalities) -> str:
    """'the case's RNA, its report and the prompt '…'' — what the heatmaps compare the tiles with."""
    own = [q.upper() if q == "rna" else q for q in queries if q in modalities]
    said = [("the case's " if i == 0 else "its ") + q for i, q in enumerate(own)]
    said += [f"the prompt '{q}'" for q in queries if q not in modalities]
    return " and ".join([", ".join(said[:-1]), said[-1]]) if len(said) > 1 else "".join(said)


def report_tables(summaries: list[pd.DataFrame], results: pd.DataFrame, out: Path, seeds: list[int]) -> dict:
    """The README's tables (markdown) from the per-seed probe summaries; also written as CSV beside them."""
    from mmfm.eval import seeds as seeds_mod
    from mmfm.eval.report import HEADLINE, markdown_table, reference_table
    from mmfm.io import write_csv

    combined = seeds_mod.combine(summaries)
    base = combined.metric.str.replace(r"^(chance_|site_only_)", "", regex=True)
    headline = combined[[(k, m) in HEADLINE for k, m in zip(combined.type, base)]]
    refs = reference_table(headline[headline.type != "retrieval"], results)
    retrieval = reference_table(headline[headline.type == "retrieval"], results)
    per_fold = pd.read_csv(out / "paired.csv", dtype=str, keep_default_na=False)  # keys as written ('' = none)
    numbers = ["mean", "se", "lo", "hi", "p", "p_corrected", "n"]
    per_fold[numbers] = per_fold[numbers].apply(pd.to_numeric, errors="coerce")
    per_fold = per_fold[[(k, m) in HEADLINE for k, m in zip(per_fold.type, per_fold.metric)]]
    paired = seeds_mod.paired_over_seeds(summaries, per_fold, MODEL)
    shown = paired.assign(comparison=MODEL + " − " + paired.baseline, p=paired.p.map(_p),
                          p_nb=paired.p_corrected.map(_p))
    shown = shown[["task", "target", "metric", "comparison", "text", "p", "p_nb", "n", "method"]].rename(
        columns={"text": "Δ [95% CI]", "p_nb": "p (NB)"})
    each = seeds_mod.per_seed(summaries, seeds, MODEL)
    each = each[[(k, m) in HEADLINE for k, m in zip(each.type, each.metric)]]
    for name, df in (("references_seeds.csv", refs), ("paired_seeds.csv", paired), ("per_seed.csv", each)):
        write_csv(out / name, df, index=False)
    return {"references": markdown_table(refs) if len(refs) else "(none)",
            "retrieval": markdown_table(retrieval) if len(retrieval) else "(none)",
            "paired": markdown_table(shown) if len(shown) else "(none)",
            "per_seed": markdown_table(each.drop(columns=["type", "model", "shots"]).round(3))}


def _p(v) -> str:
    return "—" if not np.isfinite(v) else f"{v:.3g}"


def training_curves(run_dir: Path, out: Path) -> Path | None:
    """Loss and held-out recall over steps, from metrics.jsonl / eval.jsonl (matplotlib's object API, no pyplot:
    safe beside the heatmaps' thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmfm.train.monitor import read_jsonl

    m = pd.DataFrame(read_jsonl(run_dir / "metrics.jsonl"))
    e = pd.DataFrame(read_jsonl(run_dir / "eval.jsonl")) if (run_dir / "eval.jsonl").exists() else pd.DataFrame()
    fig = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 2)
    ax[0].plot(m["step"], m["loss"], label="total")
    for c in [c for c in m.columns if c.startswith("loss/")]:
        ax[0].plot(m["step"], m[c], label=c.removeprefix("loss/"), lw=0.8)
    ax[0].set(xlabel="step", ylabel="loss", title="pretraining loss")
    ax[0].legend(fontsize=7)
    for c in [c for c in e.columns if "recall@5" in c or c.startswith("robustness_index@10/")]:
        ax[1].plot(e["step"], e[c], marker="o", label=c)
    ax[1].set(xlabel="step", ylabel="recall@5 / RI@10", title="validation retrieval and site robustness")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=120)
    return path
