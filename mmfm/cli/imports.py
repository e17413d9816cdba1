"""`mmfm import <source>`: public data downloads (GDC/TCGA, TRIDENT/CLAM feature folders) → a cohort directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmfm.importers import IMPORTERS, ImportDataError, features

DESCRIPTION = """\
Create or extend a cohort directory from what a lab downloaded: GDC STAR gene counts (+ sample sheet) or
Xena-style matrices, GDC RPPA or TCPA protein tables, masked-somatic / MC3 MAFs, TCGA-CDR or GDC clinical
tables, TCGA-Reports transcriptions, TRIDENT / CLAM feature folders, spatial transcriptomics (HEST-1k samples,
Visium Space Ranger folders) as spot tables beside the slides' tile features. Every import prints and writes
imports/<source>.json (what matched, what did not, the rule applied per case), writes atomically, can be re-run
and ends with `mmfm validate`. TCGA barcodes map aliquots and slides to cases (data_cards/gdc_tcga.md).

sources: """ + ", ".join(IMPORTERS) + """

example: mmfm import gdc-rna --out cohort --inputs "[gdc_download/]" --sample_sheet gdc_sample_sheet.tsv"""

SUMMARIES = {
    "gdc-rna": "GDC STAR 'augmented gene counts' TSVs joined to cases through the GDC sample sheet, or Xena/TANGLE "
               "wide matrices (genes × samples) → rna.h5ad (raw counts in a layer, the chosen measure in X).",
    "gdc-protein": "GDC RPPA files (+ sample sheet) or TCPA-style wide matrices → protein.h5ad.",
    "maf": "GDC masked-somatic or MC3 MAFs → per-case mutation calls (non-silent rule) as mut_<gene> columns; "
           "a case not sequenced stays unknown, never wild-type.",
    "clinical": "TCGA-CDR table and/or GDC clinical TSV → cases.csv (os_days / os_event, other endpoints, site).",
    "reports": "TCGA-Reports-style CSV (patient_filename, text) or a folder of one text per case → reports.jsonl.",
    "features": "TRIDENT h5 (linked as they are), CLAM h5 / .pt (converted; patch_size_level0 required or computed "
                "from --mag --patch_size --mpp, never guessed) → slides.csv and bags/.",
    "hest": "HEST-1k samples (HEST_v*.csv metadata, st/<id>.h5ad) with their tile features (--features, <id>.h5 "
            "from wsis/<id>.tif) → spots/<id>.h5ad spot tables in level-0 px, named in slides.csv `spots`.",
    "visium": "Space Ranger outs/ folders (scanpy read_visium; in-tissue spots) with their tile features "
              "(--features, <folder name>.h5) → spots/<sample>.h5ad, named in slides.csv `spots`.",
}

EXAMPLES = {
    "gdc-rna": 'mmfm import gdc-rna --out cohort --inputs "[gdc_download/]" --sample_sheet gdc_sample_sheet.tsv',
    "gdc-protein": 'mmfm import gdc-protein --out cohort --inputs "[rppa/]" --sample_sheet gdc_sample_sheet.tsv',
    "maf": 'mmfm import maf --out cohort --inputs "[mafs/]" --sample_sheet gdc_sample_sheet.tsv',
    "clinical": "mmfm import clinical --out cohort --cdr TCGA-CDR.tsv --gdc_clinical clinical.tsv",
    "reports": 'mmfm import reports --out cohort --inputs "[TCGA_Reports.csv]"',
    "features": 'mmfm import features --out cohort --inputs "[trident/20x_256px_0px_overlap/features_uni_v1/]"',
    "hest": "mmfm import hest --out cohort --root hest_data --features trident/20x_256px_0px_overlap/features_uni_v1",
    "visium": 'mmfm import visium --out cohort --inputs "[run1/outs]" --features trident/features_uni_v1',
}

def read_clam_pt(path: Path) -> np.ndarray:
    """CLAM .pt features through the torch bridge (torch.load(weights_only=True)); a clear error without torch."""
    try:
        from mmfm.bridges.clam import read_pt_features
    except ImportError as e:
        raise ImportDataError(f"{path}: CLAM .pt features need PyTorch (pip install 'mmfm[bridges]'); "
                              f"or import CLAM's h5_files/ instead ({e})") from e
    return read_pt_features(path)


def _command(run):
    def command(cfg) -> int:
        run(cfg)  # prints and writes its report; a bad file raises, naming it
        return 0
    return command


RUNS = {**{name: run for name, (_, run) in IMPORTERS.items()},
        "features": lambda cfg: features.run(cfg, read_pt=read_clam_pt)}
SUBCOMMANDS = {name: (config, _command(RUNS[name])) for name, (config, _) in IMPORTERS.items()}


def describe(name: str) -> str:
    return f"{SUMMARIES[name]}\n\nexample: {EXAMPLES[name]}"
