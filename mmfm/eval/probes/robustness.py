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


def expected_query_counts(bio, site, group, k_max: int, subset=None, mode: str = "random") -> np.ndarray:
    """[n, k_max, 4] expected cumulative SS/SO/OS/OO counts per query for a reference ranking of the same rows:

    'random'    — neighbours in uniformly random order (the limit of many random embeddings): a query with N_q
                  candidates of which n_K of kind K expects min(k, N_q)·n_K/N_q of them by rank k;
    'site'      — a site-only embedding: every same-site candidate first (random order), then the others.
    RI from these counts is the reference an embedding's RI is read against (ratio of expected counts)."""
    if mode not in ("random", "site"):
        raise ValueError(f"unknown reference ranking {mode!r}; expected 'random' or 'site'")
    bio, site, group = (np.asarray(a) for a in (bio, site, group))
    subset = np.zeros(len(bio)) if subset is None else np.asarray(subset)
    out = np.zeros((len(bio), k_max, len(KINDS)))
    k = np.arange(1, k_max + 1, dtype=float)[None, :]
    for q0 in range(0, len(bio), 1024):  # blocks of queries bound the [block, n] masks
        q = np.arange(q0, min(q0 + 1024, len(bio)))
        cand = (group[None, :] != group[q, None]) & (subset[None, :] == subset[q, None])
        same_bio, same_site = bio[None, :] == bio[q, None], site[None, :] == site[q, None]
        n = np.stack([(cand & b & s).sum(1) for b, s in ((same_bio, same_site), (same_bio, ~same_site),
                                                          (~same_bio, same_site), (~same_bio, ~same_site))], 1)
        n = n.astype(float)[:, None, :]  # [block, 1, 4] in KINDS order
        if mode == "random":
            total = n.sum(2)
            out[q] = np.minimum(k, total)[..., None] * n / np.maximum(total, 1)[..., None]
        else:
            first, rest = n[..., [0, 2]].sum(2), n[..., [1, 3]].sum(2)  # same-site (SS, OS), other-site (SO, OO)
            taken_first = np.minimum(k, first)[..., None] / np.maximum(first, 1)[..., None]
            taken_rest = np.clip(k - first, 0, rest)[..., None] / np.maximum(rest, 1)[..., None]
            out[q] = n * np.where(np.array([True, False, True, False]), taken_first, taken_rest)
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


REFERENCES = {"chance": "random", "site_only": "site"}  # metric prefix → reference ranking


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
