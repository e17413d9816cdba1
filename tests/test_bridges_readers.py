"""Slide readers: exact MPP → tile geometry, pyramid level choice, backends, and clear errors."""

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from skimage import data as skdata

from mmfm.bridges.readers import SlideError, best_level, open_slide
from mmfm.data.bags import patch_size_level0


def test_patch_size_level0_is_exact_from_mpp():
    assert patch_size_level0(256, 20, 0.499) == 257  # CMU-1: 256 · 0.5 / 0.499 = 256.5
    assert patch_size_level0(256, 20, 0.25) == 512
    assert patch_size_level0(224, 20, 0.265) == 423  # TRIDENT's 40× bucket would say 448 (its issue #119)
    assert patch_size_level0(512, 10, 0.5) == 1024


def test_best_level_is_coarsest_not_coarser_than_needed():
    ds = (1.0, 2.0, 4.0, 8.02)
    assert best_level(ds, 0.5) == 0
    assert best_level(ds, 1.9) == 0
    assert best_level(ds, 2.0) == 1
    assert best_level(ds, 3.0) == 1
    assert best_level(ds, 8.0) == 2  # 8.02 would read coarser than asked
    assert best_level((1.0, 4.000001), 4.0) == 1  # rounding noise in stored downsamples is tolerated


def test_real_svs_reads_like_openslide(wsi_dir):
    path = wsi_dir / "CMU-1-Small-Region.svs"
    with open_slide(path) as r:
        assert r.backend == "openslide" and r.dimensions == (2220, 2967) and r.mpp == pytest.approx(0.499)
        tile = r.read_tile((771, 514), 257, 256)
    ref = np.asarray(openslide.OpenSlide(str(path)).read_region((771, 514), 0, (257, 257)).convert("RGB"))
    ref = np.asarray(Image.fromarray(ref).resize((256, 256), Image.BILINEAR))
    assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
    np.testing.assert_array_equal(tile, ref)


def _pyramid(path, mpp0=0.25, size=(1536, 2048), levels=3):
    """Tiled pyramidal TIFF whose level k has blue = 10 + 100k (which level was read is visible in pixels)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=size + (3,), dtype=np.uint8)
    imgs = []
    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            img = np.ascontiguousarray(base[:: 2**k, :: 2**k])
            img[..., 2] = 10 + 100 * k
            imgs.append(img)
            res = 1e4 / (mpp0 * 2**k)
            tw.write(img, tile=(128, 128), photometric="rgb", compression="zlib", resolution=(res, res),
                     resolutionunit="CENTIMETER", subfiletype=0 if k == 0 else 1)
    return imgs


def test_pyramidal_tiff_picks_right_level(tmp_path):
    path = tmp_path / "pyr.tif"
    imgs = _pyramid(path)
    with open_slide(path) as r:
        assert r.level_downsamples == (1.0, 2.0, 4.0) and r.mpp == pytest.approx(0.25)
        for mag, blue in [(40, 10), (30, 10), (20, 110), (15, 110), (10, 210), (7, 210)]:
            size0 = patch_size_level0(256, mag, r.mpp)
            tile = r.read_tile((0, 0), size0, 256)
            assert tile.shape == (256, 256, 3)
            assert np.all(tile[..., 2] == blue), (mag, np.unique(tile[..., 2]))
        # 20×: level 1 holds exactly the needed pixels, so no resampling happens
        tile = r.read_tile((512, 256), 512, 256)
        np.testing.assert_array_equal(tile, imgs[1][128:384, 256:512])


def test_stripped_tiff_falls_back_to_tiffslide(tmp_path):
    path = tmp_path / "flat.tif"
    img = np.random.default_rng(1).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(path, img, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as r:
        assert r.backend == "tiffslide" and r.mpp == pytest.approx(0.5) and r.dimensions == (400, 300)
        np.testing.assert_array_equal(r.read_region((10, 20), 0, (50, 40)), img[20:60, 10:60])


def test_png_needs_mpp_and_then_reads_pixels(tmp_path):
    ihc = skdata.immunohistochemistry()
    path = tmp_path / "ihc.png"
    Image.fromarray(ihc).save(path)
    with pytest.raises(SlideError, match=r"ihc\.png.*--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as r:
        assert r.backend == "image" and r.mpp == 0.5 and r.dimensions == (512, 512)
        np.testing.assert_array_equal(r.read_region((100, 50), 0, (64, 32)), ihc[50:82, 100:164])
        edge = r.read_region((500, 500), 0, (20, 20))  # past the image: white, not garbage
        np.testing.assert_array_equal(edge[:12, :12], ihc[500:, 500:])
        assert np.all(edge[12:] == 255) and np.all(edge[:, 12:] == 255)


def test_file_mpp_wins_over_fallback_mpp(wsi_dir):
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs", mpp=0.25) as r:
        assert r.mpp == pytest.approx(0.499)


def test_corrupt_and_missing_files_are_clear_errors(wsi_dir, tmp_path):
    with pytest.raises(SlideError, match=r"broken\.svs: unsupported or corrupt slide"):
        open_slide(wsi_dir / "broken.svs")
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "nope.svs")


def test_thumbnail_reads_best_level_in_strips(tmp_path):
    path = tmp_path / "pyr.tif"
    imgs = _pyramid(path)
    with open_slide(path) as r:
        whole, (tw, th) = r.thumbnail(2.0)  # needs downsample 8: read level 2 (×4), then halve
        strips, _ = r.thumbnail(2.0, strip_bytes=4 * 512 * 32)  # 12 strips of 32 level-2 rows
        odd, _ = r.thumbnail(2.0, strip_bytes=4 * 512 * 37)
    assert (tw, th) == (256, 192) and whole.shape == (192, 256, 3)
    ref = np.asarray(Image.fromarray(imgs[2]).resize((256, 192), Image.BOX))
    np.testing.assert_array_equal(whole, ref)
    assert np.all(whole[..., 2] == 210)  # nothing was read from the finer levels
    np.testing.assert_array_equal(strips, whole)  # strip edges on output-row edges: identical
    assert odd.shape == whole.shape and np.all(odd[..., 2] == 210)
