"""`retrieval`: cross-modal retrieval among each test fold's rows (`pairs`: a query modality against the fold's
rows of another), and same-label retrieval (`label`) with the training fold as the database."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from mmfm.eval import folds as folds_mod
from mmfm.eval.probes import retrieval
from mmfm.eval.tasks.base import (Collector, FoldSpec, Target, case_features, case_values, fold_sides, label_target,
                                  result_key, row_features, row_groups)


@dataclass(frozen=True, kw_only=True)
class RetrievalSpec(FoldSpec):
    embeddings: tuple[str, ...] = ()  # same-label retrieval embeddings; default: the keys in `pairs`, else X
    pairs: tuple[tuple[str, str], ...] = ()  # cross-modal retrieval: [query_key, gallery_key] pairs
    label: str | None = None  # same-label retrieval: obs column whose classes count as relevant
    ks: tuple[int, ...] = retrieval.KS  # recall@k / mAP@k cut-offs
    metric: Literal["l2", "cosine"] = "l2"  # same-label distance (Patho-Bench default l2)

    def __post_init__(self):
        if not (self.pairs or self.label):
            raise ValueError("type 'retrieval' needs 'pairs' (cross-modal) and/or 'label' (same-label)")
        if not self.embeddings:
            keys = tuple(dict.fromkeys(k for p in self.pairs for k in p)) if self.pairs else ("X",)
            object.__setattr__(self, "embeddings", keys)

    def targets(self, adata, notes):
        return label_target(adata, self) if self.label and not self.pairs else super().targets(adata, notes)

    def new_folds(self, cases, strata, sites, where, notes):
        if not self.label:  # cross-modal retrieval fits nothing: one gallery of every case, bootstrap CI over queries
            return folds_mod.all_test(cases)
        return super().new_folds(cases, strata, sites, where, notes)


def run(adata, spec: RetrievalSpec, targets: list[Target], col: Collector) -> None:
    (target,) = targets
    folds = target.folds
    single = folds.shape[1] == 1
    groups = row_groups(adata, spec)
    for q_key, k_key in spec.pairs:
        q, k = row_features(adata, spec, q_key), row_features(adata, spec, k_key)
        q_ok, k_ok = np.isfinite(q).all(1), np.isfinite(k).all(1)
        for i, fc in enumerate(folds.columns):
            test = set(folds.index[(folds[fc] == "test").to_numpy()])
            in_test = np.isin(groups, list(test))
            qi, ki = np.flatnonzero(q_ok & in_test), np.flatnonzero(k_ok & in_test)
            key = result_key(spec, f"{q_key}->{k_key}")
            if not len(qi) or not len(ki):
                col.notes.append(f"{spec.name} {q_key}->{k_key} {fc}: no test rows with both modalities")
                continue
            col.evaluate(key, i, len(qi), lambda idx: retrieval.cross_modal(
                q[qi[idx]], groups[qi[idx]], k[ki], groups[ki], ks=spec.ks, metric="cosine"), single, spec.seed)
    if spec.label:
        labels = case_values(adata, spec, "label", spec.label)
        for emb in spec.probe_embeddings():
            feats = case_features(adata, spec, emb)
            cases = feats.index.intersection(labels.index)
            for i, fc in enumerate(folds.columns):
                tr, te = fold_sides(folds, fc, cases)
                if not len(tr) or not len(te):
                    continue
                xtr, ltr = feats.loc[tr].to_numpy(), labels[tr].to_numpy()
                xte, lte = feats.loc[te].to_numpy(), labels[te].to_numpy()
                col.evaluate(result_key(spec, emb, target=spec.label), i, len(te), lambda idx: retrieval.same_label(
                    xtr, ltr, xte[idx], lte[idx], ks=spec.ks, metric=spec.metric), single, spec.seed)
