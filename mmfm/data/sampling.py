"""Sample k tiles of a bag and read only those rows.

Training sees a fixed `k` tiles per slide per step (TANGLE/MADELEINE use 2,048), drawn uniformly
without replacement. A bag with N < k tiles yields all N tiles plus k − N duplicates drawn with
replacement that are masked out, so a model that honours the mask sees exactly the N real tiles
(padding invariance) while every feature slot still holds a plausible value.

Reading: h5py fancy indexing over 2,048 scattered rows costs ~10× a whole-bag read, so for
unfiltered (uncompressed) datasets — what TRIDENT and `write_bag` write — the rows are gathered
straight from a read-only memory map at the byte offsets HDF5 itself reports (contiguous layout, or
chunks that span whole rows; `scripts/bench_loader.py` times each layout). Anything else
(compression, partial chunks) falls back to `bags.read_rows` (sorted, coalesced hyperslab runs).
Both paths return identical arrays. The gain is in CPU and copies, measured on a warm page cache;
from cold storage, 2,048 random rows of a 20k-row bag touch most of its pages anyway, so expect
less there until bags are several times larger than k.
"""

from __future__ import annotations

import collections
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mmfm.data.bags import read_rows


def sample_tiles(n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`k` row indices into a bag of `n` tiles and a mask of which slots are real tiles.

    n ≥ k: k distinct rows, all real. 0 < n < k: all n rows, then k − n rows drawn with replacement,
    masked False. Real rows come sorted: bags store tiles in raster order, so reads stay sequential,
    and the order tells a model nothing the coords do not.
    """
    if n <= 0:
        raise ValueError(f"cannot sample tiles from an empty bag (n={n})")
    if n >= k:
        return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64), np.ones(k, bool)
    rows = np.concatenate([np.arange(n), np.sort(rng.integers(0, n, size=k - n))]).astype(np.int64)
    return rows, np.arange(k) < n


def window_positions(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` ≤ n consecutive stored positions of a packed slide (`mmfm.data.packed`) from a uniform random start,
    wrapping past the end: one contiguous read (two when it wraps) instead of `count` scattered rows.

    Each tile is still drawn with probability count/n, but subsets are not independent: only n windows exist per
    pack, and tiles close in the stored (seeded random) permutation co-occur more often than under `sample_tiles`.
    """
    if not 0 < count <= n:
        raise ValueError(f"a window of {count} tiles does not fit a slide of {n}")
    return (int(rng.integers(n)) + np.arange(count)) % n


@dataclass(frozen=True)
class _Runs:
    """Where a dataset's rows lie in the file: runs of consecutive rows at byte offsets."""

    dtype: np.dtype
    shape: tuple[int, ...]
    first_rows: np.ndarray  # [n_runs] first row of each run
    starts: np.ndarray  # [n_runs] byte offset of that row


def _plain_runs(ds: h5py.Dataset, max_runs: int = 1024) -> _Runs | None:
    """`ds`'s rows as byte runs, or None if its bytes are not stored plainly.

    Plain = no filters, and either contiguous layout or chunks spanning whole rows, all allocated.
    Consecutive chunks at consecutive offsets merge into one run; TRIDENT's one-row chunks come out
    as a few runs separated by B-tree nodes.
    """
    n = ds.shape[0] if ds.ndim else 0
    dtype = ds.dtype
    if n == 0 or ds.id.get_create_plist().get_nfilters() > 0 or dtype.kind not in "biuf":
        return None
    row_shape = tuple(ds.shape[1:])
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    offset = ds.id.get_offset()  # contiguous layout: one extent
    if offset is not None:
        return _Runs(dtype, ds.shape, np.zeros(1, np.int64), np.array([offset], np.int64))
    if ds.chunks is None or tuple(ds.chunks[1:]) != row_shape:
        return None
    per_chunk = ds.chunks[0]
    n_chunks = -(-n // per_chunk)
    if ds.id.get_num_chunks() != n_chunks:
        return None  # unallocated chunks (fill value) have no bytes on disk
    chunk_starts = np.empty(n_chunks, np.int64)

    def record(info):
        chunk_starts[info.chunk_offset[0] // per_chunk] = info.byte_offset

    ds.id.chunk_iter(record)
    new_run = np.flatnonzero(np.diff(chunk_starts) != per_chunk * row_bytes) + 1
    if len(new_run) >= max_runs:
        return None
    first_chunks = np.concatenate([[0], new_run])
    return _Runs(dtype, ds.shape, first_chunks * per_chunk, chunk_starts[first_chunks])


class _MappedRows:
    """Row gather over a read-only memory map of the file.

    The map is viewed as overlapping `row_bytes`-wide records, one starting at every byte, so rows
    at any byte offsets (several runs, unaligned B-tree gaps) come out in one vectorised gather.
    """

    def __init__(self, mm: np.ndarray, runs: _Runs, willneed: mmap.mmap | None = None):
        self.runs, self.willneed = runs, willneed
        self.row_bytes = int(np.prod(runs.shape[1:], dtype=np.int64)) * runs.dtype.itemsize
        ends = np.append(runs.first_rows[1:], runs.shape[0])
        if np.any(runs.starts + (ends - runs.first_rows) * self.row_bytes > mm.size):
            raise ValueError("dataset extends past the end of the file (truncated bag?)")
        self.records = np.ndarray((mm.size - self.row_bytes + 1,), dtype=np.dtype((np.void, self.row_bytes)),
                                  buffer=mm, strides=(1,))

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (already validated to lie in range), as a new array."""
        r = self.runs
        run = np.searchsorted(r.first_rows, rows, side="right") - 1 if len(r.first_rows) > 1 else 0
        offsets = r.starts[run] + (rows - r.first_rows[run]) * self.row_bytes
        if self.willneed is not None and len(rows) > 1:
            lo = int(offsets.min()) // mmap.PAGESIZE * mmap.PAGESIZE
            hi = int(offsets.max()) + self.row_bytes
            if 4 * len(rows) * self.row_bytes >= hi - lo:  # dense: most pages of the span are touched anyway
                self.willneed.madvise(mmap.MADV_WILLNEED, lo, hi - lo)  # one large async read, not page faults
        got = self.records[offsets]
        return got.view(r.dtype).reshape((len(rows),) + r.shape[1:])


class _OpenBag:
    """One bag opened for row reads: memory-mapped views where its layout allows, else an h5py handle."""

    def __init__(self, path: str, layout: dict[str, _Runs | None] | None, readahead: str = "willneed"):
        self.path, self.h5 = path, None
        if layout is None or any(r is None for r in layout.values()):
            self.h5 = h5py.File(path, "r")
            names = ["features", "coords"] + (["fragment"] if "fragment" in self.h5 else [])
            layout = {name: _plain_runs(self.h5[name]) for name in names}
            if all(r is not None for r in layout.values()):
                self.h5.close()
                self.h5 = None
        self.layout = layout
        self.n_rows = (self.h5["features"].shape[0] if self.h5 is not None else layout["features"].shape[0])
        if self.h5 is None:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if readahead == "random":
                mm.madvise(mmap.MADV_RANDOM)
            self.views = {name: _MappedRows(np.frombuffer(mm, np.uint8), runs, mm if readahead == "willneed" else None)
                          for name, runs in layout.items()}

    def close(self):
        """Close the h5py handle; memory maps stay valid (a thread may still be reading) until dropped."""
        if self.h5 is not None:
            self.h5.close()


READAHEAD = ("willneed", "kernel", "random")


class BagReader:
    """Reads given rows of many bags, keeping the last `max_open` bags open.

    `readahead` (cold storage; `scripts/bench_feature_store.py` measures each): 'willneed' asks for a dense
    sample's whole span at once (one large asynchronous read; on a virtio disk, cold, it beat 'kernel' by
    1.4-1.6× in 4 of 6 side-by-side rounds, all 3 with ≥ 2 grain workers among them, and lost 2: 0.63× in-process,
    0.96× with 1 worker); 'kernel' leaves page faults to the kernel's read-around (~128 KiB around each, so a
    sample denser than a row per 128 KiB reads the whole bag anyway); 'random' turns read-around off, so only
    the pages holding sampled rows are read (5-10× slower on that virtio disk even at k/n = 1/8; for disks with
    many IOPS and sparse samples, to be measured there).

    A bag's byte layout is remembered after its first open (a few numbers per dataset), so
    reopening one that fell out of the cache is just a memory map, not an HDF5 metadata walk.
    Holds no open files when pickled (grain ships it to spawned workers), so each worker opens
    its own handles lazily. Thread-safe, and memory-mapped gathers of several threads run concurrently (the loader
    reads a batch's rows from a thread pool); h5py fallback reads are serialised.
    """

    def __init__(self, max_open: int = 128, readahead: str = "willneed"):
        if readahead not in READAHEAD:
            raise ValueError(f"readahead must be one of {READAHEAD}, got {readahead!r}")
        self.max_open, self.readahead = max_open, readahead
        self._open: collections.OrderedDict[str, _OpenBag] = collections.OrderedDict()
        self._layouts: dict[tuple, dict[str, _Runs | None]] = {}
        self._lock = threading.Lock()

    def read(self, path: str | os.PathLike, rows: np.ndarray) -> dict[str, np.ndarray]:
        """features/coords(/fragment) at `rows` (any order, repeats allowed); only those rows are read."""
        path, rows = str(path), np.asarray(rows, dtype=np.int64)
        try:
            bag = self._bag(path)
            if len(rows) and (rows.min() < 0 or rows.max() >= bag.n_rows):
                raise ValueError(f"rows outside [0, {bag.n_rows})")
            if bag.h5 is not None:
                with self._lock:  # h5py one at a time; a handle another thread's eviction closed is reopened
                    return read_rows(path, rows, bag.h5 if bag.h5.id.valid else None)
            # The gather (page faults; numpy drops the GIL) runs unlocked: threads read bags concurrently.
            return {name: view[rows] for name, view in bag.views.items()}
        except (OSError, KeyError, ValueError) as e:
            raise OSError(f"{Path(path)}: cannot read tile rows: {e}") from e

    def _bag(self, path: str) -> _OpenBag:
        """The open bag at `path`, opened outside the lock if it is not (a cold HDF5 metadata walk waits on the
        disk: other threads' reads go on meanwhile)."""
        with self._lock:
            bag = self._open.get(path)
            if bag is not None:
                self._open.move_to_end(path)
                return bag
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)  # a rewritten bag gets a fresh layout
        new = _OpenBag(path, self._layouts.get(key), self.readahead)
        with self._lock:
            self._layouts[key] = new.layout
            bag = self._open.setdefault(path, new)
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
        if bag is not new:  # another thread opened it first
            new.close()
        return bag

    def close(self):
        with self._lock:
            while self._open:
                self._open.popitem()[1].close()

    def __getstate__(self):
        return {"max_open": self.max_open, "readahead": self.readahead}

    def __setstate__(self, state):
        self.__init__(**state)
