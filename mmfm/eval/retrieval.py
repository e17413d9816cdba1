"""Retrieval probes: cross-modal (slide → RNA, slide → report, ...) and same-label (Patho-Bench) retrieval.

A key is relevant to a query when it belongs to the same case (cross-modal) or has the same label (same-label).
Several keys may be relevant (a case with several slides); recall@k counts a query as a hit when ANY relevant key
is in its top k. mAP@k = mean over queries of Σ_{i≤k, hit at i} precision@i / min(k, n_relevant); when
n_relevant ≥ k (usual for same-label retrieval) this is Patho-Bench's "precision summed over hits, divided by k".
The chance level of recall@k (random ranking) is reported beside every recall: 1 − C(N−r, k) / C(N, k).
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def similarity(queries: np.ndarray, keys: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """[n_q, n_k] similarity, higher = closer: cosine, or negative Euclidean distance ('l2', Patho-Bench default)."""
    if metric == "cosine":
        return l2_normalize(queries) @ l2_normalize(keys).T
    if metric == "l2":
        d2 = (queries**2).sum(1)[:, None] + (keys**2).sum(1)[None, :] - 2.0 * queries @ keys.T
        return -np.sqrt(np.maximum(d2, 0.0))
    raise ValueError(f"unknown retrieval metric {metric!r}; expected 'cosine' or 'l2'")


def ranking(sim: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top-k keys per query, best first (ties broken by key order, deterministically)."""
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


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


def cross_modal(queries: np.ndarray, query_cases: np.ndarray, keys: np.ndarray, key_cases: np.ndarray, *,
                ks=KS, metric: str = "cosine") -> dict[str, float]:
    """recall@k, mAP@k and chance recall@k for retrieving the same case's rows of another modality.

    Queries whose case has no key (modality missing for that case) cannot be matched and are left out;
    `n_queries` says how many remained.
    """
    relevant = np.asarray(query_cases)[:, None] == np.asarray(key_cases)[None, :]
    keep = relevant.any(1)
    if not keep.any():
        raise ValueError("no query case has a key in the other modality")
    queries, relevant = queries[keep], relevant[keep]
    top = ranking(similarity(queries, keys, metric), max(ks))
    hits = np.take_along_axis(relevant, top, axis=1)
    n_rel = relevant.sum(1)
    out = {"n_queries": float(keep.sum())}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(hits, k)
        out[f"map@{k}"] = map_at_k(hits, n_rel, k)
        out[f"chance_recall@{k}"] = chance_recall(len(keys), n_rel, k)
    return out


def same_label(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, *,
               ks=KS, metric: str = "l2") -> dict[str, float]:
    """Patho-Bench retrieval: the training fold is the database, test rows are the queries.

    top{k}_acc: any of the k nearest shares the query's label; mv@{k}_acc: the query's label is among the most
    frequent labels of the k nearest (a tie counts as a hit); mAP@k as in the module docstring.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    relevant = test_labels[:, None] == train_labels[None, :]
    top = ranking(similarity(test, train, metric), max(ks))
    hits = np.take_along_axis(relevant, top, axis=1)
    n_rel = relevant.sum(1)
    out = {}
    for k in ks:
        votes = hits[:, :k].sum(1)
        most = np.array([np.unique(row, return_counts=True)[1].max() for row in train_labels[top[:, :k]]])
        out[f"top{k}_acc"] = recall_at_k(hits, k)
        out[f"mv@{k}_acc"] = float((votes == most).mean())
        out[f"map@{k}"] = map_at_k(hits, n_rel, k)
        out[f"chance_top{k}_acc"] = chance_recall(len(train), n_rel, k)
    return out
