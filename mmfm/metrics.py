"""Retrieval and robustness metrics in NumPy, one definition for the training monitor (`train/evaluate.py`) and the
probes (`eval/probes/retrieval.py`, `eval/probes/robustness.py`, whose docstring defines the robustness index).

A key is *relevant* to a query when it belongs to the same case (cross-modal) or has the same label. Keys are
ranked by similarity, and **ties count against the query**: among keys of equal similarity the irrelevant ones
rank first, so a collapsed embedding (all similarities equal) scores recall 0, never the luck of key order.
recall@k = fraction of queries with a relevant key in the top k; mAP@k = mean over queries of
Σ_{i≤k, hit at i} precision@i / min(k, n_relevant); the chance level of recall@k (random ranking) is
1 − C(N−r, k) / C(N, k).
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def similarity(queries: np.ndarray, keys: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """[n_q, n_k] similarity, higher = closer: cosine, or negative Euclidean distance ('l2', Patho-Bench default)."""
    if metric == "cosine":
        return l2_normalize(queries) @ l2_normalize(keys).T
    if metric == "l2":
        d2 = (queries**2).sum(1)[:, None] + (keys**2).sum(1)[None, :] - 2.0 * queries @ keys.T
        return -np.sqrt(np.maximum(d2, 0.0))
    raise ValueError(f"unknown retrieval metric {metric!r}; expected 'cosine' or 'l2'")


def ranked_hits(sim: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """[n_q, k] bool: is the i-th ranked key relevant; ties broken against the query (irrelevant first)."""
    return np.take_along_axis(relevant, ranking(sim, relevant, k), axis=1)


def ranking(sim: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top-k keys per query, best first (ties: irrelevant keys first)."""
    return np.lexsort((relevant, -sim), axis=1)[:, :k]


def recall_at_k(hits: np.ndarray, k: int) -> float:
    return float(hits[:, :k].any(1).mean())


def map_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    h = hits[:, :k].astype(float)
    precision = np.cumsum(h, axis=1) / np.arange(1, h.shape[1] + 1)
    denom = np.minimum(k, np.maximum(n_relevant, 1))
    return float(((precision * h).sum(1) / denom).mean())


def chance_recall(n_keys: int, n_relevant: np.ndarray, k: int) -> float:
    """Expected recall@k of a random ranking: mean over queries of 1 − Π_{i<k} (N − r − i) / (N − i)."""
    i = np.arange(min(k, n_keys))
    miss = np.prod(np.clip((n_keys - np.asarray(n_relevant)[:, None] - i) / (n_keys - i), 0.0, 1.0), axis=1)
    return float((1.0 - miss).mean())


def paired_recall(query: np.ndarray, gallery: np.ndarray, ks=KS) -> dict[int, float]:
    """Row i of `query` matches row i of `gallery` only (one case per row): recall@k by cosine similarity."""
    relevant = np.eye(len(query), len(gallery), dtype=bool)
    hits = ranked_hits(similarity(query, gallery), relevant, max(ks))
    return {k: recall_at_k(hits, k) for k in ks}


# ---------------------------------------------------------------- robustness index (eval/probes/robustness.py)

KINDS = ("SS", "SO", "OS", "OO")


def neighbour_kinds(emb: np.ndarray, bio, site, group, k_max: int) -> dict[str, np.ndarray]:
    """Boolean [n, k_max] masks per kind for the k_max nearest neighbours outside the query's own group.

    Ranks a query cannot fill (too few rows outside its group) are False in every mask.
    """
    bio, site, group = (np.asarray(a) for a in (bio, site, group))
    n = len(emb)
    from sklearn.neighbors import NearestNeighbors  # here: the base module stays light to import

    largest_group = int(np.unique(group, return_counts=True)[1].max())
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


REFERENCES = {"chance": "random", "site_only": "site"}  # metric prefix → reference ranking


def robustness_scores(emb: np.ndarray, bio, site, ks=KS) -> dict[str, float]:
    """RI@k = ΣSO / (ΣSO + ΣOS) of one-row-per-case embeddings, beside the same query rows' random-ranking
    (`chance_`) and site-only (`site_only_`) references — the probe's `robustness` row keys, without its bootstrap."""
    group = np.arange(len(emb))
    qcs = {"": query_counts(emb, bio, site, group, max(ks))}
    qcs.update({f"{p}_": expected_query_counts(bio, site, group, max(ks), mode=m)
                for p, m in REFERENCES.items()})
    out = {}
    for prefix, qc in qcs.items():
        total = qc.sum(0)  # [k_max, 4] cumulative counts in KINDS order
        for k in ks:
            so, os_ = total[k - 1, 1], total[k - 1, 2]
            out[f"{prefix}robustness_index@{k}"] = float(so / (so + os_)) if so + os_ else float("nan")
    return out
