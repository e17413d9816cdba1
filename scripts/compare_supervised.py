"""Is pretraining worth it? Supervised MIL and fine-tuning beside the linear probes, per simulator option and seed.

    python scripts/compare_supervised.py --json out/compare_supervised.json [--options default focal nonlinear mnar
        --seeds 0 1 2 --cases 400 --steps 200 --epochs 20 --folds 5 --inits abmil finetune --train '{"hidden": 64}']

For each simulator option (default, then `mmfm.simulate.HARDER`) and each seed, the pipeline of
scripts/bench_simulator_options.py (simulate → pretrain the demo recipe on half the cases → embed the other half →
probe), with one target, subtype (macro one-vs-rest AUROC), and these rows on the same patient-level folds:
chance · mean-pool linear · random-encoder linear · pretrained linear (`slide`) · `mil:abmil` (gated ABMIL from
scratch, CLAM sizes) · `mil:scratch` (the run's slide-encoder architecture, random init) · `mil:finetune` (the
run's slide encoder fine-tuned) · `mil:frozen` (frozen encoder, head trained) · oracle. Paired per-fold differences
of every MIL row against the pretrained linear probe come from the probe's paired table (95% t-interval over folds,
Nadeau–Bengio p). Writes the JSON (every option × seed: reference and paired tables, seconds per phase) and
a markdown table beside it (`.md`): per option the mean over seeds of each row and of each MIL − slide difference,
with the per-seed values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_simulator_options import Clock, run_option  # noqa: E402

from mmfm.simulate import HARDER  # noqa: E402
from mmfm.eval.report import markdown_table  # noqa: E402
from mmfm.io import write_json, write_text  # noqa: E402

LINEAR = ["slide_meanpool", "slide_random", "slide", "oracle"]
INITS = ["abmil", "scratch", "finetune", "frozen"]


def tasks(a) -> list[dict]:
    return [{"name": "subtype", "type": "classification", "label": "subtype", "embeddings": LINEAR, "folds": a.folds,
             "C": [0.001, 0.01, 0.1, 1.0], "standardize": True},
            {"name": "subtype MIL", "type": "mil", "label": "subtype", "beside": "subtype", "folds": a.folds,
             "inits": a.inits, "train": {"epochs": a.epochs, "max_tiles": a.max_tiles, **json.loads(a.train)}}]


def rows(option: str, seed: int, r: dict, inits: list[str]) -> list[dict]:
    """AUROC of every row and each MIL − slide difference, for one option × seed."""
    s = pd.DataFrame(r["summary"])
    s = s[(s.task == "subtype") & (s.metric.isin(["auroc", "wall_s"]))]
    paired = pd.DataFrame(r["paired"])
    out = []
    for emb in LINEAR + [f"mil:{i}" for i in inits]:
        v = s[s.embedding == emb].set_index("metric")["mean"]
        row = {"option": option, "seed": seed, "row": emb, "auroc": float(v.get("auroc", np.nan)),
               "wall_s": float(v.get("wall_s", np.nan))}
        p = paired[(paired.metric == "auroc") & (paired.embedding == emb) & (paired.baseline == "slide")]
        if len(p):
            row.update(delta_vs_slide=float(p.iloc[0]["mean"]), delta_text=p.iloc[0]["text"],
                       p_nb=float(p.iloc[0]["p_corrected"]))
        out.append(row)
    return out


def markdown(table: pd.DataFrame, a) -> str:
    agg = table.groupby(["option", "row"], sort=False).agg(
        auroc=("auroc", "mean"), delta=("delta_vs_slide", "mean"), wall_s=("wall_s", "mean"),
        per_seed=("auroc", lambda v: ", ".join(f"{x:.3f}" for x in v)),
        delta_per_seed=("delta_text", lambda v: "; ".join(str(x) for x in v if isinstance(x, str)))).reset_index()
    agg["auroc"] = agg.auroc.map("{:.3f}".format)
    agg["delta"] = agg.delta.map(lambda x: "—" if not np.isfinite(x) else f"{x:+.3f}")
    agg["wall_s"] = agg.wall_s.map("{:.1f}".format)
    agg.columns = ["option", "row", "AUROC (mean over seeds)", "Δ vs pretrained linear", "s per fold",
                   "AUROC per seed", "Δ [95% CI] per seed"]
    sizes = (f"{a.cases} simulated cases (half pretrain, half probed), {a.steps} pretraining steps, {a.feature_dim}-d "
             f"tile features, median {a.bag_size_median} tiles, {a.folds} folds, seeds {a.seeds}; mil: {a.epochs} "
             f"epochs, ≤ {a.max_tiles} tiles per slide per step, train {a.train}")
    return ("# Subtype: supervised MIL and fine-tuning beside the linear probes\n\n" + sizes + "\n\n"
            + markdown_table(agg) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="OUT", required=True)
    p.add_argument("--work", default=None, help="working folder (default: next to --json)")
    p.add_argument("--options", nargs="+", default=["default", *HARDER], choices=["default", *HARDER])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cases", type=int, default=400)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--feature-dim", type=int, default=128)
    p.add_argument("--bag-size-median", type=int, default=300)
    p.add_argument("--n-genes", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--max-tiles", type=int, default=2048)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--inits", nargs="+", default=INITS, choices=INITS)
    p.add_argument("--train", default="{}", help="more `train:` keys of the mil task, as JSON")
    a = p.parse_args(argv)
    a.n_bootstrap = 0
    root = Path(a.work or Path(a.json).with_suffix("")).absolute()
    clock = Clock()
    out = {"args": vars(a), "tasks": tasks(a), "runs": {}, "table": []}
    for name in a.options:
        for seed in a.seeds:
            a.seed = seed
            r = run_option(name, {} if name == "default" else HARDER[name], a, root / f"seed-{seed}", out["tasks"])
            out["runs"][f"{name}/seed-{seed}"] = r
            out["table"] += rows(name, seed, r, a.inits)
            write_json(a.json, out)  # partial results survive an interrupted run
    clock.lap("total")
    out["total_seconds"] = clock.seconds["total"]
    write_json(a.json, out)
    md = markdown(pd.DataFrame(out["table"]), a)
    write_text(Path(a.json).with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
