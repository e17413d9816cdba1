"""The latent truth of a simulated cohort (`truth/`, written by mmfm.simulate): read it, build the oracle from it,
join its columns into an embeddings AnnData as probe labels.

An oracle is the ceiling of a method comparison: the same probe, run on the variables that generated the data
instead of on an embedding learned from it. The default oracle holds what the slide's tile features are a
function of — the five programme values and the subtype (one-hot) — so it bounds what any slide embedding can
know (drivers reach morphology only through programmes; add `"drivers"` for the full latent state, which makes a
mutation probe trivially perfect). Training code never reads truth/; probes and benchmarks do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

ORACLE_VARIABLES = ("programmes", "subtype", "drivers")
# What the simulated reports state (probe labels for the report modality); `prog_*` can be joined the same way.
REPORT_FACTS = ("report_necrosis", "report_lvi", "report_reported_grade", "report_til")


def _cases_csv(cohort_dir: str | Path) -> tuple[Path, pd.DataFrame]:
    path = Path(cohort_dir) / "truth" / "cases.csv"
    if not path.is_file():
        raise ValueError(f"{path}: not found; only cohorts written by `mmfm simulate` have a latent truth")
    return path, pd.read_csv(path, dtype={"case_id": str}).set_index("case_id")


def read_truth(cohort_dir: str | Path) -> pd.DataFrame:
    """truth/cases.csv indexed by case_id (str): programmes, subtype, true drivers, risk, presence, …"""
    path, df = _cases_csv(cohort_dir)
    need = {"subtype"} | {c for c in df.columns if c.startswith("prog_")}
    if not any(c.startswith("prog_") for c in df.columns) or not need <= set(df.columns):
        raise ValueError(f"{path}: missing columns {sorted(need - set(df.columns)) or ['prog_*']}")
    return df


def oracle_embedding(cohort_dir: str | Path, variables=("programmes", "subtype")) -> pd.DataFrame:
    """[cases × latent] float64 oracle features from truth/: `prog_*` programme values, `subtype_*` one-hot of the
    true subtype, `true_mut_*` true driver status (with "drivers"); one row per case, indexed by case_id."""
    unknown = sorted(set(variables) - set(ORACLE_VARIABLES))
    if unknown or not variables:
        raise ValueError(f"oracle variables {unknown or list(variables)}: choose from {ORACLE_VARIABLES}")
    truth = read_truth(cohort_dir)
    parts = []
    if "programmes" in variables:
        parts.append(truth[[c for c in truth.columns if c.startswith("prog_")]])
    if "subtype" in variables:
        names = sorted(truth["subtype"].astype(str).unique())
        model = Path(cohort_dir) / "truth" / "model.json"
        if model.is_file():  # every subtype the simulator knows, also one absent from a small cohort
            names = list(json.loads(model.read_text()).get("subtypes", names))
        parts.append(pd.DataFrame({f"subtype_{s}": (truth["subtype"].astype(str) == s) for s in names},
                                  index=truth.index))
    if "drivers" in variables:
        parts.append(truth[[c for c in truth.columns if c.startswith("true_mut_")]])
    return pd.concat(parts, axis=1).astype(np.float64)


def join_truth(adata: ad.AnnData, cohort_dir: str | Path, columns: Sequence[str] = REPORT_FACTS,
               key: str = "case_id") -> ad.AnnData:
    """A copy of `adata` with `columns` of `<cohort>/truth/cases.csv` added to obs (matched on obs[key], or on
    obs_names when obs has no `key` column). A truth value of a case without a report is left empty."""
    path, truth = _cases_csv(cohort_dir)
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
