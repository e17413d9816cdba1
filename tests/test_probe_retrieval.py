"""Retrieval metrics on constructed examples whose answers are counted by hand in the comments."""

import numpy as np
import pandas as pd
import pytest

from mmfm.eval.probes import retrieval


def _unit(angles_deg):
    a = np.deg2rad(np.asarray(angles_deg, float))
    return np.stack([np.cos(a), np.sin(a)], 1)


def test_cross_modal_recall_map_and_chance_by_hand():
    # Gallery (RNA rows) at angles 0, 10, 20, 90, 180 deg; cases  a, b, b, c, d  (case b has two RNA rows).
    keys, key_cases = _unit([0, 10, 20, 90, 180]), np.array(["a", "b", "b", "c", "d"])
    # Queries (slides): q0 case a at 12 deg, q1 case b at 1 deg, q2 case c at 85 deg, q3 case e (no RNA).
    queries, q_cases = _unit([12, 1, 85, 45]), np.array(["a", "b", "c", "e"])
    m = retrieval.cross_modal(queries, q_cases, keys, key_cases, ks=(1, 2, 3))
    # Rankings: q0 → 10,20,0 (b,b,a): hit at rank 3.  q1 → 0,10,20 (a,b,b): hits at ranks 2,3.
    #           q2 → 90,20,... (c): hit at rank 1.        q3 has no RNA and is left out.
    assert m["n_queries"] == 3
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["recall@3"] == pytest.approx(3 / 3)
    # AP@3: q0 = (1/3)/1; q1 = (1/2 + 2/3)/2; q2 = 1/1.
    assert m["map@3"] == pytest.approx(np.mean([1 / 3, (1 / 2 + 2 / 3) / 2, 1.0]))
    # AP@1: only q2 hits → 1/3.
    assert m["map@1"] == pytest.approx(1 / 3)
    # Chance recall@1 with N=5 keys: r = 1, 2, 1 relevant → (1/5 + 2/5 + 1/5) / 3.
    assert m["chance_recall@1"] == pytest.approx((1 / 5 + 2 / 5 + 1 / 5) / 3)
    # Chance recall@2: 1 - C(N-r,2)/C(N,2): r=1 → 1 - 6/10, r=2 → 1 - 3/10.
    assert m["chance_recall@2"] == pytest.approx((0.4 + 0.7 + 0.4) / 3)


def test_same_label_topk_majority_vote_and_ties_by_hand():
    # Database on a line at x = 0, 1, 2, 3, 10 with labels A, B, B, A, C; queries use Euclidean (l2) distance.
    db, db_lab = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]]), np.array(list("ABBAC"))
    q, q_lab = np.array([[0.1], [2.9], [9.0]]), np.array(list("BAA"))
    m = retrieval.same_label(db, db_lab, q, q_lab, ks=(1, 2, 3))
    # q0 (B) at 0.1 → A(0), B(1), B(2): top1 miss, top2 hit; mv@2 = {A:1,B:1} tie → hit; mv@3 B wins → hit.
    # q1 (A) at 2.9 → A(3), B(2), B(1): top1 hit; mv@1 hit; mv@2 tie → hit; mv@3 B wins → miss.
    # q2 (A) at 9.0 → C(10), A(3), B(2): top1 miss; top2 hit; mv@2 tie → hit; mv@3 three-way tie → hit.
    assert m["top1_acc"] == pytest.approx(1 / 3)
    assert m["top2_acc"] == pytest.approx(3 / 3)
    assert m["mv@1_acc"] == pytest.approx(1 / 3)
    assert m["mv@2_acc"] == pytest.approx(3 / 3)
    assert m["mv@3_acc"] == pytest.approx(2 / 3)
    # mAP@3 (divided by min(3, n_relevant = 2)): q0 hits at 2,3 → (1/2 + 2/3)/2; q1 hit at 1 → 1/2;
    # q2 hit at 2 → (1/2)/2.
    assert m["map@3"] == pytest.approx(np.mean([(1 / 2 + 2 / 3) / 2, 1 / 2, 1 / 4]))


def test_l2_and_cosine_similarity_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
    np.testing.assert_allclose(retrieval.similarity(a, b, "l2"), -np.linalg.norm(a[:, None] - b[None], axis=2),
                               atol=1e-9)
    cos = (a @ b.T) / np.linalg.norm(a, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None]
    np.testing.assert_allclose(retrieval.similarity(a, b, "cosine"), cos, atol=1e-12)
    with pytest.raises(ValueError, match="unknown retrieval metric"):
        retrieval.similarity(a, b, "dot")


def test_cross_modal_retrieval_ranks_every_case_at_once(tmp_path):
    """No training is involved, so without a split file the gallery is all cases (not one fold's)."""
    import anndata as ad

    from mmfm.eval.probe import probe

    rng = np.random.default_rng(0)
    n = 30
    a = rng.normal(size=(n, 8))
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"C{i}" for i in range(n)]),
                       obsm={"a": a, "b": a + 0.01 * rng.normal(size=(n, 8))})
    res = probe(adata, [{"name": "r", "type": "retrieval", "pairs": [["a", "b"]]}], tmp_path, plots=False,
                n_bootstrap=10).results
    got = res.set_index("metric")["value"]
    assert got["recall@1"] == 1.0
    assert got["chance_recall@1"] == pytest.approx(1 / n)  # gallery of all 30 cases
