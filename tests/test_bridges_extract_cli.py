"""`mmfm extract` as a user runs it: every bad folder / argument / weights file / case map is one stderr line and
exit 2 with nothing written; a run with no bag leaves no cohort; small fragments are kept; upsampling warns; a
corrupt slide prints only the clear message."""

import dataclasses
import json
import logging

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

from mmfm.bridges.encoders import REGISTRY, build_model
from mmfm.bridges.extract import ACCEPTED_SUFFIXES
from mmfm.bridges.tissue import TissueConfig
from mmfm.cli import main
from mmfm.data.cohort import validate

SLIDE = "CMU-1-Small-Region"
PROG = "mmfm extract"


def _run(capsys, wsi, out, *extra, init=("--random_init",)):
    rc = main(["extract", "--wsi_dir", str(wsi), "--out", str(out), "--encoder", "vit-test", *init,
               "--workers", "0", "--batch_size", "16", "--no-progress", *extra])
    got = capsys.readouterr()
    return rc, got.out, got.err


def _one_error(err: str) -> str:
    """The whole stderr must be one `mmfm extract: error: ...` line; returns its message."""
    assert err.count("\n") == 1 and err.startswith(f"{PROG}: error: "), err
    return err[len(f"{PROG}: error: "):].strip()


def _summary(out, shard="0-of-1"):
    return json.loads((out / f"extract_summary_{shard}.json").read_text())


def _glass(h, w, seed=0):
    return np.random.default_rng(seed).integers(236, 249, size=(h, w, 3)).astype(np.uint8)


def _fragment_png(path, size, centre, radius_px):
    """Glass with one pink disc of tissue; returns the disc's boolean mask (the ground truth)."""
    img = _glass(size, size)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - centre[1]) ** 2 + (xx - centre[0]) ** 2 <= radius_px**2
    img[disc] = (200, 120, 180)
    Image.fromarray(img).save(path)
    return disc


def _tiles_from_truth(disc, P, min_fraction):
    """Independent reference: the P×P grid cells whose true tissue share reaches `min_fraction`."""
    n = disc.shape[0] // P
    frac = disc[: n * P, : n * P].reshape(n, P, n, P).mean(axis=(1, 3))
    r, c = np.nonzero(frac >= min_fraction)
    return np.stack([c, r], 1) * P, frac[r, c]


def _tissue_png(path, size=384):
    Image.fromarray(skdata.immunohistochemistry()[:size, :size]).save(path)


# ---- 1. a folder without slides, a run without a bag ------------------------------------------------------------

@pytest.mark.parametrize("content", [[], ["notes.txt"]])
def test_folder_without_slides_is_an_error_naming_folder_and_suffixes(tmp_path, capsys, content):
    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    wsi.mkdir()
    for name in content:
        (wsi / name).write_text("scanned on Tuesday")
    rc, stdout, err = _run(capsys, wsi, out)
    msg = _one_error(err)
    found = "it holds only notes.txt" if content else "it is empty"
    assert rc == 2 and msg == (f"--wsi_dir {wsi}: no slides ({found}); accepted suffixes: "
                               + " ".join(ACCEPTED_SUFFIXES))
    assert ".svs" in msg and ".png" in msg and stdout == "" and not out.exists()


def test_run_where_every_slide_failed_writes_no_cohort_and_keeps_earlier_bags(tmp_path, capsys, wsi_dir):
    """Fresh --out: no cohort files (validate refuses the folder). Existing cohort: its bags and tables are kept
    byte for byte, and the run still exits 1 with the error line."""
    bad, out = tmp_path / "bad", tmp_path / "cohort"
    bad.mkdir()
    (bad / "broken.svs").symlink_to(wsi_dir / "broken.svs")
    Image.fromarray(_glass(300, 300)).save(bad / "blank.png")
    rc, stdout, err = _run(capsys, bad, out, "--mpp", "0.5")
    assert rc == 1 and json.loads(stdout)["n_failed"] == 2
    lines = err.splitlines()
    assert [x.split(":")[0] for x in lines[:2]] == ["FAILED blank", "FAILED broken"]
    assert lines[2] == (f"{PROG}: error: no slide gave a bag (2 failed, listed above); no cohort files were "
                        f"written; details in {out / 'extract_summary_0-of-1.json'}") and len(lines) == 3
    assert not any((out / f).exists() for f in ("cohort.yaml", "slides.csv", "cases.csv"))
    assert _summary(out)["n_bags"] == 0 and (out / "qc" / "blank.png").exists()
    assert not validate(out).ok

    good = tmp_path / "good"
    good.mkdir()
    _tissue_png(good / "s0.png")
    assert _run(capsys, good, out, "--mpp", "0.5")[0] == 0
    before = {p.name: p.read_bytes() for p in [out / "slides.csv", out / "cases.csv", out / "cohort.yaml",
                                                out / "bags" / "s0.h5"]}
    rc, _, err = _run(capsys, bad, out, "--mpp", "0.5")
    assert rc == 1 and "no slide gave a bag (2 failed, listed above); its cohort tables are unchanged" in err
    after = {p.name: p.read_bytes() for p in [out / "slides.csv", out / "cases.csv", out / "cohort.yaml",
                                               out / "bags" / "s0.h5"]}
    assert after == before
    assert validate(out).ok and list(pd.read_csv(out / "slides.csv")["slide_id"]) == ["s0"]


# ---- 2. tissue mask resolution ----------------------------------------------------------------------------------

def test_one_small_fragment_is_kept(tmp_path, capsys):
    """A disc of 60 µm radius (11 310 µm², 69 % of one 128 µm tile) centred in grid cell (3, 4): the old fixed
    2·10⁴ µm² speck floor erased it ("no tissue found", whatever --min_tissue); the default floor is a quarter
    tile."""
    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    wsi.mkdir()
    disc = _fragment_png(wsi / "frag.png", 2048, centre=(3.5 * 256, 4.5 * 256), radius_px=120)  # 0.5 µm/px
    ref_coords, ref_frac = _tiles_from_truth(disc, 256, 0.25)
    assert ref_coords.tolist() == [[768, 1024]] and ref_frac[0] == pytest.approx(np.pi * 120**2 / 256**2, rel=0.01)

    rc, _, err = _run(capsys, wsi, out, "--mpp", "0.5", "--tissue.min_fragment_um2", "20000", "--min_tissue", "0.01")
    assert rc == 1 and "FAILED frag:" in err and "no tissue found" in err and "20000 µm² dropped" in err
    rc, _, err = _run(capsys, wsi, out, "--mpp", "0.5")
    assert rc == 0, err
    with h5py.File(out / "bags" / "frag.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], ref_coords)
        assert f["features"].attrs["tissue_mask_mpp"] == pytest.approx(8.0)  # 128 µm tile / 16 mask px
    assert validate(out).ok


def test_lowering_min_tissue_keeps_smaller_fragments(tmp_path, capsys):
    """25 µm radius (1 963 µm², 12 % of a tile): below the default quarter-tile floor, kept at --min_tissue 0.05."""
    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    wsi.mkdir()
    disc = _fragment_png(wsi / "frag.png", 1024, centre=(1.5 * 256, 2.5 * 256), radius_px=50)
    rc, _, err = _run(capsys, wsi, out, "--mpp", "0.5")
    assert rc == 1 and "no tissue found" in err and "4096 µm² dropped" in err
    rc, _, err = _run(capsys, wsi, out, "--mpp", "0.5", "--min_tissue", "0.05")
    assert rc == 0, err
    ref_coords, _ = _tiles_from_truth(disc, 256, 0.05)
    with h5py.File(out / "bags" / "frag.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], ref_coords)


def test_mask_resolution_follows_the_tile_size(tmp_path, capsys):
    """64 px tiles at 40× on a 0.25 µm/px scan are 16 µm wide: a fixed 8 µm/px mask gave each tile 2 mask pixels and
    erased a 10 µm disc (31 % of its tile); the mask is now at 1 µm/px (16 px per tile side)."""
    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    wsi.mkdir()
    disc = _fragment_png(wsi / "frag.png", 1024, centre=(5.5 * 64, 9.5 * 64), radius_px=20)
    geometry = ["--mpp", "0.25", "--mag", "40", "--patch_size", "64"]
    rc, _, err = _run(capsys, wsi, out, *geometry, "--tissue.mask_px_per_tile", "2")  # = the old 8 µm/px
    assert rc == 1 and "no tissue found" in err and "mask at 8 µm/px" in err
    rc, _, err = _run(capsys, wsi, out, *geometry)
    assert rc == 0, err
    ref_coords, _ = _tiles_from_truth(disc, 64, 0.25)
    assert len(ref_coords) == 1
    with h5py.File(out / "bags" / "frag.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], ref_coords)
        assert f["features"].attrs["tissue_mask_mpp"] == pytest.approx(1.0)


def test_mask_mpp_arithmetic():
    cfg = TissueConfig()
    assert cfg.mask_mpp(128.0, 0.5, (4000, 4000)) == 8.0  # 20×, 256 px: the field's usual 1.25× thumbnail
    assert cfg.mask_mpp(64.0, 0.25, (4000, 4000)) == 4.0  # 40×, 256 px
    assert cfg.mask_mpp(2.0, 0.25, (4000, 4000)) == 0.25  # never finer than the scan
    W = H = 400_000  # 100 × 100 mm at 0.25 µm/px: 8 µm/px would be 1.6e8 mask px; capped at 64 Mpx
    capped = cfg.mask_mpp(128.0, 0.25, (W, H))
    assert (W * 0.25 / capped) * (H * 0.25 / capped) == pytest.approx(64e6)
    assert cfg.fragment_floor_um2(128.0) == 0.25 * 128**2
    assert TissueConfig(min_fragment_um2=5.0).fragment_floor_um2(128.0) == 5.0


# ---- 3. upsampling beyond the scan ------------------------------------------------------------------------------

def test_target_finer_than_the_scan_warns(tmp_path, capsys, wsi_dir):
    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    wsi.mkdir()
    _tissue_png(wsi / "s0.png")
    rc, _, err = _run(capsys, wsi, out, "--mpp", "0.5", "--mag", "40")
    assert rc == 0
    assert err == (f"{PROG}: warning: {wsi / 's0.png'}: scanned at 0.5 µm/px (from --mpp, ≈20×) but --mag 40 needs "
                   "0.25 µm/px: tiles are upsampled 2.00× (interpolated pixels, no added detail); check --mpp or "
                   "lower --mag\n")
    assert "upsampled 2.00×" in _summary(out)["slides"][0]["warning"]
    # the scan's own µm/px: the real SVS (0.499) read at 40×, and no warning at its own 20×
    svs, out2 = tmp_path / "svs", tmp_path / "cohort2"
    svs.mkdir()
    (svs / f"{SLIDE}.svs").symlink_to(wsi_dir / f"{SLIDE}.svs")
    rc, _, err = _run(capsys, svs, out2, "--mag", "40", "--min_tissue", "0.9", "--patch_size", "512")
    assert rc == 0 and f"{SLIDE}.svs: scanned at 0.499 µm/px (from file, ≈20×)" in err and "2.00×" in err
    rc, _, err = _run(capsys, wsi, tmp_path / "cohort3", "--mpp", "0.5", "--mag", "20")
    assert rc == 0 and err == ""


def test_magnification_other_than_the_encoders_warns(tmp_path, capsys, monkeypatch):
    """An encoder trained at 20× (the registry's `mag`) run at 10× warns once; the test encoders have no `mag`."""
    monkeypatch.setitem(REGISTRY, "vit-test", dataclasses.replace(REGISTRY["vit-test"], mag=20.0))
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    _tissue_png(wsi / "s0.png")
    rc, _, err = _run(capsys, wsi, tmp_path / "cohort", "--mpp", "1.0", "--mag", "10", "--patch_size", "128")
    assert rc == 0
    assert err == (f"{PROG}: warning: --mag 10: vit-test was trained on tiles at 20× (0.5 µm/px); features at 10× "
                   "are out of its training distribution\n")


# ---- 4. corrupt slides: the clear message only ------------------------------------------------------------------

def test_corrupt_slides_print_only_the_clear_message(tmp_path, capsys, caplog, wsi_dir):
    """A truncated SVS makes tifffile log "invalid offset to first page" before tiffslide raises: that note goes
    into the slide's error, never to stderr / the logging tree on its own."""
    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    wsi.mkdir()
    (wsi / "broken.svs").symlink_to(wsi_dir / "broken.svs")
    with open(wsi_dir / f"{SLIDE}.svs", "rb") as f:
        (wsi / "truncated.svs").write_bytes(f.read(200_000))  # a copy cut short (in tmp, never in the repo)
    with caplog.at_level(logging.DEBUG):
        rc, _, err = _run(capsys, wsi, out)
    assert rc == 1 and not [r for r in caplog.records if r.name.startswith("tifffile")]
    lines = err.splitlines()
    assert len(lines) == 3 and lines[2].startswith(f"{PROG}: error: no slide gave a bag")
    assert lines[0] == (f"FAILED broken: {wsi / 'broken.svs'}: unsupported or corrupt slide (openslide: "
                        "OpenSlideUnsupportedFormatError: Unsupported or missing image file; tiffslide: TiffFileError: "
                        "not a TIFF file: header=b'IJrE')")
    assert lines[1].startswith(f"FAILED truncated: {wsi / 'truncated.svs'}: unsupported or corrupt slide (")
    assert "[tifffile: invalid offset to first page" in lines[1]


# ---- 5. missing weights -----------------------------------------------------------------------------------------

def test_missing_weights_message_with_and_without_public_weights(tmp_path, capsys, monkeypatch, wsi_dir):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    wsi.mkdir()
    (wsi / f"{SLIDE}.svs").symlink_to(wsi_dir / f"{SLIDE}.svs")
    rc, _, err = _run(capsys, wsi, out, init=())
    assert rc == 2 and _one_error(err) == (
        "encoder 'vit-test': no weights: pass --weights FILE (.safetensors or a torch state dict); vit-test has no "
        "published weights; --random_init is for tests only (features are then flagged untrained)")
    rc, _, err = _run(capsys, wsi, out, "--encoder", "vit-tiny", init=())
    assert rc == 2 and _one_error(err) == (
        "encoder 'vit-tiny': no weights: pass --weights FILE (.safetensors or a torch state dict), or fill the "
        "local Hugging Face cache for timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k beforehand (no weights file "
        "there; nothing is downloaded); --random_init is for tests only (features are then flagged untrained)")
    assert "looked in" not in err and not out.exists()


# ---- 6. every other bad argument: one line, exit 2, nothing written ---------------------------------------------

@pytest.fixture
def one_slide(tmp_path, wsi_dir):
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    (wsi / f"{SLIDE}.svs").symlink_to(wsi_dir / f"{SLIDE}.svs")
    return wsi


def test_bad_paths_and_arguments(tmp_path, capsys, one_slide):
    out = tmp_path / "cohort"
    cases = {
        ("--wsi_dir", str(tmp_path / "nope")): f"--wsi_dir {tmp_path / 'nope'}: no such directory",
        ("--encoder", "unii"): f"unknown encoder 'unii'; known: {', '.join(sorted(REGISTRY))}",
        ("--shard", "2/2"): "--shard 2/2: need 0 <= i < n",
        ("--shard", "a/b"): "--shard 'a/b': expected i/n, e.g. 0/4",
        ("--shard", "1/2"): f"--shard 1/2: no slide falls in this shard (1 slide(s) in {one_slide} fill shards "
                            "0..0); use at most 1 shards",
        ("--mag", "0"): "--mag 0.0: must be positive",
        ("--workers", "-1"): "--workers -1: must be ≥ 0 (0 reads tiles in-process)",
        ("--mpp", "-0.5"): "--mpp -0.5: must be positive (µm per level-0 pixel)",
        ("--min_tissue", "25"): "--tissue.min_tissue_fraction 25.0: must be in [0, 1]",
        ("--device", "gpu"): "--device 'gpu': not a device (auto, cpu, cuda, cuda:N)",
        ("--weights", str(tmp_path / "w.safetensors")): "--weights and --random_init exclude each other",
    }
    if not torch.cuda.is_available():
        cases[("--device", "cuda")] = "--device cuda: no CUDA device here; use --device cpu (or auto)"
    for args, want in cases.items():
        argv = ["--wsi_dir", str(one_slide), *args] if args[0] != "--wsi_dir" else list(args)
        rc = main(["extract", *argv, "--out", str(out), "--encoder", args[1] if args[0] == "--encoder" else "vit-test",
                   "--random_init", "--no-progress"])
        assert (rc, _one_error(capsys.readouterr().err)) == (2, want), args
        assert not out.exists(), args
    (tmp_path / "file").write_text("x")
    rc = main(["extract", "--wsi_dir", str(one_slide), "--out", str(tmp_path / "file"), "--encoder", "vit-test",
               "--random_init"])
    assert (rc, _one_error(capsys.readouterr().err)) == (2, f"--out {tmp_path / 'file'}: exists and is not a directory")


def test_weights_of_the_wrong_shape_name_the_first_mismatching_key(tmp_path, capsys, one_slide):
    out = tmp_path / "cohort"
    sd = {k: v.contiguous() for k, v in build_model(REGISTRY["vit-test"]).state_dict().items()}
    keys = list(sd)
    bad = dict(sd)
    for k in keys[3], keys[7]:  # two tensors of another shape; the model's order decides which is named
        bad[k] = torch.zeros(*sd[k].shape[:-1], sd[k].shape[-1] + 1)
    save_file(bad, tmp_path / "w.safetensors")
    rc, _, err = _run(capsys, one_slide, out, init=("--weights", str(tmp_path / "w.safetensors")))
    want_shape = list(sd[keys[3]].shape)
    assert rc == 2 and _one_error(err) == (
        f"{(tmp_path / 'w.safetensors').resolve()}: does not match vit-test (vit_tiny_patch16_224): first mismatching "
        f"key {keys[3]!r} has shape {want_shape[:-1] + [want_shape[-1] + 1]} in the file, the model needs "
        f"{want_shape} (2 key(s) of another shape)")
    prefixed = {f"module.{k}": v for k, v in sd.items()}  # a DataParallel checkpoint
    save_file(prefixed, tmp_path / "dp.safetensors")
    rc, _, err = _run(capsys, one_slide, out, init=("--weights", str(tmp_path / "dp.safetensors")))
    assert rc == 2 and _one_error(err).endswith(
        f"{len(keys)} key(s) missing from the file, first {keys[0]!r}; {len(keys)} key(s) the model does not have, "
        f"first {min(prefixed)!r}")
    assert not out.exists()


def test_bad_case_maps(tmp_path, capsys, one_slide):
    out = tmp_path / "cohort"
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(bytes(range(256)) * 4)
    stems = tmp_path / "stems.csv"
    pd.DataFrame({"slide_id": [f"{SLIDE}.svs"], "case_id": ["P1"]}).to_csv(stems, index=False)
    clash = tmp_path / "clash.csv"
    pd.DataFrame({"slide_id": [SLIDE, SLIDE], "case_id": ["P1", "P2"]}).to_csv(clash, index=False)
    nocol = tmp_path / "nocol.csv"
    pd.DataFrame({"slide": [SLIDE], "case_id": ["P1"]}).to_csv(nocol, index=False)
    cases = {
        tmp_path / "missing.csv": "file not found",
        garbage: "cannot be read as CSV (UnicodeDecodeError: ",
        stems: f"no case_id for 1 slide(s) of --wsi_dir: {SLIDE} (slide_id is the file name without its suffix)",
        clash: f"slide(s) mapped to more than one case_id: {SLIDE}",
        nocol: "missing column(s) ['slide_id'] (has ['slide', 'case_id'])",
    }
    for path, want in cases.items():
        rc, _, err = _run(capsys, one_slide, out, "--case_map", str(path))
        msg = _one_error(err)
        assert rc == 2 and msg.startswith(f"--case_map {path}: {want}"), msg
        assert not out.exists()


def test_progress_counts_slides(tmp_path, capsys):
    wsi, out = tmp_path / "wsi", tmp_path / "cohort"
    wsi.mkdir()
    for i in range(2):
        _tissue_png(wsi / f"s{i}.png", size=256 + 64 * i)
    rc = main(["extract", "--wsi_dir", str(wsi), "--out", str(out), "--encoder", "vit-test", "--random_init",
               "--workers", "0", "--mpp", "0.5"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "tissue: 100%" in err and "2/2 [" in err and "slide" in err  # the per-slide tissue pass
    assert "2/2 slides" in err  # the encoding bar counts written bags
