"""`mmfm import reports`: TCGA-Reports CSV or a folder of one text file per case → `reports.jsonl`.

TCGA-Reports (Kefeli & Tatonetti, Patterns 2024; `TCGA_Reports.csv`): comma CSV `patient_filename,text`, where
patient_filename is `<participant barcode>.<report file UUID>`; the case is the barcode before the first ".". A folder
holds `<barcode>[.anything].txt` files (UTF-8), one report each. The contract allows one report per case, so several
reports of one patient are joined in name order with a blank line between (default `concatenate`; nothing is lost),
or only the first is kept (`first`), or they are an error (`error`). Empty texts are listed and not written.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmfm.data import tcga
from mmfm.importers.common import (ImportDataError, ImportReport, dumps, ensure_cohort, finish, input_files,
                                        read_csv_str, update_cases)
from mmfm.io import write_text

SUFFIXES = (".csv", ".txt")


@dataclass
class ReportsConfig:
    out: Path  # cohort directory to create or extend
    inputs: tuple[Path, ...]  # TCGA-Reports CSV file(s) and/or folders of <barcode>.txt files
    duplicates: Literal["concatenate", "first", "error"] = "concatenate"  # several reports of one case


def _csv_reports(path: Path) -> list[tuple[str, str, str]]:
    """(name, text, where) per row of a patient_filename,text CSV (reports hold newlines and commas: csv module)."""
    csv.field_size_limit(sys.maxsize)  # a report can exceed the csv module's 128 kB default
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("patient_filename", "text") if c not in (reader.fieldnames or [])]
        if missing:
            raise ImportDataError(f"{path} line 1: column(s) {missing} missing (has {reader.fieldnames})")
        rows, start = [], 2  # a record may span several lines: name it by its first line
        for r in reader:
            rows.append((r["patient_filename"].strip(), r["text"] or "", f"{path} line {start}"))
            start = reader.line_num + 1
        return rows


def run(cfg: ReportsConfig) -> ImportReport:
    """Import pathology reports into `cfg.out` (reports.jsonl + the cases)."""
    out = Path(cfg.out)
    report = ImportReport("reports", str(out), [str(p) for p in cfg.inputs])
    items: list[tuple[str, str, str]] = []
    for f in input_files(cfg.inputs, SUFFIXES, recursive=False):
        if f.suffix.lower() == ".csv":
            items += _csv_reports(f)
        else:
            items.append((f.name, f.read_text(encoding="utf-8"), str(f)))
    if not items:
        raise ImportDataError(f"no report (.csv / .txt) under {[str(p) for p in cfg.inputs]}")
    by_case: dict[str, list[tuple[str, str]]] = {}
    for name, text, where in items:
        case = tcga.case_of(tcga.name_barcode(name), f"{where} ({name})")
        if not text.strip():
            report.unmatch("empty reports (not written)", [f"{name} ({where})"])
            continue
        by_case.setdefault(case, []).append((name, text.strip()))
    texts = {}
    for case in sorted(by_case):
        reps = sorted(by_case[case])
        if len(reps) > 1:
            if cfg.duplicates == "error":
                raise ImportDataError(f"case {case}: {len(reps)} reports ({', '.join(n for n, _ in reps)}) and "
                                      "duplicates = error; choose concatenate or first")
            report.duplicate(f"cases with several reports ({cfg.duplicates})",
                             [f"{case}: {', '.join(n for n, _ in reps)}"])
            if cfg.duplicates == "first":
                reps = reps[:1]
        texts[case] = "\n\n".join(t for _, t in reps)
        report.per_case[case] = {"sources": [n for n, _ in reps]}
    ensure_cohort(out)
    before = set(read_csv_str(out / "cases.csv")["case_id"])
    write_text(out / "reports.jsonl", "".join(dumps({"case_id": c, "text": t}) + "\n" for c, t in texts.items()))
    report.written.append(str(out / "reports.jsonl"))
    update_cases(out, texts, report)
    report.matched = list(texts)
    report.rules["duplicates"] = cfg.duplicates
    report.unmatch("cases of cases.csv without a report", sorted(before - set(texts)))
    return finish(report, out)
