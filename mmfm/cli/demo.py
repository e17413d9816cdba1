"""`mmfm demo`: the main job — simulate → validate → pretrain → embed held-out cases → probe → report.

Every step is the public API a researcher would call on their own cohort; the demo only wires them
together. Probes run on the cases held out from pretraining and from checkpoint choice (patient-level), with
the pretrained slide embedding beside the mean-pool and random-init baselines, chance and the simulator's
oracle, and report CIs and paired differences whatever the numbers show. `--seeds N` pretrains N times (same
split and folds) and reports the spread across seeds. Re-running reuses finished steps (the cohort is
deterministic for its seed; pretraining resumes from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from mmfm.config import load
from mmfm.simulate import SimConfig
from mmfm.io import write_text
from mmfm.train.config import RunConfig

CONFIGS = resources.files("mmfm") / "configs"  # shipped as package data: works from a wheel, no checkout
CONFIG = Path(str(CONFIGS / "demo_report.yaml"))  # slide ↔ RNA ↔ protein ↔ report text (frozen MiniLM, cached)
TASKS = Path(str(CONFIGS / "tasks" / "demo_report.yaml"))  # + report facts: linear beside zero-shot
HEATMAP_SLIDES = 2  # held-out slides drawn in report/heatmaps/

DESCRIPTION = """\
The whole pipeline on a simulated cohort, as a researcher would run it on their own: simulate → validate →
pretrain slide ↔ RNA ↔ protein ↔ report text (configs/demo_report.yaml, shipped with the package) → embed
the held-out cases → probe (configs/tasks/demo_report.yaml: survival, subtype, mutations, retrieval across
every pair, robustness, and the facts the reports state, linear beside zero-shot) → heatmaps of two held-out
slides → report (--out/report/README.md with every plot). Each row reads chance · baselines
(mean-pool, random-init) · pretrained · oracle (the simulator's latent variables), with paired differences
model − baseline; --seeds N pretrains N seeds and reports the spread across them. Re-running reuses finished
steps. Any key of the pretraining recipe can be changed with --set train.steps=50 (or --recipe.train.steps=50).

example: mmfm demo --out demo_out --cases 500 --seeds 3"""

SET_PREFIX = "recipe."


def base() -> dict:
    """Flags and --set override the shipped recipe key by key (never replace it with bare defaults)."""
    from mmfm.config import read_yaml

    return {"recipe": read_yaml(CONFIG)}


def demo_recipe() -> RunConfig:
    return load(RunConfig, CONFIG)


@dataclass
class DemoConfig:
    out: str = "demo_out"              # report folder (cohort, runs, embeddings, report/)
    cases: int = 500                   # simulated cases
    seed: int = 0                      # simulator seed
    seeds: int = 1                     # pretraining seeds (train.seed, +1, …); the report gives their spread
    sim: SimConfig = field(default_factory=SimConfig)  # simulator knobs (n_cases and seed come from above)
    recipe: RunConfig = field(default_factory=demo_recipe)  # the pretraining recipe (data.cohort set by the demo)
    n_bootstrap: int = 100             # bootstrap resamples for single-fold probes
    plots: bool = True                 # PNG plots in the report


Config = DemoConfig
MODEL = "slide"  # the pretrained embedding the report compares with the baselines
ORACLE = "oracle"  # the simulator's latent programmes + subtype, probed on the same cases (the ceiling)


def _step(name: str, t0: float) -> float:
    now = time.perf_counter()
    print(f"[demo] {name} done in {now - t0:.1f}s", flush=True)
    return now


def _pretrain(run_cfg: RunConfig, run_dir: Path) -> None:
    """Train, or reuse a finished run of the same config (resume an unfinished one)."""
    from mmfm.train.config import dump_config
    from mmfm.train.loop import pretrain

    same_run = (run_dir / "config.yaml").exists() and (run_dir / "config.yaml").read_text() == dump_config(run_cfg)
    if run_dir.exists() and not same_run:
        shutil.rmtree(run_dir)  # the demo's own output from another configuration
    pretrain(run_cfg, run_dir, resume=same_run and (run_dir / "checkpoints").exists())


def demo_tasks(specs: list) -> list:
    """The demo's task file with the oracle beside every embedding-level task (retrieval pairs and zero-shot, which
    needs the text tower's space, stay as they are)."""
    return [s if s.type in ("retrieval", "zeroshot") else dataclasses.replace(s, embeddings=(*s.embeddings, ORACLE))
            for s in specs]


def _heatmaps(run_dir: Path, cohort_dir: Path, slide_ids: list[str], out: Path) -> list[Path]:
    """Attention and similarity (to the case's RNA and report, and to a typed prompt) of a few held-out slides, on
    their tile grid (a simulated cohort has no slide images)."""
    from mmfm.bridges.heatmap_render import HeatmapConfig, heatmap

    pngs = []
    for sid in slide_ids:
        res = heatmap(HeatmapConfig(run=str(run_dir), cohort=str(cohort_dir), slide=sid, out=str(out / sid),
                                    queries=("rna", "report", "Tumour necrosis is present.")))
        pngs += [p for figs in res.figures.values() for p in figs]
    return pngs


def demo(cfg: DemoConfig | None = None) -> dict:
    from mmfm.data.cohort import CohortError, validate
    from mmfm.simulate import simulate_cohort
    from mmfm.eval.embed import EmbedConfig, embed
    from mmfm.eval.probe import probe
    from mmfm.eval.references import attach_oracle
    from mmfm.eval.report import plot_captions, reading_notes
    from mmfm.eval.tasks import load_tasks
    from mmfm.simulate.truth import join_truth
    from mmfm.io import write_h5ad
    from mmfm.train.config import check

    cfg = cfg or DemoConfig()
    if cfg.seeds < 1:
        raise ValueError(f"--seeds {cfg.seeds}: must be >= 1")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    sim = dataclasses.replace(cfg.sim, n_cases=cfg.cases, seed=cfg.seed)
    sim_key = hashlib.sha1(json.dumps(dataclasses.asdict(sim), sort_keys=True).encode()).hexdigest()[:8]
    cohort_dir = out / f"cohort-{sim_key}"  # one folder per simulator config; same config resumes
    simulate_cohort(cohort_dir, sim)
    t = _step(f"simulate ({cfg.cases} cases)", t0)

    report = validate(cohort_dir)
    print(report.format() if not report.ok else f"[demo] cohort valid: {len(report.warnings)} warning(s)")
    if not report.ok:
        raise CohortError(f"{cohort_dir}: the simulated cohort does not validate (see above)")

    tasks = demo_tasks(load_tasks(TASKS))
    base_cfg = check(dataclasses.replace(cfg.recipe, data=dataclasses.replace(cfg.recipe.data, cohort=str(cohort_dir))))
    seeds = [base_cfg.train.seed + i for i in range(cfg.seeds)]
    results, first = [], None
    for i, seed in enumerate(seeds):  # same split and folds for every seed: only the pretraining run differs
        tag = "" if i == 0 else f"-seed{seed}"
        run_cfg = dataclasses.replace(base_cfg, train=dataclasses.replace(base_cfg.train, seed=seed))
        run_dir = out / f"run{tag}"
        _pretrain(run_cfg, run_dir)
        t = _step(f"pretrain (seed {seed})", t)
        splits = json.loads((run_dir / "splits.json").read_text())
        held = list(splits["heldout"])
        # the baselines do not depend on the pretraining seed: embedded once, copied to the other seeds
        adata, slides = embed(run_dir, cohort_dir, out / f"embeddings{tag}.h5ad", case_ids=held,
                              cfg=EmbedConfig() if first is None else EmbedConfig(baselines=()))
        if first is None:
            attach_oracle(adata, cohort_dir, like=MODEL)
            first = adata
        else:
            for key in set(first.obsm) - set(adata.obsm):
                adata.obsm[key] = first.obsm[key]
        adata = join_truth(adata, cohort_dir)  # the facts the simulated reports state: labels of the report tasks
        write_h5ad(out / f"embeddings{tag}.h5ad", adata)
        t = _step(f"embed (seed {seed}: {len(held)} held-out cases, {slides.n_obs} slides, all tiles)", t)
        results.append(probe(adata, tasks, out / "report" / (f"seed-{seed}" if i else ""),
                             n_bootstrap=cfg.n_bootstrap, plots=cfg.plots and i == 0))
        t = _step(f"probe (seed {seed})", t)

    heat = []
    if cfg.plots:
        _training_curves(out / "run", out / "report")
        queried = [k for k in ("rna", "report") if k in adata.obsm]  # a heatmap query needs the case's own data
        full = adata.obs_names[np.isfinite(np.hstack([adata.obsm[k] for k in queried])).all(axis=1)]
        shown = slides.obs_names[slides.obs["case_id"].astype(str).isin(full)][:HEATMAP_SLIDES].tolist()
        heat = _heatmaps(out / "run", cohort_dir, shown, out / "report" / "heatmaps")
        t = _step(f"heatmaps ({', '.join(shown)})", t)
    tables = report_tables([r.summary for r in results], results[0].results, results[0].out, seeds)
    fewer = any("folds reduced" in n for r in results for n in r.notes)
    spread = (f"mean ± SD across the {len(seeds)} pretraining seeds {seeds} (each seed: mean over its folds, or its "
              "point estimate for retrieval and robustness)" if len(seeds) > 1 else
              "mean ± SE over folds (SE = sample SD / √k); retrieval and robustness: mean [95% bootstrap CI]")
    setup = (f"{cfg.cases} simulated cases (seed {cfg.seed}); pretraining on {len(splits['train'])} cases "
             f"({run_cfg.train.steps} steps, {run_cfg.model.slide.kind} slide encoder, {run_cfg.objective.kind}; "
             f"{len(seeds)} seed(s)), {len(splits['val'])} validation cases for the training curve and checkpoint "
             f"choice; probes on the {len(held)} held-out cases ({slides.n_obs} slides; a case's slides are "
             f"averaged) that neither saw, patient-level CV (5 folds"
             f"{'; fewer where a task has few cases, see the notes in summary.md' if fewer else ''}). "
             f"Cells: {spread}.")
    legend = (f"`{MODEL}` = pretrained (projected), `slide_backbone` = pretrained before the head, `slide_meanpool` "
              f"/ `slide_random` = baselines, `{ORACLE}` = the same probe on the simulator's latent programmes and "
              "subtype (the ceiling); chance: AUROC and C-index 0.5, retrieval = a random ranking, robustness = a "
              "random ranking and a site-only embedding of the same query rows.")
    text = ["# mmfm demo", "", setup, "", legend, "",
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
        rel = [p.relative_to(out / "report") for p in heat]
        text += ["Heatmaps of held-out slides (tile grid; attention of each head, similarity to the case's RNA, its "
                 "report and the prompt 'Tumour necrosis is present.'; tile scores in the h5 beside):", ""] + \
                [f"- [`{r}`]({r})" for r in rel] + [""]
    others = "; other seeds under report/seed-*/" if len(seeds) > 1 else ""
    text += [f"Full results: `{out / 'report' / 'summary.md'}` (every metric, fold and note{others}).",
             f"Total time: {time.perf_counter() - t0:.0f}s"]
    write_text(out / "report" / "README.md", "\n".join(text) + "\n")
    print("\n".join(text))
    return {"tables": tables, "summaries": [r.summary for r in results], "seeds": seeds, "run_dir": out / "run",
            "report": out / "report"}


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


def _training_curves(run_dir: Path, out: Path) -> Path | None:
    """Loss and held-out recall over steps, from metrics.jsonl / eval.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmfm.train.monitor import read_jsonl

    m = pd.DataFrame(read_jsonl(run_dir / "metrics.jsonl"))
    e = pd.DataFrame(read_jsonl(run_dir / "eval.jsonl")) if (run_dir / "eval.jsonl").exists() else pd.DataFrame()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(m["step"], m["loss"], label="total")
    for c in [c for c in m.columns if c.startswith("loss/")]:
        ax[0].plot(m["step"], m[c], label=c.removeprefix("loss/"), lw=0.8)
    ax[0].set(xlabel="step", ylabel="loss", title="pretraining loss")
    ax[0].legend(fontsize=7)
    for c in [c for c in e.columns if "recall@5" in c]:
        ax[1].plot(e["step"], e[c], marker="o", label=c)
    ax[1].set(xlabel="step", ylabel="recall@5", title="held-out retrieval")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(cfg: DemoConfig) -> int:
    demo(cfg)
    return 0
