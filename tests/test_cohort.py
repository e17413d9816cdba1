"""The cohort contract: a valid mini cohort opens; each broken thing is reported with file and row/slide/case."""

import json
import os
import time
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

import mmfm.data.cohort as cohort_mod
from mmfm.data import scan_cache
from mmfm.cli import main as cli_main
from mmfm.data.bags import write_bag
from mmfm.data.cohort import Cohort, CohortError, CohortSpec, validate

D = 8
N_TILES = 20
SPEC = CohortSpec(name="mini", version="1", description="test cohort", encoder_name="enc", feature_dim=D,
                  target_magnification=20.0, patch_size=256)
# C0 has two slides, C3 none (omics only), C4 only clinical data and a mutation flag.
CASES = pd.DataFrame({
    "case_id": ["C0", "C1", "C2", "C3", "C4"],
    "site": ["S0", "S0", "S1", "S1", "S2"],
    "os_days": ["100", "250.5", "", "40", "12"],
    "os_event": ["1", "0", "", "1", "0"],
    "subtype": ["A", "B", "A", "", "B"],
    "grade": ["2", "3", "1", "", "2"],
    "mut_TP53": ["1", "0", "", "", ""],
    "mut_KRAS": ["0", "", "", "1", "0"],
})
SLIDES = pd.DataFrame({"slide_id": ["S0a", "S0b", "S1", "S2"], "case_id": ["C0", "C0", "C1", "C2"],
                       "path": ["bags/S0a.h5", "bags/S0b.h5", "bags/S1.h5", "bags/S2.h5"]})
RNA_CASES = ["C0", "C1", "C3"]
GENES = ["MKI67", "CD8A", "VEGFA", "COL1A1"]


def _features(n=N_TILES, d=D, seed=0, dtype=np.float16):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def _coords(n=N_TILES):
    return np.stack([np.arange(n) % 5, np.arange(n) // 5], 1) * 512


def _raw_bag(path, features, coords, coord_attrs=None, feature_attrs=None):
    """Write a bag with h5py directly (write_bag refuses malformed shapes, which these tests need)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features).attrs.update(feature_attrs or {"encoder": "enc"})
        f.create_dataset("coords", data=coords).attrs.update(coord_attrs or {})


def _write_omics(path, cases, names, seed=0, counts=None):
    rng = np.random.default_rng(seed)
    x = rng.poisson(5.0, (len(cases), len(names))).astype(np.float32) if counts is None else counts
    with warnings.catch_warnings():  # some tests write duplicate names on purpose
        warnings.filterwarnings("ignore", message=".*names are not unique")
        ad.AnnData(X=x, obs=pd.DataFrame(index=pd.Index(cases, dtype=str)),
                   var=pd.DataFrame(index=pd.Index(names, dtype=str))).write_h5ad(path)


def make_cohort(root, cases=CASES, slides=SLIDES):
    """A valid mini cohort: every modality, a two-slide case, an omics-only case, a clinical-only case."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "cohort.yaml").write_text(yaml.safe_dump(SPEC.to_dict()))
    cases.to_csv(root / "cases.csv", index=False)
    slides.to_csv(root / "slides.csv", index=False)
    for i, (sid, path) in enumerate(zip(slides["slide_id"], slides["path"])):
        write_bag(root / path, _features(seed=i), _coords(), patch_size_level0=512, encoder="enc",
                  fragment=np.zeros(N_TILES, np.int32) if i == 0 else None,
                  coord_attrs={"patch_size": 256, "target_magnification": 20})
    _write_omics(root / "rna.h5ad", RNA_CASES, GENES)
    _write_omics(root / "protein.h5ad", ["C1", "C2"], ["p53", "HER2"], seed=1)
    with open(root / "reports.jsonl", "w") as f:
        for cid in ["C0", "C2", "C3"]:
            f.write(json.dumps({"case_id": cid, "text": f"report of {cid}"}) + "\n")
    return root


@pytest.fixture
def mini(tmp_path):
    return make_cohort(tmp_path / "mini")


def test_valid_cohort_opens_with_contract_api(mini):
    c = Cohort.open(mini)
    assert c.validation.ok and not c.validation.warnings and not c.validation.excluded, c.validation.format()
    assert c.spec == SPEC
    assert list(c.cases.index) == ["C0", "C1", "C2", "C3", "C4"]
    assert c.cases.loc["C1", "os_days"] == 250.5 and np.isnan(c.cases.loc["C2", "os_event"])
    assert c.cases["site"].tolist() == ["S0", "S0", "S1", "S1", "S2"]
    assert c.mutation_columns == ["mut_TP53", "mut_KRAS"]
    assert c.case_index == {"C0": 0, "C1": 1, "C2": 2, "C3": 3, "C4": 4}
    assert list(c.slides.index) == ["S0a", "S0b", "S1", "S2"]
    assert c.slides["n_tiles"].tolist() == [N_TILES] * 4
    assert c.slides["patch_size_level0"].tolist() == [512] * 4
    assert c.slides["has_fragment"].tolist() == [True, False, False, False]
    assert c.slides.loc["S1", "path"] == str(mini / "bags" / "S1.h5")
    assert list(c.slides_of("C0").index) == ["S0a", "S0b"] and len(c.slides_of("C3")) == 0
    with pytest.raises(KeyError, match="C9"):
        c.slides_of("C9")
    assert list(c.rna.obs_names) == RNA_CASES and list(c.rna.var_names) == GENES
    assert c.reports.to_dict() == {"C0": "report of C0", "C2": "report of C2", "C3": "report of C3"}
    expected = pd.DataFrame({
        "slide": [1, 1, 1, 0, 0], "rna": [1, 1, 0, 1, 0], "protein": [0, 1, 1, 0, 0],
        "report": [1, 0, 1, 1, 0], "mutation": [1, 1, 0, 1, 1]}, index=c.cases.index).astype(bool)
    pd.testing.assert_frame_equal(c.presence(), expected)


def test_trident_written_bag_opens_unchanged(mini):
    """TRIDENT: features chunked (1, D) with maxshape, its coords attrs, no fragment, no mmfm root attrs."""
    path = mini / "bags" / "S1.h5"
    path.unlink()
    n = 37
    with h5py.File(path, "w") as f:
        feats = f.create_dataset("features", shape=(n, D), maxshape=(None, D), chunks=(1, D), dtype=np.float32)
        feats[:] = _features(n, dtype=np.float32)
        feats.attrs.update({"name": "S1", "savetodir": "/job/features_enc", "encoder": "enc"})
        coords = f.create_dataset("coords", data=_coords(n).astype(np.int64), maxshape=(None, 2), chunks=(1, 2))
        coords.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                             "target_magnification": 20, "overlap": 0, "name": "S1", "savetodir": "/job",
                             "level0_width": 2220, "level0_height": 2967})
    c = Cohort.open(mini)
    assert c.validation.ok and not c.validation.warnings, c.validation.format()
    assert c.slides.loc["S1", "n_tiles"] == n and not c.slides.loc["S1", "has_fragment"]


def test_trident_and_mmfm_names_of_one_encoder_are_one_encoder(mini):
    """cohort.yaml says mmfm's `conch-v1.5`, bags say TRIDENT's `conch_v15` or mmfm's name: one encoder; a bag of
    another encoder (even a TRIDENT name of it) is an error naming the slide."""
    (mini / "cohort.yaml").write_text(yaml.safe_dump({**SPEC.to_dict(), "tile_encoder": {
        "name": "conch-v1.5", "feature_dim": D}}))
    for i, sid in enumerate(SLIDES["slide_id"]):
        write_bag(mini / "bags" / f"{sid}.h5", _features(seed=i), _coords(), patch_size_level0=512,
                  encoder=("conch_v15", "conch-v1.5")[i % 2])
    assert validate(mini).ok, validate(mini).format()
    write_bag(mini / "bags" / "S2.h5", _features(), _coords(), patch_size_level0=512, encoder="uni_v1")
    rep = validate(mini)
    assert [e for e in rep.errors if "encoder" in e] == [
        "bags/S2.h5 (slide S2, case C2): features attr encoder='uni_v1' differs from cohort.yaml tile_encoder.name "
        "'conch-v1.5' (a cohort holds features of one tile encoder)"]


def _set_csv(root, name, edit):
    df = pd.read_csv(root / name, dtype=str, keep_default_na=False)
    edit(df)
    df.to_csv(root / name, index=False)


def _cell(name, row, col, value):
    return lambda root: _set_csv(root, name, lambda df: df.__setitem__(col, df[col].where(df.index != row, value)))


def _bag(sid, features=None, coords=None, coord_attrs=None):
    def go(root):
        p = root / "bags" / f"{sid}.h5"
        p.unlink()
        f = _features() if features is None else features
        c = _coords(len(f)) if coords is None else coords
        _raw_bag(p, f, c, {"patch_size_level0": 512} if coord_attrs is None else coord_attrs)
    return go


def _nan_features():
    f = _features(dtype=np.float32)
    f[5, 3] = np.nan
    f[9, 0] = np.inf
    return f


def _omics_edit(name, cases=None, counts=None):
    def go(root):
        a = ad.read_h5ad(root / name)
        _write_omics(root / name, a.obs_names.tolist() if cases is None else cases, a.var_names.tolist(),
                     counts=counts if counts is not None else a.X)
    return go


def _reports(lines):
    return lambda root: (root / "reports.jsonl").write_text("\n".join(lines) + "\n")


ERRORS = {
    "missing cohort.yaml": (lambda r: (r / "cohort.yaml").unlink(), "cohort.yaml: missing"),
    "missing cases.csv": (lambda r: (r / "cases.csv").unlink(), "cases.csv: missing"),
    "missing slides.csv": (lambda r: (r / "slides.csv").unlink(), "slides.csv: missing"),
    "yaml key": (lambda r: (r / "cohort.yaml").write_text(yaml.safe_dump({**SPEC.to_dict(), "patch_size": "big"})),
                 "cohort.yaml: key 'patch_size' missing or invalid"),
    "missing column": (lambda r: _set_csv(r, "cases.csv", lambda df: df.pop("site")),
                       "cases.csv: required column(s) ['site'] missing"),
    "missing bag": (lambda r: (r / "bags" / "S1.h5").unlink(), "slides.csv line 4 (slide S1): bag file bags/S1.h5 missing"),
    "duplicate case": (_cell("cases.csv", 2, "case_id", "C1"), "cases.csv line 4: duplicate case_id 'C1' (first on line 3)"),
    "duplicate slide": (_cell("slides.csv", 1, "slide_id", "S0a"), "slides.csv line 3: duplicate slide_id 'S0a'"),
    "unknown case": (_cell("slides.csv", 3, "case_id", "CX"), "slides.csv line 5 (slide S2): case_id 'CX' not in cases.csv"),
    "omics unknown case": (_omics_edit("rna.h5ad", cases=["C0", "C1", "CX"]),
                           "rna.h5ad: 1 row(s) for case_id(s) not in cases.csv: CX"),
    "omics duplicate obs": (_omics_edit("protein.h5ad", cases=["C1", "C1"]), "protein.h5ad: duplicate obs (case) names C1"),
    "bag dtype": (_bag("S1", features=_features(dtype=np.float64)), "features dtype float64 is not float16/float32"),
    "bag rank": (_bag("S1", features=np.zeros((N_TILES, D, 2), np.float32)), "features must be rank 2 [N, D]"),
    "bag NaN": (_bag("S2", features=_nan_features()),
                "bags/S2.h5 (slide S2, case C2): 2 feature row(s) contain NaN/inf (first at row 5)"),
    "zero tiles": (_bag("S1", features=np.zeros((0, D), np.float16), coords=np.zeros((0, 2), np.int64)),
                   "bags/S1.h5 (slide S1, case C1): zero tiles"),
    "coords length": (_bag("S1", coords=_coords(N_TILES - 1)), "coords shape (19, 2) does not match features (20, 8)"),
    "no patch_size_level0": (_bag("S1", coord_attrs={"patch_size": 256}), "coords attribute 'patch_size_level0' missing"),
    "fragment": (lambda r: write_bag(r / "bags" / "S1.h5", _features(), _coords(), patch_size_level0=512, encoder="enc",
                                     fragment=np.zeros(N_TILES - 2)),
                 "bags/S1.h5 (slide S1, case C1): fragment must be an integer dataset of shape (20,), got (18,) int32"),
    "feature dim": (_bag("S1", features=_features(d=D - 2)), "feature dim 6 differs from cohort.yaml tile_encoder.feature_dim 8"),
    # one cohort, one feature space: another encoder or magnification is an error naming the slide
    "encoder attr": (lambda r: write_bag(r / "bags" / "S1.h5", _features(), _coords(), patch_size_level0=512,
                                         encoder="other"), "bags/S1.h5 (slide S1, case C1): features attr encoder='other'"),
    "target magnification": (lambda r: write_bag(r / "bags" / "S1.h5", _features(), _coords(), patch_size_level0=512,
                                                 encoder="enc", coord_attrs={"target_magnification": 10}),
                             "bags/S1.h5 (slide S1, case C1): coords attr target_magnification=10 differs from "
                             "cohort.yaml 20.0"),
    "negative counts": (_omics_edit("rna.h5ad", counts=np.array([[1, 2, 3, 4], [1, -2, 0, 0], [0, 0, 0, 1]], np.float32)),
                        "rna.h5ad: X has negative values in 1 row(s) (case(s) C1)"),
    "NaN counts": (_omics_edit("protein.h5ad", counts=np.array([[1, np.nan], [3, 4]], np.float32)),
                   "protein.h5ad: X has NaN/inf in 1 row(s) (case(s) C1)"),
    "empty report": (_reports(['{"case_id": "C0", "text": "fine"}', '{"case_id": "C2", "text": "  "}']),
                     "reports.jsonl line 2 (case C2): empty report text"),
    "report unknown case": (_reports(['{"case_id": "CX", "text": "x"}']), "reports.jsonl line 1 (case CX): case_id not in cases.csv"),
    "report not json": (_reports(['{"case_id": "C0", "text": "x"}', "{oops"]), "reports.jsonl line 2: not valid JSON"),
    "os_days text": (_cell("cases.csv", 1, "os_days", "abc"), "cases.csv line 3 (case C1): os_days 'abc' is not a finite number"),
    "os_days negative": (_cell("cases.csv", 0, "os_days", "-3"), "cases.csv line 2 (case C0): os_days '-3' is negative"),
    "os_event": (_cell("cases.csv", 4, "os_event", "2"), "cases.csv line 6 (case C4): os_event '2' is not one of [0, 1]"),
    "grade": (_cell("cases.csv", 0, "grade", "2.5"), "cases.csv line 2 (case C0): grade '2.5' is not an integer"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_each_error_is_reported_with_its_location(mini, name):
    breaker, message = ERRORS[name]
    breaker(mini)
    rep = validate(mini)
    assert not rep.ok
    assert any(message in e for e in rep.errors), rep.format()
    with pytest.raises(CohortError, match="ERROR") as err:
        Cohort.open(mini)
    assert message in str(err.value)


WARNINGS = {
    "no modality": (lambda r: None, None),  # C4 loses its only flag: clinical data alone is no modality
    "small bag": (lambda r: write_bag(r / "bags" / "S1.h5", _features(3), _coords(3), patch_size_level0=512,
                                      encoder="enc"), "bags/S1.h5 (slide S1, case C1): only 3 tiles"),
    "mutation flag": (_cell("cases.csv", 1, "mut_TP53", "yes"), "cases.csv line 3 (case C1): mut_TP53 'yes' is not one of [0, 1]"),
    "fractional counts": (_omics_edit("rna.h5ad", counts=np.full((3, 4), 0.5, np.float32)),
                          "rna.h5ad: X holds non-integer values in 3 row(s)"),
    "random-init features": (lambda r: write_bag(r / "bags" / "S1.h5", _features(), _coords(), patch_size_level0=512,
                                                 encoder="enc", root_attrs={"random_init_weights": True}),
                             "bags/S1.h5 (slide S1, case C1): features come from a RANDOMLY INITIALISED tile encoder"),
}


@pytest.mark.parametrize("name", list(WARNINGS))
def test_suspicious_input_warns_but_opens(mini, name):
    breaker, message = WARNINGS[name]
    if name == "no modality":
        _set_csv(mini, "cases.csv", lambda df: df.__setitem__("mut_KRAS", ["0", "", "", "1", ""]))
        message = "1 case(s) in cases.csv have no usable modality: C4"
    breaker(mini)
    c = Cohort.open(mini)
    assert c.validation.ok
    assert any(message in w for w in c.validation.warnings), c.validation.format()


def test_invalid_mutation_flag_becomes_unknown_and_is_listed(mini):
    _cell("cases.csv", 1, "mut_TP53", "yes")(mini)
    c = Cohort.open(mini)
    assert np.isnan(c.cases.loc["C1", "mut_TP53"])
    assert "cases.csv line 3 (case C1): mut_TP53 set to missing" in c.validation.excluded


def test_all_problems_are_reported_at_once(mini):
    breaks = ["missing bag", "duplicate slide", "bag NaN", "omics unknown case", "NaN counts", "empty report",
              "os_days text", "os_event", "grade"]
    for name in breaks:
        ERRORS[name][0](mini)
    rep = validate(mini)
    for name in breaks:
        assert any(ERRORS[name][1] in e for e in rep.errors), (name, rep.format())
    assert not rep.fatal  # every one of them is repairable by exclusion


def test_non_strict_open_excludes_and_lists_invalid_data(mini):
    for name in ["bag NaN", "omics unknown case", "empty report", "os_days text"]:
        ERRORS[name][0](mini)
    with pytest.raises(CohortError):
        Cohort.open(mini)
    c = Cohort.open(mini, strict=False)
    assert list(c.slides.index) == ["S0a", "S0b", "S1"]
    assert list(c.rna.obs_names) == ["C0", "C1"]
    assert "C2" not in c.reports.index
    assert np.isnan(c.cases.loc["C1", "os_days"])
    assert not c.presence().loc["C2", "slide"]
    assert len(c.validation.excluded) == 4, c.validation.format()
    assert any("slide S2" in e for e in c.validation.excluded)


def test_every_bad_yaml_key_is_named(mini):
    spec = SPEC.to_dict()
    spec["tile_encoder"] = {"name": "enc", "feature_dim": 0, "dim": 8}
    del spec["patch_size"]
    (mini / "cohort.yaml").write_text(yaml.safe_dump({**spec, "target_magnification": True, "extra": 1}))
    rep = validate(mini)
    assert rep.errors[:3] == [
        "cohort.yaml: key 'tile_encoder.feature_dim' missing or invalid (expected a positive integer, got 0)",
        "cohort.yaml: key 'target_magnification' missing or invalid (expected a positive number, got True)",
        "cohort.yaml: key 'patch_size' missing or invalid (expected a positive integer (px at target_magnification), "
        "got None)"]
    assert rep.warnings[:2] == ["cohort.yaml: unknown key 'extra' ignored",
                                "cohort.yaml: unknown key 'tile_encoder.dim' ignored"]


def test_bag_that_is_not_a_bag(mini):
    (mini / "bags" / "S1.h5").write_bytes(b"not hdf5")
    with h5py.File(mini / "bags" / "S2.h5", "w") as f:
        f.create_group("features")
        f.create_dataset("coords", data=_coords())
    errors = validate(mini).errors
    assert any(e.startswith("bags/S1.h5 (slide S1, case C1): unreadable bag") for e in errors), errors
    assert any(e.startswith("bags/S2.h5 (slide S2, case C2): unreadable bag") for e in errors), errors


def test_fatal_problem_raises_even_non_strict(mini):
    (mini / "slides.csv").unlink()
    (mini / "cohort.yaml").write_text("name: [unclosed")
    with pytest.raises(CohortError) as err:
        Cohort.open(mini, strict=False)
    msg = str(err.value)
    assert "slides.csv: missing" in msg and "cohort.yaml: not valid YAML" in msg


def test_nonfinite_scan_reads_in_chunks(mini, monkeypatch):
    """The NaN/inf scan must not load a bag at once: force ~3-row blocks and find a NaN in the last one."""
    n = 50
    f = _features(n, dtype=np.float32)
    bad = [7, 48, 49]
    f[bad, 1] = np.nan
    write_bag(mini / "bags" / "S1.h5", f, _coords(n), patch_size_level0=512, encoder="enc")
    reads = []
    real = cohort_mod._scan_nonfinite

    class Spy:
        def __init__(self, ds):
            self.ds, self.shape, self.dtype, self.chunks = ds, ds.shape, ds.dtype, None

        def __getitem__(self, key):
            out = self.ds[key]
            reads.append(len(out))
            return out

    monkeypatch.setattr(cohort_mod, "SCAN_CHUNK_BYTES", 3 * D * 2)  # 3 float16 rows
    monkeypatch.setattr(cohort_mod, "_scan_nonfinite", lambda ds: real(Spy(ds)))
    rep = validate(mini)
    assert any(f"{len(bad)} feature row(s) contain NaN/inf (first at row 7)" in e for e in rep.errors), rep.format()
    assert max(reads) == 3 and sum(reads) == n + 3 * N_TILES  # every row of the 4 bags once
    reads.clear()
    assert validate(mini, scan_features=False).ok and not reads  # headers only


def _scan_spy(monkeypatch) -> list[str]:
    """Names of the bags whose feature rows get scanned (the only reader of feature data during validation)."""
    scanned, real = [], cohort_mod._scan_nonfinite
    monkeypatch.setattr(cohort_mod, "_scan_nonfinite", lambda ds: (scanned.append(ds.file.filename.split("/")[-1]),
                                                                    real(ds))[1])
    return scanned


def _age(path, seconds=3600, mtime_ns=None):
    """Date a file back (as a cohort written long before it is opened), or to an exact mtime."""
    t = time.time_ns() - seconds * 10**9 if mtime_ns is None else mtime_ns
    os.utime(path, ns=(t, t))
    return t


def test_feature_scan_once_per_cohort_until_a_bag_changes(mini, monkeypatch):
    for p in (mini / "bags").glob("*.h5"):
        _age(p)
    scanned = _scan_spy(monkeypatch)
    Cohort.open(mini)
    assert sorted(scanned) == ["S0a.h5", "S0b.h5", "S1.h5", "S2.h5"] and (mini / ".feature_scan.json").is_file()
    scanned.clear()
    c = Cohort.open(mini)
    assert validate(mini).ok and c.validation.ok and scanned == []  # second and third open read no feature rows
    # an in-place edit keeps the size; the new mtime alone triggers the rescan that finds the NaN
    before = (mini / "bags" / "S2.h5").stat().st_size
    with h5py.File(mini / "bags" / "S2.h5", "r+") as f:
        f["features"][5, 3] = np.nan
    _age(mini / "bags" / "S2.h5", seconds=1800)
    assert (mini / "bags" / "S2.h5").stat().st_size == before
    want = "bags/S2.h5 (slide S2, case C2): 1 feature row(s) contain NaN/inf (first at row 5)"
    assert want in validate(mini).errors and scanned == ["S2.h5"]
    scanned.clear()
    assert want in validate(mini).errors and scanned == []  # the bad result is remembered too
    # a rewritten bag with its old mtime but a new size is rescanned
    mtime = (mini / "bags" / "S1.h5").stat().st_mtime_ns
    write_bag(mini / "bags" / "S1.h5", _features(N_TILES + 5), _coords(N_TILES + 5), patch_size_level0=512,
              encoder="enc", coord_attrs={"patch_size": 256, "target_magnification": 20})
    _age(mini / "bags" / "S1.h5", mtime_ns=mtime)
    assert Cohort.open(mini, strict=False).slides.loc["S1", "n_tiles"] == N_TILES + 5 and scanned == ["S1.h5"]
    scanned.clear()
    validate(mini, scan_cache=False)  # on request: every bag again
    assert sorted(scanned) == ["S0a.h5", "S0b.h5", "S1.h5", "S2.h5"]


def test_feature_scan_of_a_just_written_bag_is_not_trusted(mini, monkeypatch):
    """A bag modified within RACY_NS of its scan may keep its mtime on a coarse-clock file system."""
    scanned = _scan_spy(monkeypatch)
    monkeypatch.setattr(scan_cache, "RACY_NS", 10**18)
    validate(mini)
    validate(mini)
    assert len(scanned) == 8
    monkeypatch.setattr(scan_cache, "RACY_NS", 0)
    scanned.clear()
    validate(mini)
    assert scanned == []  # the same entries, trusted once the bag is older than the scan by more than RACY_NS


def test_feature_scan_cache_damaged_or_read_only(mini, monkeypatch):
    for p in (mini / "bags").glob("*.h5"):
        _age(p)
    scanned = _scan_spy(monkeypatch)
    (mini / ".feature_scan.json").write_text("{not json")
    assert validate(mini).ok and len(scanned) == 4
    assert json.loads((mini / ".feature_scan.json").read_text())["bags"]["bags/S1.h5"]["bad"] == 0
    (mini / ".feature_scan.json").unlink()

    def read_only(*_):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(scan_cache, "write_json", read_only)
    scanned.clear()
    assert Cohort.open(mini).validation.ok and Cohort.open(mini).validation.ok
    assert len(scanned) == 8 and not (mini / ".feature_scan.json").exists()  # opens, scanning every time


def test_counts_layer_is_checked_instead_of_x(mini):
    a = ad.read_h5ad(mini / "rna.h5ad")
    a.layers["counts"] = a.X.copy()
    a.layers["counts"][2, 0] = -1
    a.X = np.log1p(np.abs(a.X))
    a.write_h5ad(mini / "rna.h5ad")
    rep = validate(mini)
    assert "rna.h5ad: layers['counts'] has negative values in 1 row(s) (case(s) C3)" in rep.errors


def test_ids_that_look_like_missing_values_survive(tmp_path):
    cases = CASES.assign(case_id=["NA", "007", "C2", "C3", "C4"])
    slides = SLIDES.assign(case_id=["NA", "NA", "007", "C2"])
    c = Cohort.open(make_cohort(tmp_path / "ids", cases=cases, slides=slides), strict=False)
    assert list(c.cases.index[:2]) == ["NA", "007"]
    assert list(c.slides_of("NA").index) == ["S0a", "S0b"]


def test_cli_exit_codes_and_json(mini, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert cli_main(["validate", str(mini), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ok"] is True
    ERRORS["zero tiles"][0](mini)
    assert cli_main(["validate", str(mini)]) == 1
    assert "bags/S1.h5 (slide S1, case C1): zero tiles" in capsys.readouterr().out
    ERRORS["bag NaN"][0](mini)
    assert cli_main(["validate", str(mini), "--headers-only"]) == 1
    out = capsys.readouterr().out
    assert "zero tiles" in out and "NaN" not in out
    assert cli_main(["validate"]) == 2  # bad input: one line on stderr, exit 2
    err = capsys.readouterr().err
    assert err.startswith("mmfm validate: error: ") and "PATH" in err and err.count("\n") == 1
