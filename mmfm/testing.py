"""Test fixtures shipped with the package: a tiny GDC/TCGA-style download written in the published formats, so the
tests, notebooks/03_from_gdc_download.ipynb and a user checking an importer can run the importers offline
(nothing is downloaded). `write_gdc_download(root)` writes it; `ANTIBODIES`, `ROSTER` say what it holds.
Nothing in the package imports this module (tests/test_layers.py: it sits above every layer).

Six named cases over TCGA-BRCA and TCGA-LUAD carry the awkward situations real downloads have (see ROSTER), plus
`n_extra` ordinary cases. Values share one latent state per case (tile features, RNA, protein, survival and
driver mutations all depend on it), so pretraining and probes on the imported cohort have something to find.
Layout under `root` (what gdc-client, the portals and the tools write):
  rna/<File ID>/<uuid>.rna_seq.augmented_star_gene_counts.tsv    + rna/logs/, an unfinished *.partial
  gdc_sample_sheet.rna.tsv                                       legacy portal columns (Sample Type)
  xena/HiSeqV2                                                   Xena genes × samples, log2(count + 1)
  protein/<File ID>/<portion barcode>_RPPA_data.tsv             + gdc_sample_sheet.protein.tsv (portal ≥ 2.4.0 columns)
  tcpa/TCGA-PANCAN32-L4.csv
  maf/<File ID>/<uuid>.wxs.aliquot_ensemble_masked.maf.gz        GDC per-aliquot MAFs + gdc_sample_sheet.maf.tsv
  mc3/mc3.v0.2.8.PUBLIC.maf.gz                                   one MAF, header on line 1, FILTER column
  clinical/TCGA-CDR.tsv, clinical/clinical.tsv                   TCGA-CDR sheet as TSV; GDC clinical TSV
  reports/TCGA_Reports.csv
  trident/20x_256px_0px_overlap/features_uni_v1/<slide>.h5       TRIDENT feature files
  clam/h5_files/<slide>.h5, clam/patches/<slide>.h5              CLAM features (no attrs) and patch coordinates
"""

from __future__ import annotations

import csv
import gzip
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from mmfm.data.tcga import SAMPLE_TYPES

NON_SILENT_FIXTURE = ("Missense_Mutation", "Nonsense_Mutation", "Frame_Shift_Del", "Splice_Site", "In_Frame_Ins")
SILENT_FIXTURE = ("Silent", "Intron", "3'UTR", "Splice_Region", "5'Flank")
DRIVERS = ("TP53", "PIK3CA", "KRAS", "GATA3")
PASSENGERS = ("TTN", "MUC16", "CSMD3", "RYR2")
ANTIBODIES = ("1433BETA", "AKT", "AKT_pS473", "ER-ALPHA", "PR", "HER2", "P53", "EGFR", "CAVEOLIN1", "CYCLINB1",
              "E-CADHERIN", "GATA3")
SYMBOLS = ("TP53", "ESR1", "PGR", "ERBB2", "KRT5", "KRT14", "MKI67", "GATA3", "FOXA1", "CDH1", "EGFR", "KRAS",
           "NKX2-1", "SFTPC", "NAPSA", "CD8A", "PTPRC", "COL1A1", "VIM", "ACTB", "GAPDH", "MYC", "CCND1", "PIK3CA",
           "AR", "TFF1", "XBP1", "AGR2", "SCGB2A2", "MUC1", "CEACAM5", "SOX2", "TP63", "KRT7", "TTF1", "BRCA1")
STAR_HEADER = ("gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
               "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded")
MAF_COLUMNS = (
    "Hugo_Symbol Entrez_Gene_Id Center NCBI_Build Chromosome Start_Position End_Position Strand Variant_Classification "
    "Variant_Type Reference_Allele Tumor_Seq_Allele1 Tumor_Seq_Allele2 dbSNP_RS dbSNP_Val_Status Tumor_Sample_Barcode "
    "Matched_Norm_Sample_Barcode Match_Norm_Seq_Allele1 Match_Norm_Seq_Allele2 Tumor_Validation_Allele1 "
    "Tumor_Validation_Allele2 Match_Norm_Validation_Allele1 Match_Norm_Validation_Allele2 Verification_Status "
    "Validation_Status Mutation_Status Sequencing_Phase Sequence_Source Validation_Method Score BAM_File Sequencer "
    "Tumor_Sample_UUID Matched_Norm_Sample_UUID HGVSc HGVSp HGVSp_Short Transcript_ID Exon_Number t_depth t_ref_count "
    "t_alt_count n_depth n_ref_count n_alt_count").split()
GDC_MAF_TAIL = ("hotspot", "RNA_Support", "RNA_depth", "RNA_ref_count", "RNA_alt_count", "callers")
CDR_COLUMNS = (
    "bcr_patient_barcode type age_at_initial_pathologic_diagnosis gender race ajcc_pathologic_tumor_stage "
    "clinical_stage histological_type histological_grade initial_pathologic_dx_year menopause_status birth_days_to "
    "vital_status tumor_status last_contact_days_to death_days_to cause_of_death new_tumor_event_type "
    "new_tumor_event_site new_tumor_event_site_other new_tumor_event_dx_days_to treatment_outcome_first_course "
    "margin_status residual_tumor OS OS.time DSS DSS.time DFI DFI.time PFI PFI.time Redaction").split()
GDC_CLINICAL_COLUMNS = ("project.project_id", "cases.case_id", "cases.submitter_id", "cases.consent_type",
                        "demographic.vital_status", "demographic.days_to_death", "demographic.days_to_birth",
                        "demographic.gender", "demographic.age_at_index", "diagnoses.days_to_last_follow_up",
                        "diagnoses.age_at_diagnosis", "diagnoses.ajcc_pathologic_stage", "treatments.treatment_type")
ENCODER = "uni_v1"


@dataclass(frozen=True)
class FixtureCase:
    """Which files one case gets. rna: sample parts ('01A', '01B', '11A'); slides: section names; maf: tumour
    aliquot sample parts (empty = no MAF downloaded); maf_silent: only non-qualifying variants."""

    case: str
    project: str
    rna: tuple[str, ...] = ("01A",)
    slides: tuple[str, ...] = ("DX1",)
    maf: tuple[str, ...] = ("01A",)
    maf_silent: bool = False
    protein: bool = True
    reports: int = 1
    clinical: str = "cdr"  # cdr | gdc | both


ROSTER = (
    FixtureCase("TCGA-A2-A0T2", "TCGA-BRCA", rna=("01A", "01B", "11A"), slides=("DX1", "TS1")),  # two tumour aliquots
    FixtureCase("TCGA-A2-A0CM", "TCGA-BRCA", maf=(), protein=False, reports=2),  # no MAF; two reports
    FixtureCase("TCGA-E2-A14N", "TCGA-BRCA", rna=(), slides=("DX1", "DX2"), maf_silent=True, reports=0,
                clinical="both"),  # no RNA; sequenced but only silent variants
    FixtureCase("TCGA-05-4244", "TCGA-LUAD", slides=("TS1",), clinical="gdc"),  # frozen only; GDC clinical only
    FixtureCase("TCGA-44-2655", "TCGA-LUAD", rna=("01A", "06A"), maf=("01A", "01B")),  # metastasis RNA; 2 MAF aliquots
    FixtureCase("TCGA-05-4395", "TCGA-LUAD", protein=False),
)
TSS = {"TCGA-BRCA": ("A2", "E2", "BH", "AR"), "TCGA-LUAD": ("05", "44", "55", "MP")}


@dataclass
class GdcDownload:
    root: Path
    cases: list[FixtureCase]
    latent: dict[str, np.ndarray] = field(default_factory=dict)  # case → latent state (what the data share)

    def __getattr__(self, name):  # paths by name: d.rna_sheet, d.trident_dir, ...
        paths = {"rna_dir": "rna", "rna_sheet": "gdc_sample_sheet.rna.tsv", "xena": "xena/HiSeqV2",
                 "protein_dir": "protein", "protein_sheet": "gdc_sample_sheet.protein.tsv",
                 "tcpa": "tcpa/TCGA-PANCAN32-L4.csv", "maf_dir": "maf", "maf_sheet": "gdc_sample_sheet.maf.tsv",
                 "mc3": "mc3/mc3.v0.2.8.PUBLIC.maf.gz", "cdr": "clinical/TCGA-CDR.tsv",
                 "gdc_clinical": "clinical/clinical.tsv", "reports_csv": "reports/TCGA_Reports.csv",
                 "trident_dir": f"trident/20x_256px_0px_overlap/features_{ENCODER}", "clam_h5_dir": "clam/h5_files",
                 "clam_patches_dir": "clam/patches"}
        if name not in paths:
            raise AttributeError(name)
        return self.root / paths[name]


class _Writer:
    def __init__(self, root: Path, seed: int, feature_dim: int, n_genes: int, tiles: tuple[int, int]):
        self.root, self.rng = root, np.random.default_rng(seed)
        self.dim, self.tiles = feature_dim, tiles
        self.genes = self._gene_model(max(n_genes, len(SYMBOLS) + 4))
        k = 3  # latent size
        self.proj = self.rng.standard_normal((k, feature_dim))
        self.gene_w = 0.6 * self.rng.standard_normal((k, len(self.genes)))
        self.gene_b = self.rng.normal(0.0, 1.0, len(self.genes))
        self.ab_w = 0.7 * self.rng.standard_normal((k, len(ANTIBODIES)))

    def uuid(self) -> str:
        return str(uuid.UUID(bytes=self.rng.bytes(16), version=4))

    def _gene_model(self, n: int) -> list[tuple[str, str, str, int]]:
        """(gene_id, gene_name, gene_type, length): real-looking ids, a symbol shared by two ids, a _PAR_Y copy."""
        out = []
        for i in range(n - 3):
            name = SYMBOLS[i] if i < len(SYMBOLS) else f"LINC{i:05d}"
            out.append((f"ENSG{100000 + 37 * i:011d}.{1 + i % 9}", name,
                        "protein_coding" if i < len(SYMBOLS) else "lncRNA", int(500 + 97 * i % 4000)))
        out += [("ENSG00000002586.20", "CD99", "protein_coding", 1800),
                ("ENSG00000002586.20_PAR_Y", "CD99", "protein_coding", 1800),
                ("ENSG00000284770.2", "TP53", "lncRNA", 900)]  # a symbol reused by another gene id
        return out

    # ------------------------------------------------------------------------------------------------ RNA
    def star_counts(self, z: np.ndarray) -> np.ndarray:
        mu = np.exp(self.gene_b + z @ self.gene_w)
        mu *= self.rng.uniform(2e5, 6e5) / mu.sum()
        counts = self.rng.poisson(mu)
        counts[[g[0].endswith("_PAR_Y") for g in self.genes]] = 0  # GDC assigns PAR reads to the X copy
        return counts

    def write_star(self, path: Path, counts: np.ndarray) -> None:
        lengths = np.array([g[3] for g in self.genes], float)
        rate = counts / lengths
        tpm = rate / rate.sum() * 1e6
        fpkm = counts * 1e9 / (lengths * counts.sum())
        coding = np.array([g[2] == "protein_coding" for g in self.genes])
        uq = max(np.percentile(counts[coding], 75), 1.0)
        fpkm_uq = counts * 1e9 / (lengths * uq)
        first = self.rng.binomial(counts, 0.5)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["# gene-model: GENCODE v36", "\t".join(STAR_HEADER)]
        unmapped, multi = self.rng.integers(100_000, 1_000_000, 2)
        lines += [f"N_unmapped\t\t\t{unmapped}\t{unmapped}\t{unmapped}\t\t\t",
                  f"N_multimapping\t\t\t{multi}\t{multi}\t{multi}\t\t\t"]
        for name in ("N_noFeature", "N_ambiguous"):
            a, b, c = self.rng.integers(10_000, 1_000_000, 3)
            lines.append(f"{name}\t\t\t{a}\t{b}\t{c}\t\t\t")
        for g, c, f1, t, fp, fu in zip(self.genes, counts, first, tpm, fpkm, fpkm_uq):
            lines.append(f"{g[0]}\t{g[1]}\t{g[2]}\t{c}\t{f1}\t{c - f1}\t{t:.4f}\t{fp:.4f}\t{fu:.4f}")
        path.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------------------------------- slides
    def bag(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.rng.integers(*self.tiles))
        tumour = self.rng.random(n) < 0.6
        feats = np.where(tumour[:, None], z @ self.proj, 0.0) + 0.7 * self.rng.standard_normal((n, self.dim))
        cols = int(np.ceil(np.sqrt(n)))
        coords = np.stack([np.arange(n) % cols, np.arange(n) // cols], 1).astype(np.int64) * 512 + 1000
        return feats.astype(np.float32), coords

    def write_trident(self, path: Path, feats: np.ndarray, coords: np.ndarray, name: str) -> None:
        """TRIDENT's feature h5: features chunked by row with maxshape (None, D), coords int64 with its attrs."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            d = f.create_dataset("features", data=feats, chunks=(1, feats.shape[1]), maxshape=(None, feats.shape[1]))
            d.attrs.update({"name": name, "savetodir": str(path.parent), "encoder": ENCODER})
            c = f.create_dataset("coords", data=coords, chunks=(1, 2), maxshape=(None, 2))
            c.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                            "target_magnification": 20, "overlap": 0, "name": name, "savetodir": "None",
                            "level0_width": int(coords[:, 0].max() + 2000),
                            "level0_height": int(coords[:, 1].max() + 2000)})

    def write_clam(self, feats: np.ndarray, coords: np.ndarray, name: str) -> None:
        """CLAM: h5_files/<slide>.h5 (features float32, coords int32, no attrs) and patches/<slide>.h5 (coords at
        level 0 with patch_size at patch_level 1, whose downsample is 2 → 512 level-0 px)."""
        h5 = self.root / "clam" / "h5_files" / f"{name}.h5"
        h5.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(h5, "w") as f:
            f.create_dataset("features", data=feats.astype(np.float32))
            f.create_dataset("coords", data=coords.astype(np.int32))
        patches = self.root / "clam" / "patches" / f"{name}.h5"
        patches.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(patches, "w") as f:
            c = f.create_dataset("coords", data=coords)
            c.attrs.update({"patch_size": 256, "patch_level": 1, "downsample": np.array([2.0, 2.0]),
                            "downsampled_level_dim": np.array([10000, 8000]), "level_dim": np.array([20000, 16000]),
                            "name": name, "save_path": str(patches.parent)})


def _sheet(path: Path, rows: list[dict], new_portal: bool = False) -> None:
    cols = ["File ID", "File Name", "Data Category", "Data Type", "Project ID", "Case ID", "Sample ID"]
    cols += (["Tissue Type", "Tumor Descriptor", "Specimen Type", "Preservation Method"] if new_portal
             else ["Sample Type"])
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def write_gdc_download(root: str | Path, n_extra: int = 0, seed: int = 0, feature_dim: int = 16, n_genes: int = 48,
                       tiles: tuple[int, int] = (24, 64)) -> GdcDownload:
    """Write the whole folder; returns the paths, the roster and each case's latent state."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    w = _Writer(root, seed, feature_dim, n_genes, tiles)
    roster = list(ROSTER)
    for i in range(n_extra):
        project = ("TCGA-BRCA", "TCGA-LUAD")[i % 2]
        pid = "".join(w.rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"), 4))
        roster.append(FixtureCase(f"TCGA-{TSS[project][i // 2 % 4]}-{pid}", project))
    dl = GdcDownload(root, roster)
    for c in roster:
        z = w.rng.standard_normal(3) + (0.8 if c.project == "TCGA-BRCA" else -0.8) * np.array([0.0, 0.0, 1.0])
        dl.latent[c.case] = z
    _rna(w, dl)
    _protein(w, dl)
    _mutations(w, dl)
    _clinical(w, dl)
    _reports(w, dl)
    _slides(w, dl)
    return dl


def _rna(w: _Writer, dl: GdcDownload) -> None:
    rows, xena = [], {}
    for c in dl.cases:
        for part in c.rna:
            fid, name = w.uuid(), f"{w.uuid()}.rna_seq.augmented_star_gene_counts.tsv"
            counts = w.star_counts(dl.latent[c.case] if part[:2] != "11" else 0.2 * dl.latent[c.case])
            w.write_star(dl.rna_dir / fid / name, counts)
            rows.append({"File ID": fid, "File Name": name, "Data Category": "Transcriptome Profiling",
                         "Data Type": "Gene Expression Quantification", "Project ID": c.project, "Case ID": c.case,
                         "Sample ID": f"{c.case}-{part}", "Sample Type": SAMPLE_TYPES[part[:2]]})
            xena.setdefault(f"{c.case}-{part[:2]}", counts)
    rows.append({"File ID": w.uuid(), "File Name": f"{w.uuid()}.rna_seq.augmented_star_gene_counts.tsv",
                 "Data Category": "Transcriptome Profiling", "Data Type": "Gene Expression Quantification",
                 "Project ID": "TCGA-LUAD", "Case ID": "TCGA-55-8514", "Sample ID": "TCGA-55-8514-01A",
                 "Sample Type": "Primary Solid Tumor"})  # listed in the cart, never downloaded
    _sheet(dl.rna_sheet, rows)
    (dl.rna_dir / "logs").mkdir(exist_ok=True)
    (dl.rna_dir / "logs" / "gdc-client.log").write_text("download log\n")
    (dl.rna_dir / rows[0]["File ID"] / f"{rows[0]['File Name']}.partial").write_text("")
    dl.xena.parent.mkdir(parents=True, exist_ok=True)
    with open(dl.xena, "w") as fh:  # Xena HiSeqV2: genes × samples, first header cell 'sample', log2(x + 1)
        samples = sorted(xena)
        fh.write("\t".join(["sample", *samples]) + "\n")
        seen = set()
        for g, gene in enumerate(w.genes):
            if gene[1] in seen:
                continue  # Xena gene-level matrices hold one row per symbol
            seen.add(gene[1])
            fh.write("\t".join([gene[1], *(f"{np.log2(xena[s][g] + 1):.4f}" for s in samples)]) + "\n")


def _protein(w: _Writer, dl: GdcDownload) -> None:
    rows, tcpa = [], []
    for c in dl.cases:
        if not c.protein:
            continue
        barcode = f"{c.case}-01A-21-A241-20"
        fid, name = w.uuid(), f"{barcode}_RPPA_data.tsv"
        vals = dl.latent[c.case] @ w.ab_w + 0.3 * w.rng.standard_normal(len(ANTIBODIES))
        vals -= np.median(vals)
        cells = [f"{v:.6f}" for v in vals]
        if c.case == "TCGA-44-2655":
            cells[ANTIBODIES.index("GATA3")] = "NA"  # an antibody not on this case's array set
        path = dl.protein_dir / fid / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["AGID\tlab_id\tcatalog_number\tset_id\tpeptide_target\tprotein_expression"]
        lines += [f"AGID{100 + i:05d}\t{882 + i}\tsc-{628 + i}\tOld\t{ab}\t{cell}" for i, (ab, cell) in
                  enumerate(zip(ANTIBODIES, cells))]
        path.write_text("\n".join(lines) + "\n")
        rows.append({"File ID": fid, "File Name": name, "Data Category": "Proteome Profiling",
                     "Data Type": "Protein Expression Quantification", "Project ID": c.project, "Case ID": c.case,
                     "Sample ID": f"{c.case}-01A", "Tissue Type": "Tumor", "Tumor Descriptor": "Primary",
                     "Specimen Type": "Solid Tissue", "Preservation Method": "Unknown"})
        tcpa.append([barcode, c.project.removeprefix("TCGA-"), "Primary Tumor", "1", *cells])
    _sheet(dl.protein_sheet, rows, new_portal=True)
    dl.tcpa.parent.mkdir(parents=True, exist_ok=True)
    with open(dl.tcpa, "w", newline="") as fh:
        cw = csv.writer(fh, lineterminator="\n")
        cw.writerow(["Sample_ID", "Cancer_Type", "Sample_Type", "SetID", *ANTIBODIES])
        cw.writerows(tcpa)


def _variants(w: _Writer, z: np.ndarray, silent_only: bool) -> list[tuple[str, str]]:
    """(gene, Variant_Classification) of one tumour: drivers by the latent state, passengers, silent noise."""
    out = [(g, str(w.rng.choice(SILENT_FIXTURE))) for g in w.rng.choice(PASSENGERS + DRIVERS, 3)]
    if silent_only:
        return out
    logits = np.array([1.5 * z[0], z[1], -0.5 + z[0] * z[1], 0.8 * z[2]])
    out += [(g, str(w.rng.choice(NON_SILENT_FIXTURE))) for g, p in zip(DRIVERS, 1 / (1 + np.exp(-logits)))
            if w.rng.random() < p]
    return out + [(str(w.rng.choice(PASSENGERS)), "Missense_Mutation")]


def _maf_row(case: str, tumour: str, gene: str, vc: str, build: str, filt: str | None = None) -> list[str]:
    row = {c: "" for c in MAF_COLUMNS}
    row.update({"Hugo_Symbol": gene, "Entrez_Gene_Id": "0" if gene == "Unknown" else "7157", "Center": "BI",
                "NCBI_Build": build, "Chromosome": "chr17", "Start_Position": "7675088", "End_Position": "7675088",
                "Strand": "+", "Variant_Classification": vc, "Variant_Type": "SNP", "Reference_Allele": "C",
                "Tumor_Seq_Allele1": "C", "Tumor_Seq_Allele2": "T", "Tumor_Sample_Barcode": tumour,
                "Matched_Norm_Sample_Barcode": f"{case}-10A-01D-A10Z-09", "Mutation_Status": "Somatic",
                "t_depth": "60", "t_ref_count": "40", "t_alt_count": "20", "n_depth": "40"})
    return [row[c] for c in MAF_COLUMNS] + ([filt] if filt is not None else [])


def _mutations(w: _Writer, dl: GdcDownload) -> None:
    rows, mc3 = [], []
    for c in dl.cases:
        for part in c.maf:
            tumour = f"{c.case}-{part}-11D-A10Y-09"
            variants = _variants(w, dl.latent[c.case], c.maf_silent)
            if c.case == "TCGA-44-2655":  # TP53 only in the second aliquot: the aliquot rule decides
                variants = [v for v in variants if v[0] != "TP53"] + ([("TP53", "Nonsense_Mutation")] if part == "01B"
                                                                       else [])
            fid, name = w.uuid(), f"{w.uuid()}.wxs.aliquot_ensemble_masked.maf.gz"
            path = dl.maf_dir / fid / name
            path.parent.mkdir(parents=True, exist_ok=True)
            head = ["#version gdc-1.0.0", "#annotation.spec gdc-1.0.1-public", "#filedate 20220117",
                    f"#tumor.aliquot {w.uuid()}", f"#normal.aliquot {w.uuid()}"]
            body = ["\t".join(_maf_row(c.case, tumour, g, vc, "GRCh38") + [""] * len(GDC_MAF_TAIL))
                    for g, vc in variants]
            with gzip.open(path, "wt") as fh:
                fh.write("\n".join(head + ["\t".join(MAF_COLUMNS + list(GDC_MAF_TAIL))] + body) + "\n")
            rows.append({"File ID": fid, "File Name": name, "Data Category": "Simple Nucleotide Variation",
                         "Data Type": "Masked Somatic Mutation", "Project ID": c.project,
                         "Case ID": f"{c.case}, {c.case}", "Sample ID": f"{c.case}-10A, {c.case}-{part}",
                         "Sample Type": f"Blood Derived Normal, {SAMPLE_TYPES[part[:2]]}"})
            mc3 += [_maf_row(c.case, tumour, g, vc, "37", "PASS") for g, vc in variants]
            if c.case == "TCGA-05-4395":  # a call present only against a non-preferred normal
                mc3.append(_maf_row(c.case, tumour, "KRAS", "Missense_Mutation", "37", "nonpreferredpair"))
    _sheet(dl.maf_sheet, rows)
    dl.mc3.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(dl.mc3, "wt") as fh:
        fh.write("\n".join(["\t".join(MAF_COLUMNS + ["FILTER"])] + ["\t".join(r) for r in mc3]) + "\n")


def _clinical(w: _Writer, dl: GdcDownload) -> None:
    cdr, gdc = [], []
    for i, c in enumerate(dl.cases):
        z = dl.latent[c.case]
        t = float(w.rng.exponential(1200 * np.exp(-0.8 * z[0])))
        censor = float(w.rng.uniform(200, 3000))
        days, event = (round(t), 1) if t < censor else (round(censor), 0)
        pfi_days = round(w.rng.uniform(0.3, 1.0) * days)
        if c.clinical in ("cdr", "both"):
            r = {k: "[Not Available]" for k in CDR_COLUMNS}
            r.update({"bcr_patient_barcode": c.case, "type": c.project.removeprefix("TCGA-"),
                      "age_at_initial_pathologic_diagnosis": str(int(w.rng.integers(35, 85))),
                      "gender": "FEMALE" if c.project == "TCGA-BRCA" else str(w.rng.choice(["MALE", "FEMALE"])),
                      "race": "WHITE",
                      "ajcc_pathologic_tumor_stage": str(w.rng.choice(["Stage I", "Stage IIA", "Stage III"])),
                      "histological_type": ("Infiltrating Ductal Carcinoma" if c.project == "TCGA-BRCA"
                                            else "Lung Adenocarcinoma"),
                      "histological_grade": "[Not Available]", "vital_status": "Dead" if event else "Alive",
                      "OS": str(event), "OS.time": f"{days}.0", "DSS": str(event), "DSS.time": f"{days}.0",
                      "DFI": "#N/A", "DFI.time": "#N/A", "PFI": str(int(pfi_days < days or event)),
                      "PFI.time": str(pfi_days), "Redaction": ""})
            cdr.append([str(i), *(r[k] for k in CDR_COLUMNS)])
        if c.clinical in ("gdc", "both"):
            case_uuid, birth = w.uuid(), int(w.rng.integers(13000, 30000))
            for j, treatment in enumerate(("Radiation Therapy, NOS", "Pharmaceutical Therapy, NOS")):
                follow = "'--" if event else str(days - 30 * j)  # rows of one case disagree on follow-up
                gdc.append([c.project, case_uuid, c.case, "Public", "Dead" if event else "Alive",
                            str(days) if event else "'--", str(-birth),
                            "female" if c.project == "TCGA-BRCA" else "male", str(birth // 365), follow,
                            str(birth), "Stage IIA", treatment])
    (dl.root / "clinical").mkdir(exist_ok=True)
    with open(dl.cdr, "w", newline="") as fh:  # the sheet saved as TSV: an unnamed index column first
        cw = csv.writer(fh, delimiter="\t", lineterminator="\n")
        cw.writerow(["", *CDR_COLUMNS])
        cw.writerows(cdr)
    with open(dl.gdc_clinical, "w", newline="") as fh:
        cw = csv.writer(fh, delimiter="\t", lineterminator="\n")
        cw.writerow(GDC_CLINICAL_COLUMNS)
        cw.writerows(gdc)


def _reports(w: _Writer, dl: GdcDownload) -> None:
    rows = []
    for c in dl.cases:
        z = dl.latent[c.case]
        for k in range(c.reports):
            organ = "breast" if c.project == "TCGA-BRCA" else "lung"
            grade = 1 + int(np.clip(z[0] + 1.5, 0, 2))
            text = (f"SURGICAL PATHOLOGY REPORT\nSpecimen: {organ}, resection{' (addendum)' if k else ''}.\n"
                    f"Diagnosis: invasive carcinoma, histologic grade {grade}, size {2 + abs(z[1]):.1f} cm, "
                    f"margins {'involved' if z[2] > 1 else 'free'}.")
            rows.append([f"{c.case}.{w.uuid().upper()}", text])
    dl.reports_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(dl.reports_csv, "w", newline="") as fh:
        cw = csv.writer(fh, lineterminator="\n")
        cw.writerow(["patient_filename", "text"])
        cw.writerows(rows)


def _slides(w: _Writer, dl: GdcDownload) -> None:
    for c in dl.cases:
        for section in c.slides:
            sample = "01Z-00" if section.startswith("DX") else "01A-01"
            name = f"{c.case}-{sample}-{section}.{w.uuid().upper()}"
            feats, coords = w.bag(dl.latent[c.case])
            w.write_trident(dl.trident_dir / f"{name}.h5", feats, coords, name)
            w.write_clam(feats, coords, name)
