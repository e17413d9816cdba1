"""Robustness index (PathoROB, Kömen et al. 2025): does embedding neighbourhood follow biology or medical center?

Embeddings are L2-normalised and ranked by Euclidean distance (= cosine ranking). For each query, neighbours from the
query's own slide/case are removed (which also removes the query). Over neighbour ranks 1..k, counted over all
queries, a neighbour is SS / SO / OS / OO = (same|other biology) × (same|other site). Then

    RI(k) = ΣSO / (ΣSO + ΣOS)                       (current PathoROB definition, in [0, 1])
    bio_vs_confounding(k) = (ΣSS + ΣSO) / (ΣSS + ΣOS) (earlier de Jong et al. 2025 index, > 1: biology dominates)

with sums cumulative over ranks 1..k. Queries are the resampling unit of the bootstrap CI (PathoROB bootstraps
query rows too). An optional `subset` column evaluates each subset separately (PathoROB's
"paired" TCGA mode, 2 classes × 2 centers per subset) and pools the counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

from mmfm.metrics import l2_normalize

KINDS = ("SS", "SO", "OS", "OO")


def neighbour_kinds(emb: np.ndarray, bio, site, group, k_max: int) -> dict[str, np.ndarray]:
    """Boolean [n, k_max] masks per kind for the k_max nearest neighbours outside the query's own group.

    Ranks a query cannot fill (too few rows outside its group) are False in every mask.
    """
    bio, site, group = (np.asarray(a) for a in (bio, site, group))
    n = len(emb)
    largest_group = int(pd.Series(group).value_counts().max())
    nn = NearestNeighbors(n_neighbors=min(n, k_max + largest_group)).fit(l2_normalize(emb))
    _, idx = nn.kneighbors(l2_normalize(emb))
    masks = {k: np.zeros((n, k_max), bool) for k in KINDS}
    for q in range(n):
        nb = idx[q][group[idx[q]] != group[q]][:k_max]
        same_bio, same_site = bio[nb] == bio[q], site[nb] == site[q]
        m = len(nb)
        masks["SS"][q, :m] = same_bio & same_site
        masks["SO"][q, :m] = same_bio & ~same_site
        masks["OS"][q, :m] = ~same_bio & same_site
        masks["OO"][q, :m] = ~same_bio & ~same_site
    return masks


def query_counts(emb: np.ndarray, bio, site, group, k_max: int, subset=None) -> np.ndarray:
    """[n, k_max, 4] per-query SS/SO/OS/OO counts cumulated over ranks 1..k (within the query's subset)."""
    out = np.zeros((len(emb), k_max, len(KINDS)), dtype=np.int64)
    subset = np.zeros(len(emb)) if subset is None else np.asarray(subset)
    bio, site, group = (np.asarray(a) for a in (bio, site, group))
    for s in np.unique(subset):
        rows = np.flatnonzero(subset == s)
        masks = neighbour_kinds(emb[rows], bio[rows], site[rows], group[rows], k_max)
        out[rows] = np.stack([np.cumsum(masks[k], axis=1) for k in KINDS], axis=2)
    return out


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
