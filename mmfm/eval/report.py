"""Probe outputs: results.csv / bootstrap.csv, summary.md and PNG plots.

summary.md opens with one row per task × metric reading chance · baselines · model · oracle (`reference_table`,
also references.csv), then the paired differences model − baseline with 95% CIs and paired tests
(`paired_table`, also paired.csv), then one table per task. Roles come from embedding names
(mmfm.eval.references.role) unless given. Plots use matplotlib's object API (`Figure` + Agg canvas), so nothing
depends on a display or pyplot state.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sksurv.nonparametric import kaplan_meier_estimator

from mmfm.eval import stats
from mmfm.eval.drawing import draw
from mmfm.eval.references import REFERENCE_PREFIXES, ROLES, chance_level, role
from mmfm.io import atomic_path, write_text

GROUP = ["task", "type", "target", "embedding", "model", "shots", "metric"]
ROW = ["task", "type", "target", "model", "shots", "metric"]  # one comparison row: every embedding side by side
BOOKKEEPING = {"C", "alpha", "n_test", "n_train", "n_classes", "standardized", "n_queries", "epoch", "n_targets"}  # results.csv only
COSTS = ("wall_s",)  # seconds per fold (fit + predict): shown in the tables, never paired
PRIMARY = {"classification": ("auroc",), "mutation": ("auroc",), "fewshot": ("bacc",), "survival": ("c_index",),
           "retrieval": ("recall@5", "top5_acc"), "robustness": None, "zeroshot": ("auroc",),
           "regression": ("pearson_mean",), "spots": ("pearson_mean",)}  # headline metrics
TABLE_METRICS = {  # metrics of the reference and paired tables (globs)
    "classification": ("auroc", "bacc", "wall_s"), "mutation": ("auroc", "wall_s"), "fewshot": ("bacc",),
    "survival": ("c_index", "uno_c", "wall_s"),
    "retrieval": ("recall@1", "recall@5", "top1_acc", "top5_acc"), "robustness": ("robustness_index@*",),
    "zeroshot": ("auroc", "bacc"), "regression": ("pearson_mean", "pearson_median", "n_significant", "wall_s"),
    "spots": ("pearson_mean", "pearson_median", "r2_mean", "wall_s")}
CONVENTIONS = (
    "Several folds: mean ± SE over folds, SE = sample SD (ddof=1) / √k (few-shot: over folds × draws). One fold: "
    "bootstrap mean [2.5%, 97.5%] over resampled test cases. Robustness: point estimate [2.5%, 97.5%] over "
    "resampled query rows. The pooled log-rank p is a single value. Chance: AUROC / C-index / td-AUC 0.5, "
    "balanced accuracy 1/K, kappa 0; regression `chance_*` = the same model fitted on training targets shuffled "
    "against the features (permutation null), scored on the same test fold; retrieval `chance_*` = expected value of a random ranking; robustness "
    "`chance_*` = a random ranking and `site_only_*` = same-site neighbours first, on the same query rows. "
    "Paired differences (model − baseline) use the same folds: mean [95% t-interval] with SE = SD of the k fold "
    "differences / √k and the paired t-test p; folds share training cases, which makes that test anti-conservative, "
    "so `p (NB)` is the Nadeau–Bengio corrected resampled t-test (variance × (1 + k·n_test/n_train)). One fold: the "
    "same bootstrap resamples for both embeddings, percentile interval of the difference, two-sided bootstrap p "
    "(2·(min(#Δ≤0, #Δ≥0)+1)/(B+1)). "
    "Embeddings are paired only when their test sets have the same size (the same cases).")


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


def _in_table(kind: str, metric: str) -> bool:
    return any(fnmatch.fnmatchcase(metric, pat) for pat in TABLE_METRICS.get(kind, ()))


def _row_label(metric: str, model, shots) -> str:
    return metric + (f" ({model})" if model else "") + (f", {int(shots)}-shot" if shots != "" else "")


def _ordered(embeddings, roles) -> list[str]:
    """Embeddings in first-appearance order within the role order baseline → model → oracle."""
    return sorted(dict.fromkeys(embeddings), key=lambda e: ROLES.index(role(e, roles)))


def _chance_text(summary: pd.DataFrame, row: tuple, embeddings: list[str], n_classes) -> str:
    task, _, target, model, shots, metric = row
    at = summary[(summary.task == task) & (summary.target == target) & (summary.model == model)
                 & (summary.shots == shots) & summary.embedding.isin(embeddings)]
    parts = []
    for prefix, label in zip(REFERENCE_PREFIXES, ("", "site-only ")):
        v = at[at.metric == prefix + metric]["mean"].to_numpy(float)
        v = v[np.isfinite(v)]
        if v.size:
            parts.append(label + (f"{v.min():.3f}" if np.ptp(v) < 5e-4 else f"{v.min():.3f}–{v.max():.3f}"))
    if not parts:
        c = chance_level(metric, n_classes)
        parts.append(f"{c:.3f}" if np.isfinite(c) else "—")
    return " · ".join(parts)


def reference_table(summary: pd.DataFrame, results: pd.DataFrame, roles: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per task × target × metric (× Cox model, × shots): chance · baselines · models · oracle.

    Cells are the summary text (mean ± SE or mean [CI]); columns are `<role>: <embedding>` ('—' = not probed).
    Chance comes from the probe's `chance_`/`site_only_` results on the same rows where it depends on them.
    """
    s = summary[[_in_table(t, m) for t, m in zip(summary.type, summary.metric)]]
    if s.empty:
        return pd.DataFrame()
    order = _ordered(s.embedding, roles)
    cols = {e: e if role(e, roles) == "oracle" else f"{role(e, roles)}: {e}" for e in order}
    n_classes = results[results.metric == "n_classes"].groupby(["task", "target"]).value.first()
    rows = []
    for key, g in s.groupby(ROW, sort=False):
        task, _, target, model, shots, metric = key
        row = {"task": task, "target": target, "metric": _row_label(metric, model, shots),
               "chance": _chance_text(summary, key, list(g.embedding), n_classes.get((task, target)))}
        row.update({cols[e]: t for e, t in zip(g.embedding, g.text)})
        rows.append(row)
    return pd.DataFrame(rows, columns=["task", "target", "metric", "chance", *cols.values()]).fillna("—")


def _fold_values(g: pd.DataFrame, emb: str) -> pd.Series:
    """Per-fold values of one embedding (few-shot: mean over the draws of a fold)."""
    v = g[g.embedding == emb]
    return v.groupby("fold").value.mean()


SIZE_KEY = ["task", "target", "model", "embedding"]


def _size_book(results: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """(task, target, model, embedding) → fold × {n_test, n_train}, pivoted once (per pair it cost ~10 ms each)."""
    book = results[results.metric.isin(["n_test", "n_train"])]
    if book.empty:
        return {}
    wide = book.pivot_table(index=[*SIZE_KEY, "fold"], columns="metric", values="value", aggfunc="first")
    return {k: g.droplevel(SIZE_KEY).dropna(axis=1, how="all") for k, g in wide.groupby(level=SIZE_KEY, sort=False)}


def _test_sizes(book: dict[tuple, pd.DataFrame], key: tuple, emb: str) -> pd.DataFrame:
    task, _, target, model, _, _ = key
    return book.get((task, target, model, emb), pd.DataFrame(index=pd.Index([], name="fold")))


def paired_table(results: pd.DataFrame, boot: pd.DataFrame, roles: dict[str, str] | None = None) -> pd.DataFrame:
    """Model − baseline differences per task × target × metric on the same folds (or the same bootstrap resamples).

    Folds: stats.paired over the fold values (mean over draws for few-shot), with the Nadeau–Bengio correction from
    the recorded n_test/n_train. One fold / robustness: stats.paired_bootstrap over index-aligned resamples.
    Pairs whose recorded test sizes differ (different cases) are listed with method 'not paired'. Supervised rows
    (`mil:*`, trained on the labels) are paired against each model embedding (the pretrained linear probe).
    """
    res = results[[_in_table(t, m) and m not in COSTS for t, m in zip(results.type, results.metric)]]
    book = _size_book(results)
    rows = []
    for key, g in res.groupby(ROW, sort=False):
        embs = list(dict.fromkeys(g.embedding))
        of = {r: [e for e in embs if role(e, roles) == r] for r in ("baseline", "model", "supervised")}
        for m, b in [*product(of["model"], of["baseline"]), *product(of["supervised"], of["model"])]:
            sm, sb = _test_sizes(book, key, m), _test_sizes(book, key, b)
            common = sm.index.intersection(sb.index)  # a fold whose fit failed on one side is simply left out
            if "n_test" in sm and "n_test" in sb and (sm.loc[common, "n_test"] != sb.loc[common, "n_test"]).any():
                est = stats.Paired(*[float("nan")] * 5, n=0, method="not paired (different test cases)")
            elif g[g.embedding == m].fold.isin(["pooled", "all"]).any() or g[g.embedding == m].fold.nunique() == 1:
                bk = boot[(boot.task == key[0]) & (boot.target == key[2]) & (boot.model == key[3])
                          & (boot.shots == key[4]) & (boot.metric == key[5])]
                a, c = (bk[bk.embedding == e].set_index("boot").value for e in (m, b))
                a, c = a.align(c, join="inner")
                est = stats.paired_bootstrap(a, c)
            else:
                a, c = _fold_values(g, m).align(_fold_values(g, b), join="inner")
                ratio = (sm["n_test"] / sm["n_train"]).mean() if {"n_test", "n_train"} <= set(sm) else None
                est = stats.paired(a, c, test_train_ratio=ratio)
            rows.append({"task": key[0], "type": key[1], "target": key[2], "model": key[3], "shots": key[4],
                         "metric": key[5], "embedding": m, "baseline": b, "mean": est.mean, "se": est.se,
                         "lo": est.lo, "hi": est.hi, "p": est.p, "p_corrected": est.p_corrected, "n": est.n,
                         "method": est.method, "text": est.format()})
    return pd.DataFrame(rows, columns=["task", "type", "target", "model", "shots", "metric", "embedding", "baseline",
                                       "mean", "se", "lo", "hi", "p", "p_corrected", "n", "method", "text"])


def _paired_markdown(paired: pd.DataFrame) -> pd.DataFrame:
    def p(v):
        return "—" if not np.isfinite(v) else f"{v:.3g}"

    return pd.DataFrame({
        "task": paired.task, "target": paired.target,
        "metric": [_row_label(m, mo, sh) for m, mo, sh in zip(paired.metric, paired.model, paired.shots)],
        "model − baseline": paired.embedding + " − " + paired.baseline, "Δ [95% CI]": paired.text,
        "SE": [p(v) for v in paired.se], "p": [p(v) for v in paired.p], "p (NB)": [p(v) for v in paired.p_corrected],
        "k": paired.n, "method": paired.method})


OVERLAP_WARNINGS = {  # what → (heading, why the numbers are not clean held-out estimates)
    "pretraining": ("test cases were seen in pretraining",
                    "These numbers are NOT held-out estimates (run with --allow_overlap):"),
    "validation": ("test cases were validation cases of the run",
                   ("They chose the checkpoint (held-out evaluation during pretraining, --step best), so these "
                    "numbers are optimistically selected (run with --allow_validation_overlap):")),
}


def summary_markdown(summary: pd.DataFrame, results: pd.DataFrame, notes: list[str],
                     overlap: dict[str, list[str]], *, validation_overlap: dict[str, list[str]] | None = None,
                     references: pd.DataFrame | None = None, paired: pd.DataFrame | None = None) -> str:
    out = ["# Probe summary", ""]
    for what, cases in (("pretraining", overlap), ("validation", validation_overlap or {})):
        if cases:
            heading, why = OVERLAP_WARNINGS[what]
            out += [f"## WARNING: {heading}", "", why, ""]
            out += [f"- `{t}`: {len(c)} case(s): {', '.join(c[:10])}{' …' if len(c) > 10 else ''}"
                    for t, c in cases.items()]
            out.append("")
    out += [CONVENTIONS, ""]
    if references is not None and len(references):
        out += ["## Chance · baselines · model · oracle", "", markdown_table(references), ""]
    if paired is not None and len(paired):
        out += ["## Paired differences: model − baseline", "", markdown_table(_paired_markdown(paired)), ""]
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
        if np.isfinite(chance_level(metric)):
            ax.axvline(chance_level(metric), color="grey", linestyle="--", linewidth=1)
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
                  overlap: dict[str, list[str]], survival_preds: dict, robustness_curves: dict, plots: bool,
                  roles: dict[str, str] | None = None, validation_overlap: dict[str, list[str]] | None = None,
                  per_target: pd.DataFrame | None = None) -> None:
    references, paired = reference_table(summary, results, roles), paired_table(results, boot, roles)
    if per_target is not None and len(per_target):
        with atomic_path(out / "per_target.csv", suffix=".csv") as tmp:
            per_target.to_csv(tmp, index=False)
    for name, df in (("results.csv", results), ("bootstrap.csv", boot), ("summary.csv", summary),
                     ("references.csv", references), ("paired.csv", paired)):
        with atomic_path(out / name, suffix=".csv") as tmp:
            df.to_csv(tmp, index=False)
    write_text(out / "summary.md", summary_markdown(summary, results, notes, overlap,
                                                    validation_overlap=validation_overlap, references=references,
                                                    paired=paired))
    if plots:
        draw_figures(None, out, summary, results, survival_preds, robustness_curves, per_target, roles)


def draw_figures(drawer, out: Path, summary: pd.DataFrame, results: pd.DataFrame, survival_preds: dict,
                 robustness_curves: dict, per_target: pd.DataFrame | None, roles: dict[str, str] | None = None) -> None:
    """The figures of these tasks' tables (primary metric per task, Kaplan–Meier per survival model, RI curves,
    per-target r), drawn by `drawer` (`mmfm.eval.drawing`; None: here)."""
    for task, s in summary.groupby("task", sort=False):
        draw(drawer, plot_task, s, out / f"{slug(task)}.png")
    for (task, emb, model), pred in survival_preds.items():
        p = results[(results.task == task) & (results.embedding == emb) & (results.model == model)
                    & (results.metric == "logrank_p")].value
        draw(drawer, plot_km, pred, float(p.iloc[0]) if len(p) else float("nan"),
             out / f"km_{slug(task, emb, model)}.png", f"{task}: {emb} ({model})")
    by_task: dict[str, dict] = {}
    for (task, emb), c in robustness_curves.items():
        by_task.setdefault(task, {})[emb] = c
    for task, curves in by_task.items():
        draw(drawer, plot_robustness, curves, out / f"{slug(task)}_ri.png", task)
    for task, g in (per_target.groupby("task", sort=False) if per_target is not None and len(per_target) else ()):
        draw(drawer, plot_per_target, g, out / f"{slug(task)}_per_target.png", task, roles)


def per_target_r(per_target: pd.DataFrame, model: str, baseline: str) -> pd.DataFrame:
    """Per target: mean Pearson r over the folds that chose it, of `model` and `baseline` (targets both have)."""
    r = per_target.groupby(["embedding", "target"], sort=False).pearson.mean().unstack(0)
    return r[[model, baseline]].dropna()


def plot_per_target(per_target: pd.DataFrame, path: Path, title: str, roles: dict[str, str] | None = None) -> bool:
    """Scatter of per-target r: the first model embedding against the mean-pool baseline (else the first one)."""
    embs = list(dict.fromkeys(per_target.embedding))
    models = [e for e in embs if role(e, roles) == "model"]
    bases = [e for e in embs if role(e, roles) == "baseline"]
    bases = [e for e in bases if e.endswith("meanpool")] or bases
    if not models or not bases:
        return False
    r = per_target_r(per_target, models[0], bases[0])
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.scatter(r[bases[0]], r[models[0]], s=10)
    lo, hi = min(r.min().min(), 0.0) - 0.05, max(r.max().max(), 0.0) + 0.05
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel=f"{bases[0]}: Pearson r", ylabel=f"{models[0]}: Pearson r")
    above = int((r[models[0]] > r[bases[0]]).sum())
    ax.set_title(f"{title}: {len(r)} targets, {above} above the diagonal\nmean r {r[models[0]].mean():.3f} vs "
                 f"{r[bases[0]].mean():.3f}", fontsize=9)
    _save(fig, path)
    return True


HEADLINE = {  # (task type, metric) → column label of the printed table
    ("survival", "c_index"): "C-index",
    ("classification", "auroc"): "AUROC",
    ("mutation", "auroc"): "AUROC",
    ("zeroshot", "auroc"): "AUROC",
    ("retrieval", "recall@5"): "recall@5",
    ("robustness", "robustness_index@10"): "RI@10",
    ("regression", "pearson_mean"): "mean r",
    ("regression", "n_significant"): "# significant (BH 5%)",
    ("spots", "pearson_mean"): "mean r (spots)",
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


CAPTIONS = (  # (file-name pattern, caption) for the report's plots, most specific first
    (r"^training_curves\.png$", ("pretraining loss per pair, and recall@5 on the validation cases during training "
                                  "— at most `data.eval_max_cases` of them, a fixed tile sample per slide, never "
                                  "the probes' held-out cases")),
    (r"^km_(.+)\.png$", "Kaplan–Meier curves of the predicted high- vs low-risk halves (pooled test folds), "
     "log-rank p — {0}"),
    (r"^(.+)_ri\.png$", "robustness index against k (neighbours sharing biology rather than site) — {0}"),
    (r"^(.+)_projection\.png$", "2-D projection of the embedding coloured by biology and by site — {0}"),
    (r"^(.+)_per_target\.png$", "Pearson r per target (mean over the folds that chose it), pretrained against "
     "mean-pool; above the diagonal = better predicted by the pretrained embedding — {0}"),
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
