"""Tissue segmentation on a low-resolution thumbnail, the tile grid over it, and the QC picture.

Otsu on the HSV saturation channel (stained tissue is saturated, glass and background are not), closing to join
nearby tissue, small specks and small holes removed, then connected components give tissue fragments (one index
per tile, for fragment-aware encoders) and the enclosed background gives holes (excluded unless `fill_holes`).

A level-0 pixel (x, y) belongs to thumbnail pixel (x·tw // W, y·th // H); a tile's tissue fraction is the share of
its level-0 footprint whose thumbnail pixel is tissue (outside the slide counts as background). This definition
is exact and separable, so all tile fractions are one matrix product `Wy @ mask @ Wxᵀ`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import filters, measure, morphology

from mmfm.io import atomic_path


@dataclass(frozen=True)
class TissueConfig:
    thumb_mpp: float = 8.0  # ≈1.25×, where Otsu segmentation is usually run
    min_saturation: float = 0.05  # floor for the Otsu threshold: a blank slide must not split its noise
    closing_um: float = 32.0  # radius joining tissue pieces closer than this
    min_fragment_um2: float = 2e4  # drop specks (dust, debris) smaller than this
    min_hole_um2: float = 2e4  # holes smaller than this are filled
    fill_holes: bool = False  # True: tiles inside large holes (lumina, tears) count as tissue
    min_tissue_fraction: float = 0.25  # a tile needs at least this share of tissue


@dataclass(frozen=True)
class TissueMask:
    mask: np.ndarray  # bool [th, tw] at the thumbnail
    fragments: np.ndarray  # int32 [th, tw]: 0 background, k = fragment k-1
    n_fragments: int
    n_holes: int
    threshold: float  # saturation threshold used


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1]: (max - min) / max, 0 where the pixel is black."""
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    return np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)


def segment_tissue(thumb: np.ndarray, thumb_mpp: float, cfg: TissueConfig = TissueConfig()) -> TissueMask:
    """Tissue mask, fragments and holes of an RGB thumbnail at `thumb_mpp` µm/px."""
    sat = filters.gaussian(saturation(thumb), sigma=1.0)
    try:
        thr = float(filters.threshold_otsu(sat))
    except ValueError:  # constant image
        thr = 1.0
    thr = max(thr, cfg.min_saturation)
    mask = sat > thr
    px_area = thumb_mpp**2
    radius = int(round(cfg.closing_um / thumb_mpp))
    if radius > 0:
        mask = morphology.closing(mask, morphology.disk(radius))
    mask = morphology.remove_small_objects(mask, max_size=max(0, int(cfg.min_fragment_um2 / px_area) - 1),
                                         connectivity=2)
    mask = morphology.remove_small_holes(mask, max_size=max(0, int(cfg.min_hole_um2 / px_area) - 1))
    holes = ndimage.binary_fill_holes(mask) & ~mask
    n_holes = int(measure.label(holes, connectivity=1).max())
    if cfg.fill_holes:
        mask = mask | holes
    frags = measure.label(mask, connectivity=2).astype(np.int32)
    return TissueMask(mask=mask, fragments=frags, n_fragments=int(frags.max()), n_holes=n_holes, threshold=thr)


def _axis_weights(extent: int, thumb_len: int, step: int) -> np.ndarray:
    """[n_tiles, thumb_len]: how many level-0 pixels of tile i fall on thumbnail pixel j along one axis."""
    n_tiles = -(-extent // step)
    x = np.arange(extent, dtype=np.int64)
    out = np.zeros((n_tiles, thumb_len), np.float64)
    np.add.at(out, (x // step, (x * thumb_len) // extent), 1.0)
    return out


@dataclass(frozen=True)
class TileGrid:
    coords: np.ndarray  # int64 [N, 2] level-0 top-left (x, y), row-major order
    fraction: np.ndarray  # float64 [N] tissue share of each tile
    fragment: np.ndarray  # int32 [N] dominant fragment index (0-based)


def tile_grid(tissue: TissueMask, level0_size: tuple[int, int], size_level0: int,
              min_fraction: float) -> TileGrid:
    """Non-overlapping tiles of `size_level0` level-0 px whose tissue share is ≥ `min_fraction` (and > 0)."""
    W, H = level0_size
    th, tw = tissue.mask.shape
    wx = _axis_weights(W, tw, size_level0)
    wy = _axis_weights(H, th, size_level0)
    frac = wy @ tissue.mask.astype(np.float64) @ wx.T / float(size_level0) ** 2
    keep = (frac >= min_fraction - 1e-12) & (frac > 0)
    rows, cols = np.nonzero(keep)
    frag = np.empty(len(rows), np.int32)
    n_labels = tissue.n_fragments + 1
    for i, (r, c) in enumerate(zip(rows, cols)):
        ys, xs = np.flatnonzero(wy[r]), np.flatnonzero(wx[c])
        block = tissue.fragments[ys[0]: ys[-1] + 1, xs[0]: xs[-1] + 1]
        w = np.outer(wy[r, ys[0]: ys[-1] + 1], wx[c, xs[0]: xs[-1] + 1])
        votes = np.bincount(block.ravel(), weights=w.ravel(), minlength=n_labels)
        frag[i] = int(np.argmax(votes[1:]))
    coords = np.stack([cols, rows], axis=1).astype(np.int64) * size_level0
    return TileGrid(coords=coords, fraction=frac[rows, cols], fragment=frag)


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def write_qc(path: str | Path, thumb: np.ndarray, tissue: TissueMask, grid: TileGrid,
             level0_size: tuple[int, int], size_level0: int, min_side: int = 1024) -> Path:
    """QC PNG: thumbnail, tissue outline tinted, every kept tile drawn in its fragment's colour."""
    th, tw = tissue.mask.shape
    k = max(1, min_side // max(th, tw))
    img = Image.fromarray(thumb).resize((tw * k, th * k), Image.NEAREST)
    edge = tissue.mask ^ ndimage.binary_erosion(tissue.mask)
    tint = np.asarray(img).copy()
    tint[np.kron(edge, np.ones((k, k), bool))] = (0, 200, 0)
    img = Image.fromarray(tint)
    draw = ImageDraw.Draw(img)
    sx, sy = tw * k / level0_size[0], th * k / level0_size[1]
    for (x, y), f in zip(grid.coords, grid.fragment):
        draw.rectangle([x * sx, y * sy, (x + size_level0) * sx - 1, (y + size_level0) * sy - 1],
                       outline=_PALETTE[int(f) % len(_PALETTE)])
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return path
