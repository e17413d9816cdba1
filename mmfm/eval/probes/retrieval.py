"""Retrieval probes: cross-modal (slide → RNA, slide → report, ...) and same-label (Patho-Bench) retrieval.

A key is relevant to a query when it belongs to the same case (cross-modal) or has the same label (same-label).
Several keys may be relevant (a case with several slides); recall@k counts a query as a hit when ANY relevant key
is in its top k. mAP@k = mean over queries of Σ_{i≤k, hit at i} precision@i / min(k, n_relevant); when
n_relevant ≥ k (usual for same-label retrieval) this is Patho-Bench's "precision summed over hits, divided by k".
The chance level of recall@k (random ranking) is reported beside every recall. The metrics themselves (and
their tie rule: ties count against the query) are `mmfm.metrics`, shared with the training monitor.
"""

from __future__ import annotations

import numpy as np

from mmfm.metrics import KS, chance_recall, map_at_k, ranked_hits, ranking, recall_at_k, similarity  # noqa: F401


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
    hits = ranked_hits(similarity(queries, keys, metric), relevant, max(ks))
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
    sim = similarity(test, train, metric)
    top = ranking(sim, relevant, max(ks))
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
