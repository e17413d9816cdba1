"""`mmfm import maf`: GDC masked-somatic or MC3 MAFs → per-case `mut_<GENE>` flags in cases.csv.

Reading: every leading `#` line is skipped (`#version 2.4`, GDC pragmas), the next line is the header; columns used
`Hugo_Symbol`, `Variant_Classification`, `Tumor_Sample_Barcode` (an aliquot barcode) and, when present, `FILTER`
(MC3). Plain or gzipped.

Rules (why):
- A variant counts when its Variant_Classification is protein-altering: Missense_Mutation, Nonsense_Mutation,
  Frame_Shift_Del, Frame_Shift_Ins, In_Frame_Del, In_Frame_Ins, Splice_Site, Translation_Start_Site,
  Nonstop_Mutation (maftools' non-synonymous set, the usual definition of a "mutated gene" label). Silent, UTR,
  flank, intron, IGR, RNA, Splice_Region, Targeted_Region and De_novo_Start_* do not. `classifications` overrides.
- MC3 rows whose FILTER holds `nonpreferredpair` (the same tumour called against a second normal) are excluded by
  default, so a variant is never counted twice; `exclude_filters` sets the tokens.
- A case is *known* only if it was sequenced: a tumour sample appears in a MAF row, or (with a sample sheet) a MAF
  file of its tumour sample was downloaded. Known cases get 1/0 per panel gene; every other case stays empty
  (unknown), never 0 — "no MAF" is not "wild-type".
- Several tumour aliquots of one case: `aliquot_rule` (default `first`: the best-ranked aliquot's calls only).
- Panel: `genes`, or the `top_n` genes mutated in the most known cases (ties by name; `Unknown` excluded).
The importer owns every `mut_*` column of cases.csv: a re-run replaces them all.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from mmfm.data import tcga
from mmfm.importers import aliquots
from mmfm.importers.common import (ImportDataError, ImportReport, ensure_cohort, finish, input_files,
                                        read_csv_str, update_cases)
from mmfm.importers.sample_sheet import match_files, read_sample_sheet
from mmfm.io import check_header, ends_mid_line

NON_SILENT = ("Missense_Mutation", "Nonsense_Mutation", "Frame_Shift_Del", "Frame_Shift_Ins", "In_Frame_Del",
              "In_Frame_Ins", "Splice_Site", "Translation_Start_Site", "Nonstop_Mutation")
MAF_SUFFIX = (".maf", ".maf.gz", ".maf.txt", ".maf.txt.gz")
NEEDED = ("Hugo_Symbol", "Variant_Classification", "Tumor_Sample_Barcode")


@dataclass
class MafConfig:
    out: Path  # cohort directory to create or extend
    inputs: tuple[Path, ...]  # MAF files (.maf, .maf.gz) or folders of them (gdc-client layout)
    sample_sheet: Path | None = None  # GDC sample sheet: cases whose MAF holds no row are still known (0)
    genes: tuple[str, ...] = ()  # gene panel (Hugo symbols); empty = the top_n most mutated genes
    top_n: int = 20  # panel size when genes is empty
    classifications: tuple[str, ...] = NON_SILENT  # Variant_Classification values that count as mutated
    exclude_filters: tuple[str, ...] = ("nonpreferredpair",)  # rows whose FILTER holds one of these are ignored
    aliquot_rule: Literal["first", "any", "error"] = "first"  # several tumour aliquots of a case
    sample_types: tuple[str, ...] = tcga.TUMOUR_CODES  # TCGA sample-type codes of the tumour barcodes used


def read_maf(path: Path) -> tuple[pd.DataFrame, int]:
    """(rows with the needed columns (+ FILTER) as text, line number of the header)."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    skip = 0
    try:
        if opener is open:
            check_header(path)
        with opener(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if not line.startswith("#"):
                    break
                skip += 1
        df = pd.read_csv(path, sep="\t", skiprows=skip, dtype=str, keep_default_na=False, low_memory=False,
                         usecols=lambda c: c in NEEDED or c == "FILTER", compression="infer")
    except (OSError, EOFError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError,
            UnicodeDecodeError) as e:
        raise ImportDataError(f"{path}: cannot be read as a MAF: {e}") from e
    if opener is open and ends_mid_line(path):
        raise ImportDataError(f"{path}: ends in the middle of a line (line {skip + 1 + len(df)}): a truncated "
                              f"download? Fetch the file again")
    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise ImportDataError(f"{path} line {skip + 1}: MAF column(s) {missing} missing")
    return df, skip + 1


def run(cfg: MafConfig) -> ImportReport:
    """Import mutation flags into `cfg.out` (mut_* columns of cases.csv)."""
    out = Path(cfg.out)
    report = ImportReport("maf", str(out), [str(p) for p in cfg.inputs])
    files = input_files(cfg.inputs, MAF_SUFFIX)
    if not files:
        raise ImportDataError(f"no MAF file (*.maf, *.maf.gz) under {[str(p) for p in cfg.inputs]}")
    sequenced: dict[str, tcga.Barcode] = {}  # tumour aliquot / sample barcode → parsed, for every covered sample
    if cfg.sample_sheet is not None:  # MAF rows name their samples: a file outside the sheet is used all the same
        sheet = read_sample_sheet(cfg.sample_sheet)
        report.notes += [f"{f} is not in the sample sheet: only its rows say which tumours were sequenced"
                         for f in files if f.name not in sheet]
        for _, row in match_files([f for f in files if f.name in sheet], sheet, cfg.sample_sheet, report, MAF_SUFFIX):
            for s in row.tumour_samples(cfg.sample_types):
                sequenced.setdefault(s.text, s)
    calls, n_filtered, n_other = [], 0, 0
    for f in files:
        df, header = read_maf(f)
        for i, bc in enumerate(df["Tumor_Sample_Barcode"]):
            if bc not in sequenced:
                sequenced[bc] = tcga.parse_barcode(bc, f"{f} line {header + 1 + i}, Tumor_Sample_Barcode")
        keep = df["Variant_Classification"].isin(cfg.classifications).to_numpy()
        n_other += int((~keep).sum())
        if "FILTER" in df and cfg.exclude_filters:
            tokens = df["FILTER"].str.replace(";", ",").str.split(",")
            bad = tokens.map(lambda t: any(x.strip() in cfg.exclude_filters for x in t)).to_numpy()
            n_filtered += int((bad & keep).sum())
            keep &= ~bad
        calls.append(df.loc[keep, ["Tumor_Sample_Barcode", "Hugo_Symbol"]])
    report.notes.append(f"{n_other} row(s) of other Variant_Classifications and {n_filtered} qualifying row(s) with "
                        f"an excluded FILTER were not counted")
    with_rows = {b.sample for b in sequenced.values() if b.portion is not None}  # sheet samples seen as aliquots
    cands = [aliquots.Candidate(bc, b) for bc, b in sorted(sequenced.items())
             if b.portion is not None or b.sample not in with_rows]
    chosen = aliquots.select(cands, cfg.aliquot_rule, cfg.sample_types, report, "tumour samples")
    sample_case = {c.source: case for case, used in chosen.items() for c in used}
    calls = pd.concat(calls) if calls else pd.DataFrame(columns=["Tumor_Sample_Barcode", "Hugo_Symbol"])
    calls = calls[calls["Tumor_Sample_Barcode"].isin(sample_case) & ~calls["Hugo_Symbol"].isin(["", "Unknown"])]
    hits = pd.DataFrame({"case": calls["Tumor_Sample_Barcode"].map(sample_case).to_numpy(),
                         "gene": calls["Hugo_Symbol"].to_numpy()}).drop_duplicates()
    if cfg.genes:
        panel = list(dict.fromkeys(cfg.genes))
        report.rules["panel"] = f"given: {', '.join(panel)}"
    else:
        freq = hits.groupby("gene").size().reset_index(name="n")
        panel = list(freq.sort_values(["n", "gene"], ascending=[False, True])["gene"][:cfg.top_n])
        report.rules["panel"] = f"the {cfg.top_n} genes mutated in the most known cases"
    known = sorted(chosen)
    flags = pd.DataFrame(0.0, index=pd.Index(known, name="case_id"), columns=[f"mut_{g}" for g in panel])
    for case, gene in hits[hits["gene"].isin(panel)].itertuples(index=False):
        flags.at[case, f"mut_{gene}"] = 1.0
    report.rules.update({"mutated": "Variant_Classification in " + ", ".join(cfg.classifications),
                         "filter": "FILTER tokens excluded: " + (", ".join(cfg.exclude_filters) or "none"),
                         "aliquots": aliquots.RULE_TEXT[cfg.aliquot_rule],
                         "unknown": "cases without a sequenced tumour sample stay empty (unknown), never 0"})
    for case in known:
        report.per_case[case]["mutated"] = [g for g in panel if flags.at[case, f"mut_{g}"] == 1.0]
    ensure_cohort(out)
    stale = sorted(c for c in read_csv_str(out / "cases.csv").columns if c.startswith("mut_") and c not in flags)
    if stale:
        report.notes.append(f"earlier mut_* columns not in this panel removed: {', '.join(stale)}")
    update_cases(out, known, report, columns=flags, owned=flags.columns, drop=stale)
    cases = read_csv_str(out / "cases.csv")
    report.matched = known
    report.unmatch("cases of cases.csv without a sequenced tumour (mutations unknown)",
                   sorted(set(cases["case_id"]) - set(known)))
    missing_genes = [g for g in panel if not hits["gene"].eq(g).any()]
    if missing_genes:
        report.notes.append(f"panel gene(s) with no qualifying variant in any known case: {', '.join(missing_genes)}")
    report.rules["counts"] = "; ".join(f"{g} {int(flags[f'mut_{g}'].sum())}/{len(known)}" for g in panel)
    return finish(report, out)
