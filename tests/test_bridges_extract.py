"""`mmfm extract` end to end on the real SVS: a valid cohort, tiles exactly where the tissue mask says, features
equal to encoding the tiles directly, failures reported, resume, sharding, and the random-init flag."""

import json

import h5py
import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

from mmfm.bridges.encoders import REGISTRY, build_model, encode, load_encoder
from mmfm.bridges.extract import parse_shard, shard_of
from mmfm.bridges.readers import open_slide
from mmfm.bridges.tissue import TissueConfig, segment_tissue
from mmfm.cli import main
from mmfm.data.cohort import Cohort, validate

SLIDE = "CMU-1-Small-Region"


def _extract(wsi, out, *extra, weights=None):
    init = ["--weights", str(weights)] if weights else ["--random-init"]
    return main(["extract", "--wsi-dir", str(wsi), "--out", str(out), "--encoder", "vit-test", *init,
                 "--mag", "20", "--patch-size", "256", "--workers", "0", "--batch-size", "16", "--no-progress",
                 *extra])


def _summary(out, shard="0-of-1"):
    return json.loads((out / f"extract_summary_{shard}.json").read_text())


@pytest.fixture(scope="module")
def svs_run(tmp_path_factory, wsi_dir):
    """The real SVS and the corrupt one side by side (symlinks: fixtures are never copied)."""
    wsi = tmp_path_factory.mktemp("wsi")
    for name in (f"{SLIDE}.svs", "broken.svs"):
        (wsi / name).symlink_to(wsi_dir / name)
    out = tmp_path_factory.mktemp("cohort")
    rc = _extract(wsi, out)
    return wsi, out, rc


def test_real_svs_gives_valid_cohort_and_broken_file_is_reported(svs_run):
    wsi, out, rc = svs_run
    assert rc == 1  # one slide failed
    s = _summary(out)
    by_id = {r["slide_id"]: r for r in s["slides"]}
    assert by_id[SLIDE]["status"] == "ok" and by_id[SLIDE]["n_tiles"] > 20
    assert by_id["broken"]["status"] == "failed" and "broken.svs" in by_id["broken"]["reason"]
    assert (s["n_ok"], s["n_failed"], s["random_init_weights"]) == (1, 1, True)
    st, n = s["stages"], by_id[SLIDE]["n_tiles"]  # per-stage timing: the broken slide fails at its mask
    assert [st[k]["tiles"] for k in ("mask", "read", "encode", "write")] == [n] * 4 == [s["tiles_encoded"]] * 4
    loop_s = s["tiles_encoded"] / s["tiles_per_s"]  # the encode loop's wall time holds its stages (workers=0)
    assert sum(st[k]["seconds"] for k in ("encode", "write", "reader_wait")) <= loop_s
    assert st["read"]["seconds"] <= st["reader_wait"]["seconds"] and min(v["seconds"] for v in st.values()) > 0
    rep = validate(out)
    assert rep.ok, rep.format()
    cohort = Cohort.open(out)
    row = cohort.slides.loc[SLIDE]
    assert (row["n_tiles"], row["patch_size_level0"]) == (by_id[SLIDE]["n_tiles"], 257)
    slides = pd.read_csv(out / "slides.csv")
    assert slides.to_dict("records") == [{"slide_id": SLIDE, "case_id": SLIDE, "path": f"bags/{SLIDE}.h5"}]
    cases = pd.read_csv(out / "cases.csv", dtype=str, keep_default_na=False)
    assert cases.to_dict("records") == [{"case_id": SLIDE, "site": ""}]  # not a TCGA name: site unknown
    spec = yaml.safe_load((out / "cohort.yaml").read_text())
    assert spec["tile_encoder"] == {"name": "vit-test", "feature_dim": 64}
    assert (spec["target_magnification"], spec["patch_size"]) == (20.0, 256)
    assert Image.open(out / "qc" / f"{SLIDE}.png").size[0] > 500
    assert not list((out / "bags").glob(".*"))  # no temp files left


def _mask_reference(path):
    """Tile coords/fragments recomputed from the tissue mask by painting level 0 and averaging blocks."""
    cfg = TissueConfig()
    P = int(round(256 * 0.5 / 0.499))
    with open_slide(path) as r:
        W, H = r.dimensions
        thumb, _ = r.thumbnail(P * r.mpp / 16)  # 16 mask pixels per tile side
        tissue = segment_tissue(thumb, r.mpp * W / thumb.shape[1], cfg, tile_um=P * r.mpp)
    th, tw = tissue.mask.shape
    lab = np.where(tissue.mask, tissue.fragments, 0)[(np.arange(H) * th) // H][:, (np.arange(W) * tw) // W]
    ny, nx = -(-H // P), -(-W // P)
    full = np.zeros((ny * P, nx * P), np.int32)
    full[:H, :W] = lab
    blocks = full.reshape(ny, P, nx, P).transpose(0, 2, 1, 3).reshape(ny, nx, -1)
    frac = (blocks > 0).mean(-1)
    r, c = np.nonzero((frac >= cfg.min_tissue_fraction) & (frac > 0))
    frag = [np.bincount(blocks[i, j], minlength=tissue.n_fragments + 1)[1:].argmax() for i, j in zip(r, c)]
    return P, np.stack([c, r], 1) * P, np.array(frag)


def test_tiles_are_where_the_tissue_mask_says(svs_run, wsi_dir):
    _, out, _ = svs_run
    P, coords, frag = _mask_reference(wsi_dir / f"{SLIDE}.svs")
    with h5py.File(out / "bags" / f"{SLIDE}.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], coords)
        np.testing.assert_array_equal(f["fragment"][:], frag)
        a = dict(f["coords"].attrs)
        assert a["patch_size_level0"] == P == 257 and a["patch_size"] == 256
        assert a["level0_width"] == 2220 and a["level0_height"] == 2967
        assert a["level0_magnification"] == pytest.approx(10 / 0.499) and a["target_magnification"] == 20.0


def test_features_equal_direct_encoding_and_are_flagged_untrained(svs_run, wsi_dir):
    _, out, _ = svs_run
    with h5py.File(out / "bags" / f"{SLIDE}.h5", "r") as f:
        feats, coords = f["features"][:], f["coords"][:]
        assert f.attrs["random_init_weights"] == True  # noqa: E712 (numpy bool)
        assert f["features"].attrs["encoder"] == "vit-test" and f["features"].attrs["weights"] == "random-init"
    slide = openslide.OpenSlide(str(wsi_dir / f"{SLIDE}.svs"))
    white = Image.new("RGBA", (257, 257), (255, 255, 255, 255))  # bottom-row tiles reach past the slide edge

    def tile(x, y):
        region = Image.alpha_composite(white, slide.read_region((int(x), int(y)), 0, (257, 257)))
        return np.asarray(region.convert("RGB").resize((256, 256), Image.BILINEAR))

    assert coords[:, 1].max() + 257 > 2967
    tiles = np.stack([tile(x, y) for x, y in coords])
    ref = encode(load_encoder("vit-test", random_init=True), torch.from_numpy(tiles), torch.float32).numpy()
    assert feats.shape == (len(coords), 64) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-4)


def test_resume_skips_complete_and_redoes_truncated(tmp_path, wsi_dir):
    """Also the one multi-process run: workers=1 must give the same bag as the in-process reader."""
    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    wsi.mkdir()
    (wsi / f"{SLIDE}.svs").symlink_to(wsi_dir / f"{SLIDE}.svs")
    assert _extract(wsi, out, "--workers", "1") == 0
    bag = out / "bags" / f"{SLIDE}.h5"
    first = h5py.File(bag, "r")["features"][:]
    mtime = bag.stat().st_mtime_ns
    assert _extract(wsi, out) == 0
    assert _summary(out)["slides"][0]["status"] == "skipped" and bag.stat().st_mtime_ns == mtime
    bag.write_bytes(bag.read_bytes()[: bag.stat().st_size // 2])  # a bag cut short by a crashed copy
    leftover = out / "bags" / f".{SLIDE}.h5.abc123.h5.tmp"  # temp file of a killed run
    leftover.write_bytes(b"partial")
    assert _extract(wsi, out) == 0
    assert _summary(out)["slides"][0]["status"] == "ok" and not leftover.exists()
    np.testing.assert_allclose(h5py.File(bag, "r")["features"][:], first, rtol=1e-5, atol=1e-5)
    assert len(pd.read_csv(out / "slides.csv")) == 1
    # real weights later: the random-init bag is not "complete" for this run, it is redone and unflagged
    torch.manual_seed(7)
    weights = tmp_path / "vit-test.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(REGISTRY["vit-test"]).state_dict().items()}, weights)
    assert _extract(wsi, out, weights=weights) == 0
    assert _summary(out)["slides"][0]["status"] == "ok"
    with h5py.File(bag, "r") as f:
        assert f.attrs["random_init_weights"] == False  # noqa: E712
        assert f["features"].attrs["weights"] == str(weights.resolve())
        assert not np.allclose(f["features"][:], first)
    assert _extract(wsi, out, weights=weights) == 0 and _summary(out)["slides"][0]["status"] == "skipped"
    assert _extract(wsi, out, "--random-init", weights=weights) == 2  # both: refused


def _png_slides(d, n=4):
    ihc = skdata.immunohistochemistry()
    d.mkdir()
    for i in range(n):
        Image.fromarray(ihc[i * 32: i * 32 + 384, i * 32: i * 32 + 384]).save(d / f"s{i}.png")


def test_shards_partition_the_slides_and_share_the_tables(tmp_path):
    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    _png_slides(wsi)
    pd.DataFrame({"slide_id": ["s0", "s1", "s2", "s3"], "case_id": ["A", "A", "B", "B"]}).to_csv(
        tmp_path / "map.csv", index=False)
    for i in range(2):
        assert _extract(wsi, out, "--mpp", "0.5", "--shard", f"{i}/2", "--case-map", str(tmp_path / "map.csv")) == 0
    got = [{r["slide_id"] for r in _summary(out, f"{i}-of-2")["slides"]} for i in range(2)]
    assert got[0] & got[1] == set() and got[0] | got[1] == {"s0", "s1", "s2", "s3"}
    assert got == [{"s0", "s2"}, {"s1", "s3"}]
    slides = pd.read_csv(out / "slides.csv")
    assert list(slides["slide_id"]) == ["s0", "s1", "s2", "s3"] and list(slides["case_id"]) == ["A", "A", "B", "B"]
    assert list(pd.read_csv(out / "cases.csv")["case_id"]) == ["A", "B"]
    rep = validate(out)
    assert rep.ok, rep.format()
    # a cohort holds one encoder and one tile geometry: mixing is refused with the key named
    assert _extract(wsi, out, "--mpp", "0.5", "--patch-size", "224") == 2


def test_missing_mpp_is_a_clear_per_slide_error(tmp_path, capsys):
    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    _png_slides(wsi, n=2)
    assert _extract(wsi, out) == 1
    reasons = [r["reason"] for r in _summary(out)["slides"]]
    assert all("--mpp" in r and ".png" in r for r in reasons) and len(reasons) == 2
    assert "FAILED s0" in capsys.readouterr().err


def test_shard_arithmetic():
    items = list(range(11))
    parts = [shard_of(items, (i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == items and sum(map(len, parts)) == len(items)
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "1", "a/b", "-1/2"):
        with pytest.raises(Exception, match="shard"):
            parse_shard(bad)


def _blob_pyramid(path, corrupt_level0=False):
    """Pyramidal TIFF (0.25 µm/px) with pink tissue on glass; optionally garbage in every level-0 tile."""
    h, w = 1024, 1536
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), 240, np.uint8)
    img[(yy - 500) ** 2 + (xx - 700) ** 2 < 400**2] = (190, 110, 170)
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            res = 1e4 / (0.25 * 2**k)
            tw.write(np.ascontiguousarray(img[:: 2**k, :: 2**k]), tile=(256, 256), photometric="rgb",
                     compression="zlib", resolution=(res, res), resolutionunit="CENTIMETER",
                     subfiletype=0 if k == 0 else 1)
    if corrupt_level0:
        with tifffile.TiffFile(path) as tf:
            spans = list(zip(tf.pages[0].dataoffsets, tf.pages[0].databytecounts))
        with open(path, "r+b") as f:
            for off, n in spans:
                f.seek(off)
                f.write(b"\xff" * n)


def test_bad_tiles_and_blank_slides_fail_alone(tmp_path):
    """A slide whose thumbnail reads but whose level-0 tiles are corrupt, and a blank slide, are reported;
    the good slide in the same run is written."""
    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    wsi.mkdir()
    _blob_pyramid(wsi / "a_corrupt.tif", corrupt_level0=True)
    _blob_pyramid(wsi / "b_good.tif")
    Image.fromarray(np.full((600, 600, 3), 243, np.uint8)).save(wsi / "c_blank.png")
    assert _extract(wsi, out, "--mag", "40", "--mpp", "0.25") == 1
    by_id = {r["slide_id"]: r for r in _summary(out)["slides"]}
    assert by_id["b_good"]["status"] == "ok" and by_id["b_good"]["n_tiles"] > 0
    assert by_id["a_corrupt"]["status"] == "failed" and "reading tiles" in by_id["a_corrupt"]["reason"]
    assert by_id["c_blank"]["status"] == "failed" and "no tissue" in by_id["c_blank"]["reason"]
    assert list(pd.read_csv(out / "slides.csv")["slide_id"]) == ["b_good"]
    assert not (out / "bags" / "a_corrupt.h5").exists() and (out / "qc" / "c_blank.png").exists()
    # the good slide's file is later replaced by a corrupt one and its bag lost: a run with no bag changes no
    # table, so validate names the lost bag instead of accepting an empty cohort
    (wsi / "b_good.tif").write_bytes((wsi / "a_corrupt.tif").read_bytes())
    (out / "bags" / "b_good.h5").unlink()
    assert _extract(wsi, out, "--mag", "40", "--mpp", "0.25") == 1
    assert list(pd.read_csv(out / "slides.csv")["slide_id"]) == ["b_good"]
    rep = validate(out)
    assert not rep.ok and "bags/b_good.h5 missing" in rep.format()


def test_cli_flags_aliases_and_user_errors(tmp_path, capsys):
    """Flags are the ExtractConfig fields (`-` or `_`); --min-tissue / --fill-holes stay as aliases of the tissue
    keys; a user error is one line on stderr and exit 2."""
    from mmfm.cli import extract as command
    from mmfm.config import parse_cli

    cfg = parse_cli(command.Config, ["--wsi-dir", "w", "--out", "o", "--encoder", "uni", "--min-tissue", "0.3",
                                     "--fill-holes", "--shard", "1/2", "--no-progress", "--set", "tissue.mask_px_per_tile=8"],
                    aliases=command.ALIASES)
    assert (str(cfg.wsi_dir), str(cfg.out), cfg.encoder, cfg.shard, cfg.progress) == ("w", "o", "uni", "1/2", False)
    assert cfg.tissue == TissueConfig(min_tissue_fraction=0.3, fill_holes=True, mask_px_per_tile=8)
    capsys.readouterr()
    assert main(["extract", "--wsi-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                 "--encoder", "vit-test", "--random-init"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmfm extract: error: ") and "none" in err and err.count("\n") == 1
    assert main(["extract", "--out", str(tmp_path / "o"), "--encoder", "vit-test", "--min-tissue", "lots"]) == 2
    assert "min_tissue_fraction" in capsys.readouterr().err


def test_a_slide_claimed_by_a_live_worker_is_left_to_it_and_done_by_the_next_run(tmp_path):
    """Workers over one slide list share it by per-slide locks: a slide another live worker holds is not touched
    (no bag, no table row from this run, its temp file kept); once that worker is gone, a re-run does that slide
    only, and the cohort is whole."""
    import socket
    import subprocess
    import sys

    from mmfm.locks import _start_ticks

    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    _png_slides(wsi, n=3)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / "bags").mkdir(parents=True)
        (out / "bags" / ".s1.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid,
                                                           "start": _start_ticks(other.pid), "since": "now"}))
        (out / "bags" / ".s1.h5.abc.tmp").write_text("the other worker's bag, half written")
        assert _extract(wsi, out, "--mpp", "0.5") == 0
        first = next(out.glob("extract_summary_0-of-1.*.json"))
        got = {r["slide_id"]: r["status"] for r in json.loads(first.read_text())["slides"]}
        assert got == {"s0": "ok", "s1": "claimed", "s2": "ok"}
        assert f"in use by pid {other.pid}" in json.loads(first.read_text())["slides"][1]["reason"]
        assert not (out / "bags" / "s1.h5").exists() and (out / "bags" / ".s1.h5.abc.tmp").exists()
        assert list(pd.read_csv(out / "slides.csv")["slide_id"]) == ["s0", "s2"]
        assert not (out / "bags" / ".s0.lock").exists()  # its own claims released
    finally:
        other.kill()
        other.wait()
    assert _extract(wsi, out, "--mpp", "0.5") == 0  # the claim's owner is gone: taken over
    got = {r["slide_id"]: r["status"] for r in _summary(out)["slides"]}
    assert got == {"s0": "skipped", "s1": "ok", "s2": "skipped"}
    assert list(pd.read_csv(out / "slides.csv")["slide_id"]) == ["s0", "s1", "s2"]
    assert not list((out / "bags").glob(".*"))  # no lock or temp file left
    assert validate(out).ok
