"""The packed tile store: the tiles of many slides in a few large shard files, each slide's tiles in a seeded random
permutation, so a training sample of k tiles is ONE contiguous window of its slide — reads proportional to the bytes
used (an HDF5 bag sampled k of n rows moves the whole bag from a cold disk).

Written by `mmfm pack` from a cohort's TRIDENT h5 bags, which stay the interchange format; the loader uses it when
`<cohort>/packed/index.json` exists (`LoaderConfig.tile_store`), evaluation reads the bags. Layout of `packed/`:

  shard-00000.features.npy  [R, D] the bags' dtype (float16; float32 if any bag has it), plain .npy
  shard-00000.meta.npy      [R] structured (coords int64 ×2, fragment int32, row int32): `row` is the tile's row in its
                            bag, so the permutation is data, and a slide is restored to bag order exactly
  shard-00000.json          the shard's completion record (slides, bag sizes and mtimes, file sizes); written after
                            its two .npy files, so a shard with a record whose sizes match is complete and kept
  index.json                written last: slide → (shard, offset, n_tiles) and the bag it came from (size, mtime)

Why plain .npy with pread (no new dependency): a window is one or two `preadv` calls. scripts/bench_feature_store.py
reads the same cold windows from each candidate (3 runs, scripts/results/bench_feature_store_run*.json): pread moves
1.11 bytes from the disk per byte delivered at 0.09-0.11 CPU s per 192 MB; zarr v3 reads as few bytes (256-row
chunks) for 0.15-0.18 CPU s through tensorstore and about half the rate through zarr-python; a memory map reads 1.99
(read-around on faults); array-record 1.7-1.8 at 0.24 CPU s. Rates were within noise of each other at that load.
Reading: the loader issues a batch's windows from a thread pool (`LoaderConfig.read_threads`), each scattered by the
kernel straight into the batch in bag-row order (`PackedReader.read_by_row`), with read-ahead off on the shards
(otherwise its read-ahead reads past the windows: 1.15-1.5 bytes read per byte delivered, now 1.01).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfm.data.bags import read_bag, read_header
from mmfm.io import atomic_path, write_json

FORMAT = "mmfm-packed/1"
PACKED_DIR = "packed"  # under the cohort root: where `mmfm pack` writes and the loader looks
META = np.dtype([("coords", "<i8", (2,)), ("fragment", "<i4"), ("row", "<i4")])


def permutation(slide_id: str, n: int, seed: int) -> np.ndarray:
    """The stored order of a slide's tiles: bag rows, a pure function of (seed, slide id)."""
    key = int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, key]).permutation(n)


def _bag_facts(path: Path) -> dict:
    st = os.stat(path)
    return {"bag_size": st.st_size, "bag_mtime_ns": st.st_mtime_ns}


def _plan(slides: list[dict], row_bytes: int, shard_bytes: int) -> list[list[dict]]:
    """Slides in cohort order, greedily into shards of about `shard_bytes` (a slide is never split)."""
    shards, cur, size = [], [], 0
    for s in slides:
        if cur and size + s["n_tiles"] * row_bytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += s["n_tiles"] * row_bytes
    return shards + ([cur] if cur else [])


def _shard_record(out: Path, name: str) -> dict | None:
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _complete(out: Path, name: str, want: dict) -> bool:
    """The shard's record matches the plan and its files have the recorded sizes (a kept shard is whole)."""
    rec = _shard_record(out, name)
    if rec is None or {k: rec.get(k) for k in want} != want:
        return False
    return all((out / f).is_file() and (out / f).stat().st_size == size for f, size in rec["files"].items())


def _write_shard(out: Path, name: str, slides: list[dict], dim: int, dtype: np.dtype, seed: int) -> dict[str, int]:
    """Both .npy files of one shard, atomically, one slide in memory at a time; {file name: size}."""
    rows = sum(s["n_tiles"] for s in slides)
    with atomic_path(out / f"{name}.features.npy", suffix=".tmp") as ftmp, \
            atomic_path(out / f"{name}.meta.npy", suffix=".tmp") as mtmp:
        feats = np.lib.format.open_memmap(ftmp, mode="w+", dtype=dtype, shape=(rows, dim))
        meta = np.lib.format.open_memmap(mtmp, mode="w+", dtype=META, shape=(rows,))
        at = 0
        for s in slides:
            bag = read_bag(s["path"])
            n = s["n_tiles"]
            if bag["features"].shape != (n, dim):
                raise ValueError(f"{s['path']}: features {bag['features'].shape}, the cohort says ({n}, {dim})")
            perm = permutation(s["slide_id"], n, seed)
            feats[at: at + n] = bag["features"][perm]
            meta["coords"][at: at + n] = bag["coords"][perm]
            meta["fragment"][at: at + n] = bag["fragment"][perm] if "fragment" in bag else 0
            meta["row"][at: at + n] = perm
            at += n
        for m in (feats, meta):
            m.flush()
        del feats, meta
        for tmp in (ftmp, mtmp):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # durable before the record says the shard is complete
            finally:
                os.close(fd)
    return {f: (out / f).stat().st_size for f in (f"{name}.features.npy", f"{name}.meta.npy")}


def pack_cohort(cohort, seed: int = 0, shard_gb: float = 1.0, log=print) -> Path:
    """Write `<cohort>/packed/` from the cohort's bags; shards already complete (same slides, same bags) are kept."""
    out = Path(cohort.root) / PACKED_DIR
    out.mkdir(exist_ok=True)
    for stale in out.glob(".shard-*.tmp"):  # a killed pack's temporary files (one pack at a time per cohort)
        stale.unlink()
    slides_df = cohort.slides[cohort.slides["n_tiles"] > 0]
    if not len(slides_df):
        raise ValueError(f"{cohort.root}: no slide with tiles to pack")
    wide = any(read_header(p).dtype == np.float32 for p in slides_df["path"])
    dtype = np.dtype(np.float32 if wide else np.float16)  # float16 → float32 is exact, the other way is not
    dim = int(cohort.spec.feature_dim)
    root = Path(cohort.root)
    slides = [{"slide_id": str(sid), "path": str(p), "n_tiles": int(n), **_bag_facts(Path(p))}
              for sid, p, n in zip(slides_df.index, slides_df["path"], slides_df["n_tiles"])]
    plan = _plan(slides, dim * dtype.itemsize, int(shard_gb * 2**30))
    index_slides, shards = {}, []
    for i, members in enumerate(plan):
        name = f"shard-{i:05d}"
        want = {"format": FORMAT, "seed": seed, "dim": dim, "dtype": dtype.str,
                "slides": [{k: s[k] for k in ("slide_id", "n_tiles", "bag_size", "bag_mtime_ns")} for s in members]}
        if _complete(out, name, want):
            log(f"{name}: complete, kept ({len(members)} slides)")
        else:
            (out / f"{name}.json").unlink(missing_ok=True)  # an old record never vouches for new files
            files = _write_shard(out, name, members, dim, dtype, seed)
            write_json(out / f"{name}.json", {**want, "files": files})
            log(f"{name}: written ({len(members)} slides, {sum(s['n_tiles'] for s in members)} tiles)")
        at = 0
        for s in members:
            p = Path(s["path"])
            bag = str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
            index_slides[s["slide_id"]] = {"shard": i, "offset": at, "n_tiles": s["n_tiles"], "bag": bag,
                                           "bag_size": s["bag_size"], "bag_mtime_ns": s["bag_mtime_ns"]}
            at += s["n_tiles"]
        shards.append({"name": name, "rows": at})
    for old in out.glob("shard-*"):  # a previous, larger pack's tail
        if int(old.name[len("shard-"):].split(".")[0]) >= len(plan):
            old.unlink()
    write_json(out / "index.json", {"format": FORMAT, "seed": seed, "dim": dim, "dtype": dtype.str,
                                    "shards": shards, "slides": index_slides}, indent=None)
    return out


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a C-order .npy file, reading only its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError("Fortran order")
        return shape, dtype, f.tell()


@dataclass(frozen=True)
class _Shard:
    features: str  # paths
    meta: str
    features_offset: int  # byte offset of row 0 in each file
    meta_offset: int


class PackedStore:
    """An opened `packed/` directory: every shard checked whole (header, shape, size) against index.json."""

    def __init__(self, directory: Path, index: dict, shards: list[_Shard]):
        self.directory, self.index, self.shards = directory, index, shards
        self.dim, self.dtype, self.seed = int(index["dim"]), np.dtype(index["dtype"]), int(index["seed"])
        self.digest = hashlib.sha1(json.dumps(index, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def open(cls, directory: str | os.PathLike) -> PackedStore:
        d = Path(directory)
        try:
            index = json.loads((d / "index.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{d / 'index.json'}: unreadable packed index ({e}); re-run `mmfm pack`") from e
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"{d / 'index.json'}: not a {FORMAT} index; re-run `mmfm pack`")
        try:
            return cls(d, index, cls._check_shards(d, index))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{d / 'index.json'}: malformed packed index ({type(e).__name__}: {e}); "
                             f"re-run `mmfm pack`") from e

    @staticmethod
    def _check_shards(d: Path, index: dict) -> list[_Shard]:
        dim, dtype = int(index["dim"]), np.dtype(index["dtype"])
        shards = []
        for s in index["shards"]:
            offsets = []
            for part, want_dtype, want_shape in (("features", dtype, (s["rows"], dim)), ("meta", META, (s["rows"],))):
                path = d / f"{s['name']}.{part}.npy"
                try:
                    shape, got_dtype, offset = _npy_header(path)
                    size = path.stat().st_size
                except (OSError, ValueError) as e:
                    raise ValueError(f"{path}: unreadable packed shard ({e}); re-run `mmfm pack` to rewrite it") from e
                expect = offset + int(np.prod(want_shape)) * want_dtype.itemsize
                if shape != want_shape or got_dtype != want_dtype or size != expect:
                    raise ValueError(f"{path}: damaged or partial packed shard ({shape} {got_dtype}, {size} bytes; "
                                     f"index.json says {want_shape} {want_dtype}, {expect} bytes); re-run "
                                     f"`mmfm pack` to rewrite it")
                offsets.append((str(path), offset))
            shards.append(_Shard(offsets[0][0], offsets[1][0], offsets[0][1], offsets[1][1]))
        return shards

    def usable(self, slides) -> tuple[dict[str, tuple[int, int]], list[str]]:
        """({slide id: (shard, offset)} for the cohort's slides packed from their current bag, [the others])."""
        ok, stale = {}, []
        for sid, path, n in zip(slides.index, slides["path"], slides["n_tiles"]):
            e = self.index["slides"].get(str(sid))
            try:
                same = e is not None and e["n_tiles"] == n and _bag_facts(Path(path)) == \
                    {"bag_size": e["bag_size"], "bag_mtime_ns": e["bag_mtime_ns"]}
            except OSError:
                same = False
            if same:
                ok[str(sid)] = (int(e["shard"]), int(e["offset"]))
            elif n > 0:
                stale.append(str(sid))
        return ok, stale


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # buffers one preadv call may fill


def _preadv(fd: int, path: str, bufs: list, offset: int, size: int) -> None:
    """Fill `bufs` (C-ordered buffers of `size` bytes each) from consecutive file bytes at `offset`: the kernel copies
    each straight to its place (no gather copy after), IOV_MAX buffers a call, short reads resumed mid-buffer."""
    for c in range(0, len(bufs), IOV_MAX):
        chunk, at, done = bufs[c: c + IOV_MAX], offset + c * size, 0
        while done < len(chunk) * size:
            i, part = divmod(done, size)
            rest = chunk[i:] if not part else [memoryview(chunk[i]).cast("B")[part:], *chunk[i + 1:]]
            got = os.preadv(fd, rest, at + done)
            if got == 0:
                raise ValueError(f"{path}: ends at byte {at + done}, before the {len(bufs) * size}-byte run at "
                                 f"{offset} (truncated since it was opened? re-run `mmfm pack`)")
            done += got


def _runs(positions: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) spans of `positions` that are consecutive stored rows (a window: one, or two when it wraps)."""
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    return list(zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(positions)].tolist()))


class PackedReader:
    """Reads runs of stored rows with `preadv` straight into the output arrays: a window costs one call per file and
    contiguous run (two when it wraps). Thread-safe, and reads run concurrently (`preadv` releases the GIL): the
    loader issues a batch's windows from a thread pool, so the disk sees many requests at once instead of one
    waiting for the last. Holds no open files when pickled (grain workers open their own)."""

    def __init__(self, shards: list[_Shard], dim: int, dtype: str):
        self.shards, self.dim, self.dtype = shards, dim, np.dtype(dtype)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # guards the file table only

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):  # reads are exact windows: kernel read-ahead only reads past them
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return fd

    def _meta(self, sh: _Shard, offset: int, positions: np.ndarray, spans) -> np.ndarray:
        meta = np.empty(len(positions), META)
        for lo, hi in spans:
            _preadv(self._fd(sh.meta), sh.meta, [meta[lo:hi]], sh.meta_offset + (offset + int(positions[lo])) *
                    META.itemsize, (hi - lo) * META.itemsize)
        return meta

    def read(self, shard: int, offset: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Stored rows `offset + positions` of `shard`, in the order of `positions`: features, coords, fragment, row."""
        positions = np.asarray(positions, np.int64)
        sh, spans = self.shards[shard], _runs(positions)
        feats = np.empty((len(positions), self.dim), self.dtype)
        meta = self._meta(sh, offset, positions, spans)
        rb = self.dim * self.dtype.itemsize
        for lo, hi in spans:
            _preadv(self._fd(sh.features), sh.features, [feats[lo:hi]],
                    sh.features_offset + (offset + int(positions[lo])) * rb, (hi - lo) * rb)
        return {"features": feats, "coords": meta["coords"], "fragment": meta["fragment"],
                "row": meta["row"].astype(np.int64)}

    def read_by_row(self, shard: int, offset: int, positions: np.ndarray, into: np.ndarray) -> dict[str, np.ndarray]:
        """Stored rows `offset + positions` (distinct) of `shard` in bag-row order — the order of the h5 path, which
        position-aware slide encoders (GigaPath's dilated attention) rely on: the meta first, then the features
        scattered by the kernel straight into `into` ([len(positions), D], C order, the store's dtype), one row
        per iovec. Returns coords, fragment, row, in that order."""
        positions = np.asarray(positions, np.int64)
        if into.shape != (len(positions), self.dim) or into.dtype != self.dtype or not into.flags.c_contiguous:
            raise ValueError(f"read_by_row: `into` must be C-ordered {self.dtype} of shape "
                             f"{(len(positions), self.dim)}, got {into.dtype} {into.shape}")
        sh, spans = self.shards[shard], _runs(positions)
        meta = self._meta(sh, offset, positions, spans)
        order = np.argsort(meta["row"], kind="stable")
        slot = np.empty(len(order), np.int64)
        slot[order] = np.arange(len(order))  # stored position i goes to batch row slot[i]
        rows, rb = list(into), self.dim * self.dtype.itemsize  # row views: one iovec each
        for lo, hi in spans:
            _preadv(self._fd(sh.features), sh.features, list(map(rows.__getitem__, slot[lo:hi].tolist())),
                    sh.features_offset + (offset + int(positions[lo])) * rb, rb)
        meta = meta[order]
        return {"coords": meta["coords"], "fragment": meta["fragment"], "row": meta["row"].astype(np.int64)}

    def close(self):
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}

    def __getstate__(self):
        return {"shards": self.shards, "dim": self.dim, "dtype": self.dtype.str}

    def __setstate__(self, state):
        self.__init__(**state)
