"""Few-shot linear probing: k labelled cases per class drawn from the training fold, scored on the whole test fold.

Protocol of TANGLE/MADELEINE and Patho-Bench's `sample_fewshots`: for each k, `draws` seeded draws (10 by default)
of k cases per class WITHOUT replacement from the training fold; a k larger than the smallest training class is
skipped (it would silently become an unbalanced full-data probe). The classifier is the fixed-C linear probe
(no inner CV is possible with one example per class).
"""

from __future__ import annotations

import numpy as np

from mmfm.eval.probes import classification

SHOTS = (1, 2, 4, 8, 16, 25)


def draw(y_train: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k training rows per class present in `y_train` (sorted, so the fit is order-independent)."""
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y_train == c), size=k, replace=False)
                                   for c in np.unique(y_train)]))


def run(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, n_classes: int, *,
        shots=SHOTS, draws: int = 10, seed: int = 0, C: float = 0.5, balanced: bool = True,
        standardize: bool = False) -> list[dict]:
    """One record {shots, draw, **metrics} per (k, draw); draws are seeded by (seed, k, draw)."""
    smallest = np.bincount(y_train)[np.unique(y_train)].min()
    records = []
    for k in shots:
        if k > smallest:
            continue
        for d in range(draws):
            idx = draw(y_train, k, np.random.default_rng([seed, k, d]))
            proba, _ = classification.fit_predict(x_train[idx], y_train[idx], x_test, n_classes, C=C,
                                                  balanced=balanced, standardize=standardize)
            records.append({"shots": k, "draw": d, **classification.metrics(y_test, proba)})
    return records
