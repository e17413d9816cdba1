"""Robustness index (PathoROB, Kömen et al. 2025): does embedding neighbourhood follow biology or medical center?

Embeddings are L2-normalised and ranked by Euclidean distance (= cosine ranking). For each query, neighbours from the
query's own slide/case are removed (which also removes the query). Over neighbour ranks 1..k, counted over all
queries, a neighbour is SS / SO / OS / OO = (same|other biology) × (same|other site). Then

    RI(k) = ΣSO / (ΣSO + ΣOS)                       (current PathoROB definition, in [0, 1])
    bio_vs_confounding(k) = (ΣSS + ΣSO) / (ΣSS + ΣOS) (earlier de Jong et al. 2025 index, > 1: biology dominates)

with sums cumulative over ranks 1..k. Queries are the resampling unit of the bootstrap CI (PathoROB bootstraps
query rows too). An optional `subset` column evaluates each subset separately (PathoROB's
"paired" TCGA mode, 2 classes × 2 centers per subset) and pools the counts.

An RI means little alone when biology and site are confounded (a random embedding then scores well above 0.5 or
below it), so every RI comes with two references on the same query rows: `chance_` (random ranking) and
`site_only_` (a site-only embedding: same-site neighbours first).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# the counting is shared with the training monitor's validation RI (mmfm/train/evaluate.py): one definition
from mmfm.metrics import KINDS, REFERENCES, expected_query_counts, neighbour_kinds, query_counts  # noqa: F401


def counts(emb: np.ndarray, bio, site, group, k_max: int, subset=None) -> pd.DataFrame:
    """Cumulative SS/SO/OS/OO counts at k = 1..k_max summed over queries (and over subsets, when given)."""
    total = query_counts(emb, bio, site, group, k_max, subset).sum(0)
    return pd.DataFrame(total, columns=list(KINDS), index=pd.RangeIndex(1, k_max + 1, name="k"))


def indices(c: pd.DataFrame) -> pd.DataFrame:
    """Add RI(k) and bio_vs_confounding(k) columns to a table of cumulative counts."""
    c = c.copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        c["robustness_index"] = c["SO"] / (c["SO"] + c["OS"])
        c["bio_vs_confounding"] = (c["SS"] + c["SO"]) / (c["SS"] + c["OS"])
    return c


def robustness_index(emb: np.ndarray, bio, site, group, ks=(1, 5, 10), subset=None) -> pd.DataFrame:
    """RI(k) and bio_vs_confounding(k) for each k in `ks`, with the cumulative counts they come from."""
    return indices(counts(emb, bio, site, group, max(ks), subset).loc[list(ks)])


def scores(query_counts_: dict[str, np.ndarray], ks, idx: np.ndarray) -> dict[str, float]:
    """RI@k and bio_vs_confounding@k of query rows `idx` for the embedding ('' key) and each reference
    (`chance_…`, `site_only_…`), from per-query cumulative counts as made by query_counts / expected_query_counts."""
    out = {}
    cols = np.asarray(ks) - 1
    for prefix, qc in query_counts_.items():
        ri = indices(pd.DataFrame(qc[idx][:, cols].sum(0), columns=list(KINDS), index=list(ks)))
        out.update({f"{prefix}{m}@{k}": float(ri.loc[k, m]) for k in ks
                    for m in ("robustness_index", "bio_vs_confounding")})
    return out
