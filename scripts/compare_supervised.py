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
Nadeau–Bengio p); `finetune − frozen` and `finetune − scratch` are paired the same way per fold, and every pair
also over the folds of all seeds pooled (`pair`; different seeds are independent cohorts).
Runs go seed-major (every option's first seed before any second seed). After every finished option × seed the JSON
(reference and paired tables, seconds per phase) and the markdown beside it (`.md`: per option the mean over seeds
of each row and of each MIL − slide difference, with the per-seed values; which cells finished) are rewritten; a
rerun with the same sizes and `--json` skips the finished cells.
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
from mmfm.eval import stats  # noqa: E402
from mmfm.eval.report import markdown_table  # noqa: E402
from mmfm.io import write_json, write_text  # noqa: E402

LINEAR = ["slide_meanpool", "slide_random", "slide", "oracle"]
INITS = ["abmil", "scratch", "finetune", "frozen"]
MIL_PAIRS = [("finetune", "frozen"), ("finetune", "scratch")]
RESUMABLE = {"json", "work", "options", "seeds", "report_only"}  # may change between a run and its resumption


def tasks(a) -> list[dict]:
    return [{"name": "subtype", "type": "classification", "label": "subtype", "embeddings": LINEAR, "folds": a.folds,
             "C": [0.001, 0.01, 0.1, 1.0], "standardize": True},
            {"name": "subtype MIL", "type": "mil", "label": "subtype", "beside": "subtype", "folds": a.folds,
             "inits": a.inits, "train": {"epochs": a.epochs, "max_tiles": a.max_tiles, **json.loads(a.train)}}]


def rows(option: str, seed: int, r: dict, inits: list[str]) -> list[dict]:
    """AUROC of every row (chance first) and each MIL − slide difference, for one option × seed."""
    s = pd.DataFrame(r["summary"])
    s = s[(s.task == "subtype") & (s.metric.isin(["auroc", "wall_s"]))]
    paired = pd.DataFrame(r["paired"])
    chance = [float(x["chance"]) for x in r["references"] if x["task"] == "subtype" and x["metric"] == "auroc"]
    out = [{"option": option, "seed": seed, "row": "chance", "auroc": chance[0] if chance else 0.5,
            "wall_s": float("nan")}]
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


def fold_values(results_csv: Path) -> dict:
    """Per row, the subtype AUROC and wall seconds of each fold, and the folds' mean n_test / n_train."""
    res = pd.read_csv(results_csv)
    res = res[res.task == "subtype"]
    out = {}
    for emb, g in res.groupby("embedding", sort=False):
        v = g.pivot_table(index="fold", columns="metric", values="value", aggfunc="mean")
        out[emb] = {"fold": [str(f) for f in v.index], "auroc": v["auroc"].tolist(), "wall_s": v["wall_s"].tolist(),
                    "test_train": float((v["n_test"] / v["n_train"]).mean())}
    return out


def pair(runs: list[dict], m: str, b: str, nb: bool = True) -> dict:
    """m − b AUROC over the folds of `runs` (one run: with the Nadeau–Bengio p; several seeds: their folds pooled,
    independent cohorts, paired t over all folds)."""
    a = np.concatenate([r["folds"][m]["auroc"] for r in runs])
    c = np.concatenate([r["folds"][b]["auroc"] for r in runs])
    est = stats.paired(a, c, test_train_ratio=runs[0]["folds"][m]["test_train"] if nb and len(runs) == 1 else None)
    return {"embedding": m, "baseline": b, "mean": est.mean, "lo": est.lo, "hi": est.hi, "p": est.p,
            "p_corrected": est.p_corrected, "n": est.n, "text": est.format(),
            "folds": " / ".join(f"{x:.3f} vs {y:.3f}" for x, y in zip(a, c))}


def markdown(table: pd.DataFrame, out: dict, a) -> str:
    agg = table.groupby(["option", "row"], sort=False).agg(
        auroc=("auroc", "mean"), delta=("delta_vs_slide", "mean"), wall_s=("wall_s", "mean"),
        seeds=("seed", lambda v: ", ".join(map(str, v))),
        per_seed=("auroc", lambda v: ", ".join(f"{x:.3f}" for x in v)),
        delta_per_seed=("delta_text", lambda v: "; ".join(str(x) for x in v if isinstance(x, str)))).reset_index()
    by_option = {o: [r for k, r in out["runs"].items() if k.split("/")[0] == o and "folds" in r] for o in a.options}
    pooled, fastest = [], []
    for o, emb in zip(agg.option, agg.row):
        runs = by_option[o]
        ok = runs and emb in runs[0]["folds"]
        pooled.append(pair(runs, emb, "slide")["text"] if ok and emb.startswith("mil:") else "")
        fastest.append(min(min(r["folds"][emb]["wall_s"]) for r in runs) if ok else float("nan"))
    agg.insert(5, "pooled", pooled)
    agg.insert(5, "fastest", fastest)
    agg["auroc"] = agg.auroc.map("{:.3f}".format)
    agg["delta"] = agg.delta.map(lambda x: "—" if not np.isfinite(x) else f"{x:+.3f}")
    for c in ("wall_s", "fastest"):
        agg[c] = agg[c].map(lambda x: "—" if not np.isfinite(x) else f"{x:.1f}")
    agg.columns = ["option", "row", "AUROC (mean over seeds)", "Δ vs pretrained linear", "s per fold (mean)",
                   "s per fold (fastest)", "Δ [95% CI], folds of all seeds", "seeds", "AUROC per seed",
                   "Δ [95% CI] per seed"]
    pairs = []
    for o, runs in by_option.items():
        for m, b in MIL_PAIRS:
            m, b = f"mil:{m}", f"mil:{b}"
            if not runs or m not in runs[0]["folds"] or b not in runs[0]["folds"]:
                continue
            for k, r in out["runs"].items():
                if r in runs:
                    pairs.append({"option": o, "seeds": k.split("-")[-1], **pair([r], m, b)})
            if len(runs) > 1:
                pairs.append({"option": o, "seeds": "all (folds pooled)", **pair(runs, m, b)})
    pairs = pd.DataFrame(pairs)
    sizes = (f"{a.cases} simulated cases (half pretrain, half probed), {a.steps} pretraining steps, {a.feature_dim}-d "
             f"tile features, median {a.bag_size_median} tiles, {a.folds} folds; mil: {a.epochs} epochs, ≤ "
             f"{a.max_tiles} tiles per slide per step, train {a.train}, inits {a.inits}")
    planned = [f"{o}/seed-{s}" for s in a.seeds for o in a.options]
    missing = [k for k in planned if k not in out["runs"]]
    text = ("# Subtype: supervised MIL and fine-tuning beside the linear probes\n\n" + sizes + "\n\n"
            + f"Finished (option/seed): {', '.join(out['runs'])}. Not finished: {', '.join(missing) or 'none'}.\n\n"
            + markdown_table(agg) + "\n")
    if len(pairs):
        pairs = pairs.assign(pair=pairs.embedding + " − " + pairs.baseline)
        text += ("\n## Between MIL rows, paired per fold (AUROC Δ [95% CI], p; fold values m vs b)\n\n"
                 + markdown_table(pairs[["option", "seeds", "pair", "text", "p", "p_corrected", "folds"]].assign(
                     p=pairs.p.map("{:.3g}".format), p_corrected=pairs.p_corrected.map("{:.3g}".format))) + "\n")
    return text


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
    p.add_argument("--report-only", action="store_true", help="rewrite JSON and markdown from the finished runs")
    a = p.parse_args(argv)
    a.n_bootstrap = 0
    root = Path(a.work or Path(a.json).with_suffix("")).absolute()
    out = resume(a)
    for key, r in out["runs"].items():  # per-fold values of runs recorded before they were kept in the JSON
        if "folds" not in r:
            r["folds"] = fold_values(root / f"seed-{key.split('-')[-1]}" / f"probe-{key.split('/')[0]}" / "results.csv")
    for seed in [] if a.report_only else a.seeds:  # seed-major: every option's first seed before any second seed
        for name in a.options:
            key = f"{name}/seed-{seed}"
            if key in out["runs"]:
                print(f"[compare] {key}: done in {a.json}, skipped", flush=True)
                continue
            a.seed = seed
            clock = Clock()
            r = run_option(name, {} if name == "default" else HARDER[name], a, root / f"seed-{seed}", out["tasks"])
            r["folds"] = fold_values(root / f"seed-{seed}" / f"probe-{name}" / "results.csv")
            clock.lap("total")
            r["seconds"]["total"] = clock.seconds["total"]
            out["runs"][key] = r
            out["table"] += rows(name, seed, r, a.inits)
            save(out, a)  # every finished option × seed is on disk: a rerun resumes after it
            print(f"[compare] {key}: " + ", ".join(f"{k} {v['wall']:.0f}s (cpu {v['cpu']:.0f}s)"
                                                   for k, v in r["seconds"].items()), flush=True)
    save(out, a)
    print(Path(a.json).with_suffix(".md").read_text())
    return 0


def resume(a) -> dict:
    """The finished option × seed runs of an earlier run with the same sizes (`--json` exists), or a fresh record."""
    out = {"args": {k: v for k, v in vars(a).items() if k not in RESUMABLE}, "tasks": tasks(a), "runs": {},
           "table": []}
    path = Path(a.json)
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("args") != out["args"] or old.get("tasks") != out["tasks"]:
            raise SystemExit(f"{path} holds a run with other sizes or tasks ({old.get('args')}); "
                             "pass another --json or remove it")
        out["runs"], out["table"] = old["runs"], old["table"]
    return out


def save(out: dict, a) -> None:
    out["options"], out["seeds"] = a.options, a.seeds
    out["finished"] = list(out["runs"])
    out["total_seconds"] = {k: sum(r["seconds"]["total"][k] for r in out["runs"].values()) for k in ("wall", "cpu")}
    write_json(a.json, out)
    write_text(Path(a.json).with_suffix(".md"), markdown(pd.DataFrame(out["table"]), out, a))


if __name__ == "__main__":
    raise SystemExit(main())
