"""`mmfm demo`: the main job — simulate → validate → pretrain → embed held-out cases → probe → report.

Every step is the public API a researcher would call on their own cohort; the demo only wires them
together. Probes run on the cases held out from pretraining (patient-level), with the pretrained
slide embedding beside the mean-pool and random-init baselines, and report CIs whatever the numbers
show. Re-running reuses finished steps (the cohort is deterministic for its seed; pretraining resumes
from its last checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import pandas as pd

from mmfm.io import write_text

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "demo.yaml"
TASKS = REPO / "configs" / "tasks" / "demo.yaml"

HEADLINE = {  # (task type, metric) → column label of the printed table
    ("survival", "c_index"): "C-index",
    ("classification", "auroc"): "AUROC",
    ("mutation", "auroc"): "AUROC",
    ("retrieval", "recall@5"): "recall@5",
    ("robustness", "robustness_index@10"): "RI@10",
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    out: str = "demo_out"
    cases: int = 500
    seed: int = 0
    steps: int | None = None           # default: configs/demo.yaml's train.steps
    overrides: tuple[str, ...] = ()    # extra `--set key=value` for the pretraining config
    sim_overrides: tuple[tuple[str, object], ...] = ()  # SimConfig fields (tests use tiny cohorts)
    n_bootstrap: int = 100
    plots: bool = True


def _step(name: str, t0: float) -> float:
    now = time.perf_counter()
    print(f"[demo] {name} done in {now - t0:.1f}s", flush=True)
    return now


def headline_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows = (task, target, metric), columns = embeddings; cells 'mean ± se' or 'mean [lo, hi]'."""
    keep = [(t, m) in HEADLINE for t, m in zip(summary["type"], summary["metric"])]
    s = summary[keep]
    if s.empty:
        return pd.DataFrame()
    s = s.assign(row=s["task"] + " · " + s["target"].astype(str).where(s["target"].astype(str) != "", "-")
                 + " · " + s["metric"] + s["model"].astype(str).map(lambda m: f" ({m})" if m else ""))
    return s.pivot_table(index="row", columns="embedding", values="text", aggfunc="first", sort=False).fillna("")


def chance_rows(summary: pd.DataFrame) -> pd.DataFrame:
    s = summary[summary["metric"] == "chance_recall@5"]
    return s[["task", "target", "embedding", "text"]]


def demo(cfg: DemoConfig = DemoConfig()) -> dict:
    from mmfm.data.cohort import Cohort, validate
    from mmfm.data.simulate import SimConfig, simulate_cohort
    from mmfm.eval.embed import embed
    from mmfm.eval.probe import probe
    from mmfm.eval.report import markdown_table
    from mmfm.train.config import dump_config, load_config
    from mmfm.train.loop import pretrain

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    sim = SimConfig(n_cases=cfg.cases, seed=cfg.seed, **dict(cfg.sim_overrides))
    sim_key = hashlib.sha1(json.dumps(dataclasses.asdict(sim), sort_keys=True).encode()).hexdigest()[:8]
    cohort_dir = out / f"cohort-{sim_key}"  # one folder per simulator config; same config resumes
    simulate_cohort(cohort_dir, sim)
    t = _step(f"simulate ({cfg.cases} cases)", t0)

    report = validate(cohort_dir)
    print(report.format() if not report.ok else f"[demo] cohort valid: {len(report.warnings)} warning(s)")
    if not report.ok:
        raise SystemExit(1)
    cohort = Cohort.open(cohort_dir)

    overrides = [f"data.cohort={cohort_dir}"] + ([f"train.steps={cfg.steps}"] if cfg.steps else []) + list(cfg.overrides)
    run_cfg = load_config(CONFIG, overrides)
    run_dir = out / "run"
    same_run = (run_dir / "config.yaml").exists() and (run_dir / "config.yaml").read_text() == dump_config(run_cfg)
    if run_dir.exists() and not same_run:
        shutil.rmtree(run_dir)  # the demo's own output from another configuration
    resume = same_run and (run_dir / "checkpoints").exists()
    pretrain(run_cfg, run_dir, resume=resume)
    t = _step("pretrain", t)

    splits = json.loads((run_dir / "splits.json").read_text())
    held = [c for c in splits["heldout"] if c in cohort.case_index]
    emb_path = out / "embeddings.h5ad"
    embed(run_dir, cohort_dir, emb_path, case_ids=held)
    t = _step(f"embed ({len(held)} held-out cases, all tiles)", t)

    res = probe(emb_path, TASKS, out / "report", n_bootstrap=cfg.n_bootstrap, plots=cfg.plots)
    t = _step("probe", t)

    table = headline_table(res.summary)
    chance = chance_rows(res.summary)
    curves = _training_curves(run_dir, out / "report") if cfg.plots else None
    text = ["# mmfm demo", "",
            f"{cfg.cases} simulated cases (seed {cfg.seed}); pretraining on {len(splits['train'])} cases "
            f"({run_cfg.train.steps} steps, {run_cfg.model.slide.kind} slide encoder, {run_cfg.objective.kind}); "
            f"probes on {len(held)} held-out cases, 5-fold patient-level CV, mean ± SE over folds.", "",
            "`slide` = pretrained (projected), `slide_backbone` = pretrained before the head, "
            "`slide_meanpool` / `slide_random` = baselines.", "",
            markdown_table(table.reset_index()) if len(table) else "(no headline metrics)", "",
            "Chance level of recall@5:", "", markdown_table(chance) if len(chance) else "-", "",
            f"Full results: `{(out / 'report' / 'summary.md')}`" + (f"; training curves: `{curves}`" if curves else ""),
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DemoConfig.out, help="report folder (cohort, run, embeddings, report/)")
    p.add_argument("--cases", type=int, default=DemoConfig.cases)
    p.add_argument("--seed", type=int, default=DemoConfig.seed)
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: configs/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pretraining config override")


def run(args: argparse.Namespace) -> int:
    demo(DemoConfig(out=args.out, cases=args.cases, seed=args.seed, steps=args.steps, overrides=tuple(args.set)))
    return 0
