"""Benchmark: the method comparison on the default simulated cohort and on each harder simulator option.

    python scripts/bench_simulator_options.py --json out/bench/bench_simulator_options.json [--cases 400 --steps 200]

For each option (default, then `mmfm.simulate.HARDER`: focal morphology, nonlinear tile features, MNAR omics)
with everything else equal: simulate a cohort → pretrain the demo recipe (configs/demo.yaml: gated ABMIL ↔ RNA ↔
protein, all-pairs SigLIP) on half of the cases → embed the other half with every tile → probe them. Side by side:
`slide` (pretrained, projected), the baselines `slide_meanpool` (mean of raw tile features) and `slide_random`
(same architecture, random init), and the `oracle` (the same probe on the simulator's programmes + subtype, on the
same cases) as the ceiling; `slide_backbone` is embedded but not probed (runtime). Chance levels sit beside every
number and model − baseline differences come with paired 95% CIs and tests (mmfm.eval.report).

Protocol, fixed before any run: 5-fold patient-level CV on the held-out cases; features z-scored per training
fold (so 64-d projections and 128-d means meet the regulariser on equal terms); logistic C and Cox α chosen by
inner CV on the training fold (α grid: Patho-Bench's 0.02 / 0.07 plus 0.2 / 0.5, because elastic-net Cox on
z-scored 64–128-d features of ~150 cases overflows at the smallest α); expression: the top-50 highly variable genes
of each training fold's bulk RNA, ridge with α per gene by leave-one-out on the training fold, mean Pearson r and
per gene (pretrained above mean-pool in how many genes); no held-out evaluation during pretraining
and the last checkpoint is embedded, so nothing about the probe cases steers the model. One pretraining seed per
option: the paired CIs are over folds, not over pretraining runs. Sizes (400 cases, 200 steps, D = 128, ~300
tiles per slide) keep each option at ≈ 3 CPU-minutes. JSON: per option the simulator config, wall and CPU
seconds per phase, the reference table (chance · baselines · model · oracle) and the paired table; `table` is the
compact comparison printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mmfm.simulate import HARDER, SimConfig, simulate_cohort
from mmfm.eval.embed import embed
from mmfm.eval.probe import probe
from mmfm.eval.references import attach_oracle
from mmfm.eval.report import per_target_r
from mmfm.io import write_json
from mmfm.train import load_config, pretrain

REPO = Path(__file__).resolve().parents[1]
EMBEDDINGS = ["slide_meanpool", "slide_random", "slide", "oracle"]
PROTOCOL = {"embeddings": EMBEDDINGS, "folds": 5, "standardize": True}
TASKS = [
    {"name": "survival", "type": "survival", "time": "os_days", "event": "os_event", "models": ["coxnet"],
     "alphas": [0.02, 0.07, 0.2, 0.5], **PROTOCOL},
    {"name": "subtype", "type": "classification", "label": "subtype", "C": [0.001, 0.01, 0.1, 1.0], **PROTOCOL},
    {"name": "TP53", "type": "mutation", "labels": ["mut_TP53"], "C": [0.001, 0.01, 0.1, 1.0], **PROTOCOL},
    {"name": "site robustness", "type": "robustness", "label": "subtype", "site": "site", "embeddings": EMBEDDINGS,
     "ks": [10]},
    {"name": "expression", "type": "regression", "source": "rna", "hvg": 50, **PROTOCOL},
]
HEADLINE = {"survival": "c_index", "subtype": "auroc", "TP53": "auroc", "site robustness": "robustness_index@10",
            "expression": "pearson_mean"}


class Clock:
    """Wall and CPU seconds (all threads of this process) per phase."""

    def __init__(self):
        self.seconds, self._t = {}, (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.seconds[name] = {"wall": now[0] - self._t[0], "cpu": now[1] - self._t[1]}
        self._t = now


def run_option(name: str, overrides: dict, a: argparse.Namespace, root: Path, tasks: list | None = None) -> dict:
    """simulate → pretrain on half the cases → embed the other half → probe `tasks` (default: TASKS)."""
    sim = SimConfig(n_cases=a.cases, seed=a.seed, feature_dim=a.feature_dim, bag_size_median=a.bag_size_median,
                    n_genes=a.n_genes, **overrides)
    clock = Clock()
    cohort = simulate_cohort(root / f"cohort-{name}", sim)
    clock.lap("simulate")
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"data.cohort={cohort}", f"train.steps={a.steps}", "train.eval_every=0", f"train.ckpt_every={a.steps}",
        "train.progress=false", "data.heldout_fraction=0.5", "data.val_fraction=0",
        f"data.split_seed={a.seed}", f"train.seed={a.seed}",
        f"loader.n_genes={min(500, a.n_genes)}"])
    run_dir = root / f"run-{name}"
    pretrain(cfg, run_dir, resume=(run_dir / "checkpoints").exists())
    clock.lap("pretrain")
    held = json.loads((run_dir / "splits.json").read_text())["heldout"]
    adata, _ = embed(run_dir, cohort, root / f"embeddings-{name}.h5ad", case_ids=held)
    attach_oracle(adata, cohort, like="slide")
    clock.lap("embed")
    res = probe(adata, tasks or TASKS, root / f"probe-{name}", n_bootstrap=a.n_bootstrap, plots=False)
    clock.lap("probe")
    refs = pd.read_csv(root / f"probe-{name}" / "references.csv", keep_default_na=False)
    per_target = root / f"probe-{name}" / "per_target.csv"  # written only when `tasks` hold a regression task
    genes = per_target_r(pd.read_csv(per_target), "slide", "slide_meanpool") if per_target.exists() else None
    paired = pd.read_csv(root / f"probe-{name}" / "paired.csv")
    return {"sim": dataclasses.asdict(sim), "n_probe_cases": int(np.isfinite(adata.obsm["slide"]).all(1).sum()),
            "seconds": clock.seconds,
            "references": refs.to_dict("records"), "paired": paired.to_dict("records"),
            "per_gene_r": None if genes is None else {
                "genes": len(genes), "slide_mean": float(genes.slide.mean()),
                "slide_meanpool_mean": float(genes.slide_meanpool.mean()),
                "slide_above_meanpool": int((genes.slide > genes.slide_meanpool).sum())},
            "summary": res.summary[["task", "target", "embedding", "metric", "mean", "se", "lo", "hi", "n"]]
            .to_dict("records")}


def compact(option: str, r: dict) -> list[dict]:
    """One row per task: chance, each embedding's headline metric, and slide − each baseline [CI] p."""
    summary, paired = pd.DataFrame(r["summary"]), pd.DataFrame(r["paired"])
    rows = []
    for task, metric in HEADLINE.items():
        s = summary[(summary.task == task) & (summary.metric == metric)].set_index("embedding")
        chance = summary[(summary.task == task) & (summary.metric == f"chance_{metric}")]["mean"]
        row = {"option": option, "task": task, "metric": metric,
               "chance": float(chance.iloc[0]) if len(chance) else 0.5,
               **{e: float(s.loc[e, "mean"]) if e in s.index else float("nan") for e in EMBEDDINGS}}
        site = summary[(summary.task == task) & (summary.metric == f"site_only_{metric}")]["mean"]
        if len(site):
            row["site_only"] = float(site.iloc[0])
        for b in ("slide_meanpool", "slide_random"):
            p = paired[(paired.task == task) & (paired.metric == metric) & (paired.embedding == "slide")
                       & (paired.baseline == b)]
            if len(p):
                row[f"slide-{b}"] = p.iloc[0]["text"]
                row[f"p(slide-{b})"] = float(p.iloc[0]["p"])
                row[f"pNB(slide-{b})"] = float(p.iloc[0]["p_corrected"])
        if task == "expression":  # per gene (mean r over the folds that chose it): pretrained vs mean-pool
            g = r["per_gene_r"]
            row["genes slide>meanpool"] = f"{g['slide_above_meanpool']}/{g['genes']}"
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="OUT", required=True)
    p.add_argument("--work", default=None, help="working folder (default: next to --json)")
    p.add_argument("--options", nargs="+", default=["default", *HARDER], choices=["default", *HARDER])
    p.add_argument("--cases", type=int, default=400)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--feature-dim", type=int, default=128)
    p.add_argument("--bag-size-median", type=int, default=300)
    p.add_argument("--n-genes", type=int, default=1000)
    p.add_argument("--n-bootstrap", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    root = Path(a.work or Path(a.json).with_suffix("")).absolute()
    root.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    out = {"args": vars(a), "protocol": {"tasks": TASKS}, "options": {}, "table": []}
    for name in a.options:
        out["options"][name] = r = run_option(name, {} if name == "default" else HARDER[name], a, root)
        out["table"] += compact(name, r)
        print(f"[bench] {name}: " + ", ".join(f"{k} {v['wall']:.0f}s (cpu {v['cpu']:.0f}s)"
                                              for k, v in r["seconds"].items()), flush=True)
        write_json(a.json, out)  # partial results survive an interrupted run
    clock.lap("total")
    out["total_seconds"] = clock.seconds["total"]
    write_json(a.json, out)
    table = pd.DataFrame(out["table"])
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 3):
        print(table.drop(columns=[c for c in table.columns if c.startswith("p")]).to_string(index=False))
    print(f"total {out['total_seconds']['wall']:.0f}s wall, {out['total_seconds']['cpu']:.0f}s cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
