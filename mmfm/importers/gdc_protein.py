"""`mmfm import gdc-protein`: GDC RPPA files or a TCPA wide matrix → `protein.h5ad`, one row per case.

GDC RPPA (Proteome Profiling / Protein Expression Quantification): one TSV per shipped portion, named
`<barcode>_RPPA_data.tsv`, columns `AGID lab_id catalog_number set_id peptide_target protein_expression`; the value may
be `NA`. Joined to cases through the sample sheet when given (its Sample ID wins; a file-name barcode of another
case is an error), else through the barcode in the file name. TCPA level 4 (`TCGA-<TYPE>-L4.csv`, pan-cancer
`TCGA-PANCAN32-L4.csv`): comma CSV, `Sample_ID, Cancer_Type, Sample_Type, SetID`, then one column per antibody.

Values are on a log2 scale (normalised, median-centred: negatives are normal). The cohort contract wants raw,
non-negative values in `layers['counts']`, so counts = 2^value (the linear relative level) and `X` keeps the published
log2 values. The contract cannot mark one protein missing for one case, so antibodies not measured for every
imported case are dropped (default) or the cases lacking any of them are dropped; either way they are listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd

from mmfm.data import tcga
from mmfm.importers import aliquots
from mmfm.importers.common import (ImportDataError, ImportReport, ensure_cohort, finish, input_files,
                                        partial_files, read_csv_str, update_cases)
from mmfm.importers.sample_sheet import match_files, read_sample_sheet
from mmfm.io import write_h5ad

RPPA_COLUMNS = ("AGID", "lab_id", "catalog_number", "set_id", "peptide_target", "protein_expression")
RPPA_SUFFIX = ("_rppa_data.tsv",)
TCPA_META = ("Sample_ID", "Cancer_Type", "Sample_Type", "SetID")
MISSING = {"", "NA", "NaN", "nan", "#N/A"}


@dataclass
class GdcProteinConfig:
    out: Path  # cohort directory to create or extend
    inputs: tuple[Path, ...]  # RPPA files / gdc-client folders (format gdc) or TCPA CSV files (format tcpa)
    sample_sheet: Path | None = None  # GDC sample sheet (format gdc; default: barcode from the file name)
    format: Literal["gdc", "tcpa"] = "gdc"  # gdc: per-sample *_RPPA_data.tsv; tcpa: samples × antibodies CSV
    values: Literal["log2", "linear"] = "log2"  # scale of the published values; counts = 2^v for log2
    missing: Literal["drop_protein", "drop_case"] = "drop_protein"  # an antibody not measured for every case
    aliquot_rule: Literal["first", "mean", "error"] = "first"  # several samples of a case (see importers/aliquots.py)
    sample_types: tuple[str, ...] = tcga.TUMOUR_CODES  # TCGA sample-type codes imported


def _floats(cells: pd.Series, where) -> np.ndarray:
    """Text cells → floats (missing tokens → NaN); anything else is an error naming the line."""
    out = np.full(len(cells), np.nan)
    for i, cell in enumerate(cells):
        cell = cell.strip()
        if cell in MISSING:
            continue
        try:
            out[i] = float(cell)
        except ValueError:
            raise ImportDataError(f"{where(i)}: {cell!r} is not a number") from None
        if not np.isfinite(out[i]):
            raise ImportDataError(f"{where(i)}: {cell!r} is not finite")
    return out


def read_rppa(path: Path) -> pd.DataFrame:
    """One GDC RPPA file → DataFrame indexed by peptide_target with AGID, catalog_number, value."""
    path = Path(path)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ImportDataError(f"{path}: cannot be read as an RPPA TSV: {e}") from e
    missing = [c for c in RPPA_COLUMNS if c not in df.columns]
    if missing:
        raise ImportDataError(f"{path} line 1: column(s) {missing} missing (has {list(df.columns)})")
    dup = df["peptide_target"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise ImportDataError(f"{path} line {i + 2}: peptide_target {df['peptide_target'][i]} appears twice")
    value = _floats(df["protein_expression"], lambda i: f"{path} line {i + 2}, protein_expression")
    return pd.DataFrame({"AGID": df["AGID"].to_numpy(), "catalog_number": df["catalog_number"].to_numpy(),
                         "value": value}, index=pd.Index(df["peptide_target"].str.strip(), name="protein"))


def _gdc(cfg: GdcProteinConfig, report: ImportReport):
    files = input_files(cfg.inputs, RPPA_SUFFIX)
    if not files:
        raise ImportDataError(f"no *_RPPA_data.tsv file under {[str(p) for p in cfg.inputs]}")
    report.unmatch("unfinished downloads (*.partial)", partial_files(cfg.inputs))
    cands, paths, projects = [], {}, {}
    if cfg.sample_sheet is not None:
        for f, row in match_files(files, read_sample_sheet(cfg.sample_sheet), cfg.sample_sheet, report, RPPA_SUFFIX):
            if len(row.samples) != 1:
                raise ImportDataError(f"{cfg.sample_sheet} line {row.line}: an RPPA file must belong to one sample")
            named = tcga.name_barcode(f.name).split("_RPPA")[0]
            if tcga.is_barcode(named) and tcga.case_of(named) != row.samples[0].case:
                raise ImportDataError(f"{f}: file name says case {tcga.case_of(named)} but {cfg.sample_sheet} line "
                                      f"{row.line} says {row.samples[0].case}")
            cands.append(aliquots.Candidate(f.name, row.samples[0]))
            paths[f.name], projects[row.samples[0].case] = f, row.project
    else:
        for f in files:
            if f.name in paths:
                report.duplicate("second copies of a downloaded file (first used)", [f"{paths[f.name]} ← {f}"])
                continue
            name = f.name[:-len(RPPA_SUFFIX[0])]
            cands.append(aliquots.Candidate(f.name, tcga.parse_barcode(name, f"{f} (file name)")))
            paths[f.name] = f
    chosen = aliquots.select(cands, cfg.aliquot_rule, cfg.sample_types, report, "RPPA files")
    rows, var = {}, []
    for case, used in chosen.items():
        tables = [read_rppa(paths[c.source]) for c in used]
        var += [t[["AGID", "catalog_number"]] for t in tables]
        rows[case] = pd.concat([t["value"] for t in tables], axis=1).mean(axis=1, skipna=False)
    mat = pd.DataFrame(rows).T
    info = pd.concat(var)
    info = info[~info.index.duplicated()].reindex(mat.columns)
    obs = pd.DataFrame({"samples": [", ".join(c.barcode.text for c in u) for u in chosen.values()],
                        "files": [", ".join(c.source for c in u) for u in chosen.values()]},
                       index=pd.Index(list(chosen), name="case_id"))
    if projects:
        obs["project"] = [projects[c] for c in obs.index]
    return mat, obs, info


def read_tcpa(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """TCPA CSV → (values samples × antibodies as floats, metadata columns as text), indexed by Sample_ID."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ImportDataError(f"{path}: cannot be read as a TCPA CSV: {e}") from e
    if "Sample_ID" not in df.columns:
        raise ImportDataError(f"{path} line 1: column Sample_ID missing (has {list(df.columns)[:8]} ...)")
    dup = df["Sample_ID"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise ImportDataError(f"{path} line {i + 2}: Sample_ID {df['Sample_ID'][i]} appears twice")
    meta = [c for c in TCPA_META if c in df.columns]
    abs_ = [c for c in df.columns if c not in meta]
    vals = {c: _floats(df[c], lambda i, c=c: f"{path} line {i + 2}, column {c}") for c in abs_}
    return (pd.DataFrame(vals, index=df["Sample_ID"].str.strip()), df[meta].set_index(df["Sample_ID"].str.strip()))


def _tcpa(cfg: GdcProteinConfig, report: ImportReport):
    files = input_files(cfg.inputs, (".csv",), recursive=False)
    if not files:
        raise ImportDataError(f"no TCPA .csv file under {[str(p) for p in cfg.inputs]}")
    values, cands, projects = {}, [], {}
    for f in files:
        mat, meta = read_tcpa(f)
        for i, sid in enumerate(mat.index):
            bc = tcga.parse_barcode(sid, f"{f} line {i + 2}, Sample_ID")
            source = f"{f.name}:{sid}"
            values[source] = mat.loc[sid]
            cands.append(aliquots.Candidate(source, bc))
            if "Cancer_Type" in meta and meta.at[sid, "Cancer_Type"]:
                projects.setdefault(bc.case, "TCGA-" + meta.at[sid, "Cancer_Type"].removeprefix("TCGA-"))
    chosen = aliquots.select(cands, cfg.aliquot_rule, cfg.sample_types, report, "RPPA samples")
    mat = pd.DataFrame({case: pd.concat([values[c.source] for c in used], axis=1).mean(axis=1, skipna=False)
                        for case, used in chosen.items()}).T
    obs = pd.DataFrame({"samples": [", ".join(c.barcode.text for c in u) for u in chosen.values()],
                        "sources": [", ".join(c.source for c in u) for u in chosen.values()]},
                       index=pd.Index(list(chosen), name="case_id"))
    if projects:
        obs["project"] = [projects.get(c, "") for c in obs.index]
    return mat, obs, pd.DataFrame(index=mat.columns)


def run(cfg: GdcProteinConfig) -> ImportReport:
    """Import RPPA protein levels into `cfg.out` (protein.h5ad + the cases)."""
    out = Path(cfg.out)
    report = ImportReport("gdc-protein", str(out), [str(p) for p in cfg.inputs])
    report.rules["aliquots"] = aliquots.RULE_TEXT[cfg.aliquot_rule]
    mat, obs, info = (_gdc if cfg.format == "gdc" else _tcpa)(cfg, report)
    if mat.empty:
        raise ImportDataError("no RPPA sample left after the sample-type filter; see the report")
    gaps = mat.isna()
    if cfg.missing == "drop_protein":
        drop = list(mat.columns[gaps.any(axis=0)])
        report.unmatch("antibodies not measured for every case (dropped: missing = drop_protein)", drop)
        mat, info = mat.drop(columns=drop), info.drop(index=drop)
    else:
        drop = list(mat.index[gaps.any(axis=1)])
        report.unmatch("cases lacking some antibody (dropped: missing = drop_case)", drop)
        mat, obs = mat.drop(index=drop), obs.drop(index=drop)
        for c in drop:
            report.per_case.pop(c, None)
    if mat.shape[0] == 0 or mat.shape[1] == 0:
        raise ImportDataError(f"missing = {cfg.missing} leaves {mat.shape[0]} case(s) × {mat.shape[1]} antibodies; "
                              "try the other rule")
    x = mat.to_numpy(np.float64)
    if cfg.values == "linear" and (x < 0).any():
        raise ImportDataError("values = linear but the data hold negative values (log2 data? use values: log2)")
    counts = np.exp2(x) if cfg.values == "log2" else x
    report.rules["values"] = ("X = published log2 values; layers['counts'] = 2^value" if cfg.values == "log2"
                              else "X = layers['counts'] = the published values")
    report.rules["missing"] = cfg.missing
    ensure_cohort(out)
    before = set(read_csv_str(out / "cases.csv")["case_id"])
    info = info.astype(str)
    info.index = info.index.astype(str)
    adata = ad.AnnData(X=x.astype(np.float32), obs=obs.astype(str), var=info,
                       layers={"counts": counts.astype(np.float32)},
                       uns={"source": f"RPPA ({cfg.format})", "values": cfg.values, "missing": cfg.missing,
                            "aliquot_rule": cfg.aliquot_rule})
    write_h5ad(out / "protein.h5ad", adata)
    report.written.append(str(out / "protein.h5ad"))
    report.matched = list(obs.index)
    update_cases(out, obs.index, report, project=obs["project"].to_dict() if "project" in obs else None)
    report.unmatch("cases of cases.csv without protein", sorted(before - set(obs.index)))
    return finish(report, out)
