"""Probe outputs: results.csv / bootstrap.csv, summary.md (one table per task, baselines as rows) and PNG plots.

Plots use matplotlib's object API (`Figure` + Agg canvas), so nothing depends on a display or pyplot state.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sksurv.nonparametric import kaplan_meier_estimator

from mmfm.eval import stats
from mmfm.io import atomic_path, write_text

GROUP = ["task", "type", "target", "embedding", "model", "shots", "metric"]
BOOKKEEPING = {"C", "alpha", "n_test", "n_queries"}  # in results.csv, not in the summary tables
PRIMARY = {"classification": ("auroc",), "mutation": ("auroc",), "fewshot": ("bacc",), "survival": ("c_index",),
           "retrieval": ("recall@5", "top5_acc"), "robustness": None, "zeroshot": ("auroc",)}  # headline metrics
CHANCE = {"auroc": 0.5, "c_index": 0.5}


def slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(p for p in parts if p)).strip("_")


def summarize(results: pd.DataFrame, boot: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, target, embedding, model, shots, metric).

    Bootstrapped single-fold groups → bootstrap mean and 95% percentile CI (Patho-Bench); robustness → the point
    estimate with the percentile CI of query-row resamples (PathoROB); otherwise mean ± SE over the fold rows (for
    few-shot, over folds × draws); 'pooled' rows (log-rank p) are shown as is.
    """
    res = results[~results.metric.isin(BOOKKEEPING)]
    booted = {k: g.value.to_numpy() for k, g in boot.groupby(GROUP, sort=False)} if len(boot) else {}
    rows = []
    for k, g in res.groupby(GROUP, sort=False):
        if k in booted and (g.fold == "all").all():  # robustness: PathoROB reports the point estimate, CI beside
            ci = stats.percentile_ci(booted[k])
            est = stats.Estimate(float(g.value.iloc[0]), lo=ci.lo, hi=ci.hi, n=ci.n)
        elif k in booted:
            est = stats.percentile_ci(booted[k])
        elif g.fold.isin(["pooled", "all"]).all():
            est = stats.Estimate(float(g.value.iloc[0]), n=1)
        else:
            est = stats.mean_se(g.value)
        text = f"{est.mean:.3g}" if k[-1].endswith("_p") and np.isfinite(est.mean) else est.format()
        nan = float("nan")
        rows.append({**dict(zip(GROUP, k)), "mean": est.mean, "se": nan if est.se is None else est.se,
                     "lo": nan if est.lo is None else est.lo, "hi": nan if est.hi is None else est.hi,
                     "n": est.n, "text": text})
    return pd.DataFrame(rows, columns=GROUP + ["mean", "se", "lo", "hi", "n", "text"])


def markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def task_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows = (target, embedding, model, shots) — model embeddings and baselines side by side; columns = metrics."""
    rows = ["target", "embedding", "model", "shots"]
    wide = summary.pivot_table(index=rows, columns="metric", values="text", aggfunc="first", sort=False)
    wide = wide[[m for m in dict.fromkeys(summary.metric) if m in wide.columns]].reset_index()
    keep = [c for c in rows if (wide[c].astype(str) != "").any()]
    return wide[keep + [c for c in wide.columns if c not in rows]].fillna("N/A")


def summary_markdown(summary: pd.DataFrame, results: pd.DataFrame, notes: list[str],
                     overlap: dict[str, list[str]]) -> str:
    out = ["# Probe summary", ""]
    if overlap:
        out += ["## WARNING: test cases were seen in pretraining", "",
                "These numbers are NOT held-out estimates (run with --allow-overlap):", ""]
        out += [f"- `{t}`: {len(c)} case(s): {', '.join(c[:10])}{' …' if len(c) > 10 else ''}"
                for t, c in overlap.items()]
        out.append("")
    out += ["Several folds: mean ± SE over folds (SE = std(ddof=0)/√n; few-shot: over folds × draws). One fold: "
            "bootstrap mean [2.5%, 97.5%] over resampled test cases. Robustness: point estimate [2.5%, 97.5%] over "
            "resampled query rows. "
            "The pooled log-rank p is a single value. Retrieval `chance_*` columns are the expected value under a "
            "random ranking.", ""]
    for task, s in summary.groupby("task", sort=False):
        folds = sorted(set(results.fold[results.task == task]) - {"pooled", "all"})
        out += [f"## {task} ({s.type.iloc[0]}, {f'{len(folds)} fold(s)' if folds else 'all rows'})", ""]
        # rows measured with different metric sets (cross-modal vs same-label retrieval) get separate tables
        metric_set = s.groupby(["target", "embedding", "model", "shots"], sort=False).metric.transform(
            lambda m: ",".join(m))
        for _, part in s.groupby(metric_set, sort=False):
            out += [markdown_table(task_table(part)), ""]
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def plot_task(summary: pd.DataFrame, path: Path) -> bool:
    """Primary metric per embedding (error bars = SE or CI); few-shot: metric against shots."""
    kind = summary.type.iloc[0]
    metrics = PRIMARY.get(kind) or (summary.metric.iloc[0],)  # a type not listed: its first metric
    s = summary[summary.metric.isin(metrics)]
    metric = " / ".join(m for m in metrics if m in set(s.metric))
    if s.empty:
        return False
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    if kind == "fewshot":
        for (target, emb), g in s.groupby(["target", "embedding"], sort=False):
            g = g.sort_values("shots")
            ax.errorbar(g.shots.astype(int), g["mean"], yerr=g.se.fillna(0), marker="o", capsize=3, label=emb)
        ax.set_xscale("log", base=2)
        ticks = sorted(set(s.shots.astype(int)))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("cases per class")
        ax.legend(fontsize=7)
    else:
        labels = [" / ".join(str(v) for v in (t, e, m) if v) for t, e, m in zip(s.target, s.embedding, s.model)]
        # a bootstrap mean may sit just outside its percentile interval (a few degenerate resamples): no whisker
        lo = np.maximum(np.where(s.lo.notna(), s["mean"] - s.lo, s.se.fillna(0)), 0.0)
        hi = np.maximum(np.where(s.hi.notna(), s.hi - s["mean"], s.se.fillna(0)), 0.0)
        ax.barh(np.arange(len(s)), s["mean"], xerr=[lo, hi], capsize=3)
        ax.set_yticks(np.arange(len(s)), labels, fontsize=7)
        ax.set_xlabel(metric)
        if metric in CHANCE:
            ax.axvline(CHANCE[metric], color="grey", linestyle="--", linewidth=1)
        chance = summary.set_index(["target", "embedding", "model", "metric"])["mean"]
        marks = [chance.get((t, e, m, f"chance_{x}"), np.nan)
                 for t, e, m, x in zip(s.target, s.embedding, s.model, s.metric)]
        if np.isfinite(marks).any():  # retrieval: expected value of a random ranking
            ax.plot(marks, np.arange(len(s)), "|", color="crimson", markersize=18, mew=2, label="chance")
            ax.legend(fontsize=7)
    ax.set_title(f"{summary.task.iloc[0]}: {metric}")
    _save(fig, path)
    return True


def plot_km(pred: pd.DataFrame, p_value: float, path: Path, title: str) -> None:
    """Kaplan–Meier curves of pooled test cases split at each fold's median TRAINING risk."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for high, name in ((False, "low risk"), (True, "high risk")):
        g = pred[pred.high_risk == high]
        if len(g):
            t, surv = kaplan_meier_estimator(g.event.astype(bool).to_numpy(), g.time.to_numpy(float))
            ax.step(np.r_[0, t], np.r_[1, surv], where="post", label=f"{name} (n={len(g)})")
    ax.set_xlabel("time (days)")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title}\nlog-rank p = {p_value:.3g}", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_robustness(curves: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for emb, c in curves.items():
        ax.plot(c.index, c.robustness_index, marker="o", label=emb)
    ax.set_xlabel("k (neighbours)")
    ax.set_ylabel("robustness index")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_embedding(x: np.ndarray, bio, site, path: Path, *, title: str, method: str = "umap", seed: int = 0) -> None:
    """2-D projection (UMAP or PCA) coloured by site and by biology, side by side."""
    from mmfm.metrics import l2_normalize

    x = l2_normalize(x)
    if method == "umap":
        import umap

        with warnings.catch_warnings():  # umap warns that a seed forces one thread: that is the point
            warnings.simplefilter("ignore", UserWarning)
            xy = umap.UMAP(n_neighbors=min(15, len(x) - 1), metric="cosine", random_state=seed).fit_transform(x)
    elif method == "pca":
        xc = x - x.mean(0)
        xy = xc @ np.linalg.svd(xc, full_matrices=False)[2][:2].T
    else:
        raise ValueError(f"unknown projection {method!r}; expected 'umap' or 'pca'")
    fig = Figure(figsize=(10, 4.5))
    for i, (values, name) in enumerate(((site, "site"), (bio, "biology"))):
        ax = fig.add_subplot(1, 2, i + 1)
        values = np.asarray(values).astype(str)
        for v in np.unique(values):
            m = values == v
            ax.scatter(xy[m, 0], xy[m, 1], s=8, label=v)
        ax.set_title(f"coloured by {name}")
        ax.set_xticks([])
        ax.set_yticks([])
        if len(np.unique(values)) <= 12:
            ax.legend(fontsize=6, markerscale=1.5)
    fig.suptitle(f"{title} ({method})")
    _save(fig, path)


def write_outputs(out: Path, results: pd.DataFrame, boot: pd.DataFrame, summary: pd.DataFrame, *, notes: list[str],
                  overlap: dict[str, list[str]], survival_preds: dict, robustness_curves: dict, plots: bool) -> None:
    for name, df in (("results.csv", results), ("bootstrap.csv", boot), ("summary.csv", summary)):
        with atomic_path(out / name, suffix=".csv") as tmp:
            df.to_csv(tmp, index=False)
    write_text(out / "summary.md", summary_markdown(summary, results, notes, overlap))
    if not plots:
        return
    for task, s in summary.groupby("task", sort=False):
        plot_task(s, out / f"{slug(task)}.png")
    for (task, emb, model), pred in survival_preds.items():
        p = results[(results.task == task) & (results.embedding == emb) & (results.model == model)
                    & (results.metric == "logrank_p")].value
        plot_km(pred, float(p.iloc[0]) if len(p) else float("nan"), out / f"km_{slug(task, emb, model)}.png",
                f"{task}: {emb} ({model})")
    by_task: dict[str, dict] = {}
    for (task, emb), c in robustness_curves.items():
        by_task.setdefault(task, {})[emb] = c
    for task, curves in by_task.items():
        plot_robustness(curves, out / f"{slug(task)}_ri.png", task)


HEADLINE = {  # (task type, metric) → column label of the printed table
    ("survival", "c_index"): "C-index",
    ("classification", "auroc"): "AUROC",
    ("mutation", "auroc"): "AUROC",
    ("zeroshot", "auroc"): "AUROC",
    ("retrieval", "recall@5"): "recall@5",
    ("robustness", "robustness_index@10"): "RI@10",
}


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
    """The expected recall@5 of a random ranking for each retrieval row: a constant, so no interval."""
    s = summary[summary["metric"] == "chance_recall@5"]
    return pd.DataFrame({"task": s["task"], "pair": s["embedding"],
                         "chance recall@5": s["mean"].map(lambda v: f"{v:.3f}")})


CAPTIONS = (  # (file-name pattern, caption) for the report's plots, most specific first
    (r"^training_curves\.png$", "pretraining loss per pair, and held-out recall@5 during training — on at most "
     "`data.eval_max_cases` held-out cases with a fixed tile sample per slide, so not the table's numbers"),
    (r"^km_(.+)\.png$", "Kaplan–Meier curves of the predicted high- vs low-risk halves (pooled test folds), "
     "log-rank p — {0}"),
    (r"^(.+)_ri\.png$", "robustness index against k (neighbours sharing biology rather than site) — {0}"),
    (r"^(.+)_projection\.png$", "2-D projection of the embedding coloured by biology and by site — {0}"),
    (r"^(.+)\.png$", "headline metric per embedding (bar = mean; whisker = SE over folds or 95% CI; "
     "dashed line = chance) — {0}"),
)


def plot_captions(folder: Path) -> list[tuple[str, str]]:
    """(file name, one-line caption) for every PNG in the report folder."""
    out = []
    for png in sorted(Path(folder).glob("*.png")):
        for pattern, caption in CAPTIONS:
            m = re.match(pattern, png.name)
            if m:
                out.append((png.name, caption.format(*m.groups())))
                break
    return out


def reading_notes(summary: pd.DataFrame) -> list[str]:
    """What a reader would otherwise misread: metrics below chance."""
    s = summary[summary["metric"].isin(["auroc", "c_index"]) & (summary["mean"] < 0.5)]
    return [f"{r.task} · {r.embedding}{' · ' + str(r.target) if str(r.target) else ''}: {r.metric} "
            f"{r['mean']:.3f} is below chance (0.5) — with this few test cases, noise around chance, not an "
            f"inverted signal" for _, r in s.iterrows()]
