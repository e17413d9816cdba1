"""`mmfm import clinical` (TCGA-CDR, GDC clinical TSV) and `mmfm import reports` (TCGA-Reports CSV, text folders):
endpoints recomputed here from the tables, precedence, missing tokens, duplicates and the malformed-input errors."""

import csv
import json

import numpy as np
import pandas as pd
import pytest

from mmfm.data.cohort import Cohort, validate
from mmfm.importers import ImportDataError, clinical, gdc_rna, reports
from mmfm.testing import write_gdc_download
from mmfm.data.tcga import BarcodeError


@pytest.fixture(scope="module")
def dl(tmp_path_factory):
    return write_gdc_download(tmp_path_factory.mktemp("gdc"))


@pytest.fixture
def cohort(dl, tmp_path):
    """A cohort whose cases come from the RNA files (E2-A14N has none)."""
    out = tmp_path / "c"
    gdc_rna.run(gdc_rna.GdcRnaConfig(out=out, inputs=(dl.rna_dir,), sample_sheet=dl.rna_sheet))
    return out


def _table(path, sep="\t"):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter=sep))


def _cases(out):
    return pd.read_csv(out / "cases.csv", dtype=str, keep_default_na=False).set_index("case_id")


def _gdc_os(rows):
    """Overall survival from GDC clinical rows, by the rule: Dead → days_to_death, Alive → max follow-up."""
    out = {}
    for case in {r["cases.submitter_id"] for r in rows}:
        mine = [r for r in rows if r["cases.submitter_id"] == case]
        if mine[0]["demographic.vital_status"] == "Dead":
            out[case] = (float(mine[0]["demographic.days_to_death"]), 1.0)
        else:
            out[case] = (max(float(r["diagnoses.days_to_last_follow_up"]) for r in mine), 0.0)
    return out


def test_cdr_and_gdc_clinical_give_endpoints_with_cdr_first(dl, cohort):
    rep = clinical.run(clinical.ClinicalConfig(out=cohort, cdr=dl.cdr, gdc_clinical=dl.gdc_clinical, cases="all"))
    cdr = {r["bcr_patient_barcode"]: r for r in _table(dl.cdr)}
    gdc_rows = _table(dl.gdc_clinical)
    gdc = _gdc_os(gdc_rows)
    cases = _cases(cohort)
    assert sorted(cases.index) == sorted(set(cdr) | set(gdc))  # cases=all adds E2-A14N (no RNA)
    for case, row in cases.iterrows():
        if case in cdr:
            r = cdr[case]
            assert (float(row["os_days"]), float(row["os_event"])) == (float(r["OS.time"]), float(r["OS"]))
            assert (float(row["pfi_days"]), row["pfi_event"]) == (float(r["PFI.time"]), r["PFI"])
            assert row["dfi_days"] == row["dfi_event"] == ""  # '#N/A' in the CDR: unknown
            assert row["histological_grade"] == ""  # '[Not Available]'
            assert row["project"] == "TCGA-" + r["type"] and row["clinical_source"] == "TCGA-CDR"
            assert row["age"] == r["age_at_initial_pathologic_diagnosis"]
        else:
            assert (float(row["os_days"]), float(row["os_event"])) == gdc[case]
            assert row["clinical_source"] == "GDC clinical" and row["pfi_days"] == ""
        assert row["site"] == case[5:7]
    both = set(cdr) & set(gdc)
    assert both == {"TCGA-E2-A14N"} and rep.duplicates["cases in both tables (TCGA-CDR used)"] == sorted(both)
    v = validate(cohort)
    assert v.ok, v.format()
    c = Cohort.open(cohort)
    assert c.cases["os_days"].notna().all() and c.cases["os_event"].isin([0.0, 1.0]).all()


def test_existing_cases_only_by_default_and_gdc_rows_merge(dl, cohort, tmp_path):
    rep = clinical.run(clinical.ClinicalConfig(out=cohort, gdc_clinical=dl.gdc_clinical))
    gdc = _gdc_os(_table(dl.gdc_clinical))
    cases = _cases(cohort)
    assert "TCGA-E2-A14N" not in cases.index  # in the table but not in the cohort
    assert rep.unmatched["patients of the table not in the cohort (cases = existing)"] == ["TCGA-E2-A14N"]
    assert (float(cases.loc["TCGA-05-4244", "os_days"]), float(cases.loc["TCGA-05-4244", "os_event"])) == \
        gdc["TCGA-05-4244"]
    no_data = sorted(set(cases.index) - set(gdc))
    assert (cases.loc[no_data, "os_days"] == "").all()  # the importer owns its columns: no stale values
    assert rep.unmatched["cases of cases.csv without clinical data"] == no_data
    with pytest.raises(ImportDataError, match="has no case yet"):
        clinical.run(clinical.ClinicalConfig(out=tmp_path / "empty", cdr=dl.cdr))


def test_gdc_old_column_names_and_follow_up_rules(tmp_path):
    t = tmp_path / "clinical.tsv"
    t.write_text("case_id\tcase_submitter_id\tproject_id\tvital_status\tdays_to_death\tdays_to_last_follow_up\n"
                 "u1\tTCGA-A2-A0T2\tTCGA-BRCA\tAlive\t'--\t300\n"
                 "u1\tTCGA-A2-A0T2\tTCGA-BRCA\tAlive\t'--\t410\n"  # a second diagnosis row, later follow-up
                 "u2\tTCGA-A2-A0CM\tTCGA-BRCA\tNot Reported\t'--\t120\n"
                 "u3\tTCGA-A2-A0D0\tTCGA-BRCA\tDead\t'--\t'--\n"
                 "u4\tTCGA-A2-A0D1\tTCGA-BRCA\tAlive\t'--\t-5\n")
    out = tmp_path / "c"
    rep = clinical.run(clinical.ClinicalConfig(out=out, gdc_clinical=t, cases="all"))
    cases = _cases(out)
    assert (cases.loc["TCGA-A2-A0T2", "os_days"], cases.loc["TCGA-A2-A0T2", "os_event"]) == ("410", "0")
    assert (cases.loc[["TCGA-A2-A0CM", "TCGA-A2-A0D0", "TCGA-A2-A0D1"], "os_days"] == "").all()
    assert rep.unmatched["negative OS times (left unknown)"] == ["TCGA-A2-A0D1"]
    assert set(rep.unmatched["cases with no usable overall survival"]) == {"TCGA-A2-A0CM", "TCGA-A2-A0D0",
                                                                           "TCGA-A2-A0D1"}
    t.write_text(t.read_text() + "u3\tTCGA-A2-A0D0\tTCGA-BRCA\tDead\t200\t'--\n"
                 "u3\tTCGA-A2-A0D0\tTCGA-BRCA\tDead\t230\t'--\n")
    with pytest.raises(ImportDataError, match=rf"{t} line 8: case TCGA-A2-A0D0 has death 230.0 but line 7 has 200.0"):
        clinical.run(clinical.ClinicalConfig(out=out, gdc_clinical=t, cases="all"))


CDR_HEAD = "\tbcr_patient_barcode\ttype\tOS\tOS.time\n"


@pytest.mark.parametrize("body, error, message", [
    (CDR_HEAD.replace("\tOS.time", "") + "0\tTCGA-A2-A0T2\tBRCA\t1\n", ImportDataError,
     r"cdr.tsv line 1: TCGA-CDR column\(s\) \['OS.time'\] missing"),
    (CDR_HEAD + "0\tTCGA-A2-A0T2\tBRCA\t2\t100\n", ImportDataError, r"cdr.tsv line 2, OS: event '2' is not 0 or 1"),
    (CDR_HEAD + "0\tTCGA-A2-A0T2\tBRCA\t1\tlong\n", ImportDataError,
     r"cdr.tsv line 2, OS.time: 'long' is not a number"),
    (CDR_HEAD + "0\tTCGA-A2-A0T2\tBRCA\t1\t100\n1\tTCGA-A2-A0T2\tBRCA\t1\t100\n", ImportDataError,
     r"cdr.tsv line 3: patient TCGA-A2-A0T2 appears twice \(first on line"),
    (CDR_HEAD + "0\tPT-0001\tBRCA\t1\t100\n", BarcodeError,
     r"cdr.tsv line 2, bcr_patient_barcode: 'PT-0001' is not a TCGA barcode"),
])
def test_malformed_clinical_tables(tmp_path, body, error, message):
    cdr = tmp_path / "cdr.tsv"
    cdr.write_text(body)
    with pytest.raises(error, match=message):
        clinical.run(clinical.ClinicalConfig(out=tmp_path / "c", cdr=cdr, cases="all"))


def test_cdr_spreadsheet_is_refused_with_advice(tmp_path):
    with pytest.raises(ImportDataError, match="save the sheet 'TCGA-CDR' as CSV or TSV"):
        clinical.run(clinical.ClinicalConfig(out=tmp_path / "c", cdr=tmp_path / "TCGA-CDR.xlsx"))
    with pytest.raises(ImportDataError, match="give cdr"):
        clinical.run(clinical.ClinicalConfig(out=tmp_path / "c"))


# ------------------------------------------------------------------------------------------------- reports
def test_tcga_reports_csv_joins_on_the_barcode_and_concatenates_duplicates(dl, cohort):
    rep = reports.run(reports.ReportsConfig(out=cohort, inputs=(dl.reports_csv,)))
    rows = _table(dl.reports_csv, sep=",")
    want = {}
    for r in sorted(rows, key=lambda r: r["patient_filename"]):
        case = r["patient_filename"].split(".")[0]
        want[case] = want[case] + "\n\n" + r["text"].strip() if case in want else r["text"].strip()
    lines = (cohort / "reports.jsonl").read_text().splitlines()
    got = {json.loads(ln)["case_id"]: json.loads(ln)["text"] for ln in lines}
    assert got == want and "\n" in got["TCGA-05-4244"]  # multi-line reports survive the CSV round trip
    assert [k for k in rep.duplicates] == ["cases with several reports (concatenate)"]
    assert rep.duplicates["cases with several reports (concatenate)"][0].startswith("TCGA-A2-A0CM: ")
    assert validate(cohort).ok
    reports.run(reports.ReportsConfig(out=cohort, inputs=(dl.reports_csv,), duplicates="first"))
    first = sorted(r["patient_filename"] for r in rows if r["patient_filename"].startswith("TCGA-A2-A0CM"))[0]
    text = next(r["text"] for r in rows if r["patient_filename"] == first).strip()
    assert Cohort.open(cohort).reports["TCGA-A2-A0CM"] == text
    with pytest.raises(ImportDataError, match="case TCGA-A2-A0CM: 2 reports .* duplicates = error"):
        reports.run(reports.ReportsConfig(out=cohort, inputs=(dl.reports_csv,), duplicates="error"))


def test_folder_of_texts_and_bad_reports(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "TCGA-A2-A0T2.txt").write_text("Invasive ductal carcinoma, grade 2.\n")
    (d / "TCGA-A2-A0CM.a1b2.txt").write_text("   \n")
    out = tmp_path / "c"
    rep = reports.run(reports.ReportsConfig(out=out, inputs=(d,)))
    assert Cohort.open(out).reports.to_dict() == {"TCGA-A2-A0T2": "Invasive ductal carcinoma, grade 2."}
    assert rep.unmatched["empty reports (not written)"] == [f"TCGA-A2-A0CM.a1b2.txt ({d / 'TCGA-A2-A0CM.a1b2.txt'})"]
    (d / "report_7.txt").write_text("text")
    with pytest.raises(BarcodeError, match=r"report_7.txt \(report_7.txt\): 'report_7' is not a TCGA barcode"):
        reports.run(reports.ReportsConfig(out=out, inputs=(d,)))
    bad = tmp_path / "r.csv"
    bad.write_text("patient,text\nTCGA-A2-A0T2.x,hello\n")
    with pytest.raises(ImportDataError, match=r"r.csv line 1: column\(s\) \['patient_filename'\] missing"):
        reports.run(reports.ReportsConfig(out=out, inputs=(bad,)))
    bad.write_text('patient_filename,text\nTCGA-A2-A0T2.x,"two\nlines"\nXYZ.y,hello\n')
    with pytest.raises(BarcodeError, match=r"r.csv line 4 \(XYZ.y\): 'XYZ' is not a TCGA barcode"):
        reports.run(reports.ReportsConfig(out=out, inputs=(bad,)))
    np.testing.assert_equal(validate(out).ok, True)  # failed runs left the cohort as it was
