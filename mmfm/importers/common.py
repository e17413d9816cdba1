"""What every importer shares: the import report, the data error, and the few writes into a cohort directory.

Ownership rule (what makes a re-run safe): each importer owns its output — `rna.h5ad`, `protein.h5ad`,
`reports.jsonl`, the `mut_*` columns, the clinical columns, or the slides.csv rows of the slides it imports — and a
re-run replaces exactly that with the result of its inputs (pass every download to one run to combine them). Rows of
cases.csv are only ever added, never removed, since other modalities may refer to them. Every write is atomic.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import yaml

from mmfm.data import tcga
from mmfm import io
from mmfm.io import id_list, write_json, write_text

PLACEHOLDER_ENCODER = "none"  # cohort.yaml written before any slide features: `import features` replaces it
SHOW = 8  # items shown per category when the report is printed (the JSON has them all)


class ImportDataError(ValueError):
    """An input file the importer cannot use as it is; the message names the file and line or column."""


@dataclass
class ImportReport:
    """What one import matched, could not match and chose. Printed, and written to `imports/<importer>.json`."""

    importer: str
    cohort: str
    inputs: list[str]
    rules: dict[str, str] = field(default_factory=dict)  # rule name -> the rule applied, in words
    matched: list[str] = field(default_factory=list)  # cases (slides for `features`) written
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # category -> items that were not imported
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # category -> "case: used X; not used Y"
    per_case: dict[str, dict] = field(default_factory=dict)  # case (or slide) -> what was chosen for it
    notes: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    validation: dict = field(default_factory=dict)

    def unmatch(self, category: str, items: Iterable[str]) -> None:
        items = [str(i) for i in items]
        if items:
            self.unmatched.setdefault(category, []).extend(items)

    def duplicate(self, category: str, items: Iterable[str]) -> None:
        items = [str(i) for i in items]
        if items:
            self.duplicates.setdefault(category, []).extend(items)

    def format(self) -> str:
        def listing(v):
            return id_list(v, SHOW)
        lines = [f"mmfm import {self.importer} → {self.cohort}: {len(self.matched)} matched"]
        lines += [f"  rule {k}: {v}" for k, v in self.rules.items()]
        lines += [f"  UNMATCHED {k} ({len(v)}): {listing(v)}" for k, v in self.unmatched.items()]
        lines += [f"  DUPLICATES {k} ({len(v)}): {listing(v)}" for k, v in self.duplicates.items()]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  wrote {w}" for w in self.written]
        if self.validation:
            v = self.validation
            lines.append(f"  validate: {'ok' if v['ok'] else 'ERRORS'} ({len(v['errors'])} error(s), "
                         f"{len(v['warnings'])} warning(s)){'; headers only' if not v.get('scanned', True) else ''}")
            lines += [f"    ERROR {e}" for e in v["errors"][:SHOW]]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def finish(report: ImportReport, out: Path, scan_features: bool = True) -> ImportReport:
    """Validate the cohort as the importer left it, write `imports/<importer>.json`, print the report."""
    from mmfm.data.cohort import validate

    rep = validate(out, scan_features=scan_features)
    report.validation = {"ok": rep.ok, "scanned": scan_features, "errors": rep.errors, "warnings": rep.warnings}
    path = out / "imports" / f"{report.importer}.json"
    report.written.append(str(path))
    write_json(path, report.to_dict())
    print(report.format())
    return report


# ------------------------------------------------------------------------------------------- cohort dir writes
def ensure_cohort(out: Path) -> None:
    """Create the directory with an empty cases.csv / slides.csv and, if missing, a placeholder cohort.yaml
    (tile_encoder.name 'none', dim 1) that `mmfm import features` replaces: validate needs the file even for a
    cohort that has no slide features yet."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "cohort.yaml").exists():
        doc = {"name": out.resolve().name, "version": "1",
               "description": "imported by mmfm import; no slide features yet (`mmfm import features` sets them)",
               "tile_encoder": {"name": PLACEHOLDER_ENCODER, "feature_dim": 1},
               "target_magnification": 20.0, "patch_size": 256}
        write_text(out / "cohort.yaml", yaml.safe_dump(doc, sort_keys=False))
    for name, cols in (("cases.csv", ["case_id", "site"]), ("slides.csv", ["slide_id", "case_id", "path"])):
        if not (out / name).exists():
            write_csv(out / name, pd.DataFrame(columns=cols))


def read_csv_str(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)


def write_csv(path: Path, df: pd.DataFrame) -> None:
    io.write_csv(path, df, index=False)


def update_cases(out: Path, case_ids: Iterable[str], report: ImportReport, *,
                 columns: pd.DataFrame | None = None, owned: Iterable[str] = (),
                 project: Mapping[str, str] | None = None, drop: Iterable[str] = ()) -> None:
    """Add `case_ids` to cases.csv (site = the TCGA tissue source site), replace the `owned` columns with
    `columns` (indexed by case_id; cases absent from it get empty = unknown), fill empty `project` cells,
    remove the `drop` columns."""
    path = out / "cases.csv"
    cases = read_csv_str(path).drop(columns=list(drop))
    new = [c for c in dict.fromkeys(map(str, case_ids)) if c not in set(cases["case_id"])]
    if new:
        cases = pd.concat([cases, pd.DataFrame({"case_id": new})])
    cases = cases.fillna("").reset_index(drop=True)
    cases["site"] = tcga.fill_sites(cases["case_id"], cases["site"])
    if project:
        if "project" not in cases:
            cases["project"] = ""
        have = cases.set_index("case_id")["project"]
        clash = [f"{c}: {have[c]} vs {p}" for c, p in project.items() if c in have.index and have[c] not in ("", p)]
        report.duplicate("cases with two projects (first kept)", clash)
        fill = cases["project"].eq("") & cases["case_id"].isin(list(project))
        cases.loc[fill, "project"] = cases.loc[fill, "case_id"].map(project)
    for col in owned:
        vals = columns[col] if columns is not None and col in columns else pd.Series(dtype=object)
        cases[col] = cases["case_id"].map(vals.map(_cell)).fillna("")
    write_csv(path, cases.sort_values("case_id", kind="stable"))
    report.written.append(str(path))


def _cell(v) -> str:
    """A value as cases.csv text: '' for unknown, integers without '.0'."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def unique_cases(values: Iterable[str]) -> list[str]:
    return sorted(set(map(str, values)))


def input_files(inputs: Iterable[Path], suffixes: tuple[str, ...], recursive: bool = True) -> list[Path]:
    """Files under the inputs (files or folders) whose name ends with one of `suffixes`, sorted; a gdc-client
    folder holds `<file id>/<file name>` plus `logs/` and unfinished `*.partial` files, which are never taken."""
    out: list[Path] = []
    for p in map(Path, inputs):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = p.rglob("*") if recursive else p.iterdir()
            out += [f for f in found if f.is_file() and f.name.lower().endswith(suffixes)
                    and "logs" not in f.relative_to(p).parts[:-1]]
        else:
            raise ImportDataError(f"{p}: no such file or directory")
    return sorted(dict.fromkeys(out))


def partial_files(inputs: Iterable[Path]) -> list[str]:
    """Unfinished gdc-client downloads (`*.partial`) under the input folders, for the report."""
    return sorted(str(f) for p in map(Path, inputs) if p.is_dir() for f in p.rglob("*.partial"))


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)
