"""Linear-probe metrics against sklearn and hand-written NumPy references; few-shot draws; C chosen on train only."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mmfm.eval.probes import classification, fewshot


def _mann_whitney_auc(y, score):
    """P(score_pos > score_neg) + 0.5 P(tie), counted over all pairs."""
    pos, neg = score[y == 1], score[y == 0]
    d = pos[:, None] - neg[None, :]
    return ((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size


def _quadratic_kappa(y, pred, n):
    o = np.zeros((n, n))
    np.add.at(o, (y, pred), 1)
    e = np.outer(o.sum(1), o.sum(0)) / o.sum()
    w = (np.arange(n)[:, None] - np.arange(n)[None, :]) ** 2 / (n - 1) ** 2
    return 1 - (w * o).sum() / (w * e).sum()


@pytest.fixture(scope="module")
def wdbc():
    """WDBC (sklearn): 569 real FNA cytology cases × 30 nuclear features, benign/malignant."""
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)  # raw WDBC scales (1e-3..1e3) make lbfgs crawl; the probe itself never scales
    perm = np.random.default_rng(0).permutation(len(x))
    return x[perm[:380]], y[perm[:380]], x[perm[380:]], y[perm[380:]]


def test_binary_probe_matches_patho_bench_protocol_and_metrics(wdbc):
    xtr, ytr, xte, yte = wdbc
    proba, C = classification.fit_predict(xtr, ytr, xte, 2)
    ref = LogisticRegression(C=0.5, max_iter=10000, random_state=0, class_weight="balanced").fit(xtr, ytr)
    np.testing.assert_allclose(proba, ref.predict_proba(xte), atol=1e-6)  # unscaled features, lbfgs, C=0.5
    m = classification.metrics(yte, proba)
    assert m["auroc"] == pytest.approx(roc_auc_score(yte, proba[:, 1]), abs=1e-12)
    assert m["auroc"] == pytest.approx(_mann_whitney_auc(yte, proba[:, 1]), abs=1e-12)
    pred = proba.argmax(1)
    assert m["bacc"] == pytest.approx(np.mean([(pred[yte == c] == c).mean() for c in (0, 1)]))
    assert m["kappa"] == pytest.approx(_quadratic_kappa(yte, pred, 2))
    assert m["auroc"] > 0.95


def test_multiclass_macro_ovr_auroc_and_missing_class():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 20)
    proba = rng.dirichlet(np.ones(3), size=60) + np.eye(3)[y] * 0.3
    proba /= proba.sum(1, keepdims=True)
    m = classification.metrics(y, proba)
    ovr = np.mean([_mann_whitney_auc((y == c).astype(int), proba[:, c]) for c in range(3)])
    assert m["auroc"] == pytest.approx(ovr, abs=1e-12)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"), abs=1e-12)
    assert m["kappa"] == pytest.approx(_quadratic_kappa(y, proba.argmax(1), 3))
    assert np.isnan(classification.metrics(y[y < 2], proba[y < 2])["auroc"])  # class 2 absent: undefined, not 0


@pytest.mark.parametrize("seed", range(6))
def test_metrics_are_sklearns(seed):
    """One confusion matrix and a rank statistic, held to sklearn's four metrics: ties in the scores, a class never
    predicted, a class predicted but absent from y, two or three classes."""
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score

    rng = np.random.default_rng(seed)
    k = 2 + seed % 2
    y = rng.integers(0, k, 40)
    proba = np.round(rng.dirichlet(np.ones(k), 40), 1)  # rounded: tied scores
    proba[:, -1] = 1.0 - proba[:, :-1].sum(1)
    if seed >= 4:
        y = y[y < k - 1] if k == 3 else y  # the last class absent from y, predicted all the same
        proba = proba[:len(y)]
    if seed in (2, 3):
        proba[:, 0], proba[:, 1:] = 0.0, proba[:, 1:] + 0.1  # class 0 never predicted
        proba /= proba.sum(1, keepdims=True)
    m, pred = classification.metrics(y, proba), proba.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["bacc"] == balanced_accuracy_score(y, pred)
        assert m["f1"] == f1_score(y, pred, average="macro", zero_division=0)
        kappa = cohen_kappa_score(y, pred, weights="quadratic", labels=np.arange(k))
    assert m["kappa"] == kappa or (np.isnan(m["kappa"]) and not np.isfinite(kappa))
    if len(np.unique(y)) < k and k > 2:
        assert np.isnan(m["auroc"])
    elif k == 2:
        assert m["auroc"] == pytest.approx(roc_auc_score(y, proba[:, 1]), abs=1e-12)
    else:
        assert m["auroc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"), abs=1e-12)


def test_class_absent_from_training_gets_zero_probability():
    x = np.random.default_rng(0).normal(size=(30, 4))
    y = np.repeat([0, 2], 15)
    proba, _ = classification.fit_predict(x, y, x[:5], 3)
    assert proba.shape == (5, 3) and np.all(proba[:, 1] == 0)
    np.testing.assert_allclose(proba.sum(1), 1.0)


def test_C_sweep_uses_training_fold_only(wdbc):
    xtr, ytr, xte, yte = wdbc
    grid = (1e-4, 1e-2, 1.0)
    _, c1 = classification.fit_predict(xtr, ytr, xte, 2, C=grid)
    _, c2 = classification.fit_predict(xtr, ytr, xte[:10] * -5.0, 2, C=grid)  # garbage test set
    assert c1 == c2 and c1 in grid


def test_fewshot_draws_k_per_class_from_training_only(wdbc):
    xtr, ytr, xte, yte = wdbc
    idx = fewshot.draw(ytr, 4, np.random.default_rng(0))
    assert np.bincount(ytr[idx]).tolist() == [4, 4] and len(set(idx)) == 8
    recs = fewshot.run(xtr, ytr, xte, yte, 2, shots=(1, 8, 10_000), draws=3)
    assert [(r["shots"], r["draw"]) for r in recs] == [(1, 0), (1, 1), (1, 2), (8, 0), (8, 1), (8, 2)]
    assert len({r["auroc"] for r in recs if r["shots"] == 1}) > 1  # draws differ
    assert np.mean([r["auroc"] for r in recs if r["shots"] == 8]) > 0.8
    again = fewshot.run(xtr, ytr, xte, yte, 2, shots=(1, 8), draws=3)
    assert [r["auroc"] for r in again] == [r["auroc"] for r in recs]  # seeded
