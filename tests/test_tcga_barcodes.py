"""TCGA barcodes: every level decoded by hand from the GDC barcode rules, slide names with UUIDs, clear errors."""

import pytest

from mmfm.data import tcga
from mmfm.data.tcga import BarcodeError, parse_barcode, parse_slide_name

UUID = "20205276-CA16-46B3-914B-A42F6D06C2AB"


@pytest.mark.parametrize("text, want", [
    ("TCGA-02-0001", dict(site="02", participant="0001")),
    ("TCGA-02-0001-01", dict(sample_code="01", vial=None)),
    ("TCGA-02-0001-01C", dict(sample_code="01", vial="C")),
    ("TCGA-02-0001-01C-01D", dict(portion="01", analyte="D")),
    ("TCGA-02-0001-01C-01D-0182-01", dict(site="02", participant="0001", sample_code="01", vial="C", portion="01",
                                          analyte="D", plate="0182", centre="01", section=None)),
    ("TCGA-A2-A0T2-11A-32R-A084-07", dict(site="A2", sample_code="11", vial="A", portion="32", analyte="R",
                                          plate="A084", centre="07")),
    ("TCGA-D3-A3ML-06A-21-A241-20", dict(sample_code="06", portion="21", analyte=None, plate="A241", centre="20")),
    ("TCGA-02-0001-01C-01-TS1", dict(portion="01", analyte=None, section="TS1", plate=None)),
    ("TCGA-05-4244-01Z-00-DX1", dict(sample_code="01", vial="Z", portion="00", section="DX1")),
    ("tcga-a2-a0t2-01a", dict(site="A2", participant="A0T2", vial="A")),  # lower case is upper-cased
])
def test_every_barcode_level_is_decoded(text, want):
    bc = parse_barcode(text)
    for key, value in want.items():
        assert getattr(bc, key) == value, key
    assert bc.case == "TCGA-" + text.upper()[5:12]
    assert bc.text == text.upper()


def test_sample_type_names_tumour_flag_and_sample_barcode():
    assert parse_barcode("TCGA-A2-A0T2-01A").sample_type == "Primary Solid Tumor"
    assert parse_barcode("TCGA-A2-A0T2-06A").sample_type == "Metastatic"
    assert parse_barcode("TCGA-A2-A0T2-11A").sample_type == "Solid Tissue Normal"
    assert parse_barcode("TCGA-A2-A0T2-10A").sample_type == "Blood Derived Normal"
    assert [parse_barcode(f"TCGA-A2-A0T2-{c}A").is_tumour for c in ("01", "02", "06", "10", "11", "20")] == \
        [True, True, True, False, False, False]
    assert parse_barcode("TCGA-A2-A0T2-01A-11R-A084-07").sample == "TCGA-A2-A0T2-01A"
    assert parse_barcode("TCGA-A2-A0T2").sample is None
    assert tcga.ANALYTES[parse_barcode("TCGA-A2-A0T2-01A-11R").analyte] == "RNA"


@pytest.mark.parametrize("name, case, section, kind", [
    (f"TCGA-05-4395-01Z-00-DX1.{UUID}.svs", "TCGA-05-4395", "DX1", "FFPE"),
    (f"TCGA-05-4395-01Z-00-DX2.{UUID.lower()}", "TCGA-05-4395", "DX2", "FFPE"),  # extract's slide id (stem)
    (f"TCGA-02-0001-01C-01-TS1.{UUID}.h5", "TCGA-02-0001", "TS1", "frozen"),
    ("TCGA-02-0001-01C-01-BSA.svs", "TCGA-02-0001", "BSA", "frozen"),
    ("dir/TCGA-02-0001-01C-01-MS1", "TCGA-02-0001", "MS1", "frozen"),
])
def test_gdc_slide_file_names(name, case, section, kind):
    bc = parse_slide_name(name)
    assert (bc.case, bc.section, bc.preservation) == (case, section, kind)
    assert tcga.slide_case(name) == case and tcga.slide_preservation(name) == kind


def test_non_slide_and_non_tcga_names():
    assert tcga.slide_case("CMU-1-Small-Region") is None and tcga.slide_preservation("slide_7.svs") is None
    assert tcga.slide_case("TCGA-A2-A0T2-01A-11R-A084-07.h5") == "TCGA-A2-A0T2"  # any level maps to the case
    assert tcga.slide_preservation("TCGA-A2-A0T2-01A") is None
    with pytest.raises(BarcodeError, match="a slide barcode ends with its section"):
        parse_slide_name("TCGA-A2-A0T2-01A-11R-A084-07.svs")
    assert tcga.site_of("TCGA-E2-A14N") == "E2" and tcga.site_of("C3L-00001") is None


@pytest.mark.parametrize("text, why", [
    ("C3L-00001", "must start TCGA-"),
    ("TARGET-20-PAEFGT-03A", "must start TCGA-"),
    ("TCGA-A2-A0T", "must start TCGA-"),
    ("TCGA-A2-A0T2-1A", "sample part '1A'"),
    ("TCGA-A2-A0T2-01A-XY", "portion part 'XY'"),
    ("TCGA-A2-A0T2-01A-11R-A08", "neither a 4-character plate nor a slide section"),
    ("TCGA-A2-A0T2-01A-11R-A084-7", "centre part '7'"),
    ("TCGA-A2-A0T2-01A-11R-A084-07-99", "too many parts"),
])
def test_errors_say_where_and_why(text, why):
    with pytest.raises(BarcodeError) as e:
        parse_barcode(text, "sheet.tsv line 4, Sample ID")
    msg = str(e.value)
    assert msg.startswith(f"sheet.tsv line 4, Sample ID: '{text}' is not a TCGA barcode") and why in msg
    assert "e.g. TCGA-A2-A0T2-01A-11R-A084-07" in msg
    assert isinstance(e.value, ValueError)


def test_rank_prefers_primary_tumour_then_vial_then_portion():
    names = ["TCGA-A2-A0T2-11A-01R", "TCGA-A2-A0T2-06A-01R", "TCGA-A2-A0T2-01B-01R", "TCGA-A2-A0T2-01A-21R",
             "TCGA-A2-A0T2-01A-11R", "TCGA-A2-A0T2-02A-01R"]
    ranked = sorted(names, key=lambda t: parse_barcode(t).rank())
    # by hand: sample code 01 < 02 < 06 < 11; within 01: vial A < B; within 01A: portion 11 < 21
    assert ranked == ["TCGA-A2-A0T2-01A-11R", "TCGA-A2-A0T2-01A-21R", "TCGA-A2-A0T2-01B-01R",
                      "TCGA-A2-A0T2-02A-01R", "TCGA-A2-A0T2-06A-01R", "TCGA-A2-A0T2-11A-01R"]
    # a sample-level id (no portion) sorts after its aliquots
    assert parse_barcode("TCGA-A2-A0T2-01A-11R").rank() < parse_barcode("TCGA-A2-A0T2-01A").rank()
