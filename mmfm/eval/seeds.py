"""Probe results of several pretraining seeds, read together: the spread across seeds and the paired comparison
of the pretrained embedding with each baseline.

One pretraining run is one draw of the method: fold CIs say how well the probe is estimated on *this* encoder,
not how much another seed would move it. With N seeds probed on the same held-out cases and the same folds, each
number becomes the mean over seeds ± the sample SD across seeds, and a model − baseline difference is tested with
the pretraining run as the unit: Δ_s = (model − baseline) of seed s, averaged over its folds (or its point estimate
for a single-fold task), then mean [95% t-interval] and the paired t-test over the N seeds (`stats.paired`). With
one seed there is no spread: the probe's own per-fold paired test stands (`report.paired_table`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mmfm.eval import stats
from mmfm.eval.report import GROUP

KEY = ["task", "type", "target", "model", "shots", "metric"]  # a comparison row; GROUP minus the embedding


def combine(summaries: list[pd.DataFrame]) -> pd.DataFrame:
    """One summary over seeds (rows present in every seed): `mean` = mean over seeds, `se` = SD across seeds
    (ddof=1), `n` = seeds, `text` = 'mean ± SD'. One seed: that seed's summary unchanged."""
    if len(summaries) == 1:
        return summaries[0]
    stacked = pd.concat([s.assign(_seed=i) for i, s in enumerate(summaries)], ignore_index=True)
    rows = []
    for key, g in stacked.groupby(GROUP, sort=False):
        v = g["mean"].to_numpy(float)
        if len(v) < len(summaries):  # probed in some seeds only (a fit that failed): not comparable
            continue
        sd = float(np.std(v, ddof=1))
        rows.append({**dict(zip(GROUP, key)), "mean": float(v.mean()), "se": sd, "lo": float(v.min()),
                     "hi": float(v.max()), "n": len(v), "text": f"{v.mean():.3f} ± {sd:.3f}"})
    return pd.DataFrame(rows, columns=list(summaries[0].columns))


def per_seed(summaries: list[pd.DataFrame], seeds: list[int], embedding: str) -> pd.DataFrame:
    """Rows = (task, target, metric) of `embedding`, columns = each seed's mean: what the spread is made of."""
    parts = []
    for seed, s in zip(seeds, summaries):
        s = s[s.embedding == embedding]
        parts.append(s.set_index(KEY)["mean"].rename(f"seed {seed}"))
    return pd.concat(parts, axis=1, join="inner").reset_index()


def paired_over_seeds(summaries: list[pd.DataFrame], folds: pd.DataFrame, embedding: str) -> pd.DataFrame:
    """`embedding` − each baseline per comparison row: across seeds (N ≥ 2) from the seed means, else the probe's
    per-fold paired test of the one seed (`folds` = its paired table). Columns: KEY, baseline, mean, lo, hi, p,
    p_corrected (Nadeau–Bengio, folds only), n (seeds, folds or resamples), method, text."""
    cols = KEY + ["baseline", "mean", "lo", "hi", "p", "p_corrected", "n", "method", "text"]
    mine = folds[folds.embedding == embedding]
    if len(summaries) == 1:
        return mine[cols].reset_index(drop=True)
    text_key = {c: str for c in ["embedding", *KEY]}  # `folds` may come from paired.csv: match keys as text
    means = [s.astype(text_key).set_index(["embedding", *KEY])["mean"] for s in summaries]
    rows = []
    for _, r in mine.drop_duplicates(KEY + ["baseline"]).iterrows():
        key = tuple(str(r[c]) for c in KEY)
        if str(r.method).startswith("not paired"):  # different cases (e.g. a covariate some cases lack)
            est = stats.Paired(*[float("nan")] * 5, n=0, method=r.method)
        else:
            try:
                a = [m.loc[(embedding, *key)] for m in means]
                b = [m.loc[(r.baseline, *key)] for m in means]
            except KeyError:  # missing in some seed
                continue
            est = stats.paired(a, b)
        rows.append({**dict(zip(KEY, key)), "baseline": r.baseline, "mean": est.mean, "lo": est.lo, "hi": est.hi,
                     "p": est.p, "p_corrected": float("nan"), "n": est.n,
                     "method": "paired t over seeds" if est.n else est.method, "text": est.format()})
    return pd.DataFrame(rows, columns=cols)
