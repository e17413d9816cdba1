"""Tissue segmentation on a thumbnail at a resolution tied to the tile size, the tile grid over it, and the QC picture.

Otsu on the HSV saturation channel (stained tissue is saturated, glass and background are not), closing to join
nearby tissue, small specks and small holes removed, then connected components give tissue fragments (one index
per tile, for fragment-aware encoders) and the enclosed background gives holes (excluded unless `fill_holes`).

A level-0 pixel (x, y) belongs to thumbnail pixel (x·tw // W, y·th // H); a tile's tissue fraction is the share of
its level-0 footprint whose thumbnail pixel is tissue (outside the slide counts as background). This definition
is exact and separable, so all tile fractions are one matrix product `Wy @ mask @ Wxᵀ`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import filters, measure, morphology

from mmfm.io import atomic_path


@dataclass(frozen=True)
class TissueConfig:
    """Where the mask is computed and what it keeps.

    Resolution: (tile side in µm) / `mask_px_per_tile` µm/px — 8 µm/px for 256 px tiles at 20× (128 µm), 4 µm/px
    at 40× — so every tile spans ≥ `mask_px_per_tile` mask pixels a side whatever --mag / --patch_size say
    (a fixed 8 µm/px thumbnail gave a 64 px tile at 40× two mask pixels). Never finer than the scan; coarser
    only where the mask would pass `max_mask_mpx` megapixels (a scan area over 64 × 64 mm at 20× / 256 px).

    Smallest fragment kept: `min_fragment_um2`, by default `min_tissue_fraction` of one tile — 0.25 × 128² =
    4096 µm² at 20× / 256 px, a 64 × 64 µm piece or a disc of 36 µm radius, 8 × 8 mask pixels. That is the
    smallest piece that can give a tile on its own, so no fragment able to yield a tile is dropped as a speck
    (the old fixed 2·10⁴ µm² floor dropped a disc of 70 µm radius that fills 94 % of a tile), and lowering
    `min_tissue_fraction` keeps smaller pieces too. Pieces under about three mask pixels across (≈ 24 µm at
    20× / 256 px) fade in the 1-pixel blur before the threshold whatever the floor.
    """

    mask_px_per_tile: int = 16  # mask pixels along one tile side (sets the mask's µm/px from the tile size)
    max_mask_mpx: float = 64.0  # cap on the mask size in megapixels (memory, time), coarsening it beyond
    min_saturation: float = 0.05  # floor for the Otsu threshold: a blank slide must not split its noise
    closing_um: float = 32.0  # radius joining tissue pieces closer than this
    min_fragment_um2: float | None = None  # drop specks smaller than this; None: min_tissue_fraction of a tile
    min_hole_um2: float = 2e4  # holes smaller than this are filled
    fill_holes: bool = False  # True: tiles inside large holes (lumina, tears) count as tissue
    min_tissue_fraction: float = 0.25  # a tile needs at least this share of tissue

    def mask_mpp(self, tile_um: float, level0_mpp: float, level0_size: tuple[int, int]) -> float:
        """µm/px of the mask for tiles `tile_um` µm wide on a scan of `level0_mpp` µm/px and `level0_size` px."""
        W, H = level0_size
        cap = level0_mpp * math.sqrt(W * H / (self.max_mask_mpx * 1e6))
        return max(tile_um / self.mask_px_per_tile, level0_mpp, cap)

    def fragment_floor_um2(self, tile_um: float) -> float:
        """The smallest fragment area kept, in µm² (see the class docstring)."""
        return self.min_tissue_fraction * tile_um**2 if self.min_fragment_um2 is None else self.min_fragment_um2


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


def segment_tissue(thumb: np.ndarray, thumb_mpp: float, cfg: TissueConfig = TissueConfig(),
                   tile_um: float = 128.0) -> TissueMask:
    """Tissue mask, fragments and holes of an RGB thumbnail at `thumb_mpp` µm/px, for tiles `tile_um` µm wide
    (the default fragment floor is a share of a tile)."""
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
    min_px = int(cfg.fragment_floor_um2(tile_um) / px_area)
    mask = morphology.remove_small_objects(mask, max_size=max(0, min_px - 1), connectivity=2)
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
