"""Case encoder vs mean late fusion on multi-slide cases of a simulated cohort (held-out cases only).

    python scripts/compare_case_encoder.py --out out/case_cmp --json out/case_cmp.json \
        [--cases 300 --multi-slide-rate 0.5 --steps 300 --seed 0]

Simulates one cohort, pretrains demo.yaml (slides fused by their mean) and demo_case_encoder.yaml (mmfm/configs/)
(a learned case encoder) on the same training cases with the same seed, embeds the held-out cases with each,
and compares three case-level slide embeddings:
  mean_fusion       demo.yaml run: mean of the slide embeddings (the baseline, mmfm's default)
  case_encoder      demo_case_encoder.yaml run: its case encoder over all slides of the case
  case_run_mean     the same case-encoder run, but the mean of its one-slide embeddings (is the aggregator
                    doing better than averaging the slides of the same encoder?)
Metrics, on all held-out cases and on the multi-slide ones: slide → RNA retrieval recall@k among the held-out
cases (the training objective's own task; gallery = every held-out case with RNA), and a 5-fold linear probe of
the true subtype (truth/cases.csv; macro AUROC, balanced accuracy of out-of-fold predictions). Differences
against mean_fusion are paired (same queries) with 95 % bootstrap intervals over cases. Writes the result as
JSON (--json, default OUT/compare_case_encoder.json) and a markdown table beside it. Work files (cohort, runs,
embeddings) stay in --out and are reused when the script runs again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from mmfm.io import write_json, write_text
from mmfm.metrics import KS, ranked_hits, similarity

RECIPES = Path(__file__).resolve().parents[1] / "mmfm" / "configs"


def _train(cohort: Path, recipe: str, out: Path, steps: int, extra: list[str]) -> Path:
    from mmfm.train.config import load_config
    from mmfm.train.loop import pretrain

    if (out / "checkpoints" / str(steps)).exists():
        return out
    cfg = load_config(RECIPES / recipe, [f"data.cohort={cohort}", f"train.steps={steps}",
                                                  "train.progress=false", *extra])
    pretrain(cfg, out, resume=(out / "checkpoints").exists())
    return out


def _retrieval_hits(z: np.ndarray, rna: np.ndarray) -> np.ndarray:
    """[n, len(KS)] bool: is case i's own RNA among the top k of its slide query (cosine; ties count against)."""
    top = ranked_hits(similarity(z, rna), np.eye(len(z), dtype=bool), max(KS))
    return np.stack([top[:, :k].any(1) for k in KS], 1)


def _probe(z: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Out-of-fold class probabilities of a 5-fold logistic-regression probe."""
    from sklearn.model_selection import StratifiedKFold

    from mmfm.eval.probes.classification import fit_predict

    n_classes = int(y.max()) + 1
    proba = np.zeros((len(y), n_classes))
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(z, y):
        proba[te], _ = fit_predict(z[tr], y[tr], z[te], n_classes, C="auto", seed=seed)
    return proba


def _ci(values: np.ndarray) -> list[float]:
    v = values[np.isfinite(values)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v.size else [float("nan")] * 2


def compare(out: Path, n_cases: int, multi_rate: float, steps: int, seed: int, n_boot: int, extra: list[str]) -> dict:
    import anndata as ad

    from mmfm.simulate import SimConfig, simulate_cohort
    from mmfm.eval.probes.classification import metrics as cls_metrics
    from mmfm.eval.embed import EmbedConfig, embed

    cohort = simulate_cohort(out / "cohort", SimConfig(n_cases=n_cases, seed=seed, multi_slide_rate=multi_rate))
    runs = {"mean_fusion": _train(cohort, "demo.yaml", out / "run_mean", steps, [f"train.seed={seed}", *extra]),
            "case_encoder": _train(cohort, "demo_case_encoder.yaml", out / "run_case", steps,
                                   [f"train.seed={seed}", *extra])}
    held = json.loads((runs["mean_fusion"] / "splits.json").read_text())["heldout"]
    assert held == json.loads((runs["case_encoder"] / "splits.json").read_text())["heldout"]
    emb, slides_case_run = {}, None
    for name, run in runs.items():
        path = out / f"embed_{name}.h5ad"
        if not path.exists():
            embed(run, cohort, path, cfg=EmbedConfig(baselines=()), case_ids=held)
        cases = ad.read_h5ad(path)
        emb[name] = cases
        if name == "case_encoder":
            slides_case_run = ad.read_h5ad(path.with_suffix(".slides.h5ad"))
    base = emb["mean_fusion"]
    obs = base.obs
    keep = obs["has_slide"].to_numpy(bool) & obs["has_rna"].to_numpy(bool)
    ids = obs.index[keep]
    n_slides = obs.loc[ids, "n_slides"].to_numpy()
    per_slide = pd.DataFrame(slides_case_run.obsm["slide"], index=slides_case_run.obs["case_id"].astype(str))
    z = {"mean_fusion": base[ids].obsm["slide"], "case_encoder": emb["case_encoder"][ids].obsm["slide"],
         "case_run_mean": per_slide.groupby(level=0).mean().loc[ids].to_numpy(np.float32)}
    rna = {"mean_fusion": base[ids].obsm["rna"], "case_encoder": emb["case_encoder"][ids].obsm["rna"]}
    rna["case_run_mean"] = rna["case_encoder"]  # each run retrieves in its own shared space
    truth = pd.read_csv(cohort / "truth" / "cases.csv", index_col=0)
    truth.index = truth.index.astype(str)
    subtypes = sorted(truth["subtype"].unique())
    y = truth.loc[ids, "subtype"].map({s: i for i, s in enumerate(subtypes)}).to_numpy()

    hits = {k: _retrieval_hits(v, rna[k]) for k, v in z.items()}
    probas = {k: _probe(v, y, seed) for k, v in z.items()}
    rng = np.random.default_rng(seed)
    result = {"n_heldout_cases": len(ids), "n_multi_slide": int((n_slides > 1).sum()), "steps": steps,
              "cohort": {"n_cases": n_cases, "multi_slide_rate": multi_rate, "seed": seed}, "subsets": {}}
    for subset, rows in (("all", np.ones(len(ids), bool)), ("multi_slide", n_slides > 1),
                         ("single_slide", n_slides == 1)):
        idx = np.flatnonzero(rows)
        table = {}
        boots = rng.integers(0, len(idx), (n_boot, len(idx)))
        for name in z:
            row = {f"recall@{k}": float(hits[name][idx, j].mean()) for j, k in enumerate(KS)}
            m = cls_metrics(y[idx], probas[name][idx])
            row.update({"subtype_auroc": m["auroc"], "subtype_bacc": m["bacc"]})
            if name != "mean_fusion":
                d = hits[name][idx].astype(float) - hits["mean_fusion"][idx].astype(float)
                for j, k in enumerate(KS):
                    row[f"delta_recall@{k}"] = float(d[:, j].mean())
                    row[f"delta_recall@{k}_ci95"] = _ci(d[boots, j].mean(1))
                diffs = []
                for b in boots[: min(n_boot, 200)]:
                    try:
                        diffs.append(cls_metrics(y[idx][b], probas[name][idx][b])["auroc"]
                                     - cls_metrics(y[idx][b], probas["mean_fusion"][idx][b])["auroc"])
                    except ValueError:
                        diffs.append(np.nan)
                row["delta_subtype_auroc"] = row["subtype_auroc"] - table["mean_fusion"]["subtype_auroc"]
                row["delta_subtype_auroc_ci95"] = _ci(np.asarray(diffs, float))
            table[name] = row
        result["subsets"][subset] = {"n": len(idx), "chance_recall@5": 5 / len(ids), "table": table}
    return result


def markdown(result: dict) -> str:
    lines = [(f"Held-out cases with slide and RNA: {result['n_heldout_cases']} ({result['n_multi_slide']} "
              f"multi-slide); {result['steps']} steps per run; cohort {result['cohort']}."), ""]
    for subset, s in result["subsets"].items():
        lines += [f"**{subset}** (n={s['n']}, chance recall@5 = {s['chance_recall@5']:.3f})", "",
                  ("| embedding | recall@1 | recall@5 | recall@10 | Δrecall@5 vs mean [95% CI] | subtype AUROC | "
                   "ΔAUROC [95% CI] | subtype bAcc |"), "|---|---|---|---|---|---|---|---|"]
        for name, r in s["table"].items():
            d5 = (f"{r['delta_recall@5']:+.3f} [{r['delta_recall@5_ci95'][0]:+.3f}, {r['delta_recall@5_ci95'][1]:+.3f}]"
                  if "delta_recall@5" in r else "—")
            da = (f"{r['delta_subtype_auroc']:+.3f} [{r['delta_subtype_auroc_ci95'][0]:+.3f}, "
                  f"{r['delta_subtype_auroc_ci95'][1]:+.3f}]" if "delta_subtype_auroc" in r else "—")
            lines.append(f"| {name} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['recall@10']:.3f} | {d5} | "
                         f"{r['subtype_auroc']:.3f} | {da} | {r['subtype_bacc']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/case_cmp", help="work directory (cohort, runs, embeddings; reused)")
    p.add_argument("--json", default=None, help="result file (default: OUT/compare_case_encoder.json)")
    p.add_argument("--cases", type=int, default=300)
    p.add_argument("--multi-slide-rate", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--set", action="append", default=[], help="extra override for both runs, e.g. train.eval_every=0")
    a = p.parse_args()
    out = Path(a.out)
    result = compare(out, a.cases, a.multi_slide_rate, a.steps, a.seed, a.n_boot, a.set)
    path = Path(a.json) if a.json else out / "compare_case_encoder.json"
    write_json(path, result)
    text = markdown(result)
    write_text(path.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
