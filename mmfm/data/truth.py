"""The latent truth of a simulated cohort (`truth/`, written by mmfm.data.simulate) and the oracle built from it.

An oracle is the ceiling of a method comparison: the same probe, run on the variables that generated the data
instead of on an embedding learned from it. The default oracle holds what the slide's tile features are a
function of — the five programme values and the subtype (one-hot) — so it bounds what any slide embedding can
know (drivers reach morphology only through programmes; add `"drivers"` for the full latent state, which makes a
mutation probe trivially perfect). Training code never reads truth/; probes and benchmarks do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

ORACLE_VARIABLES = ("programmes", "subtype", "drivers")


def read_truth(cohort_dir: str | Path) -> pd.DataFrame:
    """truth/cases.csv indexed by case_id (str): programmes, subtype, true drivers, risk, presence, …"""
    path = Path(cohort_dir) / "truth" / "cases.csv"
    if not path.is_file():
        raise ValueError(f"{path}: not found; only cohorts written by `mmfm simulate` have a latent truth")
    df = pd.read_csv(path, dtype={"case_id": str}).set_index("case_id")
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
