"""`mmfm import gdc-rna` / `gdc-protein` on a GDC-format folder written in the published formats. Every value is
checked against the files re-read here with the csv module, every rule against the choice worked out by hand."""

import csv
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from mmfm.data.cohort import Cohort, validate
from mmfm.importers import ImportDataError, gdc_protein, gdc_rna
from mmfm.testing import ANTIBODIES, write_gdc_download
from mmfm.data.tcga import BarcodeError

RNA_CASES = ["TCGA-05-4244", "TCGA-05-4395", "TCGA-44-2655", "TCGA-A2-A0CM", "TCGA-A2-A0T2"]  # E2-A14N has none


@pytest.fixture(scope="module")
def dl(tmp_path_factory):
    return write_gdc_download(tmp_path_factory.mktemp("gdc"))


def _sheet(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _star(path):
    """gene rows of a STAR file as dicts, and the counters, read line by line."""
    lines = Path(path).read_text().splitlines()
    assert lines[0] == "# gene-model: GENCODE v36"
    header = lines[1].split("\t")
    rows = [dict(zip(header, ln.split("\t"))) for ln in lines[2:]]
    return [r for r in rows if not r["gene_id"].startswith("N_")], {r["gene_id"]: int(r["unstranded"]) for r in
                                                                    rows if r["gene_id"].startswith("N_")}


def _files_by_sample(dl):
    return {r["Sample ID"]: next(dl.rna_dir.glob(f"*/{r['File Name']}"), None) for r in _sheet(dl.rna_sheet)}


def _rna(dl, out, **kw):
    return gdc_rna.run(gdc_rna.GdcRnaConfig(out=out, inputs=(dl.rna_dir,), sample_sheet=dl.rna_sheet, **kw))


def test_star_counts_become_rna_h5ad_with_the_first_tumour_aliquot(dl, tmp_path):
    out = tmp_path / "c"
    rep = _rna(dl, out)
    a = ad.read_h5ad(out / "rna.h5ad")
    assert list(a.obs_names) == RNA_CASES
    by_sample = _files_by_sample(dl)
    # by hand: A0T2 has 01A, 01B (and normal 11A) → 01A; 44-2655 has 01A and metastatic 06A → 01A
    for case in RNA_CASES:
        genes, counters = _star(by_sample[f"{case}-01A"])
        row = a[case]
        np.testing.assert_allclose(row.X[0], [float(g["tpm_unstranded"]) for g in genes], rtol=1e-6)
        np.testing.assert_array_equal(row.layers["counts"][0], [int(g["unstranded"]) for g in genes])
        assert row.obs["samples"].iloc[0] == f"{case}-01A"
        assert row.obs["N_unmapped"].iloc[0] == counters["N_unmapped"]  # counters kept apart from genes
    assert list(a.var["gene_id"]) == [g["gene_id"] for g in genes]
    names = [g["gene_name"] for g in genes]
    assert len(names) == len(set(names)) + 2  # CD99 on two ids (PAR_Y) and TP53 on a second id
    assert list(a.var_names[-3:]) == ["CD99", "CD99|ENSG00000002586.20_PAR_Y", "TP53|ENSG00000284770.2"]
    assert a.var_names[0] == "TP53" and a.var.loc["TP53", "gene_id"] == genes[0]["gene_id"]
    assert a.uns["gene_model"] == "GENCODE v36" and a.uns["measure"] == "tpm_unstranded"
    # report: the normal, the never-downloaded file, the .partial and the two duplicated cases are all listed
    saved = json.loads((out / "imports" / "gdc-rna.json").read_text())
    un = saved["unmatched"]
    assert any("Solid Tissue Normal" in x for k, v in un.items() if "sample types" in k for x in v)
    missing = {r["File Name"] for r in _sheet(dl.rna_sheet) if by_sample[r["Sample ID"]] is None}
    assert set(un["sample-sheet files not found on disk"]) == missing and len(missing) == 1
    assert len(un["unfinished downloads (*.partial)"]) == 1
    dups = saved["duplicates"]["cases with several RNA files (rule 'first')"]
    assert dups == ["TCGA-44-2655: used TCGA-44-2655-01A; not used TCGA-44-2655-06A",
                    "TCGA-A2-A0T2: used TCGA-A2-A0T2-01A; not used TCGA-A2-A0T2-01B"]
    assert saved["per_case"]["TCGA-A2-A0T2"]["samples"] == ["TCGA-A2-A0T2-01A"] and rep.matched == RNA_CASES
    cases = pd.read_csv(out / "cases.csv", dtype=str).set_index("case_id")
    assert cases["site"].to_dict() == {c: c[5:7] for c in RNA_CASES}  # site = tissue source site
    assert cases.loc["TCGA-A2-A0T2", "project"] == "TCGA-BRCA" and cases.loc["TCGA-05-4244", "project"] == "TCGA-LUAD"
    v = validate(out)
    assert v.ok, v.format()
    assert Cohort.open(out).presence()["rna"].all()


def test_mean_rule_averages_only_the_best_sample_type(dl, tmp_path):
    _rna(dl, tmp_path / "c", aliquot_rule="mean", measure="fpkm_uq_unstranded")
    a = ad.read_h5ad(tmp_path / "c" / "rna.h5ad")
    by_sample = _files_by_sample(dl)
    g1, g2 = (_star(by_sample[f"TCGA-A2-A0T2-{s}"])[0] for s in ("01A", "01B"))
    want = [(float(x["fpkm_uq_unstranded"]) + float(y["fpkm_uq_unstranded"])) / 2 for x, y in zip(g1, g2)]
    np.testing.assert_allclose(a["TCGA-A2-A0T2"].X[0], want, rtol=1e-6)
    np.testing.assert_allclose(a["TCGA-A2-A0T2"].layers["counts"][0],
                               [(int(x["unstranded"]) + int(y["unstranded"])) / 2 for x, y in zip(g1, g2)])
    g = _star(by_sample["TCGA-44-2655-01A"])[0]  # the metastasis (06) is another sample type: not averaged in
    np.testing.assert_allclose(a["TCGA-44-2655"].X[0], [float(x["fpkm_uq_unstranded"]) for x in g], rtol=1e-6)
    assert a.obs.loc["TCGA-A2-A0T2", "samples"] == "TCGA-A2-A0T2-01A, TCGA-A2-A0T2-01B"


def test_error_rule_gene_types_and_gene_id_names(dl, tmp_path):
    with pytest.raises(ImportDataError, match=r"case TCGA-44-2655: 2 RNA files \(.*\) and aliquot rule 'error'"):
        _rna(dl, tmp_path / "e", aliquot_rule="error")
    _rna(dl, tmp_path / "c", gene_types=("protein_coding",), var_names="gene_id")
    a = ad.read_h5ad(tmp_path / "c" / "rna.h5ad")
    genes, _ = _star(_files_by_sample(dl)["TCGA-05-4244-01A"])
    assert list(a.var_names) == [g["gene_id"] for g in genes if g["gene_type"] == "protein_coding"]


def test_rerun_gives_the_same_cohort(dl, tmp_path):
    out = tmp_path / "c"
    _rna(dl, out)
    first = (out / "cases.csv").read_bytes(), ad.read_h5ad(out / "rna.h5ad")
    _rna(dl, out)
    assert (out / "cases.csv").read_bytes() == first[0]
    np.testing.assert_array_equal(ad.read_h5ad(out / "rna.h5ad").X, first[1].X)
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temp files left


def test_xena_wide_matrix(dl, tmp_path):
    gdc_rna.run(gdc_rna.GdcRnaConfig(out=tmp_path / "c", inputs=(dl.xena,), format="wide"))
    a = ad.read_h5ad(tmp_path / "c" / "rna.h5ad")
    with open(dl.xena, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    cols = rows[0][1:]
    assert list(a.obs_names) == RNA_CASES
    assert list(a.var_names) == [r[0] for r in rows[1:]]
    for case in RNA_CASES:  # primary tumour column (-01), never the normal (-11) or metastasis (-06)
        j = cols.index(f"{case}-01")
        v = np.array([float(r[1 + j]) for r in rows[1:]])
        np.testing.assert_allclose(a[case].X[0], v, rtol=1e-6)
        np.testing.assert_allclose(a[case].layers["counts"][0], 2.0 ** v - 1, rtol=1e-5, atol=1e-3)
    assert validate(tmp_path / "c").ok


def _one_file_download(dl, tmp_path, case="TCGA-05-4244"):
    """A copy of one case's STAR file in a gdc-client folder, with its own one-row sample sheet."""
    row = next(r for r in _sheet(dl.rna_sheet) if r["Sample ID"] == f"{case}-01A")
    src = next(dl.rna_dir.glob(f"*/{row['File Name']}"))
    d = tmp_path / "dl"
    (d / row["File ID"]).mkdir(parents=True)
    dst = d / row["File ID"] / row["File Name"]
    shutil.copy(src, dst)
    sheet = tmp_path / "sheet.tsv"
    with open(sheet, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(row), delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerow(row)
    return d, dst, sheet, row


def _run1(d, sheet, tmp_path):
    return gdc_rna.run(gdc_rna.GdcRnaConfig(out=tmp_path / "out", inputs=(d,), sample_sheet=sheet))


def test_malformed_rna_inputs_get_one_clear_error(dl, tmp_path):
    d, dst, sheet, row = _one_file_download(dl, tmp_path)
    _run1(d, sheet, tmp_path)  # the untouched copy imports
    text = dst.read_text()

    stray = d / "extra" / "0a1b.rna_seq.augmented_star_gene_counts.tsv"
    stray.parent.mkdir()
    stray.write_text(text)
    with pytest.raises(ImportDataError, match=rf"{stray}: not listed in the sample sheet {sheet}"):
        _run1(d, sheet, tmp_path)
    stray.unlink()

    dst.write_text(text.replace("\ttpm_unstranded", "\ttpm"))
    with pytest.raises(ImportDataError, match=rf"{dst} line 2: column\(s\) \['tpm_unstranded'\] missing"):
        _run1(d, sheet, tmp_path)
    lines = text.splitlines()
    cells = lines[9].split("\t")
    lines[9] = "\t".join(cells[:3] + ["12.5"] + cells[4:])
    dst.write_text("\n".join(lines) + "\n")
    with pytest.raises(ImportDataError, match=rf"{dst} line 10: unstranded '12.5' is not a non-negative integer"):
        _run1(d, sheet, tmp_path)
    dst.write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("N_ambiguous")) + "\n")
    with pytest.raises(ImportDataError, match="STAR counter rows .* expected once each"):
        _run1(d, sheet, tmp_path)
    dst.write_text(text)

    bad = sheet.read_text().replace(row["Sample ID"], "C3L-00001-01")
    sheet.write_text(bad)
    with pytest.raises(BarcodeError, match=rf"{sheet} line 2, Sample ID: 'C3L-00001-01' is not a TCGA barcode"):
        _run1(d, sheet, tmp_path)
    sheet.write_text(bad.replace("C3L-00001-01", "TCGA-05-4395-01A"))
    with pytest.raises(ImportDataError, match=r"line 2: Sample ID TCGA-05-4395-01A does not belong to Case ID"):
        _run1(d, sheet, tmp_path)
    sheet.write_text(bad.replace("C3L-00001-01", row["Sample ID"]).replace("Case ID", "Case"))
    with pytest.raises(ImportDataError, match=r"sample sheet column\(s\) \['Case ID'\] missing"):
        _run1(d, sheet, tmp_path)
    good = bad.replace("C3L-00001-01", row["Sample ID"])
    sheet.write_text(good.replace(row["File ID"], "0" * 8 + row["File ID"][8:]))
    with pytest.raises(ImportDataError, match=rf"its gdc-client folder is {row['File ID']} but {sheet} line 2 gives"):
        _run1(d, sheet, tmp_path)
    with pytest.raises(ImportDataError, match="format star needs sample_sheet"):
        gdc_rna.run(gdc_rna.GdcRnaConfig(out=tmp_path / "out", inputs=(d,)))


def test_mixed_gene_lists_are_refused(dl, tmp_path):
    rows = [r for r in _sheet(dl.rna_sheet) if r["Sample ID"] in ("TCGA-05-4244-01A", "TCGA-05-4395-01A")]
    d = tmp_path / "dl"
    for r in rows:
        (d / r["File ID"]).mkdir(parents=True)
        shutil.copy(next(dl.rna_dir.glob(f"*/{r['File Name']}")), d / r["File ID"] / r["File Name"])
    second = d / rows[1]["File ID"] / rows[1]["File Name"]
    lines = second.read_text().splitlines()
    second.write_text("\n".join(lines[:-1]) + "\n")  # one gene short
    sheet = tmp_path / "sheet.tsv"
    with open(sheet, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]), delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ImportDataError, match=rf"{second}: gene list differs from .*every file of one import"):
        _run1(d, sheet, tmp_path)


def test_centred_wide_matrix_is_refused(tmp_path):
    m = tmp_path / "HiSeqV2_PANCAN"
    m.write_text("sample\tTCGA-A2-A0T2-01\tTCGA-A2-A0CM-01\nESR1\t0.52\t-1.25\nPGR\t0.1\t0.2\n")
    with pytest.raises(ImportDataError, match=r"line 2, column TCGA-A2-A0CM-01: value -1.25 < 0 cannot be log2"):
        gdc_rna.run(gdc_rna.GdcRnaConfig(out=tmp_path / "c", inputs=(m,), format="wide"))
    m.write_text("sample\tTCGA-A2-A0T2-01\tA2-A0CM\nESR1\t0.52\t1.25\n")
    with pytest.raises(BarcodeError, match=rf"{m} line 1, column: 'A2-A0CM' is not a TCGA barcode"):
        gdc_rna.run(gdc_rna.GdcRnaConfig(out=tmp_path / "c", inputs=(m,), format="wide"))


# ------------------------------------------------------------------------------------------------- protein
def _rppa(path):
    with open(path, newline="") as fh:
        return {r["peptide_target"]: r["protein_expression"] for r in csv.DictReader(fh, delimiter="\t")}


def test_rppa_import_drops_unmeasured_antibodies_and_keeps_log2_in_x(dl, tmp_path):
    out = tmp_path / "c"
    cfg = gdc_protein.GdcProteinConfig(out=out, inputs=(dl.protein_dir,), sample_sheet=dl.protein_sheet)
    rep = gdc_protein.run(cfg)
    a = ad.read_h5ad(out / "protein.h5ad")
    files = {p.name.split("-01A-")[0]: _rppa(p) for p in dl.protein_dir.glob("*/*_RPPA_data.tsv")}
    assert list(a.obs_names) == sorted(files)
    na = {ab for f in files.values() for ab, v in f.items() if v == "NA"}
    assert na == {"GATA3"} and list(a.var_names) == [ab for ab in ANTIBODIES if ab not in na]
    for case, f in files.items():
        v = np.array([float(f[ab]) for ab in a.var_names])
        np.testing.assert_allclose(a[case].X[0], v, rtol=1e-6)
        np.testing.assert_allclose(a[case].layers["counts"][0], 2.0 ** v, rtol=1e-6)
    assert (a.X < 0).any() and (a.layers["counts"] > 0).all()
    assert rep.unmatched["antibodies not measured for every case (dropped: missing = drop_protein)"] == ["GATA3"]
    assert "cases of cases.csv without protein" not in rep.unmatched and validate(out).ok  # a fresh cohort
    # the other rule drops the case instead; without a sheet the file-name barcodes give the same join
    gdc_protein.run(gdc_protein.GdcProteinConfig(out=tmp_path / "d", inputs=(dl.protein_dir,), missing="drop_case"))
    b = ad.read_h5ad(tmp_path / "d" / "protein.h5ad")
    assert "TCGA-44-2655" not in b.obs_names and list(b.var_names) == list(ANTIBODIES)
    np.testing.assert_allclose(b[a.obs_names.drop("TCGA-44-2655")][:, a.var_names].X,
                               a[a.obs_names.drop("TCGA-44-2655")].X)


def test_tcpa_matrix_matches_the_gdc_files(dl, tmp_path):
    gdc_protein.run(gdc_protein.GdcProteinConfig(out=tmp_path / "g", inputs=(dl.protein_dir,)))
    gdc_protein.run(gdc_protein.GdcProteinConfig(out=tmp_path / "t", inputs=(dl.tcpa,), format="tcpa"))
    g, t = (ad.read_h5ad(tmp_path / x / "protein.h5ad") for x in ("g", "t"))
    assert list(t.obs_names) == list(g.obs_names) and list(t.var_names) == list(g.var_names)
    np.testing.assert_allclose(t.X, g.X)
    assert pd.read_csv(tmp_path / "t" / "cases.csv").set_index("case_id")["project"]["TCGA-44-2655"] == "TCGA-LUAD"


def test_malformed_protein_inputs(dl, tmp_path):
    src = next(dl.protein_dir.glob("*/TCGA-05-4244*_RPPA_data.tsv"))
    d = tmp_path / "p"
    d.mkdir()
    bad = d / src.name
    bad.write_text(src.read_text().replace("protein_expression", "value"))
    cfg = gdc_protein.GdcProteinConfig(out=tmp_path / "c", inputs=(d,))
    with pytest.raises(ImportDataError, match=rf"{bad} line 1: column\(s\) \['protein_expression'\] missing"):
        gdc_protein.run(cfg)
    lines = src.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\thigh"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ImportDataError, match=rf"{bad} line 4, protein_expression: 'high' is not a number"):
        gdc_protein.run(cfg)
    bad.unlink()
    (d / "S42_RPPA_data.tsv").write_text(src.read_text())
    with pytest.raises(BarcodeError, match=r"S42_RPPA_data.tsv \(file name\): 'S42' is not a TCGA barcode"):
        gdc_protein.run(cfg)
