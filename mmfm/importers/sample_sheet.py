"""The GDC sample sheet: which downloaded file belongs to which case and sample.

`gdc_sample_sheet.<date>.tsv` (Data Portal cart → "Sample Sheet"), tab-separated. Columns used: `File ID`, `File Name`,
`Project ID`, `Case ID`, `Sample ID`, and when present `Sample Type` (portal < 2.4.0) or `Tissue Type`, `Tumor
Descriptor`, `Specimen Type`, `Preservation Method` (portal ≥ 2.4.0, 2025). A file of several samples (a MAF of a
tumour–normal pair) lists them as "A, B" in the same order in every list column. Files are joined on `File Name`;
gdc-client stores each as `<File ID>/<File Name>`, so where the parent folder is a UUID it must equal the File ID.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mmfm.data import tcga
from mmfm.importers.common import ImportDataError, ImportReport

REQUIRED = ("File ID", "File Name", "Project ID", "Case ID", "Sample ID")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


@dataclass(frozen=True)
class SheetRow:
    line: int  # in the sheet, header = line 1
    file_id: str
    file_name: str
    project: str
    cases: tuple[str, ...]
    samples: tuple[tcga.Barcode, ...]
    preservation: str | None  # 'Preservation Method' (portal ≥ 2.4.0), else None

    def tumour_samples(self, codes: tuple[str, ...]) -> list[tcga.Barcode]:
        return [s for s in self.samples if s.sample_code in codes]


def _split(cell: str) -> list[str]:
    return [x.strip() for x in cell.split(",") if x.strip()]


def read_sample_sheet(path: Path) -> dict[str, SheetRow]:
    """File Name → row. Errors (naming the line): missing columns, a file listed twice, a non-TCGA sample,
    a sample whose participant is not the row's case."""
    path = Path(path)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ImportDataError(f"{path}: cannot be read as a GDC sample sheet (TSV): {e}") from e
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ImportDataError(f"{path}: sample sheet column(s) {missing} missing (has {list(df.columns)})")
    rows: dict[str, SheetRow] = {}
    for i, r in enumerate(df.to_dict("records")):
        line = i + 2
        where = f"{path} line {line}"
        name = r["File Name"].strip()
        if not name:
            raise ImportDataError(f"{where}: empty File Name")
        if name in rows:
            raise ImportDataError(f"{where}: File Name {name} listed twice (first on line {rows[name].line})")
        samples = tuple(tcga.parse_barcode(s, f"{where}, Sample ID") for s in _split(r["Sample ID"]))
        cases = tuple(tcga.case_of(c, f"{where}, Case ID") for c in _split(r["Case ID"]))
        wrong = [s.text for s in samples if s.case not in cases]
        if wrong:
            raise ImportDataError(f"{where}: Sample ID {', '.join(wrong)} does not belong to Case ID {r['Case ID']}")
        rows[name] = SheetRow(line, r["File ID"].strip(), name, r["Project ID"].strip(), cases, samples,
                              r.get("Preservation Method", "").strip() or None)
    return rows


def match_files(files: list[Path], sheet: dict[str, SheetRow], sheet_path: Path, report: ImportReport,
                suffixes: tuple[str, ...]) -> list[tuple[Path, SheetRow]]:
    """Pair downloaded files with sheet rows. A file absent from the sheet is an error (its case is unknown);
    sheet rows of this kind of file (name ending with one of `suffixes`) without a file on disk, and second
    copies of one file, are listed in the report."""
    pairs: dict[str, tuple[Path, SheetRow]] = {}
    for f in files:
        row = sheet.get(f.name)
        if row is None:
            raise ImportDataError(f"{f}: not listed in the sample sheet {sheet_path} (no File Name {f.name}); "
                                  "download the sheet of the same cart, or remove the file")
        if _UUID.fullmatch(f.parent.name) and f.parent.name.lower() != row.file_id.lower():
            raise ImportDataError(f"{f}: its gdc-client folder is {f.parent.name} but {sheet_path} line {row.line} "
                                  f"gives File ID {row.file_id}")
        if f.name in pairs:
            report.duplicate("second copies of a downloaded file (first used)", [f"{pairs[f.name][0]} ← {f}"])
            continue
        pairs[f.name] = (f, row)
    expected = {n for n in sheet if n.lower().endswith(suffixes)}
    report.unmatch("sample-sheet files not found on disk", sorted(expected - set(pairs)))
    return list(pairs.values())
