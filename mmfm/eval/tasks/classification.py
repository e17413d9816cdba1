"""Linear probes on case-level features: `classification` (one label), `mutation` (a panel of 0/1 columns, one
target per gene) and `fewshot` (k labelled cases per class, repeated draws). One runner: the three differ only
in their targets and in what is fitted on each training fold."""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from mmfm.eval.probes import classification, fewshot
from mmfm.eval.tasks.base import (Collector, FoldSpec, Target, TaskError, case_features, case_values, fold_sides,
                                  label_target, result_key)


@dataclass(frozen=True, kw_only=True)
class LinearSpec(FoldSpec):
    C: float | Literal["auto"] | tuple[float, ...] = 0.5  # fixed, 'auto' (45-value sweep) or a list; inner CV
    balanced: bool = True  # class-balanced loss weights
    standardize: bool = False  # z-score features with each training fold's mean/SD before the fit (recorded)


@dataclass(frozen=True, kw_only=True)
class ClassificationSpec(LinearSpec):
    label: str  # obs column of the class label

    def targets(self, adata, notes):
        return label_target(adata, self)


@dataclass(frozen=True, kw_only=True)
class FewshotSpec(ClassificationSpec):
    shots: tuple[int, ...] = fewshot.SHOTS  # labelled training cases per class
    draws: int = 10  # random draws of the training cases per shot count

    def __post_init__(self):
        if isinstance(self.C, (str, tuple, bool)):
            raise ValueError("few-shot needs a fixed numeric 'C' (no inner CV with 1 case per class)")


@dataclass(frozen=True, kw_only=True)
class MutationSpec(LinearSpec):
    labels: tuple[str, ...]  # obs columns (0/1, empty = unknown), one target each; glob patterns allowed
    min_positives: int = 2  # genes with fewer mutant (or wild-type) cases are skipped, with a note

    def targets(self, adata, notes):
        out = {}
        for gene in self.genes(adata):
            lab = pd.to_numeric(case_values(adata, self, "labels", gene), errors="coerce").dropna()
            if not lab.isin([0, 1]).all():
                raise TaskError(f"task {self.name!r}: key 'labels' column {gene!r} must be 0/1 (empty = unknown)")
            n_pos, n_neg = int(lab.sum()), int((lab == 0).sum())
            if min(n_pos, n_neg) < self.min_positives:
                notes.append(f"{self.name}/{gene}: skipped ({n_pos} mutant / {n_neg} wild-type cases, "
                             f"min_positives={self.min_positives})")
                continue
            out[gene] = (lab.index, lab.astype(int))
        return out

    def genes(self, adata) -> list[str]:
        """The obs columns matched by `labels`, in order, each once."""
        genes: list[str] = []
        for pat in self.labels:
            hits = [c for c in map(str, adata.obs.columns) if fnmatch.fnmatchcase(c, pat)]
            if not hits:
                raise TaskError(f"task {self.name!r}: key 'labels' entry {pat!r} matches no obs column")
            genes += [h for h in hits if h not in genes]
        return genes


def run(adata, spec: LinearSpec, targets: list[Target], col: Collector) -> None:
    """Linear probe (or few-shot draws) per target × embedding × fold on case-level (late-fused) features."""
    for t in targets:
        classes = _run_target(adata, spec, t.folds, col, t.name or spec.label, t.labels)
        if not isinstance(spec, MutationSpec):
            col.notes.append(f"{spec.name}: classes {list(map(str, classes))}; {t.folds.shape[1]} fold(s)")


def encode_labels(labels: pd.Series) -> tuple[pd.Series, list]:
    """Labels → 0..K-1 in sorted class order (the `mil` rows of a target encode them the same way)."""
    classes = sorted(labels.unique(), key=lambda v: (str(type(v)), v))
    return labels.map({c: i for i, c in enumerate(classes)}).astype(int), classes


def _run_target(adata, spec: LinearSpec, folds: pd.DataFrame, col: Collector, target: str, labels: pd.Series):
    y_all, classes = encode_labels(labels)
    single = folds.shape[1] == 1
    for emb in spec.probe_embeddings():
        feats = case_features(adata, spec, emb)
        cases = feats.index.intersection(y_all.index)
        for i, fc in enumerate(folds.columns):
            tr, te = fold_sides(folds, fc, cases)
            ytr, yte = y_all[tr].to_numpy(), y_all[te].to_numpy()
            if len(np.unique(ytr)) < 2 or len(te) == 0:
                col.notes.append(f"{spec.name}/{target} {emb} {fc}: skipped (one class in train or "
                                 f"empty test)")
                continue
            key = result_key(spec, emb, target)
            if isinstance(spec, FewshotSpec):
                for rec in fewshot.run(feats.loc[tr].to_numpy(), ytr, feats.loc[te].to_numpy(), yte, len(classes),
                                       shots=spec.shots, draws=spec.draws, seed=spec.seed + i, C=spec.C,
                                       balanced=spec.balanced, standardize=spec.standardize):
                    k = rec.pop("shots")
                    col.add({**result_key(spec, emb, target, shots=k), "draw": rec.pop("draw")}, i, rec)
                continue
            t0 = time.perf_counter()
            proba, C = classification.fit_predict(feats.loc[tr].to_numpy(), ytr, feats.loc[te].to_numpy(),
                                                  len(classes), C=spec.C, balanced=spec.balanced, seed=spec.seed,
                                                  standardize=spec.standardize)
            col.evaluate(key, i, len(te), lambda idx: classification.metrics(yte[idx], proba[idx]), single,
                         spec.seed)
            col.add(key, i, {"C": C, "n_test": len(te), "n_train": len(tr), "n_classes": len(classes),
                             "standardized": float(spec.standardize), "wall_s": time.perf_counter() - t0})
    return classes
