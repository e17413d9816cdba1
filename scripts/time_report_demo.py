"""What adding report text costs the demo, and what it gives: configs/demo.yaml vs configs/demo_report.yaml.

    python scripts/time_report_demo.py --out out/report_demo [--cases 500] [--steps 300]

Simulates the demo cohort once, fills the report cache (timed cold, then warm), pretrains both recipes (wall and
CPU seconds, median step time), then for the report run embeds the held-out cases, runs
configs/tasks/demo_report.yaml (linear probes, retrieval, zero-shot) and draws heatmaps for two held-out slides.
Writes OUT/timing.json and OUT/report.md. CPU seconds are quoted beside wall seconds because a shared machine
inflates wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "mmfm" / "configs"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Clock:
    def __init__(self):
        self.times: dict[str, dict] = {}

    def __call__(self, name: str, fn, *a, **kw):
        w, c = time.perf_counter(), cpu()
        out = fn(*a, **kw)
        self.times[name] = {"wall_s": round(time.perf_counter() - w, 1), "cpu_s": round(cpu() - c, 1)}
        print(f"[timing] {name}: {self.times[name]}", flush=True)
        return out


def median_step(run_dir: Path) -> float:
    from mmfm.train.monitor import read_jsonl

    rows = [r["step_time_s"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 1 and "step_time_s" in r]
    return round(statistics.median(rows), 4)


def main(out: Path, cases: int, steps: int) -> dict:
    import pandas as pd

    from mmfm.bridges.heatmap_render import HeatmapConfig, heatmap
    from mmfm.data.cohort import Cohort
    from mmfm.data.report_cache import resolve_folder
    from mmfm.simulate import SimConfig, simulate_cohort
    from mmfm.eval.embed import embed
    from mmfm.eval.probe import probe
    from mmfm.eval.report import markdown_table
    from mmfm.eval.tasks import load_tasks
    from mmfm.simulate.truth import join_truth
    from mmfm.io import write_json, write_text
    from mmfm.models.text_cache import fill_report_cache
    from mmfm.train import load_config, pretrain

    clock = Clock()
    cohort_dir = clock("simulate", simulate_cohort, out / "cohort", SimConfig(n_cases=cases, seed=0))
    cohort = Cohort.open(cohort_dir)
    runs = {}
    for name in ("demo", "demo_report"):
        cfg = load_config(CONFIGS / f"{name}.yaml", [f"data.cohort={cohort_dir}", f"train.steps={steps}",
                                                                "train.progress=false"])
        if name == "demo_report":
            folder = resolve_folder(cohort_dir, cfg.loader.report_cache)
            shutil.rmtree(folder, ignore_errors=True)
            cold = clock("report cache (cold)", fill_report_cache, cohort, cfg.model.report, folder,
                         cfg.loader.report_max_len)
            clock("report cache (warm)", fill_report_cache, cohort, cfg.model.report, folder, cfg.loader.report_max_len)
            clock.times["report cache (cold)"]["n_reports"] = cold.n_reports
        run_dir = out / f"run_{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        clock(f"pretrain {name}", pretrain, cfg, run_dir)
        clock.times[f"pretrain {name}"]["median_step_s"] = median_step(run_dir)
        runs[name] = run_dir

    run_dir = runs["demo_report"]
    held = json.loads((run_dir / "splits.json").read_text())["heldout"]
    cases_ad, _ = clock("embed (held-out)", embed, run_dir, cohort_dir, out / "embeddings.h5ad", case_ids=held)
    cases_ad = join_truth(cases_ad, cohort_dir)
    tasks = load_tasks(CONFIGS / "tasks" / "demo_report.yaml")
    clock("zero-shot tasks alone", probe, cases_ad, [t for t in tasks if t.type == "zeroshot"],
          out / "probe_zeroshot", plots=False)  # what they add, text tower load included
    summary = clock("probe (every task)", probe, cases_ad, tasks, out / "probe").summary
    pres = cohort.presence()
    usable = cohort.slides[cohort.slides.case_id.isin([c for c in held if pres.loc[c, "rna"] and pres.loc[c, "report"]])
                           & (cohort.slides.n_tiles > 0)]
    slides = usable.groupby("case_id").head(1).index[:2]  # two held-out cases, one slide each
    for s in slides:
        clock(f"heatmap {s}", heatmap, HeatmapConfig(run=str(run_dir), cohort=str(cohort_dir), slide=s,
                                                     out=str(out / "heatmaps"),
                                                     queries=("rna", "report", "Tumour necrosis is present.")))
    keep = summary.metric.isin(["auroc", "bacc", "recall@1", "recall@5", "chance_recall@5", "c_index"])
    table = summary[keep][["task", "embedding", "model", "metric", "text"]]
    text = ["# Report demo: timing and results", "", f"{cases} simulated cases, {steps} steps.", "",
            markdown_table(pd.DataFrame([{"step": k, **v} for k, v in clock.times.items()]).fillna("")), "",
            markdown_table(table)]
    write_text(out / "report.md", "\n".join(text) + "\n")
    write_json(out / "timing.json", clock.times)
    print("\n".join(text))
    return clock.times


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/report_demo"))
    p.add_argument("--cases", type=int, default=500)
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    main(a.out, a.cases, a.steps)
