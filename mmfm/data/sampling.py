"""Sample k tiles of a bag and read only those rows.

Training sees a fixed `k` tiles per slide per step (TANGLE/MADELEINE use 2,048), drawn uniformly
without replacement. A bag with N < k tiles yields all N tiles plus k − N duplicates drawn with
replacement that are masked out, so a model that honours the mask sees exactly the N real tiles
(padding invariance) while every feature slot still holds a plausible value.

Reading: h5py fancy indexing over 2,048 scattered rows costs ~10× a whole-bag read, so for
unfiltered (uncompressed) datasets — what TRIDENT and `write_bag` write — the rows are gathered
straight from a read-only memory map at the byte offsets HDF5 itself reports (contiguous layout, or
chunks that span whole rows). Anything else (compression, partial chunks) falls back to
`bags.read_rows` (sorted, coalesced hyperslab runs). Both paths return identical arrays.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import h5py
import numpy as np

from mmfm.data.bags import read_rows


def sample_tiles(n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`k` row indices into a bag of `n` tiles and a mask of which slots are real tiles.

    n ≥ k: k distinct rows, all real. 0 < n < k: all n rows (random order) then k − n rows drawn with
    replacement, masked False.
    """
    if n <= 0:
        raise ValueError(f"cannot sample tiles from an empty bag (n={n})")
    if n >= k:
        return rng.choice(n, size=k, replace=False).astype(np.int64), np.ones(k, bool)
    rows = np.concatenate([rng.permutation(n), rng.integers(0, n, size=k - n)]).astype(np.int64)
    return rows, np.arange(k) < n


class _MappedRows:
    """Row gather over a memory map: the dataset's bytes as a few strided runs of whole rows."""

    def __init__(self, first_rows: np.ndarray, views: list[np.ndarray]):
        self.first_rows, self.views = first_rows, views

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        if len(self.views) == 1:
            return self.views[0][rows]
        run = np.searchsorted(self.first_rows, rows, side="right") - 1
        out = np.empty((len(rows),) + self.views[0].shape[1:], self.views[0].dtype)
        for u in np.unique(run):
            sel = run == u
            out[sel] = self.views[u][rows[sel] - self.first_rows[u]]
        return out


def _mapped_rows(ds: h5py.Dataset, mm: np.memmap, max_runs: int = 1024) -> _MappedRows | None:
    """`ds` as memory-mapped runs of rows, or None if its bytes are not stored plainly.

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
        first_rows, starts = np.zeros(1, np.int64), np.array([offset], np.int64)
    else:
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
        first_rows, starts = first_chunks * per_chunk, chunk_starts[first_chunks]
    ends = np.append(first_rows[1:], n)
    if np.any(starts + (ends - first_rows) * row_bytes > mm.size):
        return None
    views = [np.ndarray((e - r,) + row_shape, dtype=dtype, buffer=mm, offset=int(o))
             for r, e, o in zip(first_rows, ends, starts)]
    return _MappedRows(first_rows, views)


class _OpenBag:
    """One bag opened for row reads: memory-mapped views where possible, else an h5py handle."""

    def __init__(self, path: str):
        self.path = path
        self.h5 = h5py.File(path, "r")
        self.names = ["features", "coords"] + (["fragment"] if "fragment" in self.h5 else [])
        mm = np.memmap(path, mode="r", dtype=np.uint8)
        self.views = {name: _mapped_rows(self.h5[name], mm) for name in self.names}
        if all(v is not None for v in self.views.values()):
            self.h5.close()
            self.h5 = None

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        if self.h5 is not None:
            return read_rows(self.path, rows, self.h5)
        return {name: view[rows] for name, view in self.views.items()}

    def close(self):
        if self.h5 is not None:
            self.h5.close()
        self.views = {}


class BagReader:
    """Reads given rows of many bags, keeping the last `max_open` bags open.

    Holds no open files when pickled (grain ships it to spawned workers), so each worker opens
    its own handles lazily.
    """

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._open: collections.OrderedDict[str, _OpenBag] = collections.OrderedDict()

    def read(self, path: str | os.PathLike, rows: np.ndarray) -> dict[str, np.ndarray]:
        """features/coords(/fragment) at `rows` (any order, repeats allowed); only those rows are read."""
        path = str(path)
        try:
            bag = self._open.pop(path, None) or _OpenBag(path)
            self._open[path] = bag
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
            return bag.read(np.asarray(rows, dtype=np.int64))
        except (OSError, KeyError, ValueError) as e:
            raise OSError(f"{Path(path)}: cannot read tile rows: {e}") from e

    def close(self):
        while self._open:
            self._open.popitem()[1].close()

    def __getstate__(self):
        return {"max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["max_open"])
