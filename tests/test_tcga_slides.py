"""TCGA slide names in extraction and validation: a GDC slide file maps to its participant (not its file stem) and
its tissue source site, and `validate` warns about a case that mixes FFPE (DX) and frozen (TS/BS/MS) slides."""

import numpy as np
import pandas as pd
import yaml

from mmfm.bridges.extract import ExtractConfig, extract, update_cohort
from mmfm.data.bags import write_bag
from mmfm.data.cohort import CohortSpec, validate

SLIDE = "CMU-1-Small-Region"
DX = "TCGA-A2-A0T2-01Z-00-DX1.83A5C44E-7D97-4796-BE5B-01E45F3434E7"
TS = "TCGA-A2-A0T2-01A-01-TS1.a789801b-7cdb-4b4d-adac-ce58a7c48e22"
MIXED = "mix FFPE (DX) and frozen (TS/BS/MS) slides"


def test_extract_maps_gdc_slide_files_to_their_case(tmp_path, wsi_dir):
    """The real SVS under two GDC names of one participant, extracted for real (a plain name keeps its stem as the
    case: tests/test_bridges_extract.py)."""
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    for name in (f"{DX}.svs", f"{TS}.svs"):
        (wsi / name).symlink_to(wsi_dir / f"{SLIDE}.svs")
    out = tmp_path / "cohort"
    summary = extract(ExtractConfig(wsi_dir=wsi, out=out, encoder="vit-test", random_init=True, workers=0,
                                    batch_size=32, progress=False))
    assert summary["n_ok"] == 2
    slides = pd.read_csv(out / "slides.csv", dtype=str).set_index("slide_id")
    assert slides["case_id"].to_dict() == {DX: "TCGA-A2-A0T2", TS: "TCGA-A2-A0T2"}
    assert slides.loc[DX, "path"] == f"bags/{DX}.h5"  # the slide id keeps the UUID: two DX files never collide
    cases = pd.read_csv(out / "cases.csv", dtype=str)  # the tissue source site, as the GDC importers write it
    assert cases.to_dict("records") == [{"case_id": "TCGA-A2-A0T2", "site": "A2"}]
    rep = validate(out)
    assert rep.ok, rep.format()
    mixed = [w for w in rep.warnings if MIXED in w]
    assert len(mixed) == 1 and mixed[0].endswith(": TCGA-A2-A0T2")


def test_case_map_wins_over_the_barcode(tmp_path):
    cfg = ExtractConfig(wsi_dir=tmp_path, out=tmp_path, encoder="vit-test")
    update_cohort(tmp_path, cfg, 4, [DX, "slide_b"], [], {DX: "PATIENT-7"})
    assert pd.read_csv(tmp_path / "slides.csv", dtype=str).set_index("slide_id")["case_id"].to_dict() == \
        {DX: "PATIENT-7", "slide_b": "slide_b"}


def _cohort(root, slides):
    """A valid cohort whose slides.csv rows are (slide_id, case_id, bag file name)."""
    root.mkdir()
    spec = CohortSpec("t", "1", "", "enc", 4, 20.0, 256)
    (root / "cohort.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    cases = sorted({c for _, c, _ in slides})
    pd.DataFrame({"case_id": cases, "site": [c[5:7] for c in cases]}).to_csv(root / "cases.csv", index=False)
    rows = []
    for i, (sid, case, fname) in enumerate(slides):
        write_bag(root / "bags" / fname, np.random.default_rng(i).standard_normal((20, 4)).astype(np.float32),
                  np.stack([np.arange(20), np.zeros(20)], 1) * 512, patch_size_level0=512, encoder="enc")
        rows.append({"slide_id": sid, "case_id": case, "path": f"bags/{fname}"})
    pd.DataFrame(rows).to_csv(root / "slides.csv", index=False)
    return root


def test_validate_warns_only_for_cases_mixing_ffpe_and_frozen(tmp_path):
    root = _cohort(tmp_path / "c", [
        (DX, "TCGA-A2-A0T2", f"{DX}.h5"), (TS, "TCGA-A2-A0T2", f"{TS}.h5"),  # mixed
        ("TCGA-E2-A14N-01Z-00-DX1", "TCGA-E2-A14N", "a.h5"), ("TCGA-E2-A14N-01Z-00-DX2", "TCGA-E2-A14N", "b.h5"),
        ("TCGA-05-4244-01A-01-TS1", "TCGA-05-4244", "c.h5"), ("TCGA-05-4244-01A-01-BS1", "TCGA-05-4244", "d.h5"),
        ("x1", "TCGA-44-2655", "TCGA-44-2655-01Z-00-DX1.h5"), ("x2", "TCGA-44-2655", "TCGA-44-2655-01A-01-MS1.h5"),
    ])
    rep = validate(root)
    assert rep.ok
    mixed = [w for w in rep.warnings if MIXED in w]
    # by hand: A0T2 (DX + TS) and 44-2655 (DX + MS, read from the bag file names); E2 only DX, 05-4244 only frozen
    assert mixed == [f"slides.csv: 2 case(s) {MIXED}, whose features differ systematically (keep one kind, e.g. "
                     "`mmfm import features --preservation FFPE`): TCGA-44-2655, TCGA-A2-A0T2"]


def test_no_warning_for_non_tcga_names(tmp_path):
    root = _cohort(tmp_path / "c", [("S1", "TCGA-A2-A0T2", "S1.h5"), ("S2", "TCGA-A2-A0T2", "S2.h5")])
    assert not [w for w in validate(root).warnings if MIXED in w]
