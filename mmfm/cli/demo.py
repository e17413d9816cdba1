"""`mmfm demo`: the main job — simulate → validate → pretrain → embed held-out cases → probe → report.

Every step is the public API a researcher would call on their own cohort; the demo only wires them
together. Probes run on the cases held out from pretraining (patient-level), with the pretrained
slide embedding beside the mean-pool and random-init baselines, and report CIs whatever the numbers
show. Re-running reuses finished steps (the cohort is deterministic for its seed; pretraining resumes
from its last checkpoint).
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

import pandas as pd

from mmfm.config import load
from mmfm.data.simulate import SimConfig
from mmfm.io import write_text
from mmfm.train.config import RunConfig

CONFIGS = resources.files("mmfm") / "configs"  # shipped as package data: works from a wheel, no checkout
CONFIG = Path(str(CONFIGS / "demo.yaml"))
TASKS = Path(str(CONFIGS / "tasks" / "demo.yaml"))

DESCRIPTION = """\
The whole pipeline on a simulated cohort, as a researcher would run it on their own: simulate → validate →
pretrain (configs/demo.yaml, shipped with the package) → embed the held-out cases → probe
(configs/tasks/demo.yaml) → report (--out/report/README.md with every plot). The pretrained slide embedding
sits beside the mean-pool and random-init baselines. Re-running reuses finished steps. Any key of the
pretraining recipe can be changed with --set train.steps=50 (or --recipe.train.steps=50).

example: mmfm demo --out demo_out --cases 500"""

SET_PREFIX = "recipe."


def base() -> dict:
    """Flags and --set override the shipped recipe key by key (never replace it with bare defaults)."""
    from mmfm.config import read_yaml

    return {"recipe": read_yaml(CONFIG)}


def demo_recipe() -> RunConfig:
    return load(RunConfig, CONFIG)


@dataclass
class DemoConfig:
    out: str = "demo_out"              # report folder (cohort, run, embeddings, report/)
    cases: int = 500                   # simulated cases
    seed: int = 0                      # simulator seed
    sim: SimConfig = field(default_factory=SimConfig)  # simulator knobs (n_cases and seed come from above)
    recipe: RunConfig = field(default_factory=demo_recipe)  # the pretraining recipe (data.cohort set by the demo)
    n_bootstrap: int = 100             # bootstrap resamples for single-fold probes
    plots: bool = True                 # PNG plots in the report


Config = DemoConfig


def _step(name: str, t0: float) -> float:
    now = time.perf_counter()
    print(f"[demo] {name} done in {now - t0:.1f}s", flush=True)
    return now


def demo(cfg: DemoConfig | None = None) -> dict:
    from mmfm.data.cohort import CohortError, validate
    from mmfm.data.simulate import simulate_cohort
    from mmfm.eval.embed import embed
    from mmfm.eval.probe import probe
    from mmfm.eval.report import chance_rows, headline_table, markdown_table, plot_captions, reading_notes
    from mmfm.train.config import check, dump_config
    from mmfm.train.loop import pretrain

    cfg = cfg or DemoConfig()
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

    run_cfg = check(dataclasses.replace(cfg.recipe, data=dataclasses.replace(cfg.recipe.data, cohort=str(cohort_dir))))
    run_dir = out / "run"
    same_run = (run_dir / "config.yaml").exists() and (run_dir / "config.yaml").read_text() == dump_config(run_cfg)
    if run_dir.exists() and not same_run:
        shutil.rmtree(run_dir)  # the demo's own output from another configuration
    resume = same_run and (run_dir / "checkpoints").exists()
    pretrain(run_cfg, run_dir, resume=resume)
    t = _step("pretrain", t)

    splits = json.loads((run_dir / "splits.json").read_text())
    held = list(splits["heldout"])
    emb_path = out / "embeddings.h5ad"
    _, slides = embed(run_dir, cohort_dir, emb_path, case_ids=held)
    t = _step(f"embed ({len(held)} held-out cases, {slides.n_obs} slides, all tiles)", t)

    res = probe(emb_path, TASKS, out / "report", n_bootstrap=cfg.n_bootstrap, plots=cfg.plots)
    t = _step("probe", t)

    table = headline_table(res.summary)
    chance = chance_rows(res.summary)
    if cfg.plots:
        _training_curves(run_dir, out / "report")
    fewer = any("folds reduced" in n for n in res.notes)
    text = ["# mmfm demo", "",
            f"{cfg.cases} simulated cases (seed {cfg.seed}); pretraining on {len(splits['train'])} cases "
            f"({run_cfg.train.steps} steps, {run_cfg.model.slide.kind} slide encoder, {run_cfg.objective.kind}); "
            f"probes on the {len(held)} held-out cases ({slides.n_obs} slides; a case's slides are averaged), "
            f"patient-level CV (5 folds{'; fewer where a task has few cases, see the notes in summary.md' if fewer else ''}), "
            "mean ± SE over folds; retrieval and robustness: mean [95% bootstrap CI].", "",
            "`slide` = pretrained (projected), `slide_backbone` = pretrained before the head, "
            "`slide_meanpool` / `slide_random` = baselines.", "",
            markdown_table(table.reset_index()) if len(table) else "(no headline metrics)", "",
            "Chance level of the retrieval rows (random ranking of the same gallery):", "",
            markdown_table(chance) if len(chance) else "-", ""]
    notes = reading_notes(res.summary)
    if notes:
        text += ["Reading notes:", ""] + [f"- {n}" for n in notes] + [""]
    captions = plot_captions(out / "report")
    if captions:
        text += ["Plots:", ""] + [f"- [`{name}`]({name}): {caption}" for name, caption in captions] + [""]
    text += [f"Full results: `{out / 'report' / 'summary.md'}` (every metric, fold and note).",
             f"Total time: {time.perf_counter() - t0:.0f}s"]
    write_text(out / "report" / "README.md", "\n".join(text) + "\n")
    print("\n".join(text))
    return {"table": table, "summary": res.summary, "run_dir": run_dir, "report": out / "report"}


def _training_curves(run_dir: Path, out: Path) -> Path | None:
    """Loss and held-out recall over steps, from metrics.jsonl / eval.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmfm.train.metrics import read_jsonl

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
