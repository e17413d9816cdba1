"""`mmfm import features`: TRIDENT files linked in place, CLAM h5 / .pt converted with a tile size that is never
guessed, slide names → cases, and everything that cannot be imported listed or refused with the file named."""

import json
import os
import shutil
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mmfm.cli.imports import SUBCOMMANDS
from mmfm.data.bags import read_bag
from mmfm.data.cohort import Cohort, validate
from mmfm.importers import ImportDataError, features, gdc_rna
from mmfm.testing import write_gdc_download

import_features = SUBCOMMANDS["features"][1]  # what `mmfm import features` runs: .pt files read by the torch bridge


@pytest.fixture(scope="module")
def dl(tmp_path_factory):
    return write_gdc_download(tmp_path_factory.mktemp("gdc"))


class _Pickled:
    """An object torch.load(weights_only=True) must refuse to rebuild."""


def _h5(path):
    with h5py.File(path, "r") as f:
        return f["features"][:], f["coords"][:], dict(f["coords"].attrs)


def _slides(out):
    return pd.read_csv(out / "slides.csv", dtype=str).set_index("slide_id")


def _encoder_attr(path):
    with h5py.File(path, "r") as f:
        return f["features"].attrs["encoder"]


def test_trident_files_are_linked_and_replace_the_placeholder(dl, tmp_path):
    out = tmp_path / "c"
    gdc_rna.run(gdc_rna.GdcRnaConfig(out=out, inputs=(dl.rna_dir,), sample_sheet=dl.rna_sheet))
    assert yaml.safe_load((out / "cohort.yaml").read_text())["tile_encoder"]["name"] == "none"  # placeholder
    rep = features.run(features.FeaturesConfig(out=out, inputs=(dl.trident_dir,)))
    files = sorted(dl.trident_dir.glob("*.h5"))
    slides = _slides(out)
    assert list(slides.index) == [f.name[:-3] for f in files]  # slide id = file name without .h5 (UUID kept)
    assert slides["case_id"].tolist() == [f.name[:12] for f in files]
    for f in files:  # linked where they lie, not copied; outside the cohort: absolute (never a climbing ../)
        assert (out / slides.loc[f.name[:-3], "path"]).resolve() == f.resolve()
        assert os.path.isabs(slides.loc[f.name[:-3], "path"])
    assert not (out / "bags").exists()
    spec = yaml.safe_load((out / "cohort.yaml").read_text())
    feats, _, attrs = _h5(files[0])
    assert _encoder_attr(files[0]) == "uni_v1"  # TRIDENT's name, written as mmfm's
    assert spec["tile_encoder"] == {"name": "uni", "feature_dim": feats.shape[1]}
    assert rep.rules["encoder"].startswith("uni (TRIDENT names mapped")
    assert (spec["target_magnification"], spec["patch_size"]) == (attrs["target_magnification"], attrs["patch_size"])
    v = validate(out)
    assert v.ok, v.format()
    assert any("mix FFPE (DX) and frozen" in w and "TCGA-A2-A0T2" in w for w in v.warnings)
    assert any("TCGA-A2-A0T2" in n for n in rep.notes if "mix FFPE" in n)
    c = Cohort.open(out)
    assert c.slides["n_tiles"].tolist() == [_h5(f)[0].shape[0] for f in files]
    assert c.presence()[["slide", "rna"]].sum().tolist() == [6, 5]
    before = (out / "slides.csv").read_bytes(), (out / "cases.csv").read_bytes()
    features.run(features.FeaturesConfig(out=out, inputs=(dl.trident_dir,)))  # re-run: same tables
    assert ((out / "slides.csv").read_bytes(), (out / "cases.csv").read_bytes()) == before


def test_preservation_filter_and_case_map(dl, tmp_path):
    d = tmp_path / "feats"
    shutil.copytree(dl.trident_dir, d)
    plain = d / "slide_0007.h5"
    shutil.copy(next(d.glob("TCGA-05-4395-01Z-00-DX1*.h5")), plain)
    out = tmp_path / "c"
    rep = features.run(features.FeaturesConfig(out=out, inputs=(d,), preservation="FFPE"))
    ids = list(_slides(out).index)
    assert all("-DX" in s for s in ids) and len(ids) == 6
    frozen = rep.unmatched["slides that are not FFPE (preservation setting)"]
    assert sorted(f.split(".")[0][-3:] for f in frozen) == ["TS1", "TS1"]
    assert rep.unmatched["files with no case (not a TCGA name, not in case_map)"] == [str(plain)]
    assert "TCGA-05-4244" not in pd.read_csv(out / "cases.csv")["case_id"].tolist()  # only a frozen slide
    m = tmp_path / "map.csv"
    m.write_text("slide_id,case_id\nslide_0007,PATIENT-7\n")
    features.run(features.FeaturesConfig(out=out, inputs=(d,), case_map=m))
    assert _slides(out).loc["slide_0007", "case_id"] == "PATIENT-7"
    assert validate(out).ok


def test_clam_h5_needs_a_tile_size_and_never_guesses(dl, tmp_path):
    cfg = dict(inputs=(dl.clam_h5_dir,), encoder="uni_v1", mag=20.0, patch_size=256)
    with pytest.raises(ImportDataError, match=r"no patch_size_level0 \(CLAM files do not store it\).*never guessed"):
        features.run(features.FeaturesConfig(out=tmp_path / "a", **cfg))
    with pytest.raises(ImportDataError, match="do not say the encoder .*: set encoder"):
        features.run(features.FeaturesConfig(out=tmp_path / "a", inputs=(dl.clam_h5_dir,), mag=20.0, patch_size=256,
                                             patch_size_level0=512))
    # CLAM's patch files: patch_size 256 at patch_level 1, downsample 2 → 512 level-0 px
    out = tmp_path / "b"
    rep = features.run(features.FeaturesConfig(out=out, coords_dir=dl.clam_patches_dir, **cfg))
    for sid, row in _slides(out).iterrows():
        assert row["path"] == f"bags/{sid}.h5"
        want_f, want_c, _ = _h5(dl.clam_h5_dir / f"{sid}.h5")
        got = read_bag(out / row["path"])
        np.testing.assert_array_equal(got["features"], want_f)
        np.testing.assert_array_equal(got["coords"], want_c.astype(np.int64))
        assert Cohort.open(out).slides.loc[sid, "patch_size_level0"] == 256 * 2
        assert rep.per_case[sid]["patch_size_level0_source"] == "CLAM patch file patch_size × downsample"
    # per-slide µm/px: 256 px at 20× (0.5 µm/px) over a 0.25 µm/px scan = 512; over 0.5 µm/px = 256
    sids = sorted(_slides(out).index)
    m = tmp_path / "mpp.csv"
    pd.DataFrame({"slide_id": sids, "mpp": [0.25] + [0.5] * (len(sids) - 1)}).to_csv(m, index=False)
    features.run(features.FeaturesConfig(out=tmp_path / "m", mpp_csv=m, **cfg))
    c = Cohort.open(tmp_path / "m").slides
    assert c.loc[sids[0], "patch_size_level0"] == 512 and (c.loc[sids[1:], "patch_size_level0"] == 256).all()
    assert validate(tmp_path / "m").ok


def test_clam_pt_files_with_their_coordinates(dl, tmp_path):
    pt = tmp_path / "pt_files"
    pt.mkdir()
    sids = sorted(p.name[:-3] for p in dl.clam_h5_dir.glob("*.h5"))[:3]
    for sid in sids:
        torch.save(torch.from_numpy(_h5(dl.clam_h5_dir / f"{sid}.h5")[0]), pt / f"{sid}.pt")
    cfg = dict(inputs=(pt,), encoder="uni_v1", mag=20.0, patch_size=256)
    with pytest.raises(ImportDataError, match=r"\.pt file holds no coordinates; set coords_dir"):
        import_features(features.FeaturesConfig(out=tmp_path / "a", **cfg))
    out = tmp_path / "b"
    import_features(features.FeaturesConfig(out=out, coords_dir=dl.clam_patches_dir, **cfg))
    for sid in sids:
        got = read_bag(out / "bags" / f"{sid}.h5")
        want_f, want_c, _ = _h5(dl.clam_h5_dir / f"{sid}.h5")
        np.testing.assert_array_equal(got["features"], want_f)
        np.testing.assert_array_equal(got["coords"], want_c)
    assert validate(out).ok
    torch.save(_Pickled(), pt / f"{sids[0]}.pt")  # arbitrary pickled objects are never loaded
    with pytest.raises(ImportDataError, match=rf"{sids[0]}.pt: not a tensor file torch.load\(weights_only=True\)"):
        import_features(features.FeaturesConfig(out=out, coords_dir=dl.clam_patches_dir, **cfg))
    torch.save({"features": torch.zeros(3, 4)}, pt / f"{sids[0]}.pt")
    with pytest.raises(ImportDataError, match=r"expected a float tensor \[N, D\] \(CLAM pt_files\), got dict"):
        import_features(features.FeaturesConfig(out=out, coords_dir=dl.clam_patches_dir, **cfg))


def test_duplicates_zero_tiles_and_non_feature_files_are_listed(dl, tmp_path):
    d = tmp_path / "feats"
    d.mkdir()
    sid = sorted(p.name[:-3] for p in dl.trident_dir.glob("*.h5"))[0]
    shutil.copy(dl.trident_dir / f"{sid}.h5", d / f"{sid}.h5")
    empty = d / "TCGA-A2-A0CM-01Z-00-DX1.h5"
    with h5py.File(empty, "w") as f:  # TRIDENT writes a 0-tile file for a slide without tissue
        f.create_dataset("features", data=np.zeros((0, 16), np.float32)).attrs["encoder"] = "uni_v1"
        f.create_dataset("coords", data=np.zeros((0, 2), np.int64)).attrs.update(
            {"patch_size_level0": 512, "patch_size": 256, "target_magnification": 20})
    with h5py.File(d / f"{sid}_patches.h5", "w") as f:
        f.create_dataset("coords", data=np.zeros((3, 2), np.int64))
    out = tmp_path / "c"
    rep = features.run(features.FeaturesConfig(out=out, inputs=(d, dl.clam_h5_dir), patch_size_level0=512))
    saved = json.loads((out / "imports" / "features.json").read_text())
    assert saved["unmatched"]["files with zero tiles (no tissue found)"] == [str(empty)]
    assert saved["unmatched"]["h5 files without tile features [N, D] (patch or slide-level files)"] == \
        [str(d / f"{sid}_patches.h5")]
    dup = [x for x in rep.duplicates["slides with several feature files (TRIDENT h5 > h5 > pt; first used)"]
           if x.startswith(sid)]
    assert dup == [f"{sid}: used {d / f'{sid}.h5'}; not used {dl.clam_h5_dir / f'{sid}.h5'}"]
    assert _slides(out).loc[sid, "path"] != f"bags/{sid}.h5"  # the TRIDENT copy, linked
    assert validate(out).ok


def test_disagreeing_encoders_and_cohorts_are_refused(dl, tmp_path):
    d = tmp_path / "feats"
    shutil.copytree(dl.trident_dir, d)
    odd = sorted(d.glob("*.h5"))[2]
    with h5py.File(odd, "a") as f:
        f["features"].attrs["encoder"] = "conch_v15"
    with pytest.raises(ImportDataError, match=rf"{odd}: encoder 'conch-v1.5' differs from 'uni'"):
        features.run(features.FeaturesConfig(out=tmp_path / "a", inputs=(d,)))
    out = tmp_path / "b"
    features.run(features.FeaturesConfig(out=out, inputs=(dl.trident_dir,)))
    with pytest.raises(ImportDataError, match=r"cohort.yaml: tile_encoder is .*'uni'.* but the imported features"):
        features.run(features.FeaturesConfig(out=out, inputs=(dl.clam_h5_dir,), encoder="conch_v15", mag=20.0,
                                             patch_size=256, patch_size_level0=512))


def test_encoder_from_the_trident_folder_name(dl, tmp_path):
    """No `encoder` attribute: TRIDENT's `features_<encoder>/` folder names it, in mmfm's spelling."""
    d = tmp_path / "features_conch_v15"
    shutil.copytree(dl.trident_dir, d)
    for f in d.glob("*.h5"):
        with h5py.File(f, "a") as h:
            del h["features"].attrs["encoder"]
    features.run(features.FeaturesConfig(out=tmp_path / "c", inputs=(d,)))
    assert yaml.safe_load((tmp_path / "c" / "cohort.yaml").read_text())["tile_encoder"]["name"] == "conch-v1.5"


def test_pt_files_without_torch_get_a_clear_message(dl, tmp_path, monkeypatch):
    sid = sorted(p.name[:-3] for p in dl.clam_h5_dir.glob("*.h5"))[0]
    (tmp_path / "pt").mkdir()
    torch.save(torch.zeros(3, 16), tmp_path / "pt" / f"{sid}.pt")
    cfg = features.FeaturesConfig(out=tmp_path / "c", inputs=(tmp_path / "pt",), encoder="uni_v1", mag=20.0,
                                  patch_size=256, coords_dir=dl.clam_patches_dir)
    with pytest.raises(ImportDataError, match=rf"{sid}.pt: CLAM .pt features are read with PyTorch: run `mmfm import"):
        features.run(cfg)  # the data layer never imports torch itself
    monkeypatch.setitem(sys.modules, "mmfm.bridges.clam", None)  # what an install without torch looks like
    with pytest.raises(ImportDataError, match=r"CLAM .pt features need PyTorch \(pip install 'mmfm\[bridges\]'\)"):
        import_features(cfg)


def test_link_false_copies_trident_files_into_bags(dl, tmp_path):
    out = tmp_path / "c"
    rep = features.run(features.FeaturesConfig(out=out, inputs=(dl.trident_dir,), link=False))
    for sid, row in _slides(out).iterrows():
        assert row["path"] == f"bags/{sid}.h5"
        want_f, want_c, attrs = _h5(dl.trident_dir / f"{sid}.h5")
        got = read_bag(out / row["path"])
        np.testing.assert_array_equal(got["features"], want_f)
        np.testing.assert_array_equal(got["coords"], want_c)
        assert rep.per_case[sid]["patch_size_level0"] == attrs["patch_size_level0"]
    assert validate(out).ok
