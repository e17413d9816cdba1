"""The TCGA probe task files parse, and every column they name is one the importers write on a GDC-format folder."""

import fnmatch
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfm.importers import clinical, features, gdc_rna, maf
from mmfm.testing import write_gdc_download
from mmfm.eval.probe import load_tasks

COLUMN_KEYS = ("label", "labels", "time", "event", "site", "baseline")  # spec keys that name obs columns
TASKS = sorted((Path(__file__).resolve().parents[1] / "configs" / "tasks").glob("tcga_*.yaml"))


@pytest.fixture(scope="module")
def columns(tmp_path_factory):
    dl = write_gdc_download(tmp_path_factory.mktemp("gdc"))
    out = tmp_path_factory.mktemp("cohort")
    features.run(features.FeaturesConfig(out=out, inputs=(dl.trident_dir,)))
    gdc_rna.run(gdc_rna.GdcRnaConfig(out=out, inputs=(dl.rna_dir,), sample_sheet=dl.rna_sheet))
    maf.run(maf.MafConfig(out=out, inputs=(dl.maf_dir,), genes=("TP53", "KRAS")))
    clinical.run(clinical.ClinicalConfig(out=out, cdr=dl.cdr, gdc_clinical=dl.gdc_clinical))
    return set(pd.read_csv(out / "cases.csv").columns)


def test_task_files_exist():
    assert {p.stem for p in TASKS} == {"tcga_brca", "tcga_luad", "tcga_pancancer"}


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.stem)
def test_task_columns_are_written_by_the_importers(path, columns):
    specs = load_tasks(path)
    assert path.read_text().startswith("#")
    for s in specs:
        named = [c for k in COLUMN_KEYS for c in np.atleast_1d(getattr(s, k, None) or ())]
        for col in named:
            assert fnmatch.filter(columns, col), f"{path.name} task {s.name!r}: no column {col!r} in {sorted(columns)}"
        if s.type in ("survival", "classification", "mutation"):
            assert named, f"{path.name} task {s.name!r} names no label column"
            assert s.site_preserved and s.site == "site", s.name  # TSS-preserved folds on TCGA
