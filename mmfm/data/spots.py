"""Spot tables of spatial transcriptomics (Visium, HEST-1k): one AnnData per slide, matched to the slide's tiles.

Contract (data_cards/cohort_format.md, slides.csv column `spots`): obs = spots (unique ids, e.g. barcodes);
`obsm['spatial']` [S, 2] = spot centre (x, y) in LEVEL-0 pixels of the slide the tiles were cut from (scanpy's
Visium convention: full-resolution pixels); `uns['spot_diameter_px']` = spot diameter in level-0 pixels; counts in
`layers['counts']` or X (finite, >= 0), var_names = genes, unique.

A spot belongs to the tile that contains its centre (tiles [x, x + s) × [y, y + s), level-0 top-left corners, as
in the bags); a spot whose centre lies on no tile (background, a tile filtered out) matches none. A Visium spot
(55 µm) is smaller than a 20× 256-px tile (128 µm), so a tile holds one to a few spots; HEST-Benchmark instead cuts
a patch centred on every spot — with grid tiles the containing tile is the closest equivalent.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
from scipy.spatial import cKDTree

from mmfm.data.omics import counts_of

MIN_MATCHED = 0.5  # below this share of spots on tiles the validation warns (coordinates at another level?)


class SpotError(ValueError):
    """A spot table that breaks the contract; the message names the file and key."""


def read_spots(path: str | Path, counts: bool = True) -> ad.AnnData:
    """A spot table checked against the contract: coordinates, diameter and (`counts`) the counts (counts_of's
    checks). `counts=False` reads the table backed, leaving X on disk (a header check of a large Visium HD table)."""
    path = Path(path)
    try:
        a = ad.read_h5ad(path, backed=None if counts else "r")
    except (OSError, KeyError, ValueError) as e:
        raise SpotError(f"{path}: unreadable spot table ({e})") from e
    try:
        _check(a, path, counts)
    finally:
        if not counts:
            a.file.close()
    return a


def _check(a: ad.AnnData, path: Path, counts: bool) -> None:
    if "spatial" not in a.obsm:
        raise SpotError(f"{path}: obsm['spatial'] (spot centres, level-0 px) missing")
    xy = np.asarray(a.obsm["spatial"], np.float64)
    if xy.shape != (a.n_obs, 2) or not np.isfinite(xy).all():
        raise SpotError(f"{path}: obsm['spatial'] must be finite [n_spots, 2], got shape {xy.shape}"
                        f"{'' if np.isfinite(xy).all() else ' with NaN/inf'}")
    d = a.uns.get("spot_diameter_px")
    if d is None or not np.isscalar(d) or not np.isfinite(float(d)) or float(d) <= 0:
        raise SpotError(f"{path}: uns['spot_diameter_px'] (spot diameter, level-0 px) must be a positive number, "
                        f"got {d!r}")
    if not a.obs_names.is_unique:
        raise SpotError(f"{path}: spot ids (obs_names) must be unique")
    if counts:
        try:
            counts_of(a)
        except ValueError as e:
            raise SpotError(f"{path}: {e}") from e


def match_spots(centres: np.ndarray, tile_xy: np.ndarray, tile_size: float) -> np.ndarray:
    """Row of the tile containing each spot centre (tile [x, x + s) × [y, y + s)), -1 where none does.

    Tiles of one bag do not overlap, so the containing tile is the nearest tile centre in the max-norm; the
    half-open check assigns a centre on a shared edge to the tile right of / below it."""
    centres = np.asarray(centres, np.float64).reshape(-1, 2)
    if not len(tile_xy) or not len(centres):
        return np.full(len(centres), -1, np.int64)
    tile_xy = np.asarray(tile_xy, np.float64)
    # nudge by a tiny amount so a centre on a shared edge finds the tile it belongs to (half-open), not a tie
    _, idx = cKDTree(tile_xy + tile_size / 2).query(centres + 1e-6 * tile_size, p=np.inf)
    d = centres - tile_xy[idx]
    inside = (d >= 0).all(1) & (d < tile_size).all(1)
    return np.where(inside, idx, -1).astype(np.int64)
