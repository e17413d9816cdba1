"""`robustness`: PathoROB's robustness index over all rows (nothing is fitted, so there are no folds), with the
RI-vs-k curve and a site/biology projection plot."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mmfm.eval import report
from mmfm.eval.drawing import draw
from mmfm.eval.probes import retrieval, robustness
from mmfm.eval.tasks.base import Collector, Target, TaskError, TaskSpec, column, result_key, row_features, row_groups


@dataclass(frozen=True, kw_only=True)
class RobustnessSpec(TaskSpec):
    label: str  # obs column of the biology (the signal neighbours should share)
    site: str  # obs column of the centre (the confounder)
    subset: str | None = None  # evaluate per subset and pool (PathoROB paired mode)
    ks: tuple[int, ...] = retrieval.KS  # neighbourhood sizes


def run(adata, spec: RobustnessSpec, targets: list[Target], col: Collector) -> None:
    bio, site = column(adata, spec, "label", spec.label), column(adata, spec, "site", spec.site)
    known = (bio.notna() & site.notna()).to_numpy()
    bio, site = bio.astype(str).to_numpy(), site.astype(str).to_numpy()
    subset = column(adata, spec, "subset", spec.subset).to_numpy() if spec.subset else None
    groups = row_groups(adata, spec)
    for emb in spec.embeddings:
        x = row_features(adata, spec, emb)
        ok = np.isfinite(x).all(1) & known
        if len(np.unique(groups[ok])) < 2:
            raise TaskError(f"task {spec.name!r}: fewer than 2 cases have embedding {emb!r}, 'label' and 'site'")
        sub = None if subset is None else subset[ok]
        qc = robustness.query_counts(x[ok], bio[ok], site[ok], groups[ok], max(spec.ks), subset=sub)
        ks = np.asarray(spec.ks) - 1
        refs = {"": qc, **{f"{p}_": robustness.expected_query_counts(bio[ok], site[ok], groups[ok], max(spec.ks),
                                                                      subset=sub, mode=m)
                           for p, m in robustness.REFERENCES.items()}}

        def score(idx):  # the embedding's RI and, on the same query rows, the chance and site-only references
            return robustness.scores(refs, spec.ks, idx)

        # query rows are the bootstrap unit (PathoROB bootstraps queries), so RI gets a CI like single-fold probes
        key = result_key(spec, emb, target=spec.label)
        col.evaluate(key, "all", int(ok.sum()), score, True, spec.seed)
        col.add(key, "all", {"n_test": int(ok.sum())})
        col.robustness_curves[(spec.name, emb)] = robustness.indices(
            pd.DataFrame(qc.sum(0)[ks], columns=list(robustness.KINDS), index=pd.Index(spec.ks, name="k")))
        if col.plot_dir is not None:
            draw(col.drawer, report.plot_embedding, x[ok], bio[ok], site[ok],
                 col.plot_dir / f"{report.slug(spec.name, emb)}_projection.png",
                 title=f"{spec.name}: {emb}", method=col.projection, seed=spec.seed)

