"""Probe labels from a simulated cohort's latent truth (`truth/cases.csv`), joined into an embeddings AnnData.

Training never reads the truth folder; probes may grade against it (e.g. what the simulated reports state:
`report_necrosis`, `report_lvi`, `report_reported_grade`, `report_til`, or the programme values `prog_*`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

REPORT_FACTS = ("report_necrosis", "report_lvi", "report_reported_grade", "report_til")


def join_truth(adata: ad.AnnData, cohort_dir: str | Path, columns: Sequence[str] = REPORT_FACTS,
               key: str = "case_id") -> ad.AnnData:
    """A copy of `adata` with `columns` of `<cohort>/truth/cases.csv` added to obs (matched on obs[key], or on
    obs_names when obs has no `key` column). A truth value of a case without a report is left empty."""
    path = Path(cohort_dir) / "truth" / "cases.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no latent truth (only simulated cohorts carry one)")
    truth = pd.read_csv(path, dtype={"case_id": str}).set_index("case_id")
    missing = [c for c in columns if c not in truth.columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing} (has: {', '.join(truth.columns)})")
    cases = adata.obs[key].astype(str) if key in adata.obs else pd.Series(adata.obs_names.astype(str),
                                                                         index=adata.obs_names)
    out = adata.copy()
    ids = cases.to_numpy()
    stated = truth["has_report"].reindex(ids).eq(True).to_numpy() if "has_report" in truth else np.ones(len(ids), bool)
    for c in columns:
        values = truth[c].reindex(ids).convert_dtypes()  # nullable: grade stays 1/2/3, not 1.0/2.0/3.0
        if c.startswith("report_"):  # a fact no report states is no label
            values = values.where(stated)
        out.obs[c] = pd.Series(values.to_numpy(), index=out.obs_names, dtype=values.dtype)
    return out
