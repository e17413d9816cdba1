"""`mmfm import maf`: mutation flags recomputed here from the MAF text, the non-silent rule, unknown ≠ wild-type,
MC3's FILTER column, the aliquot rules and the malformed-input errors."""

import csv
import gzip

import numpy as np
import pandas as pd
import pytest

from mmfm.data.cohort import Cohort, validate
from mmfm.importers import ImportDataError, gdc_rna, maf
from mmfm.testing import write_gdc_download
from mmfm.data.tcga import BarcodeError

# the rule, written out independently of mmfm.importers.maf.NON_SILENT
PROTEIN_ALTERING = {"Missense_Mutation", "Nonsense_Mutation", "Frame_Shift_Del", "Frame_Shift_Ins", "In_Frame_Del",
                    "In_Frame_Ins", "Splice_Site", "Translation_Start_Site", "Nonstop_Mutation"}
PANEL = ("TP53", "PIK3CA", "KRAS", "GATA3", "TTN")


@pytest.fixture(scope="module")
def dl(tmp_path_factory):
    return write_gdc_download(tmp_path_factory.mktemp("gdc"))


def _rows(path):
    with gzip.open(path, "rt") as fh:
        lines = [ln for ln in fh if not ln.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t"))


def _expected(rows, aliquots):
    """case → set of panel genes with a protein-altering call in the given tumour aliquots."""
    hits = {}
    for r in rows:
        if r["Tumor_Sample_Barcode"] in aliquots and r["Variant_Classification"] in PROTEIN_ALTERING \
                and r.get("FILTER", "PASS") != "nonpreferredpair":
            hits.setdefault(r["Tumor_Sample_Barcode"][:12], set()).add(r["Hugo_Symbol"])
    return hits


def _flags(out):
    cases = pd.read_csv(out / "cases.csv", dtype=str, keep_default_na=False).set_index("case_id")
    return cases[[c for c in cases.columns if c.startswith("mut_")]]


def test_gdc_masked_mafs_give_flags_and_unknown_stays_unknown(dl, tmp_path):
    out = tmp_path / "c"
    gdc_rna.run(gdc_rna.GdcRnaConfig(out=out, inputs=(dl.rna_dir,), sample_sheet=dl.rna_sheet))  # has TCGA-A2-A0CM
    rep = maf.run(maf.MafConfig(out=out, inputs=(dl.maf_dir,), sample_sheet=dl.maf_sheet, genes=PANEL))
    rows = [r for p in dl.maf_dir.glob("*/*.maf.gz") for r in _rows(p)]
    tumours = {r["Tumor_Sample_Barcode"] for r in rows}
    first = {t for t in tumours if t[13:16] == "01A"}  # by hand: 44-2655 has 01A and 01B → 01A (lower vial)
    hits = _expected(rows, first)
    flags = _flags(out)
    known = sorted({t[:12] for t in tumours})
    assert known == ["TCGA-05-4244", "TCGA-05-4395", "TCGA-44-2655", "TCGA-A2-A0T2", "TCGA-E2-A14N"]
    for case in known:
        assert {g for g in PANEL if flags.loc[case, f"mut_{g}"] == "1"} == hits.get(case, set()) & set(PANEL), case
        assert set(flags.loc[case]) <= {"0", "1"}
    assert (flags.loc["TCGA-E2-A14N"] == "0").all()  # sequenced, only silent/intron calls: wild-type
    assert (flags.loc["TCGA-A2-A0CM"] == "").all()  # no MAF downloaded: unknown, not wild-type
    assert rep.unmatched["cases of cases.csv without a sequenced tumour (mutations unknown)"] == ["TCGA-A2-A0CM"]
    # TP53 sits only in 44-2655's second aliquot (01B): the default rule does not see it
    assert flags.loc["TCGA-44-2655", "mut_TP53"] == "0"
    assert rep.duplicates["cases with several tumour samples (rule 'first')"] == [
        "TCGA-44-2655: used TCGA-44-2655-01A-11D-A10Y-09; not used TCGA-44-2655-01B-11D-A10Y-09"]
    v = validate(out)
    assert v.ok, v.format()
    pres = Cohort.open(out).presence()["mutation"]
    assert not pres["TCGA-A2-A0CM"] and pres.drop("TCGA-A2-A0CM").all()


def test_any_rule_and_top_n_panel(dl, tmp_path):
    out = tmp_path / "c"
    rows = [r for p in dl.maf_dir.glob("*/*.maf.gz") for r in _rows(p)]
    maf.run(maf.MafConfig(out=out, inputs=(dl.maf_dir,), aliquot_rule="any", genes=PANEL))
    hits = _expected(rows, {r["Tumor_Sample_Barcode"] for r in rows})  # every aliquot (all are sample type 01)
    flags = _flags(out)
    assert flags.loc["TCGA-44-2655", "mut_TP53"] == "1"  # now seen in the second aliquot
    for case, genes in hits.items():
        assert {g for g in PANEL if flags.loc[case, f"mut_{g}"] == "1"} == genes & set(PANEL)
    maf.run(maf.MafConfig(out=out, inputs=(dl.maf_dir,), top_n=3))
    hits = _expected(rows, {r["Tumor_Sample_Barcode"] for r in rows if r["Tumor_Sample_Barcode"][13:16] == "01A"})
    counts = pd.Series([g for s in hits.values() for g in s]).value_counts()
    top = sorted(counts.index, key=lambda g: (-counts[g], g))[:3]  # most mutated cases, ties by name
    flags = _flags(out)
    assert list(flags.columns) == [f"mut_{g}" for g in top]  # the re-run replaced every earlier mut_* column
    for case, genes in hits.items():
        assert {g for g in top if flags.loc[case, f"mut_{g}"] == "1"} == genes & set(top)


def test_mc3_filter_excludes_non_preferred_pairs(dl, tmp_path):
    rows = _rows(dl.mc3)
    assert {r["FILTER"] for r in rows} == {"PASS", "nonpreferredpair"}
    out = tmp_path / "c"
    rep = maf.run(maf.MafConfig(out=out, inputs=(dl.mc3,), genes=PANEL))
    hits = _expected(rows, {r["Tumor_Sample_Barcode"] for r in rows if r["Tumor_Sample_Barcode"][13:16] == "01A"})
    flags = _flags(out)
    for case in flags.index:
        assert {g for g in PANEL if flags.loc[case, f"mut_{g}"] == "1"} == hits.get(case, set()) & set(PANEL)
    pass_kras = any(r["Hugo_Symbol"] == "KRAS" and r["FILTER"] == "PASS" and r["Variant_Classification"] in
                    PROTEIN_ALTERING and r["Tumor_Sample_Barcode"].startswith("TCGA-05-4395") for r in rows)
    assert flags.loc["TCGA-05-4395", "mut_KRAS"] == ("1" if pass_kras else "0")
    assert "1 qualifying row(s) with an excluded FILTER" in " ".join(rep.notes)
    maf.run(maf.MafConfig(out=out, inputs=(dl.mc3,), genes=PANEL, exclude_filters=()))
    assert _flags(out).loc["TCGA-05-4395", "mut_KRAS"] == "1"


def test_malformed_mafs(tmp_path):
    head = "#version 2.4\nHugo_Symbol\tVariant_Classification\tTumor_Sample_Barcode\n"
    p = tmp_path / "a.maf"
    p.write_text(head.replace("\tVariant_Classification", "") + "TP53\tTCGA-A2-A0T2-01A-11D-A10Y-09\n")
    cfg = maf.MafConfig(out=tmp_path / "c", inputs=(p,))
    with pytest.raises(ImportDataError, match=rf"{p} line 2: MAF column\(s\) \['Variant_Classification'\] missing"):
        maf.run(cfg)
    p.write_text(head + "TP53\tMissense_Mutation\tTCGA-A2-A0T2-01A-11D-A10Y-09\nKRAS\tMissense_Mutation\tLUAD_17\n")
    with pytest.raises(BarcodeError, match=rf"{p} line 4, Tumor_Sample_Barcode: 'LUAD_17' is not a TCGA barcode"):
        maf.run(cfg)
    p.write_text(head + "TP53\tMissense_Mutation\tTCGA-A2-A0T2-01A-11D-A10Y-09\n"
                 "TP53\tMissense_Mutation\tTCGA-A2-A0T2-01B-11D-A10Y-09\n")
    with pytest.raises(ImportDataError, match="case TCGA-A2-A0T2: 2 tumour samples .* aliquot rule 'error'"):
        maf.run(maf.MafConfig(out=tmp_path / "c", inputs=(p,), aliquot_rule="error"))
    p.write_bytes(b"\x1f\x8b not gzip")
    gz = p.rename(tmp_path / "b.maf.gz")
    with pytest.raises(ImportDataError, match=rf"{gz}: cannot be read as a MAF"):
        maf.run(maf.MafConfig(out=tmp_path / "c", inputs=(gz,)))
    np.testing.assert_equal(len(list((tmp_path / "c").glob("*.csv"))), 0)  # nothing written by failed runs


def test_sample_sheet_makes_an_empty_maf_known_wild_type(dl, tmp_path):
    """A downloaded MAF with no call at all still says the tumour was sequenced — but only the sheet can tell."""
    d = tmp_path / "maf" / "5f1c0c3e-0000-4000-8000-000000000001"
    d.mkdir(parents=True)
    name = "9a7d.wxs.aliquot_ensemble_masked.maf.gz"
    with gzip.open(d / name, "wt") as fh:
        fh.write("#version gdc-1.0.0\nHugo_Symbol\tVariant_Classification\tTumor_Sample_Barcode\n")
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("File ID\tFile Name\tData Category\tData Type\tProject ID\tCase ID\tSample ID\tSample Type\n"
                     f"{d.name}\t{name}\tSimple Nucleotide Variation\tMasked Somatic Mutation\tTCGA-LUAD\t"
                     "TCGA-55-8514, TCGA-55-8514\tTCGA-55-8514-10A, TCGA-55-8514-01A\t"
                     "Blood Derived Normal, Primary Solid Tumor\n")
    out = tmp_path / "c"
    maf.run(maf.MafConfig(out=out, inputs=(tmp_path / "maf", dl.mc3), sample_sheet=sheet, genes=("TP53", "KRAS")))
    assert _flags(out).loc["TCGA-55-8514"].tolist() == ["0", "0"]
    out2 = tmp_path / "c2"
    maf.run(maf.MafConfig(out=out2, inputs=(tmp_path / "maf", dl.mc3), genes=("TP53", "KRAS")))
    assert "TCGA-55-8514" not in _flags(out2).index  # without the sheet nothing says it was sequenced
