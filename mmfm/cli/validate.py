"""`mmfm validate`: every problem of a cohort directory at once, naming file and row."""

from __future__ import annotations

from dataclasses import dataclass

from mmfm.data.cohort import validate
from mmfm.io import write_json

DESCRIPTION = """\
Check a cohort directory against the contract (data_cards/cohort_format.md): cohort.yaml, cases.csv,
slides.csv, every bag's header and (unless --headers-only) its features for NaN/inf, the omics AnnData files
and reports. Prints every error and warning at once, each naming the file and row; exit 1 if any error.

example: mmfm validate cohort --json cohort_report.json"""

POSITIONAL = "path"


@dataclass
class Config:
    path: str = ""                     # cohort directory (positional)
    json: str | None = None            # also write the report as JSON to this file
    headers_only: bool = False         # skip the NaN/inf scan of feature matrices (bag headers are still checked)
    rescan: bool = False               # scan every bag's features again, ignoring <cohort>/.feature_scan.json


def run(cfg: Config) -> int:
    if not cfg.path:
        raise ValueError("the cohort directory is required: mmfm validate PATH")
    rep = validate(cfg.path, scan_features=not cfg.headers_only, scan_cache=not cfg.rescan)
    print(rep.format())
    if cfg.json:
        write_json(cfg.json, rep.to_dict())
    return 0 if rep.ok else 1
