"""`mmfm import <source>`: public data downloads → a cohort directory (data_cards/cohort_format.md, unchanged).

One module per source, each a typed config dataclass and `run(cfg) -> ImportReport`:
  gdc-rna      GDC STAR gene counts + sample sheet, or Xena/TANGLE wide matrices  → rna.h5ad
  gdc-protein  GDC RPPA files (+ sample sheet) or TCPA wide CSV                    → protein.h5ad
  maf          GDC masked-somatic / MC3 MAFs                                       → mut_* columns of cases.csv
  clinical     TCGA-CDR and/or GDC clinical TSV                                    → os_days/os_event, ... in cases.csv
  reports      TCGA-Reports CSV or a folder of texts                               → reports.jsonl
  features     TRIDENT h5, CLAM h5, CLAM .pt tile features                         → slides.csv (+ bags/)
  hest         HEST-1k samples (metadata table, st/<id>.h5ad) + their tile features → spots/, slides.csv `spots`
  visium       Space Ranger outs/ folders (scanpy) + their tile features            → spots/, slides.csv `spots`
Every importer creates or extends the cohort, writes atomically, can be re-run (it replaces what it owns), prints and
writes `imports/<source>.json` (matched / unmatched / duplicates / the rules applied, per case), and validates.
TCGA ids are parsed by `mmfm.data.tcga`.
"""

from mmfm.importers import clinical, features, gdc_protein, gdc_rna, hest, maf, reports
from mmfm.importers.common import ImportDataError, ImportReport

IMPORTERS = {
    "gdc-rna": (gdc_rna.GdcRnaConfig, gdc_rna.run),
    "gdc-protein": (gdc_protein.GdcProteinConfig, gdc_protein.run),
    "maf": (maf.MafConfig, maf.run),
    "clinical": (clinical.ClinicalConfig, clinical.run),
    "reports": (reports.ReportsConfig, reports.run),
    "features": (features.FeaturesConfig, features.run),
    "hest": (hest.HestConfig, hest.run_hest),
    "visium": (hest.VisiumConfig, hest.run_visium),
}

__all__ = ["IMPORTERS", "ImportDataError", "ImportReport"]
