"""TRIDENT-compatible tile-feature bags: one HDF5 file per slide.

Layout (files written by TRIDENT open unchanged):
  features [N, D] float16/float32, attrs: encoder (+ anything else)
  coords   [N, 2] int64, level-0 top-left (x, y); attrs: patch_size_level0 (required),
           patch_size, target_magnification, level0_magnification, level0_width, level0_height, overlap, name
  fragment [N] int32 (optional, mmfm): tissue-fragment index per tile, for fragment-aware encoders.
Root attrs (optional, mmfm): random_init_weights (bool) — features from an untrained encoder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mmfm.io import atomic_path

MPP_PER_MAG = 10.0  # 10× ⇔ 1 µm/px, the field's convention (20× = 0.5 µm/px)


def mag_to_mpp(mag: float) -> float:
    return MPP_PER_MAG / float(mag)


def patch_size_level0(patch_size: int, target_mag: float, level0_mpp: float) -> int:
    """Level-0 pixels spanned by one tile; exact from MPP (TRIDENT's mag buckets make this imprecise). The one
    definition `mmfm extract` and `mmfm import features` share."""
    return max(1, int(round(patch_size * mag_to_mpp(target_mag) / level0_mpp)))


COORD_ATTRS = ("patch_size", "patch_size_level0", "target_magnification", "level0_magnification",
               "level0_width", "level0_height", "overlap", "name")


@dataclass(frozen=True)
class BagHeader:
    """What can be known about a bag without reading its features."""

    path: Path
    n_tiles: int
    dim: int
    dtype: np.dtype
    patch_size_level0: int | None
    coord_attrs: dict[str, Any] = field(default_factory=dict)
    feature_attrs: dict[str, Any] = field(default_factory=dict)
    has_fragment: bool = False
    root_attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def random_init(self) -> bool:
        """Features from an encoder with random weights (`mmfm extract --random-init`): never real ones."""
        return bool(self.root_attrs.get("random_init_weights", False))


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_header(path: str | os.PathLike) -> BagHeader:
    """Open a bag and read shapes and attributes only (no feature rows)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        feats, coords = f["features"], f["coords"]
        n, d = (feats.shape + (0, 0))[:2] if feats.ndim >= 2 else (feats.shape[0] if feats.ndim else 0, 0)
        cattrs = {k: _plain(v) for k, v in coords.attrs.items()}
        fattrs = {k: _plain(v) for k, v in feats.attrs.items()}
        ps = cattrs.get("patch_size_level0")
        return BagHeader(path=path, n_tiles=int(n), dim=int(d), dtype=feats.dtype,
                         patch_size_level0=None if ps is None else int(ps),
                         coord_attrs=cattrs, feature_attrs=fattrs, has_fragment="fragment" in f,
                         root_attrs={k: _plain(v) for k, v in f.attrs.items()})


def write_bag(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray, *,
              patch_size_level0: int, encoder: str, fragment: np.ndarray | None = None,
              coord_attrs: dict[str, Any] | None = None, feature_attrs: dict[str, Any] | None = None,
              root_attrs: dict[str, Any] | None = None) -> Path:
    """Write one bag atomically (temp file + rename): a crash never leaves a partial bag."""
    features = np.asarray(features)
    coords = np.asarray(coords, dtype=np.int64)
    if features.ndim != 2 or coords.shape != (features.shape[0], 2):
        raise ValueError(f"{path}: features {features.shape} and coords {coords.shape} do not match [N, D] / [N, 2]")
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        with h5py.File(tmp, "w") as f:
            fd = f.create_dataset("features", data=features, chunks=(min(max(len(features), 1), 256), features.shape[1]) if len(features) else None)
            fd.attrs["encoder"] = encoder
            for k, v in (feature_attrs or {}).items():
                fd.attrs[k] = v
            cd = f.create_dataset("coords", data=coords)
            cd.attrs["patch_size_level0"] = int(patch_size_level0)
            for k, v in (coord_attrs or {}).items():
                cd.attrs[k] = v
            if fragment is not None:
                f.create_dataset("fragment", data=np.asarray(fragment, dtype=np.int32))
            for k, v in (root_attrs or {}).items():
                f.attrs[k] = v
    return Path(path)


def read_rows(path: str | os.PathLike, rows: np.ndarray, h5: h5py.File | None = None) -> dict[str, np.ndarray]:
    """Read only `rows` (any order) of features/coords/fragment, as sorted coalesced runs.

    h5py fancy indexing over scattered rows is slow; contiguous runs are one hyperslab each.
    Returned arrays follow the order of `rows`.
    """
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    uniq, inverse = np.unique(srt, return_inverse=True)
    own = h5 is None
    f = h5py.File(path, "r") if own else h5
    try:
        out = {}
        names = ["features", "coords"] + (["fragment"] if "fragment" in f else [])
        if len(uniq):
            breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
            runs = np.split(uniq, breaks)
        else:
            runs = []
        for name in names:
            ds = f[name]
            parts = [ds[r[0]: r[-1] + 1] for r in runs]
            got = np.concatenate(parts, axis=0) if parts else np.zeros((0,) + ds.shape[1:], ds.dtype)
            res = np.empty_like(got[inverse]) if len(got) else got
            if len(got):
                res[order] = got[inverse]
            out[name] = res
        return out
    finally:
        if own:
            f.close()


def read_bag(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a whole bag (inference uses all tiles)."""
    with h5py.File(path, "r") as f:
        out = {"features": f["features"][:], "coords": f["coords"][:]}
        if "fragment" in f:
            out["fragment"] = f["fragment"][:]
        return out


def grid_indices(coords: np.ndarray, patch_size_level0: int) -> np.ndarray:
    """Level-0 (x, y) top-left pixel coords → integer (col, row) grid indices, origin at the bag's min."""
    g = np.floor_divide(np.asarray(coords, dtype=np.int64), int(patch_size_level0))
    if len(g):
        g = g - g.min(axis=0, keepdims=True)
    return g.astype(np.int32)
