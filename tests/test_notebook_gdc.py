"""notebooks/03_from_gdc_download.ipynb executes top to bottom at small sizes: a GDC-format folder → import →
validate → pretrain → embed → probe (run like the other notebooks, tests/test_notebooks.py)."""

import json

import anndata as ad
import pandas as pd
import pytest
from test_notebooks import execute


@pytest.mark.slow
def test_gdc_download_notebook_imports_pretrains_and_probes(tmp_path):
    execute("03_from_gdc_download.ipynb", tmp_path)
    out = tmp_path / "gdc"
    for name in ("features", "gdc-rna", "gdc-protein", "maf", "clinical", "reports"):
        assert json.loads((out / "cohort" / "imports" / f"{name}.json").read_text())["validation"]["ok"], name
    slides = pd.read_csv(out / "cohort" / "slides.csv")
    assert slides["slide_id"].str.contains("-DX").all()  # preservation FFPE: frozen sections left out, listed
    cases = ad.read_h5ad(out / "embeddings.h5ad")
    assert {"slide", "slide_meanpool", "rna"} <= set(cases.obsm) and (cases.obs["split"] == "heldout").all()
    res = pd.read_csv(out / "probe" / "results.csv")
    assert {"survival", "classification", "mutation", "retrieval"} <= set(res["type"])
