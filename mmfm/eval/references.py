"""What every reported number is read against: chance levels, the role of each embedding (baseline, model or
oracle), and — on a simulated cohort — the oracle embedding attached beside the learned ones.

Chance levels that depend only on the metric live here (AUROC, C-indices and time-dependent AUC 0.5, quadratic
kappa 0, balanced accuracy 1/K). Those that depend on the rows — retrieval recall of a random ranking, the
robustness index of a random or a site-only embedding — are computed by the probes on the same rows and come back
as `chance_<metric>` / `site_only_<metric>` results.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from mmfm.simulate.truth import oracle_embedding

ROLES = ("baseline", "model", "supervised", "oracle")
SUPERVISED_PREFIX = "mil:"  # rows trained on the task's labels from the tile bags (mmfm.eval.tasks.mil)
CHANCE = {"auroc": 0.5, "c_index": 0.5, "uno_c": 0.5, "td_auc": 0.5, "kappa": 0.0}
REFERENCE_PREFIXES = ("chance_", "site_only_")  # probe results that are references, not an embedding's score


def chance_level(metric: str, n_classes: float | None = None) -> float:
    """Expected value of `metric` for an uninformative predictor; NaN where it depends on the rows (or is unknown)."""
    if metric in CHANCE:
        return CHANCE[metric]
    if metric.startswith("td_auc@"):
        return 0.5
    if metric == "bacc" and n_classes:
        return 1.0 / float(n_classes)
    return float("nan")


def role(embedding: str, roles: dict[str, str] | None = None) -> str:
    """'oracle' (name starts with 'oracle'), 'baseline' (mean-pool / random-init / covariate baselines),
    'supervised' (`mil:*`, trained on the labels) or 'model'; `roles` overrides by exact name."""
    if roles and embedding in roles:
        if roles[embedding] not in ROLES:
            raise ValueError(f"role of {embedding!r} is {roles[embedding]!r}; expected one of {ROLES}")
        return roles[embedding]
    if embedding.startswith("oracle"):
        return "oracle"
    if embedding.startswith(SUPERVISED_PREFIX):
        return "supervised"
    if embedding.startswith("baseline:") or embedding.endswith(("_meanpool", "_random")) or \
            embedding in ("meanpool", "random"):
        return "baseline"
    return "model"


def attach_oracle(adata: ad.AnnData, cohort_dir: str | Path, *, like: str | None = None, key: str = "oracle",
                  variables=("programmes", "subtype")) -> ad.AnnData:
    """Add obsm[key] = the simulator's latent variables per row (rows are cases, or slides with obs['case_id']).

    With `like` (an obsm key), rows where that embedding is absent (NaN) are NaN in the oracle too, so the oracle
    is probed on exactly the cases the compared embedding has. Returns `adata` (modified in place).
    """
    oracle = oracle_embedding(cohort_dir, variables)
    cases = (adata.obs["case_id"] if "case_id" in adata.obs else adata.obs_names.to_series()).astype(str)
    unknown = sorted(set(cases) - set(oracle.index))
    if unknown:
        raise ValueError(f"{cohort_dir}/truth/cases.csv: no latent truth for case(s) {unknown[:5]}")
    x = oracle.loc[cases.to_numpy()].to_numpy(np.float64)
    if like is not None:
        if like not in adata.obsm:
            raise ValueError(f"attach_oracle: like={like!r} is not an obsm key ({', '.join(adata.obsm)})")
        x[~np.isfinite(np.asarray(adata.obsm[like], np.float64)).all(1)] = np.nan
    adata.obsm[key] = x
    adata.uns[f"{key}_columns"] = list(oracle.columns)
    return adata
