"""Site-aware pretraining options and post-hoc ComBat against the plain recipe, on simulated cohorts with growing
site confounding (held-out cases only).

    python scripts/compare_site_robustness.py --json scripts/results/compare_site_robustness.json \
        --md scripts/results/compare_site_robustness.md [--cases 160 --steps 150 --seeds 3 --confounding 1 0.25]

Settings: the default simulator (`site_confounding` 4.0, the Dirichlet concentration of each site's subtype mix)
and each `--confounding` value (lower = each site holds fewer subtypes, so site predicts biology more). Per setting
and seed (the cohort's seed and the pretraining seed: the unit of the intervals), one cohort is simulated and
the demo recipe (configs/demo.yaml at demo --quick sizes) is pretrained once per arm on the same split:

    plain           the recipe as shipped
    balance         loader.site_balance: every batch draws equally from the training sites
    cond_contrast   objective.other_site_weight=0: SigLIP negatives only from the anchor's own site
    mask_same_site  objective.same_site_weight=0: same-site negatives removed
    augment         loader.site_augment=0.5 (+ scale): tile features moved to another training site's statistics
    adversary       objective.site_adversary=0.1 (warm-up steps/4): gradient-reversed site head
    combat          the plain run's embedding, ComBat-corrected (fitted on its pretraining cases; mmfm.eval.combat)

Each arm's held-out case embedding goes through `mmfm probe` on the same folds: RI@10 (PathoROB robustness index,
label = subtype, site = cases.csv site) with the random-ranking chance and a site-only embedding's value on the same
rows, subtype AUROC (5-fold linear probe) and overall-survival C-index (5-fold CoxNet); the mean-pool of raw tile
features is the untrained reference row. Reported per setting: each arm's mean over seeds [95% t-interval over
seeds], and the paired per-seed difference arm − plain [95% t-interval, paired t-test p]; a run with one seed gives
within-seed intervals instead (`summarise`), which leave the pretraining seed's variance out. Work files (cohorts, runs,
probe outputs) stay in --work and are reused when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mmfm.io import write_json, write_text

RECIPE = Path(__file__).resolve().parents[1] / "mmfm" / "configs" / "demo.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
SIM = dict(feature_dim=64, bag_size_median=64, bag_size_max=256, n_genes=400, n_proteins=32)  # demo --quick sizes
ARMS = {
    "plain": [],
    "balance": ["loader.site_balance=true"],
    "cond_contrast": ["objective.other_site_weight=0"],
    "mask_same_site": ["objective.same_site_weight=0"],
    "augment": ["loader.site_augment=0.5", "loader.site_augment_scale=true"],
    "adversary": ["objective.site_adversary=0.1", "objective.site_adversary_warmup={quarter}"],
}
INTERVALS = {True: "intervals: 95% t over seeds, p = paired t-test over seeds",
             False: "one seed, so within-seed intervals: RI by {n_boot} bootstrap resamples of the held-out cases (Δ on the "
                    "same resamples, bootstrap p), AUROC and C by a t-interval over the 5 folds (Δ paired by fold, "
                    "paired t p); the pretraining seed's variance is not in them"}
POSTHOC = {"combat": "plain"}  # arm → the run it corrects
REFERENCE = "meanpool"  # mean of raw tile features: no training
METRICS = {"ri": ("site_ri", "robustness_index@10"), "chance_ri": ("site_ri", "chance_robustness_index@10"),
           "site_only_ri": ("site_ri", "site_only_robustness_index@10"), "auroc": ("subtype", "auroc"),
           "c_index": ("os", "c_index")}


def _recipe(cohort: Path, steps: int, seed: int, arm: str) -> list[str]:
    sets = [f"data.cohort={cohort}", f"train.steps={steps}", f"train.seed={seed}",
            f"train.warmup={max(1, steps // 10)}", "train.eval_every=0", f"train.ckpt_every={steps}", "train.keep_last=1", f"train.log_every={steps}",
            "train.progress=false", "data.heldout_fraction=0.4", "data.val_fraction=0.15", "loader.batch_size=16",
            "loader.tiles_per_slide=32", "loader.n_genes=200"]
    return sets + [s.format(quarter=max(1, steps // 4)) for s in ARMS[arm]]


def _run(cohort: Path, out: Path, steps: int, seed: int, arm: str) -> Path:
    from mmfm.train.config import load_config
    from mmfm.train.loop import pretrain

    if not (out / "checkpoints" / str(steps)).exists():
        pretrain(load_config(RECIPE, _recipe(cohort, steps, seed, arm)), out, resume=(out / "checkpoints").exists())
    return out


def one_seed(work: Path, setting: str, confounding: float | None, seed: int, args) -> Path:
    """Simulate one cohort, pretrain and embed every arm, probe them on the same folds; returns the cohort's folder
    (its probe/ holds the results). A folder whose probe finished is reused."""
    import anndata as ad

    from mmfm.eval.embed import EmbedConfig, embed
    from mmfm.eval.probe import probe
    from mmfm.simulate import SimConfig, simulate_cohort

    base = work / setting / f"seed{seed}"
    if (base / "probe" / "results.csv").exists():
        return base
    sim = SimConfig(n_cases=args.cases, seed=seed, **SIM,
                    **({} if confounding is None else {"site_confounding": confounding}))
    cohort = simulate_cohort(base / "cohort", sim)
    cols = {}
    adata = None
    for arm in args.arms:
        run = _run(cohort, base / f"run_{arm}", args.steps, seed, arm)
        plain = arm == "plain"
        cfg = EmbedConfig(baselines=("meanpool",), combat=("slide",)) if plain else EmbedConfig(baselines=())
        held = json.loads((run / "splits.json").read_text())["heldout"]
        e = embed(run, cohort, base / f"embed_{arm}.h5ad", cfg=cfg, case_ids=held)[0]
        adata = e if adata is None else adata
        assert list(e.obs_names) == list(adata.obs_names)  # same split for every arm: paired rows
        cols[arm] = e.obsm["slide"]
        if plain:
            cols["combat"], cols[REFERENCE] = e.obsm["slide_combat"], e.obsm["slide_meanpool"]
    adata = ad.AnnData(obs=adata.obs, obsm=cols, uns={k: adata.uns[k] for k in ("pretrain_cases", "validation_cases")})
    names = list(cols)
    tasks = [{"name": "site_ri", "type": "robustness", "label": "subtype", "site": "site", "embeddings": names,
              "ks": [10], "seed": seed},
             {"name": "subtype", "type": "classification", "label": "subtype", "embeddings": names, "folds": 5,
              "seed": seed},
             {"name": "os", "type": "survival", "time": "os_days", "event": "os_event", "embeddings": names,
              "models": ["coxnet"], "folds": 5, "seed": seed}]
    probe(adata, tasks, base / "probe", n_bootstrap=args.n_boot, plots=False)
    return base


def seed_result(base: Path) -> tuple[dict, dict]:
    """One cohort's probe as (arm, metric) → point estimate (RI: all held-out cases; AUROC, C: mean over the 5
    folds) and (arm, metric) → the values of its within-seed unit (RI: the bootstrap resamples of the held-out cases,
    the same resamples for every arm; AUROC, C: the folds, the same for every arm)."""
    r = pd.read_csv(base / "probe" / "results.csv", dtype={"fold": str})
    b = pd.read_csv(base / "probe" / "bootstrap.csv")
    points, units = {}, {}
    for key, (task, metric) in METRICS.items():
        rows = r[(r.task == task) & (r.metric == metric) & (r.fold != "pooled")]  # survival also pools its folds
        for arm, g in rows.groupby("embedding"):
            points[(arm, key)] = float(g.value.mean())
            units[(arm, key)] = (b[(b.task == task) & (b.metric == metric) & (b.embedding == arm)]
                                 .sort_values("boot").value.to_numpy() if task == "site_ri"
                                 else g.sort_values("fold").value.to_numpy())
    return points, units


def summarise(results: dict[str, list[tuple[dict, dict]]], arms: list[str]) -> dict:
    """Per setting: each arm's mean and its paired difference against plain. Several seeds: t-intervals over seeds
    (the seed is the unit: cohort and pretraining both vary). One seed: within-seed intervals only — RI by the
    bootstrap of the held-out cases (paired: same resamples), AUROC and C by a t-interval over the 5 folds (paired:
    same folds) — which leave the pretraining seed's variance out."""
    from mmfm.eval.stats import paired, paired_bootstrap

    out = {}
    for setting, seeds in results.items():
        table, multi = {}, len(seeds) > 1
        for arm in [*arms, *POSTHOC, REFERENCE]:
            if (arm, "ri") not in seeds[0][0]:
                continue
            row = {"n_seeds": len(seeds), "interval": "t over seeds" if multi else "within one seed"}
            for m, (task, _) in METRICS.items():
                vals = np.array([pts[(arm, m)] for pts, _ in seeds])
                own = seeds[0][1][(arm, m)]
                if multi:
                    est = paired(vals, np.zeros(len(vals)))
                elif task == "site_ri":
                    est = paired_bootstrap(own, np.zeros(len(own)))
                else:
                    est = paired(own, np.zeros(len(own)))
                row[m] = {"mean": float(vals.mean()), "ci95": [est.lo, est.hi], "per_seed": vals.round(4).tolist()}
                if arm == "plain" or m.startswith(("chance", "site_only")):
                    continue
                ref = seeds[0][1][("plain", m)]
                d = (paired(vals, np.array([pts[("plain", m)] for pts, _ in seeds])) if multi else
                     paired_bootstrap(own, ref) if task == "site_ri" else paired(own, ref))
                row[f"delta_{m}"] = {"mean": float(vals.mean() - np.mean([pts[("plain", m)] for pts, _ in seeds])),
                                     "ci95": [d.lo, d.hi], "p": d.p, "method": d.method}
            table[arm] = row
        out[setting] = table
    return out


def _cell(e: dict, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    if not np.isfinite(e["mean"]):
        return "—"
    ci = "" if not np.isfinite(e["ci95"][0]) else f" [{f.format(e['ci95'][0])}, {f.format(e['ci95'][1])}]"
    return f.format(e["mean"]) + ci


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"# Site robustness: pretraining options and ComBat vs the plain recipe", "",
             f"{a['cases']} simulated cases per cohort (40% held out for the probes), {a['steps']} pretraining steps "
             f"(demo recipe at demo --quick sizes), seeds {result['seeds']} (cohort and pretraining seed; "
             f"{INTERVALS[len(result['seeds']) > 1].format(n_boot=a['n_boot'])}). Machine: {result['machine']}. Wall: "
             f"{result['wall_s']:.0f} s.", "",
             "RI@10: robustness index at k=10 on the held-out cases (label subtype, site = cases.csv site); "
             "chance = a random ranking of the same rows, site-only = an embedding that ranks same-site cases "
             "first. AUROC: subtype, 5-fold linear probe. C: overall survival, 5-fold CoxNet (mean over folds). "
             "Δ = arm − plain on the same cases and folds.", ""]
    for setting, table in result["settings"].items():
        ref = table.get("plain", next(iter(table.values())))
        lines += [f"## {setting}", "",
                  f"RI@10 references on the same rows: chance {_cell(ref['chance_ri'])}, "
                  f"site-only {_cell(ref['site_only_ri'])}.", "",
                  "| arm | RI@10 | ΔRI@10 | p | subtype AUROC | ΔAUROC | p | C-index | ΔC | p |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, r in table.items():
            cells = []
            for m in ("ri", "auroc", "c_index"):
                d = r.get(f"delta_{m}")
                cells += [_cell(r[m]), _cell(d, True) if d else "", f"{d['p']:.2g}" if d and np.isfinite(d["p"])
                          else ""]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=RESULTS / "compare_site_robustness.json")
    p.add_argument("--md", type=Path, default=RESULTS / "compare_site_robustness.md")
    p.add_argument("--work", type=Path, default=Path("out/compare_site_robustness"))
    p.add_argument("--cases", type=int, default=160)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--confounding", type=float, nargs="*", default=[1.0, 0.25],
                   help="site_confounding values beside the default simulator's (lower = stronger)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--n-boot", type=int, default=100, help="bootstrap resamples of the held-out cases for RI")
    args = p.parse_args(argv)
    if "plain" not in args.arms:
        p.error("--arms: 'plain' is the reference every difference is paired against")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(args.work / "jit_cache"))  # one compile per arm shape
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    t0 = time.perf_counter()
    settings = [("default (site_confounding 4.0)", None)] + [(f"site_confounding {c:g}", c) for c in args.confounding]
    results: dict[str, list] = {name: [] for name, _ in settings}
    for seed in range(args.seeds):
        for name, conf in settings:
            base = one_seed(args.work, name.split(" (")[0].replace(" ", "_"), conf, seed, args)
            results[name].append(seed_result(base))
            print(f"[compare_site_robustness] {name} seed {seed} done at {time.perf_counter() - t0:.0f}s", flush=True)
    load = os.getloadavg()
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "seeds": list(range(args.seeds)), "wall_s": time.perf_counter() - t0,
              "machine": f"{_cpu_model()}, {os.cpu_count()} CPUs, load average "
                         f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end",
              "settings": summarise(results, args.arms)}
    write_json(args.json, result)
    write_text(args.md, markdown(result) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
