"""The packed tile store (`mmfm pack`): exact round trip to the h5 bags, the loader's window-sampling contract,
exact resume, per-process reads, damaged shards named, resumable packing.

The cohort is test_loader's hand-built one (each tile's coords encode its slide and bag row), packed into many
tiny shards so slides sit at non-zero offsets and windows wrap.
"""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from test_loader import K, SLIDES, _loader, _same, _slide_no, _write_cohort

from mmfm import faults
from mmfm.cli import main
from mmfm.data.bags import read_bag
from mmfm.data.cohort import Cohort, CohortError
from mmfm.data.packed import PACKED_DIR, PackedReader, pack_cohort

SLIDE_ID = {_slide_no(c, j): f"{c}_s{j}" for c, sizes in SLIDES.items() for j in range(len(sizes))}  # coords y → id
SHARD_GB = 100 * 8 * 2 / 2**30  # ≤ 100 tiles of D=8 fp16 per shard: four shards


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed") / "cohort"
    _write_cohort(root)
    pack_cohort(Cohort.open(root), seed=3, shard_gb=SHARD_GB, log=lambda _: None)
    return Cohort.open(root)


def _stored(cohort):
    """slide id -> (features, meta) of its stored rows, read with np.load (the independent reader)."""
    d = cohort.root / PACKED_DIR
    index = json.loads((d / "index.json").read_text())
    out = {}
    for sid, e in index["slides"].items():
        name = index["shards"][e["shard"]]["name"]
        rows = slice(e["offset"], e["offset"] + e["n_tiles"])
        out[sid] = (np.load(d / f"{name}.features.npy")[rows], np.load(d / f"{name}.meta.npy")[rows])
    return out


def test_pack_round_trip_equals_the_bags(packed):
    stored = _stored(packed)
    assert len(packed.packed.shards) == 4 and set(stored) == set(packed.slides.index)
    for sid, (feats, meta) in stored.items():
        bag = read_bag(packed.slides.loc[sid, "path"])
        back = np.argsort(meta["row"])  # the stored permutation, undone
        np.testing.assert_array_equal(meta["row"][back], np.arange(len(meta)))
        np.testing.assert_array_equal(feats[back], bag["features"])
        np.testing.assert_array_equal(meta["coords"][back], bag["coords"])
        np.testing.assert_array_equal(meta["fragment"][back], bag.get("fragment", np.zeros(len(meta), np.int32)))
        if len(meta) > 5:
            assert not np.array_equal(meta["row"], np.arange(len(meta)))  # permuted


def test_windows_of_the_stored_permutation(packed):
    """Each slide's k tiles are k cyclically consecutive stored rows, emitted in bag-row order, equal to the bag's
    rows; a slide with fewer than k tiles gives exactly the h5 path's batch (all tiles, then masked repeats)."""
    stored = _stored(packed)
    bags = {_slide_no(c, j): read_bag(packed.root / "bags" / f"{c}_s{j}.h5")
            for c, sizes in SLIDES.items() for j in range(len(sizes))}
    window, h5 = _loader(packed, modalities=("slide",)), _loader(packed, modalities=("slide",), tile_store="h5")
    assert window.tile_store.startswith("packed") and h5.tile_store == "h5"
    starts, padded = set(), 0
    for step in range(3 * window.steps_per_epoch):
        b, ref = window.batch(step), h5.batch(step)
        for r in np.flatnonzero(b["slide/present"]):
            slide, rows = b["slide/coords"][r, :, 1], b["slide/coords"][r, :, 0]
            assert len(set(slide)) == 1
            n = len(bags[slide[0]]["features"])
            np.testing.assert_array_equal(b["slide/features"][r], bags[slide[0]]["features"][rows])
            if n < K:
                padded += 1
                for key in b:
                    np.testing.assert_array_equal(b[key][r], ref[key][r], err_msg=key)
                continue
            assert np.all(np.diff(rows) > 0)  # bag-row order, no repeats
            at = set(np.argsort(stored[SLIDE_ID[slide[0]]][1]["row"])[rows].tolist())  # stored positions emitted
            first = [p for p in at if (p - 1) % n not in at] or [0]  # where the window starts (k = n: anywhere)
            assert len(first) == 1 and at == {(first[0] + j) % n for j in range(K)}, (step, r)
            starts.add((slide[0], first[0]))
    assert padded and len(starts) > 10  # windows start anywhere, steps differ


def test_pool_keeps_the_uniform_share_of_each_slide(packed):
    """multi_slide='pool': how many tiles each slide gives is the uniform sample's (the h5 path's); each share is
    a window of its slide."""
    w = _loader(packed, modalities=("slide",), multi_slide="pool", batch_size=10)
    h = _loader(packed, modalities=("slide",), multi_slide="pool", batch_size=10, tile_store="h5")
    for step in range(2):
        b, ref = w.batch(step), h.batch(step)
        _same({k: v for k, v in b.items() if k not in ("slide/features", "slide/coords", "slide/fragment")},
              {k: v for k, v in ref.items() if k not in ("slide/features", "slide/coords", "slide/fragment")})


def test_packed_batches_are_deterministic_and_resume_exactly(packed):
    a, b = _loader(packed), _loader(packed)
    for x, y in zip([a.batch(s) for s in range(4)], [b.batch(s) for s in range(4)]):
        _same(x, y)
    _take = lambda loader, n: [next(loader) for _ in range(n)]  # noqa: E731
    _take(a, 3)
    resumed = _loader(packed)
    resumed.set_state(json.loads(json.dumps(a.get_state())))
    for x, y in zip(_take(a, 2), _take(resumed, 2)):
        _same(x, y)
    clone = pickle.loads(pickle.dumps(a._make))  # what grain ships to a spawned worker: no open files
    _same(clone(5), a.batch(5))
    with pytest.raises(ValueError, match="tile_store.*h5.*packed"):  # another store samples other tiles
        resumed.set_state(_loader(packed, tile_store="h5").get_state())


@pytest.mark.parametrize("multi_slide", ["sample", "pool"])
def test_each_process_reads_only_its_rows(packed, monkeypatch, multi_slide):
    """Process i of 2 reads exactly the stored rows of its own rows' tiles (a padded slide: the whole slide)."""
    read = []
    for method in ("read", "read_by_row"):
        real = getattr(PackedReader, method)
        monkeypatch.setattr(PackedReader, method, lambda self, shard, offset, pos, *a, real=real: read.extend(
            (shard, offset + int(p)) for p in pos) or real(self, shard, offset, pos, *a))
    stored = _stored(packed)
    index = packed.packed.index["slides"]
    kw = {"modalities": ("slide",), "multi_slide": multi_slide, "tiles_per_slide": 12}
    whole = _loader(packed, **kw)
    parts = [_loader(packed, process_index=i, process_count=2, **kw) for i in range(2)]
    for step in range(2 * whole.steps_per_epoch):
        full = whole.batch(step)
        got = []
        for i, part in enumerate(parts):
            read.clear()
            part.batch(step)
            want = set()
            for r in range(2 * i, 2 * i + 2):
                mask = full["slide/tile_mask"][r]
                for s in np.unique(full["slide/coords"][r, :, 1][full["slide/present"][r]]):
                    e, meta = index[SLIDE_ID[s]], stored[SLIDE_ID[s]][1]
                    at = np.argsort(meta["row"])
                    rows = full["slide/coords"][r, :, 0][full["slide/coords"][r, :, 1] == s]
                    use = np.arange(e["n_tiles"]) if not mask.all() else at[rows]
                    want |= {(e["shard"], e["offset"] + int(p)) for p in use}
            assert len(read) == len(set(read)) and set(read) == want, (step, i)
            got.append(want)
        assert not got[0] & got[1]


@pytest.mark.parametrize("tile_store", ["packed", "h5"])
def test_read_threads_give_the_serial_batches(packed, tile_store):
    """A batch's rows read concurrently (the default) equal the rows read one after another, for both stores and a
    pooled multi-slide case; a float16 batch from the store's dtype and a float32 one (cast) both."""
    for kw in ({}, {"multi_slide": "pool", "feature_dtype": "float32"}):
        one = _loader(packed, tile_store=tile_store, read_threads=1, batch_size=10, **kw)
        many = _loader(packed, tile_store=tile_store, read_threads=4, batch_size=10, **kw)
        for step in range(2):
            _same(one.batch(step), many.batch(step))
        many.close()
        _same(one.batch(2), many.batch(2))  # closed: the next batch starts the threads again


def test_short_reads_are_resumed(packed, monkeypatch):
    """preadv may return fewer bytes than asked: the reader continues mid-row until every buffer is full; a file
    that ends early is named."""
    from mmfm.data import packed as packed_mod

    want = _loader(packed, modalities=("slide",)).batch(0)
    real = os.preadv
    monkeypatch.setattr(packed_mod.os, "preadv", lambda fd, bufs, off: real(fd, [memoryview(bufs[0])[:5]], off))
    _same(_loader(packed, modalities=("slide",)).batch(0), want)
    monkeypatch.setattr(packed_mod.os, "preadv", lambda fd, bufs, off: 0)  # the file ends early (truncated)
    with pytest.raises(ValueError, match=r"packed/shard-0000\d\.meta\.npy: ends at byte \d+"):
        _loader(packed, modalities=("slide",)).batch(0)


def test_damaged_or_stale_store_is_named(packed, tmp_path):
    root = shutil.copytree(packed.root, tmp_path / "cohort")
    bag = root / "bags" / "c05_s0.h5"
    bag.touch()  # a bag newer than its pack: read from the bag, with a warning
    c = Cohort.open(root, scan_features=False)
    assert any("c05_s0" in w and "mmfm pack" in w for w in c.validation.warnings)
    t = _loader(c)._tables
    from_bag = [p.endswith("c05_s0.h5") for p in t.slide_path]
    assert (t.slide_packed[from_bag, 0] == -1).all() and (t.slide_packed[~np.array(from_bag), 0] >= 0).all()
    shard = root / PACKED_DIR / "shard-00001.features.npy"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 5)
    with pytest.raises(CohortError, match=r"packed/shard-00001\.features\.npy: damaged or partial"):
        Cohort.open(root, scan_features=False)
    lenient = Cohort.open(root, strict=False, scan_features=False)
    assert lenient.packed is None and _loader(lenient).tile_store == "h5"
    with pytest.raises(ValueError, match="no usable packed store"):
        _loader(lenient, tile_store="packed")


def test_pack_resumes_keeping_complete_shards(packed, tmp_path):
    root = shutil.copytree(packed.root, tmp_path / "cohort")
    d = root / PACKED_DIR
    shutil.rmtree(d)
    faults.arm("write:shard-00001.meta.npy@1:raise")  # fails while writing the 2nd shard
    try:
        with pytest.raises(faults.InjectedFault):
            pack_cohort(Cohort.open(root, packed=False), seed=3, shard_gb=SHARD_GB, log=lambda _: None)
    finally:
        faults.arm(os.environ.get(faults.ENV))
    assert not (d / "index.json").exists() and not list(d.glob("shard-00001*")) and not list(d.glob(".*tmp"))
    first = (d / "shard-00000.features.npy").stat().st_ino
    assert main(["pack", str(root), "--seed", "3", "--shard-gb", str(SHARD_GB)]) == 0
    assert (d / "shard-00000.features.npy").stat().st_ino == first  # kept, not rewritten
    for name in ("index.json", "shard-00001.features.npy", "shard-00002.meta.npy"):
        assert (d / name).read_bytes() == (packed.root / PACKED_DIR / name).read_bytes(), name
    assert main(["pack", str(root), "--seed", "3", "--shard-gb", str(SHARD_GB)]) == 0  # all kept
    assert (d / "shard-00000.features.npy").stat().st_ino == first
    pack_cohort(Cohort.open(root, packed=False), seed=3, shard_gb=1.0, log=lambda _: None)  # fewer, larger shards
    assert sorted(p.name for p in d.glob("shard-*")) == [f"shard-00000.{x}" for x in ("features.npy", "json", "meta.npy")]
    assert len(Cohort.open(root).packed.shards) == 1
