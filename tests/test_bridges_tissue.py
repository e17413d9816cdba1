"""Tissue segmentation, fragments and holes, and the tile grid against a brute-force NumPy reference."""

import numpy as np
from PIL import Image

from mmfm.bridges.tissue import TissueConfig, TissueMask, segment_tissue, tile_grid, write_qc


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _thumb():
    """White glass with two pink tissue pieces (one with a large lumen) and a tiny speck of dust."""
    h, w = 120, 200
    img = np.full((h, w, 3), 245, np.uint8)
    a = _disk(h, w, 60, 50, 35) & ~_disk(h, w, 60, 50, 12)
    b = _disk(h, w, 60, 150, 25)
    speck = _disk(h, w, 10, 100, 1)
    for m in (a, b, speck):
        img[m] = (200, 120, 180)
    noise = np.random.default_rng(0).integers(-4, 5, size=img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8), a, b


def test_two_fragments_one_hole_and_no_speck():
    thumb, a, b = _thumb()
    cfg = TissueConfig(closing_um=8.0, min_fragment_um2=20 * 64.0, min_hole_um2=50 * 64.0)
    t = segment_tissue(thumb, 8.0, cfg)
    assert t.n_fragments == 2 and t.n_holes == 1
    assert not t.mask[10, 100]  # the speck is gone
    assert not t.mask[60, 50]  # the lumen stays a hole
    assert t.mask[60, 25] and t.mask[60, 150]
    # fragments follow raster order of their first pixel: the left piece is 1, the right one 2
    assert t.fragments[60, 25] == 1 and t.fragments[60, 150] == 2
    assert abs(t.mask.sum() - (a | b).sum()) < 0.05 * (a | b).sum()
    filled = segment_tissue(thumb, 8.0, TissueConfig(**{**cfg.__dict__, "fill_holes": True}))
    assert filled.mask[60, 50] and filled.n_fragments == 2


def test_blank_slide_has_no_tissue():
    glass = np.random.default_rng(0).integers(238, 250, size=(80, 80, 3)).astype(np.uint8)
    t = segment_tissue(glass, 8.0)
    assert t.mask.sum() == 0 and t.n_fragments == 0


def _reference_grid(mask, labels, W, H, P, min_fraction):
    """Brute force: paint every level-0 pixel from its thumbnail pixel, then average each P×P block."""
    th, tw = mask.shape
    ny, nx = -(-H // P), -(-W // P)
    rows = (np.arange(H) * th) // H
    cols = (np.arange(W) * tw) // W
    full = np.zeros((ny * P, nx * P), np.int32)  # past the slide edge: background
    full[:H, :W] = np.where(mask[rows][:, cols], labels[rows][:, cols], 0)
    blocks = full.reshape(ny, P, nx, P).transpose(0, 2, 1, 3).reshape(ny, nx, P * P)
    frac = (blocks > 0).mean(-1)
    keep = (frac >= min_fraction) & (frac > 0)
    r, c = np.nonzero(keep)
    frag = np.array([np.bincount(blocks[i, j], minlength=labels.max() + 1)[1:].argmax() for i, j in zip(r, c)])
    return np.stack([c, r], 1) * P, frac[r, c], frag


def test_tile_grid_matches_bruteforce_reference():
    thumb, _, _ = _thumb()
    t = segment_tissue(thumb, 8.0, TissueConfig(closing_um=8.0, min_fragment_um2=20 * 64.0,
                                                min_hole_um2=50 * 64.0))
    W, H = 1603, 977  # not multiples of the thumbnail or the tile size
    for P, min_fraction in [(37, 0.25), (64, 0.0), (50, 0.9)]:
        g = tile_grid(t, (W, H), P, min_fraction)
        ref_coords, ref_frac, ref_frag = _reference_grid(t.mask, t.fragments, W, H, P, min_fraction)
        np.testing.assert_array_equal(g.coords, ref_coords)
        np.testing.assert_allclose(g.fraction, ref_frac, atol=1e-9)
        np.testing.assert_array_equal(g.fragment, ref_frag)
        assert g.coords.dtype == np.int64 and len(g.coords) > 0
    assert set(tile_grid(t, (W, H), 37, 0.25).fragment) == {0, 1}


def test_qc_png_shows_grid(tmp_path):
    thumb, _, _ = _thumb()
    t = segment_tissue(thumb, 8.0, TissueConfig(closing_um=8.0, min_fragment_um2=1280.0))
    g = tile_grid(t, (1600, 960), 80, 0.5)
    path = write_qc(tmp_path / "qc" / "s.png", thumb, t, g, (1600, 960), 80)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (600, 1000, 3)  # 120×200 thumbnail upscaled ×5 so tiles are visible
    x, y = g.coords[0] * 1000 // 1600  # each kept tile is outlined in its fragment's colour
    assert tuple(img[y, x]) == (31, 119, 180) and g.fragment[0] == 0
    assert tuple(img[5, 5]) != (31, 119, 180)
    assert not list((tmp_path / "qc").glob(".*"))  # no temp file left behind


def test_empty_mask_gives_empty_grid():
    z = np.zeros((10, 10), bool)
    g = tile_grid(TissueMask(z, z.astype(np.int32), 0, 0, 1.0), (100, 100), 16, 0.0)
    assert g.coords.shape == (0, 2) and g.fragment.shape == (0,)
