"""`mmfm import clinical`: TCGA-CDR and/or GDC clinical TSV → survival endpoints and clinical columns of cases.csv.

TCGA-CDR (Liu et al., Cell 2018; sheet `TCGA-CDR` of TCGA-CDR-SupplementalTableS1.xlsx saved as CSV or TSV): one row
per patient, `bcr_patient_barcode type ... OS OS.time DSS DSS.time DFI DFI.time PFI PFI.time`, times in days, events
0/1. Mapped: OS → os_event/os_days (the contract's survival columns), DSS/DFI/PFI → dss_*/dfi_*/pfi_*, type →
project `TCGA-<type>`, plus age, gender, stage, histological type and grade as text. Missing: empty, NA, #N/A and any
`[Bracketed]` BCR token ([Not Available], [Discrepancy], ...). The CDR authors advise PFI (or OS) per cancer type:
see data_cards/gdc_tcga.md.

GDC clinical TSV (cart → Clinical → TSV → clinical.tsv): one row per case × diagnosis × treatment, headers
`<entity>.<field>` (older downloads: bare names such as case_submitter_id, which are mapped). Overall survival: Dead →
os_days = days_to_death, os_event 1; Alive → os_days = the largest days_to_last_follow_up of the case's rows, os_event
0; otherwise unknown. A case whose rows disagree on vital status or days to death is an error. Missing: `'--`, `--`,
empty, "not reported", "unknown".

Both given: the CDR (curated, harmonised follow-up) is used for its patients, the GDC table for the others; the
source is recorded per case (`clinical_source`). Negative times are listed and left unknown. The importer owns the
columns it writes: a re-run replaces them for every case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from mmfm.data import tcga
from mmfm.importers.common import (ImportDataError, ImportReport, ensure_cohort, finish, read_csv_str,
                                        update_cases)

ENDPOINTS = ("OS", "DSS", "DFI", "PFI")
CDR_TEXT = {"age_at_initial_pathologic_diagnosis": "age", "gender": "gender", "race": "race",
            "ajcc_pathologic_tumor_stage": "stage", "histological_type": "histological_type",
            "histological_grade": "histological_grade", "vital_status": "vital_status"}
GDC_OLD_NAMES = {"case_submitter_id": "cases.submitter_id", "project_id": "project.project_id",
                 "vital_status": "demographic.vital_status", "days_to_death": "demographic.days_to_death",
                 "days_to_last_follow_up": "diagnoses.days_to_last_follow_up", "gender": "demographic.gender",
                 "age_at_index": "demographic.age_at_index", "ajcc_pathologic_stage": "diagnoses.ajcc_pathologic_stage"}
GDC_NEEDED = ("cases.submitter_id", "demographic.vital_status", "demographic.days_to_death",
              "diagnoses.days_to_last_follow_up")
GDC_TEXT = {"demographic.age_at_index": "age", "demographic.gender": "gender",
            "diagnoses.ajcc_pathologic_stage": "stage", "demographic.vital_status": "vital_status"}
_BRACKET = re.compile(r"\[.*\]")
CDR_MISSING = {"", "na", "nan", "#n/a"}
GDC_MISSING = {"", "'--", "--", "not reported", "unknown", "na"}


@dataclass
class ClinicalConfig:
    out: Path  # cohort directory to create or extend
    cdr: Path | None = None  # TCGA-CDR table as CSV/TSV (sheet TCGA-CDR of TCGA-CDR-SupplementalTableS1.xlsx)
    gdc_clinical: Path | None = None  # GDC clinical.tsv (cart → Clinical → TSV)
    cases: Literal["existing", "all"] = "existing"  # annotate the cohort's cases only, or add every patient
    projects: tuple[str, ...] = ()  # with cases=all: only these projects (e.g. TCGA-BRCA); empty = all


def _read(path: Path) -> pd.DataFrame:
    path = Path(path)
    if path.suffix.lower() in (".xlsx", ".xls"):
        raise ImportDataError(f"{path}: save the sheet 'TCGA-CDR' as CSV or TSV first (mmfm reads no spreadsheets)")
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_filter=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ImportDataError(f"{path}: cannot be read as a {'CSV' if sep == ',' else 'TSV'} table: {e}") from e
    df.columns = [c.strip() for c in df.columns]
    return df.apply(lambda s: s.str.strip())


def _number(cell: str, missing: set[str], where: str, event: bool = False) -> float:
    if cell.lower() in missing or _BRACKET.fullmatch(cell):
        return np.nan
    try:
        v = float(cell)
    except ValueError:
        raise ImportDataError(f"{where}: {cell!r} is not a number") from None
    if event and v not in (0.0, 1.0):
        raise ImportDataError(f"{where}: event {cell!r} is not 0 or 1")
    if not np.isfinite(v):
        raise ImportDataError(f"{where}: {cell!r} is not finite")
    return v


def _text(cell: str, missing: set[str]) -> str:
    return "" if cell.lower() in missing or _BRACKET.fullmatch(cell) else cell


def read_cdr(path: Path) -> pd.DataFrame:
    """TCGA-CDR → one row per case (index case_id) with endpoint and text columns."""
    df = _read(path)
    missing = [c for c in ("bcr_patient_barcode", "type", "OS", "OS.time") if c not in df.columns]
    if missing:
        raise ImportDataError(f"{path} line 1: TCGA-CDR column(s) {missing} missing (has {list(df.columns)[:12]})")
    rows, first = [], {}
    for i, r in enumerate(df.to_dict("records")):
        where = f"{path} line {i + 2}"
        case = tcga.case_of(r["bcr_patient_barcode"], f"{where}, bcr_patient_barcode")
        if case in first:
            raise ImportDataError(f"{where}: patient {case} appears twice (first on line {first[case]})")
        first[case] = i + 2
        rec = {"case_id": case, "project": f"TCGA-{r['type']}" if r["type"] else ""}
        for e in ENDPOINTS:
            if e in r and f"{e}.time" in r:
                rec[f"{e.lower()}_days"] = _number(r[f"{e}.time"], CDR_MISSING, f"{where}, {e}.time")
                rec[f"{e.lower()}_event"] = _number(r[e], CDR_MISSING, f"{where}, {e}", event=True)
        rec.update({new: _text(r[old], CDR_MISSING) for old, new in CDR_TEXT.items() if old in r})
        rows.append(rec)
    out = pd.DataFrame(rows).set_index("case_id")
    out["clinical_source"] = "TCGA-CDR"
    return out


def read_gdc_clinical(path: Path) -> pd.DataFrame:
    """GDC clinical.tsv → one row per case with overall survival from vital status and days."""
    df = _read(path).rename(columns=GDC_OLD_NAMES)
    missing = [c for c in GDC_NEEDED if c not in df.columns]
    if missing:
        raise ImportDataError(f"{path} line 1: GDC clinical column(s) {missing} missing (has {list(df.columns)[:12]})")
    per: dict[str, dict] = {}
    for i, r in enumerate(df.to_dict("records")):
        where = f"{path} line {i + 2}"
        case = tcga.case_of(r["cases.submitter_id"], f"{where}, cases.submitter_id")
        vital = _text(r["demographic.vital_status"], GDC_MISSING)
        death = _number(r["demographic.days_to_death"], GDC_MISSING, f"{where}, days_to_death")
        follow = _number(r["diagnoses.days_to_last_follow_up"], GDC_MISSING, f"{where}, days_to_last_follow_up")
        p = per.get(case)
        if p is None:
            p = per[case] = {"line": {"vital": i + 2, "death": i + 2}, "vital": vital, "death": death,
                             "follow": follow, "project": r.get("project.project_id", ""),
                             **{new: _text(r[old], GDC_MISSING) for old, new in GDC_TEXT.items() if old in r}}
            continue
        for key, v in (("vital", vital), ("death", death)):
            if _known(v) and _known(p[key]) and v != p[key]:
                raise ImportDataError(f"{where}: case {case} has {key} {v} but line {p['line'][key]} has {p[key]}")
            if _known(v) and not _known(p[key]):
                p[key], p["line"][key] = v, i + 2
        p["follow"] = np.nanmax([p["follow"], follow]) if _known(follow) or _known(p["follow"]) else np.nan
        for old, new in GDC_TEXT.items():
            if old in r and not p.get(new):
                p[new] = _text(r[old], GDC_MISSING)
    rows = []
    for case, p in per.items():
        vital = p["vital"].lower()
        days, event = ((p["death"], 1.0) if vital == "dead" else (p["follow"], 0.0) if vital == "alive"
                       else (np.nan, np.nan))
        if not _known(days):
            days, event = np.nan, np.nan
        rows.append({"case_id": case, "project": p["project"], "os_days": days, "os_event": event,
                     **{new: p.get(new, "") for new in GDC_TEXT.values()}})
    out = pd.DataFrame(rows).set_index("case_id")
    out["clinical_source"] = "GDC clinical"
    return out


def _known(v) -> bool:
    return not (v is None or v == "" or (isinstance(v, float) and np.isnan(v)))


def run(cfg: ClinicalConfig) -> ImportReport:
    """Import survival endpoints and clinical columns into `cfg.out` (cases.csv)."""
    out = Path(cfg.out)
    if cfg.cdr is None and cfg.gdc_clinical is None:
        raise ImportDataError("clinical: give cdr (TCGA-CDR table) and/or gdc_clinical (GDC clinical.tsv)")
    inputs = [str(p) for p in (cfg.cdr, cfg.gdc_clinical) if p is not None]
    report = ImportReport("clinical", str(out), inputs)
    tables = []
    if cfg.cdr is not None:
        tables.append(read_cdr(cfg.cdr))
    if cfg.gdc_clinical is not None:
        gdc = read_gdc_clinical(cfg.gdc_clinical)
        if tables:
            report.duplicate("cases in both tables (TCGA-CDR used)", sorted(set(gdc.index) & set(tables[0].index)))
            gdc = gdc.drop(index=tables[0].index, errors="ignore")
        tables.append(gdc)
    table = pd.concat(tables)
    ensure_cohort(out)
    existing = set(read_csv_str(out / "cases.csv")["case_id"])
    if cfg.cases == "existing":
        if not existing:
            raise ImportDataError(f"{out}/cases.csv has no case yet: import RNA, slides, ... first, or set "
                                  "cases: all (every patient of the table becomes a case)")
        report.unmatch("patients of the table not in the cohort (cases = existing)",
                       sorted(set(table.index) - existing))
        table = table[table.index.isin(existing)]
    elif cfg.projects:
        other = ~table["project"].isin(cfg.projects)
        report.unmatch(f"patients of other projects than {list(cfg.projects)}", sorted(table.index[other]))
        table = table[~other]
    for e in ENDPOINTS:
        col = f"{e.lower()}_days"
        if col in table:
            neg = table[col] < 0
            report.unmatch(f"negative {e} times (left unknown)", sorted(table.index[neg]))
            table.loc[neg, [col, f"{e.lower()}_event"]] = np.nan
    half = table["os_days"].isna() != table["os_event"].isna()
    report.unmatch("cases with only one of OS time / event (both left unknown)", sorted(table.index[half]))
    table.loc[half, ["os_days", "os_event"]] = np.nan
    report.unmatch("cases with no usable overall survival", sorted(table.index[table["os_days"].isna()]))
    report.unmatch("cases of cases.csv without clinical data", sorted(existing - set(table.index)))
    owned = [c for c in table.columns if c != "project"]
    update_cases(out, table.index, report, columns=table, owned=owned, project=table["project"].to_dict())
    report.matched = sorted(table.index)
    for case, src in table["clinical_source"].items():
        report.per_case[case] = {"source": src}
    report.rules.update({"overall survival": "TCGA-CDR OS/OS.time; GDC: Dead → days_to_death (event 1), Alive → "
                                             "max days_to_last_follow_up (event 0)",
                         "precedence": "TCGA-CDR over GDC clinical for patients in both",
                         "cases": cfg.cases})
    return finish(report, out)
