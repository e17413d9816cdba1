"""Retrieval metrics in NumPy, one definition for the training monitor (`train/evaluate.py`) and the probes
(`eval/probes/retrieval.py`).

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
