"""The tile-bag loader: fixed-shape batches of sampled bag rows, seeded, resumable, sharded over processes.

The fixture cohort is written by hand so every expectation is computed independently: each tile's
level-0 coords encode (slide number, row), so a batch's grid coords say exactly which bag row a
feature vector must equal (read back with h5py).
"""

import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

from mmfm.data import sampling
from mmfm.data.bags import read_bag, write_bag
from mmfm.data.batch import BatchShapes, random_batch
from mmfm.data.cohort import Cohort
from mmfm.data.loader import LoaderConfig, TileBagLoader

D, PS, K = 8, 512, 16
# case -> tiles per slide ([] = no slide); c03 has no modality at all and is skipped.
SLIDES = {"c00": [40, 30], "c01": [5], "c02": [], "c03": [], "c04": [20], "c05": [60], "c06": [16],
          "c07": [33], "c08": [25, 8], "c09": [17], "c10": [50], "c11": [21]}
RNA_CASES = ["c00", "c01", "c02", "c04", "c05", "c06", "c07", "c09", "c10"]
PROTEIN_CASES = ["c00", "c04", "c05", "c08", "c11"]
REPORTS = {"c00": "high grade serous carcinoma", "c02": "no residual tumour", "c05": "grade 2 lesion"}
MUT = {"c00": (1, 0), "c01": (0, None), "c02": (None, None), "c03": (None, None)}  # others (0, 1)
FRAGMENTED = {"c00", "c05"}


def _slide_no(case: str, j: int) -> int:
    return int(case[1:]) * 10 + j


def _write_cohort(root):
    rng = np.random.default_rng(0)
    (root / "bags").mkdir(parents=True)
    (root / "cohort.yaml").write_text(
        "name: loader-test\nversion: '1'\ndescription: hand-built loader fixture\n"
        f"tile_encoder: {{name: test-enc, feature_dim: {D}}}\ntarget_magnification: 20.0\npatch_size: 256\n")
    cases, slides = [], []
    for case, sizes in SLIDES.items():
        m = MUT.get(case, (0, 1))
        cases.append({"case_id": case, "site": f"s{int(case[1:]) % 3}", "os_days": 100.0 + int(case[1:]),
                      "os_event": int(case[1:]) % 2, "subtype": "a", "grade": 2,
                      "mut_TP53": m[0], "mut_KRAS": m[1]})
        for j, n in enumerate(sizes):
            sid = f"{case}_s{j}"
            rows = np.arange(n)
            coords = np.stack([rows * PS, np.full(n, _slide_no(case, j) * PS)], 1)
            feats = rng.standard_normal((n, D)).astype(np.float16)
            frag = (rows % 3).astype(np.int32) if case in FRAGMENTED else None
            write_bag(root / "bags" / f"{sid}.h5", feats, coords, patch_size_level0=PS, encoder="test-enc",
                      fragment=frag, coord_attrs={"patch_size": 256, "target_magnification": 20.0})
            slides.append({"slide_id": sid, "case_id": case, "path": f"bags/{sid}.h5"})
    pd.DataFrame(cases).astype({"mut_TP53": "Int64", "mut_KRAS": "Int64"}).to_csv(root / "cases.csv", index=False)
    pd.DataFrame(slides).to_csv(root / "slides.csv", index=False)
    genes = [f"G{i}" for i in range(30)]
    rna = ad.AnnData(rng.poisson(5.0, (len(RNA_CASES), 30)).astype(np.float32),
                     obs=pd.DataFrame(index=RNA_CASES), var=pd.DataFrame(index=genes))
    rna.write_h5ad(root / "rna.h5ad")
    prot = ad.AnnData(rng.lognormal(2.0, 0.5, (len(PROTEIN_CASES), 6)).astype(np.float32),
                      obs=pd.DataFrame(index=PROTEIN_CASES), var=pd.DataFrame(index=[f"P{i}" for i in range(6)]))
    prot.write_h5ad(root / "protein.h5ad")
    (root / "reports.jsonl").write_text("".join(json.dumps({"case_id": c, "text": t}) + "\n"
                                                for c, t in REPORTS.items()))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    _write_cohort(root)
    return Cohort.open(root)


@pytest.fixture(scope="module")
def bags(cohort):
    """slide number -> whole bag read with h5py (the independent reference)."""
    return {_slide_no(c, j): read_bag(cohort.root / "bags" / f"{c}_s{j}.h5")
            for c, sizes in SLIDES.items() for j in range(len(sizes))}


ALL = list(SLIDES)


def _loader(cohort, **kw):
    args = {k: kw.pop(k) for k in ("modalities", "transforms", "process_index", "process_count") if k in kw}
    cfg = LoaderConfig(**{"batch_size": 4, "tiles_per_slide": K, "n_genes": 10, "report_max_len": 12,
                          "prefetch": 0, **kw})
    return TileBagLoader(cohort, cfg, ALL, **args)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -------------------------------------------------------------------------------------------- contract
def test_batches_follow_the_contract(cohort):
    loader = _loader(cohort)
    assert loader.skipped_cases == ["c03"] and loader.steps_per_epoch == 11 // 4
    assert loader.shapes == BatchShapes(batch_size=4, tiles_per_slide=K, feature_dim=D, n_genes=10,
                                        n_proteins=6, report_len=12, n_mutations=2, n_sites=3)
    assert loader.site_names == ["s0", "s1", "s2"]
    assert loader.mutation_names == ["TP53", "KRAS"] and len(loader.gene_names) == 10
    assert sorted(loader.protein_names) == [f"P{i}" for i in range(6)]
    ref = random_batch(loader.shapes)
    for batch in _take(loader, 3):
        assert batch.keys() == ref.keys()
        np.testing.assert_array_equal(batch["site_index"], [int(cohort.cases.index[c][1:]) % 3
                                                            for c in batch["case_index"]])
        for k, v in batch.items():
            assert v.shape == ref[k].shape, k
            want = np.float16 if k == "slide/features" else ref[k].dtype
            assert v.dtype == want, k


def test_presence_masks_follow_the_cohort(cohort):
    from mmfm.data.text import tokenize

    loader = _loader(cohort)
    n = 0
    for batch in _take(loader, 2 * loader.steps_per_epoch):
        for r, ci in enumerate(batch["case_index"]):
            case = cohort.cases.index[ci]
            assert batch["slide/present"][r] == bool(SLIDES[case])
            assert batch["rna/present"][r] == (case in RNA_CASES)
            assert batch["protein/present"][r] == (case in PROTEIN_CASES)
            assert batch["report/present"][r] == (case in REPORTS)
            assert batch["report/attention_mask"][r].any() == (case in REPORTS)
            if case in REPORTS:
                ids, mask = tokenize([REPORTS[case]], 12)
                np.testing.assert_array_equal(batch["report/input_ids"][r], ids[0])
                np.testing.assert_array_equal(batch["report/attention_mask"][r], mask[0])
            m = MUT.get(case, (0, 1))
            np.testing.assert_array_equal(batch["mutation/mask"][r], [v is not None for v in m])
            np.testing.assert_array_equal(batch["mutation/values"][r], [v or 0 for v in m])
            if not SLIDES[case]:
                assert not batch["slide/tile_mask"][r].any()
            if case not in RNA_CASES:
                assert not batch["rna/gene_mask"][r].any() and not batch["rna/values"][r].any()
            n += 1
    assert n == 2 * loader.steps_per_epoch * 4


def test_modalities_config_restricts_the_batch(cohort):
    loader = _loader(cohort, modalities=("slide", "mutation"))
    batch = next(loader)
    assert set(batch) == {"case_index", "site_index", "mutation/values", "mutation/mask", "mutation/present",
                          "slide/features", "slide/coords", "slide/tile_mask", "slide/fragment", "slide/slide_index",
                          "slide/present"}
    assert loader.shapes.n_genes == 0 and loader.transforms == {}
    rna_only = _loader(cohort, modalities=("rna",))  # only cases with RNA remain
    assert sorted(rna_only.case_ids) == sorted(RNA_CASES)
    assert next(rna_only)["rna/present"].all()


def test_rna_transform_fitted_on_loader_cases_and_reusable(cohort):
    from mmfm.data.omics import OmicsTransform

    loader = _loader(cohort)
    ref = OmicsTransform.fit(cohort.rna, [c for c in ALL if c in RNA_CASES], n_top_genes=10)
    assert list(loader.transforms["rna"].genes) == list(ref.genes)
    values, mask = ref.transform(cohort.rna)
    batch = next(loader)
    for r, ci in enumerate(batch["case_index"]):
        case = cohort.cases.index[ci]
        if case in RNA_CASES:
            i = list(cohort.rna.obs_names).index(case)
            np.testing.assert_allclose(batch["rna/values"][r], values[i], rtol=1e-6)
            np.testing.assert_array_equal(batch["rna/gene_mask"][r], mask[i])
    # A loader over other cases given the run's transforms applies them unchanged.
    other = TileBagLoader(cohort, LoaderConfig(batch_size=2, tiles_per_slide=K, prefetch=0), ["c05", "c09"],
                          modalities=("rna",), transforms=loader.transforms)
    assert other.transforms["rna"] is loader.transforms["rna"]


# ----------------------------------------------------------------------------------------------- tiles
def _tiles(batch, r):
    """(slide numbers, bag rows) of every tile slot of row r, decoded from the grid coords."""
    return batch["slide/coords"][r, :, 1], batch["slide/coords"][r, :, 0]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_tiles_are_sampled_bag_rows(cohort, bags, dtype):
    loader = _loader(cohort, feature_dtype=dtype)
    for batch in _take(loader, 2 * loader.steps_per_epoch):
        assert batch["slide/features"].dtype == dtype
        for r, ci in enumerate(batch["case_index"]):
            case = cohort.cases.index[ci]
            if not SLIDES[case]:
                continue
            slide, row = _tiles(batch, r)
            assert len(set(slide)) == 1  # 'sample' mode: one slide per case
            bag = bags[slide[0]]
            np.testing.assert_array_equal(batch["slide/features"][r], bag["features"][row])
            np.testing.assert_array_equal(batch["slide/fragment"][r], bag.get("fragment", np.zeros(99, int))[row])
            n, mask = len(bag["features"]), batch["slide/tile_mask"][r]
            real = row[mask]
            assert len(set(real)) == len(real) == min(n, K)  # no duplicate real tiles
            if n < K:  # all N tiles, then duplicates that are masked out
                assert sorted(real) == list(range(n)) and mask.sum() == n and not mask[n:].any()


def test_only_sampled_rows_are_read(cohort, monkeypatch):
    reads = []
    original = sampling.BagReader.read

    def spy(self, path, rows):
        reads.append((path, np.array(rows)))
        return original(self, path, rows)

    monkeypatch.setattr(sampling.BagReader, "read", spy)
    batch = next(_loader(cohort, modalities=("slide",), multi_slide="pool"))
    total = {c: sum(s) for c, s in SLIDES.items()}
    for r, ci in enumerate(batch["case_index"]):
        case = cohort.cases.index[ci]
        requested = [(p, rows) for p, rows in reads if f"/{case}_s" in p]
        slide, row = _tiles(batch, r)
        n_read = sum(len(np.unique(rows)) for _, rows in requested)
        assert n_read == min(total[case], K)  # never a whole bag
        for p, rows in requested:
            j = int(p.rsplit("_s", 1)[1].split(".")[0])
            assert set(rows) == set(row[slide == _slide_no(case, j)])


def _write_layout(path, feats, coords, layout):
    """The same bag in several HDF5 layouts. 'trident': one-row chunks, resizable, appended batch by
    batch with features and coords interleaved (how TRIDENT's save_h5 grows its files)."""
    with h5py.File(path, "w") as f:
        if layout == "trident":
            for s in range(0, len(feats), 128):
                for name, arr in (("features", feats[s:s + 128]), ("coords", coords[s:s + 128])):
                    if name not in f:
                        f.create_dataset(name, data=arr, chunks=(1,) + arr.shape[1:], maxshape=(None,) + arr.shape[1:])
                    else:
                        f[name].resize(f[name].shape[0] + len(arr), axis=0)
                        f[name][-len(arr):] = arr
            return
        kw = {"contiguous": {}, "chunks_256": {"chunks": (256, D)},
              "gzip": {"compression": "gzip", "chunks": (64, D)}}[layout]
        f.create_dataset("features", data=feats, **kw)
        f.create_dataset("coords", data=coords)


@pytest.mark.parametrize("layout", ["contiguous", "chunks_256", "trident", "gzip"])
def test_bag_reader_matches_h5py(tmp_path, layout):
    rng = np.random.default_rng(1)
    n = 1000
    feats, coords = rng.standard_normal((n, D)).astype(np.float32), rng.integers(0, 10**6, (n, 2))
    path = tmp_path / "bag.h5"
    _write_layout(path, feats, coords, layout)
    rows = rng.integers(0, n, 300)  # unsorted, with repeats
    reader = sampling.BagReader()
    got = reader.read(path, rows)
    np.testing.assert_array_equal(got["features"], feats[rows])
    np.testing.assert_array_equal(got["coords"], coords[rows])
    assert (reader._open[str(path)].h5 is None) == (layout != "gzip")  # memory-mapped unless filtered
    reader.close()
    dense = np.sort(rng.choice(n, 600, replace=False))  # dense enough for the WILLNEED advice to be given
    for mode, rows in (("willneed", dense), ("kernel", dense), ("random", rows)):
        got = sampling.BagReader(readahead=mode).read(path, rows)
        np.testing.assert_array_equal(got["features"], feats[rows])
        np.testing.assert_array_equal(got["coords"], coords[rows])


def test_bag_reader_reopens_from_remembered_layout(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    paths = []
    for i in range(2):
        paths.append(write_bag(tmp_path / f"b{i}.h5", rng.standard_normal((300, D)).astype(np.float16),
                               rng.integers(0, 10**5, (300, 2)), patch_size_level0=PS, encoder="e"))
    ref = {p: read_bag(p)["features"] for p in paths}
    reader = sampling.BagReader(max_open=1)  # every switch between bags closes the other one
    for p in paths:
        reader.read(p, [0])
    walked = []
    real_walk = sampling._plain_runs
    monkeypatch.setattr(sampling, "_plain_runs", lambda ds, **k: walked.append(ds.file.filename) or real_walk(ds, **k))
    rows = rng.integers(0, 300, 50)
    for p in paths * 2:
        np.testing.assert_array_equal(reader.read(p, rows)["features"], ref[p][rows])
    assert walked == []  # reopening maps the file; no HDF5 metadata walk
    feats = rng.standard_normal((400, D)).astype(np.float16)  # a rewritten bag is re-examined
    write_bag(paths[0], feats, rng.integers(0, 10**5, (400, 2)), patch_size_level0=PS, encoder="e")
    np.testing.assert_array_equal(reader.read(paths[0], [399])["features"], feats[[399]])
    assert set(walked) == {str(paths[0])}
    with pytest.raises(OSError, match="b0.h5.*outside"):
        reader.read(paths[0], [400])


def test_sample_tiles_without_replacement_unless_short():
    rng = np.random.default_rng(0)
    rows, mask = sampling.sample_tiles(100, 64, rng)
    assert len(set(rows)) == 64 and mask.all() and rows.max() < 100
    rows, mask = sampling.sample_tiles(5, 64, rng)
    assert sorted(rows[:5]) == list(range(5)) and mask.sum() == 5 and rows.max() < 5
    counts = np.bincount(np.concatenate([sampling.sample_tiles(10, 3, rng)[0] for _ in range(3000)]), minlength=10)
    assert counts.min() > 0.8 * 900 and counts.max() < 1.2 * 900  # uniform over rows


def test_multi_slide_sample_and_pool(cohort):
    c00 = {_slide_no("c00", 0), _slide_no("c00", 1)}
    seen = set()
    sample = _loader(cohort, batch_size=10, modalities=("slide",))
    for batch in _take(sample, 8):
        r = list(batch["case_index"]).index(cohort.case_index["c00"])
        slide, _ = _tiles(batch, r)
        assert len(set(slide)) == 1 and not batch["slide/slide_index"][r].any()
        seen |= set(slide)
    assert seen == c00  # the sampled slide changes between epochs

    pool = next(_loader(cohort, batch_size=10, modalities=("slide",), multi_slide="pool", tiles_per_slide=64))
    r = list(pool["case_index"]).index(cohort.case_index["c00"])
    slide, row = _tiles(pool, r)
    assert set(slide) == c00 and len(set(zip(slide, row))) == 64
    frag = pool["slide/fragment"][r]
    assert not set(frag[slide == _slide_no("c00", 0)]) & set(frag[slide == _slide_no("c00", 1)])
    index = pool["slide/slide_index"][r]  # which of the case's slides each tile is from (the case encoder's input)
    np.testing.assert_array_equal(index, np.where(slide == _slide_no("c00", 0), 0, 1))
    r = list(pool["case_index"]).index(cohort.case_index["c08"])  # 25 + 8 tiles < 64: all, then masked
    slide, row = _tiles(pool, r)
    mask = pool["slide/tile_mask"][r]
    assert mask.sum() == 33 and len(set(zip(slide[mask], row[mask]))) == 33


# ------------------------------------------------------------------------------- order, seeds, resume
def test_epochs_shuffle_cases_without_repeats(cohort):
    loader = _loader(cohort)
    spe = loader.steps_per_epoch
    epochs = [np.concatenate([b["case_index"] for b in _take(loader, spe)]) for _ in range(3)]
    for e in epochs:
        assert len(set(e)) == len(e) == spe * 4
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])
    unshuffled = _loader(cohort, shuffle=False)
    want = [cohort.case_index[c] for c in unshuffled.case_ids][:4]
    np.testing.assert_array_equal(next(unshuffled)["case_index"], want)


def test_same_seed_same_batches(cohort):
    a, b, c = _loader(cohort), _loader(cohort), _loader(cohort, seed=1)
    for x, y, z in zip(_take(a, 3), _take(b, 3), _take(c, 3)):
        _same(x, y)
    assert not np.array_equal(x["slide/features"], z["slide/features"])


@pytest.mark.parametrize("n", [1, 2, 3])  # mid-epoch, at the boundary, across it (2 steps/epoch)
def test_resume_is_exact(cohort, n):
    a = _loader(cohort)
    _take(a, n)
    state = json.loads(json.dumps(a.get_state()))
    b = _loader(cohort)
    b.set_state(state)
    for x, y in zip(_take(a, 3), _take(b, 3)):
        _same(x, y)
    assert b.get_state()["step"] == n + 3


def test_resume_rejects_another_config_or_case_list(cohort):
    state = _loader(cohort).get_state()
    with pytest.raises(ValueError, match="seed"):
        _loader(cohort, seed=5).set_state(state)
    cfg = LoaderConfig(batch_size=4, tiles_per_slide=K, n_genes=10, report_max_len=12)
    a, b = (TileBagLoader(cohort, cfg, [c for c in ALL if c != drop]) for drop in ("c04", "c05"))
    with pytest.raises(ValueError, match="cases_sha1"):  # as many cases, but not the same ones
        b.set_state(a.get_state())


def test_processes_partition_the_global_batch(cohort):
    whole = _take(_loader(cohort), 3)
    parts = [_take(_loader(cohort, process_index=i, process_count=2), 3) for i in range(2)]
    for step, full in enumerate(whole):
        _same(full, {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in full})
    with pytest.raises(ValueError, match="divisible"):
        _loader(cohort, batch_size=3, process_count=2)


@pytest.mark.parametrize("multi_slide", ["sample", "pool"])
def test_each_process_opens_only_the_bags_of_its_rows(cohort, monkeypatch, multi_slide):
    """Many hosts: process i of 2 opens exactly the bags whose tiles its rows of each global batch hold."""
    opened = []
    real_init = sampling._OpenBag.__init__
    monkeypatch.setattr(sampling._OpenBag, "__init__", lambda self, path, *a: opened.append(path)
                        or real_init(self, path, *a))
    kw = {"modalities": ("slide",), "multi_slide": multi_slide, "tiles_per_slide": 4}  # pool: c08's 8-tile slide often unsampled
    whole = _loader(cohort, **kw)
    parts = [_loader(cohort, process_index=i, process_count=2, **kw) for i in range(2)]
    path_of = {_slide_no(c, j): str(cohort.root / "bags" / f"{c}_s{j}.h5")
               for c, sizes in SLIDES.items() for j in range(len(sizes))}
    for step in range(6 * whole.steps_per_epoch):
        full = whole.batch(step)
        halves = []
        for i, part in enumerate(parts):
            opened.clear()
            part.batch(step)
            part._make.reader.close()  # the next step opens its bags afresh
            rows = slice(2 * i, 2 * i + 2)
            used = {path_of[s] for s in np.unique(full["slide/coords"][rows, :, 1][full["slide/present"][rows]])}
            assert len(opened) == len(set(opened)) and set(opened) == used, (step, i)
            halves.append(used)
        assert halves[0] and halves[1] and not halves[0] & halves[1]


def test_prefetch_and_workers_do_not_change_batches(cohort):
    ref = _take(_loader(cohort), 3)
    with _loader(cohort, prefetch=2) as threaded:
        for x, y in zip(ref, _take(threaded, 3)):
            _same(x, y)
    with _loader(cohort, workers=2, prefetch=1) as workers:
        for x, y in zip(ref, _take(workers, 3)):
            _same(x, y)


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_case_and_bad_bag_are_named(cohort, tmp_path):
    with pytest.raises(ValueError, match="nope"):
        TileBagLoader(cohort, LoaderConfig(batch_size=2, tiles_per_slide=K), ["c00", "nope"])
    with pytest.raises(ValueError, match="multi_slide"):
        LoaderConfig(multi_slide="all")
    with pytest.raises(ValueError, match="readahead must be one of.*'fast'"):
        LoaderConfig(readahead="fast")
    with pytest.raises(ValueError, match="no.*rna data|rna data"):  # nothing to fit the RNA transform on
        TileBagLoader(cohort, LoaderConfig(batch_size=2, tiles_per_slide=K), ["c08", "c11"],
                      modalities=("slide", "rna"))
    with pytest.raises(ValueError, match=r"data\.modalities: unknown \['dna'\]"):
        TileBagLoader(cohort, LoaderConfig(batch_size=2, tiles_per_slide=K), ALL, modalities=("slide", "dna"))
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(OSError, match="bad.h5"):
        sampling.BagReader().read(bad, np.arange(3))
