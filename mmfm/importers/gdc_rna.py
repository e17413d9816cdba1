"""`mmfm import gdc-rna`: GDC STAR gene counts (joined through the sample sheet) or a Xena/TANGLE-style wide
matrix → `rna.h5ad`, one row per case.

STAR "augmented gene counts" TSV (GDC mRNA pipeline, GENCODE v36): line 1 `# gene-model: GENCODE v36`, a header of
`gene_id gene_name gene_type unstranded stranded_first stranded_second tpm_unstranded fpkm_unstranded
fpkm_uq_unstranded`, four STAR counter rows `N_unmapped N_multimapping N_noFeature N_ambiguous`, then one row per
gene. Output: `layers['counts']` = the raw counts column (default `unstranded`: GDC treats the reads as unstranded and
derives TPM/FPKM from it), `X` = the chosen measure (default TPM), `var` = versioned Ensembl `gene_id`, `gene_name`,
`gene_type`; the counter rows go to `obs` (they are never genes: summing them into a library would be wrong).
var_names are gene symbols where unique; a symbol shared by several gene ids (GENCODE has such symbols, and the
`_PAR_Y` copies of pseudo-autosomal genes) keeps the plain symbol on its first row in file order and becomes
`SYMBOL|<gene_id>` on the others, so no two genes are ever merged. All files must share one gene list and gene model.

Wide matrix (UCSC Xena `HiSeqV2`, TANGLE's source): genes × samples, first column the gene, one column per TCGA
sample barcode; values log2(x+1) (default) or raw counts. `X` keeps the published values, `layers['counts']` the
linear ones (2^v − 1). A centred matrix (negative values, e.g. `HiSeqV2_PANCAN`) has no linear scale and is refused.
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

STAR_COLUMNS = ("gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
                "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded")
COUNTERS = ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous")
STAR_SUFFIX = (".rna_seq.augmented_star_gene_counts.tsv",)
WIDE_SUFFIX = (".tsv", ".txt", ".csv", ".tsv.gz", ".txt.gz", ".csv.gz", ".gz")
Measure = Literal["tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded", "unstranded"]


@dataclass
class GdcRnaConfig:
    out: Path  # cohort directory to create or extend
    inputs: tuple[Path, ...]  # STAR files / gdc-client folders (format star) or matrix files (format wide)
    sample_sheet: Path | None = None  # GDC sample sheet of the same cart; required for format star
    format: Literal["star", "wide"] = "star"  # star: GDC augmented_star_gene_counts; wide: Xena/TANGLE genes × samples
    measure: Measure = "tpm_unstranded"  # STAR column stored in X
    counts: Literal["unstranded", "stranded_first", "stranded_second"] = "unstranded"  # STAR column → layers['counts']
    wide_values: Literal["log2p1", "counts"] = "log2p1"  # wide: values are log2(x+1) (Xena HiSeqV2) or raw counts
    gene_types: tuple[str, ...] = ()  # STAR: keep only these gene_type values (e.g. protein_coding); empty = all
    var_names: Literal["gene_name", "gene_id"] = "gene_name"  # symbols (a repeat becomes SYMBOL|gene_id) or ids
    aliquot_rule: Literal["first", "mean", "error"] = "first"  # several samples of a case (see importers/aliquots.py)
    sample_types: tuple[str, ...] = tcga.TUMOUR_CODES  # TCGA sample-type codes imported (01 primary tumour, ...)


@dataclass
class StarCounts:
    path: Path
    gene_model: str | None
    genes: pd.DataFrame  # gene_id, gene_name, gene_type (file order)
    values: pd.DataFrame  # numeric columns (unstranded ... fpkm_uq_unstranded), one row per gene
    counters: dict[str, float]


def _numbers(df: pd.DataFrame, cols, path: Path, first_line: int, integer: bool = False) -> pd.DataFrame:
    """Parse text columns as floats; a bad cell is an error naming the file, line and column."""
    out = {}
    for col in cols:
        v = pd.to_numeric(df[col], errors="coerce")
        bad = v.isna() | ~np.isfinite(v) | (v < 0) | ((v != np.round(v)) if integer else False)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            want = "a non-negative integer" if integer else "a non-negative number"
            raise ImportDataError(f"{path} line {first_line + i}: {col} {df[col].iloc[i]!r} is not {want}")
        out[col] = v.to_numpy(np.float64)
    return pd.DataFrame(out, index=df.index)


def read_star(path: Path) -> StarCounts:
    """One GDC STAR augmented gene-counts file, checked line by line."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    comment = first.startswith("#")
    model = first.split(":", 1)[1].strip() if comment and "gene-model" in first else None
    header_line = 2 if comment else 1
    try:
        df = pd.read_csv(path, sep="\t", skiprows=1 if comment else 0, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ImportDataError(f"{path}: cannot be read as a STAR gene-counts TSV: {e}") from e
    missing = [c for c in STAR_COLUMNS if c not in df.columns]
    if missing:
        raise ImportDataError(f"{path} line {header_line}: column(s) {missing} missing (has {list(df.columns)}); "
                              "expected a GDC augmented_star_gene_counts file")
    is_counter = df["gene_id"].str.startswith("N_")
    ctr = df[is_counter]
    absent = [c for c in COUNTERS if c not in set(ctr["gene_id"])]
    if absent or len(ctr) != len(COUNTERS):
        raise ImportDataError(f"{path}: STAR counter rows {list(COUNTERS)} expected once each; "
                              f"found {list(ctr['gene_id'])}")
    counters = _numbers(ctr, ["unstranded"], path, header_line + 1, integer=True)["unstranded"]
    genes = df[~is_counter]
    first_gene_line = header_line + 1 + int(np.flatnonzero(~is_counter.to_numpy())[0]) if len(genes) else 0
    if genes["gene_id"].duplicated().any():
        dup = genes.loc[genes["gene_id"].duplicated(), "gene_id"].iloc[0]
        raise ImportDataError(f"{path}: gene_id {dup} appears twice")
    counts = _numbers(genes, STAR_COLUMNS[3:6], path, first_gene_line, integer=True)
    measures = _numbers(genes, STAR_COLUMNS[6:], path, first_gene_line)
    return StarCounts(path, model, genes[list(STAR_COLUMNS[:3])].reset_index(drop=True),
                      pd.concat([counts, measures], axis=1).reset_index(drop=True),
                      dict(zip(ctr["gene_id"], counters.to_numpy())))


def var_index(genes: pd.DataFrame, mode: str) -> pd.Index:
    """Symbols, with a repeated symbol kept on its first row and `SYMBOL|gene_id` on later rows; or gene ids."""
    if mode == "gene_id":
        return pd.Index(genes["gene_id"].astype(str).to_numpy())
    names = genes["gene_name"].astype(str)
    later = names.duplicated(keep="first")
    return pd.Index(names.where(~later, names + "|" + genes["gene_id"].astype(str)).to_numpy())


def _star(cfg: GdcRnaConfig, report: ImportReport):
    if cfg.sample_sheet is None:
        raise ImportDataError("gdc-rna format star needs sample_sheet (the GDC sample sheet of the same cart): "
                              "STAR file names carry no barcode")
    files = input_files(cfg.inputs, STAR_SUFFIX)
    if not files:
        raise ImportDataError(f"no *{STAR_SUFFIX[0]} file under {[str(p) for p in cfg.inputs]}")
    report.unmatch("unfinished downloads (*.partial)", partial_files(cfg.inputs))
    pairs = match_files(files, read_sample_sheet(cfg.sample_sheet), cfg.sample_sheet, report, STAR_SUFFIX)
    cands, rows = [], {}
    for f, row in pairs:
        if len(row.samples) != 1:
            raise ImportDataError(f"{cfg.sample_sheet} line {row.line}: a counts file must belong to one sample, "
                                  f"got Sample ID {', '.join(s.text for s in row.samples)}")
        cands.append(aliquots.Candidate(f.name, row.samples[0]))
        rows[f.name] = (f, row)
    chosen = aliquots.select(cands, cfg.aliquot_rule, cfg.sample_types, report, "RNA files")
    first: StarCounts | None = None
    x, counts, obs = [], [], []
    for case, used in chosen.items():
        tables = []
        for c in used:
            star = read_star(rows[c.source][0])
            if first is None:
                first = star
            elif star.gene_model != first.gene_model:
                raise ImportDataError(f"{star.path}: gene model {star.gene_model!r} differs from {first.path} "
                                      f"({first.gene_model!r}); import one annotation at a time")
            elif not star.genes["gene_id"].equals(first.genes["gene_id"]):
                i = int(np.flatnonzero(star.genes["gene_id"].to_numpy() != first.genes["gene_id"].to_numpy())[0]) \
                    if len(star.genes) == len(first.genes) else min(len(star.genes), len(first.genes))
                raise ImportDataError(f"{star.path}: gene list differs from {first.path} (gene row {i + 1}); "
                                      "every file of one import must have the same genes in the same order")
            tables.append(star)
        x.append(np.mean([t.values[cfg.measure].to_numpy() for t in tables], axis=0))
        counts.append(np.mean([t.values[cfg.counts].to_numpy() for t in tables], axis=0))
        row = rows[used[0].source][1]
        rec = {"case_id": case, "project": row.project, "samples": ", ".join(c.barcode.text for c in used),
               "files": ", ".join(c.source for c in used),
               "file_ids": ", ".join(rows[c.source][1].file_id for c in used), "aliquot_rule": cfg.aliquot_rule,
               "n_candidates": len(used) + len(report.per_case[case]["not_used"])}
        if row.preservation:
            rec["preservation"] = row.preservation
        rec.update({k: float(np.mean([t.counters[k] for t in tables])) for k in COUNTERS})
        obs.append(rec)
        report.per_case[case]["project"] = row.project
    if first is None:
        raise ImportDataError("no RNA file left after the sample-type filter; see the report's unmatched lists")
    genes = first.genes
    keep = genes["gene_type"].isin(cfg.gene_types).to_numpy() if cfg.gene_types else np.ones(len(genes), bool)
    if not keep.any():
        raise ImportDataError(f"gene_types {list(cfg.gene_types)} match no gene (types in {first.path}: "
                              f"{sorted(set(genes['gene_type']))[:12]})")
    var = genes[keep].reset_index(drop=True)
    var.index = var_index(var, cfg.var_names)
    renamed = int(var.index.str.contains("|", regex=False).sum())
    if renamed:
        report.notes.append(f"{renamed} gene(s) share a symbol with an earlier gene: named SYMBOL|gene_id")
    report.rules.update({"measure": f"X = {cfg.measure}; layers['counts'] = {cfg.counts}",
                         "gene_types": ", ".join(cfg.gene_types) or "all", "gene_model": str(first.gene_model)})
    uns = {"source": "GDC STAR augmented gene counts", "gene_model": str(first.gene_model), "measure": cfg.measure,
           "counts": cfg.counts, "aliquot_rule": cfg.aliquot_rule}
    return (np.stack(x)[:, keep].astype(np.float32), np.stack(counts)[:, keep].astype(np.float32),
            pd.DataFrame(obs).set_index("case_id"), var, uns)


def read_wide(path: Path) -> pd.DataFrame:
    """A genes × samples matrix as floats (rows = genes as given); errors name the file, line and column."""
    path = Path(path)
    sep = "," if ".csv" in path.name.lower() else "\t"
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, header=None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ImportDataError(f"{path}: cannot be read as a genes × samples matrix: {e}") from e
    header = [str(c).strip() for c in df.iloc[0]]
    dup = pd.Index(header[1:])
    if dup.duplicated().any():
        raise ImportDataError(f"{path} line 1: sample column {dup[dup.duplicated()][0]} appears twice")
    body = df.iloc[1:].reset_index(drop=True)
    genes = body[0].str.strip()
    if genes.duplicated().any():
        i = int(np.flatnonzero(genes.duplicated().to_numpy())[0])
        raise ImportDataError(f"{path} line {i + 2}: gene {genes[i]} appears twice")
    vals = body.iloc[:, 1:].apply(pd.to_numeric, errors="coerce")
    bad = vals.isna().to_numpy() | ~np.isfinite(vals.to_numpy(np.float64))
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise ImportDataError(f"{path} line {i + 2}, column {header[j + 1]}: {body.iat[i, j + 1]!r} is not a number")
    return pd.DataFrame(vals.to_numpy(np.float64), index=pd.Index(genes, name="gene"), columns=header[1:])


def _wide(cfg: GdcRnaConfig, report: ImportReport):
    files = input_files(cfg.inputs, WIDE_SUFFIX, recursive=False)
    if not files:
        raise ImportDataError(f"no matrix file under {[str(p) for p in cfg.inputs]}")
    cols, cands, genes = {}, [], None
    for f in files:
        m = read_wide(f)
        if genes is None:
            genes, genes_from = m.index, f
        elif not m.index.equals(genes):
            raise ImportDataError(f"{f}: genes differ from {genes_from}; every matrix of one import needs the same "
                                  "genes in the same order")
        if cfg.wide_values == "log2p1" and (m.to_numpy() < 0).any():
            i, j = map(int, np.argwhere(m.to_numpy() < 0)[0])
            raise ImportDataError(f"{f} line {i + 2}, column {m.columns[j]}: value {m.iat[i, j]} < 0 cannot be "
                                  "log2(x+1); a centred matrix (e.g. Xena HiSeqV2_PANCAN) has no count scale — use "
                                  "the non-centred one (HiSeqV2) or the GDC STAR files")
        if cfg.wide_values == "counts" and (m.to_numpy() < 0).any():
            raise ImportDataError(f"{f}: negative values, so not raw counts (set wide_values: log2p1?)")
        for col in m.columns:
            source = f"{f.name}:{col}"
            cols[source] = m[col].to_numpy()
            cands.append(aliquots.Candidate(source, tcga.parse_barcode(col, f"{f} line 1, column")))
    chosen = aliquots.select(cands, cfg.aliquot_rule, cfg.sample_types, report, "RNA samples")
    x = np.stack([np.mean([cols[c.source] for c in used], axis=0) for used in chosen.values()])
    counts = np.exp2(x) - 1.0 if cfg.wide_values == "log2p1" else x
    obs = pd.DataFrame({"samples": [", ".join(c.barcode.text for c in u) for u in chosen.values()],
                        "sources": [", ".join(c.source for c in u) for u in chosen.values()],
                        "aliquot_rule": cfg.aliquot_rule}, index=pd.Index(list(chosen), name="case_id"))
    report.rules["values"] = ("X = published log2(x+1) values; layers['counts'] = 2^x - 1" if cfg.wide_values ==
                              "log2p1" else "X = layers['counts'] = the matrix values (raw counts)")
    uns = {"source": "wide genes × samples matrix", "wide_values": cfg.wide_values, "aliquot_rule": cfg.aliquot_rule}
    var = pd.DataFrame(index=pd.Index(genes.astype(str)))
    return x.astype(np.float32), np.maximum(counts, 0).astype(np.float32), obs, var, uns


def run(cfg: GdcRnaConfig) -> ImportReport:
    """Import RNA into `cfg.out` (rna.h5ad + the cases), report what matched and what did not."""
    out = Path(cfg.out)
    report = ImportReport("gdc-rna", str(out), [str(p) for p in cfg.inputs])
    report.rules["aliquots"] = aliquots.RULE_TEXT[cfg.aliquot_rule]
    x, counts, obs, var, uns = (_star if cfg.format == "star" else _wide)(cfg, report)
    ensure_cohort(out)
    before = set(read_csv_str(out / "cases.csv")["case_id"])
    adata = ad.AnnData(X=x, obs=obs.astype({c: str for c in obs.columns if obs[c].dtype == object}), var=var,
                       layers={"counts": counts}, uns=uns)
    adata.obs_names = adata.obs_names.astype(str)
    write_h5ad(out / "rna.h5ad", adata)
    report.written.append(str(out / "rna.h5ad"))
    report.matched = list(obs.index)
    project = obs["project"].to_dict() if "project" in obs else None
    update_cases(out, obs.index, report, project=project)
    report.unmatch("cases of cases.csv without RNA", sorted(before - set(obs.index)))
    return finish(report, out)
