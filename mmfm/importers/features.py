"""`mmfm import features`: folders of tile features written by TRIDENT or CLAM → slides.csv rows and bags.

TRIDENT (`<job>/<mag>x_<ps>px_<ov>px_overlap/features_<encoder>/<slide>.h5`): `features` [N, D] (attr `encoder`) and
`coords` [N, 2] level-0 corners with attrs `patch_size`, `patch_size_level0`, `target_magnification`, ... — already
the contract's bag layout, so slides.csv points at the file where it lies (linked, not copied).
CLAM (`h5_files/<slide>.h5`): `features` float32 [N, D] and `coords` int32 level-0 corners, no attributes; CLAM
(`pt_files/<slide>.pt`): a tensor [N, D] only, its coordinates in CLAM's `patches/<slide>.h5` (or `h5_files/`) given by
`coords_dir`. Those files become new bags in `bags/`, which needs the tile side in level-0 pixels. It is never guessed:
it comes from, in order, the file's `patch_size_level0` attribute, the `patch_size_level0` setting, a CLAM patch file's
`patch_size` × `downsample` attributes (in `coords_dir`), or `patch_size` · (10 / `mag`) / mpp with the slide's level-0
µm/px from `mpp_csv` or `mpp` (the geometry `mmfm extract` uses); otherwise the file is an error.

The encoder is the file's `encoder` attribute, else TRIDENT's `features_<encoder>/` folder name, else the `encoder`
setting; TRIDENT's names are written as mmfm's (`conch_v15` → `conch-v1.5`, `mmfm.data.tile_encoders`).
Slide id = the file name without `.h5`/`.pt` (as `mmfm extract` names bags); case = the TCGA participant of the name
(`TCGA-…-DX1.<uuid>` → `TCGA-…`), or the `case_map` CSV. A file with no case, a slide of another preservation
(`preservation`), a zero-tile file and a second file of one slide (a TRIDENT-layout h5 is preferred, then any h5,
then .pt) are listed, never dropped silently. Re-runs replace the slides.csv rows of the slides imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import h5py
import numpy as np
import pandas as pd
import yaml

from mmfm.data import tcga, tile_encoders
from mmfm.data.bags import patch_size_level0, read_header, write_bag
from mmfm.importers.common import (PLACEHOLDER_ENCODER, ImportDataError, ImportReport, ensure_cohort, finish,
                                        input_files, read_csv_str, update_cases, write_csv)
from mmfm.io import write_text


PtReader = Callable[[Path], np.ndarray]  # a CLAM .pt file → [N, D] features; ValueError naming the file


@dataclass
class FeaturesConfig:
    out: Path  # cohort directory to create or extend
    inputs: tuple[Path, ...]  # folders (or files) of TRIDENT/CLAM .h5 and CLAM .pt tile features (not recursive)
    encoder: str | None = None  # tile encoder (mmfm or TRIDENT name), required when the files do not say (CLAM)
    mag: float | None = None  # magnification the tiles were cut at, required when the files do not say (CLAM)
    patch_size: int | None = None  # tile size in px at mag, required when the files do not say (CLAM)
    patch_size_level0: int | None = None  # tile side in level-0 px, for every file that lacks it
    mpp: float | None = None  # level-0 µm/px of every slide (for patch_size_level0 from mag and patch_size)
    mpp_csv: Path | None = None  # CSV slide_id,mpp: per-slide level-0 µm/px (TCGA mixes 0.25 and 0.5 µm/px scans)
    coords_dir: Path | None = None  # folder of <slide>.h5 with coords (CLAM patches/ or h5_files/), needed for .pt
    case_map: Path | None = None  # CSV slide_id,case_id for names that are not TCGA barcodes
    preservation: Literal["all", "FFPE", "frozen"] = "all"  # TCGA slides kept: DX = FFPE, TS/BS/MS = frozen
    link: bool = True  # reference TRIDENT-layout files in place (slides.csv path) instead of copying into bags/


@dataclass
class _Slide:
    slide_id: str
    path: Path
    kind: str  # 'trident' (has patch_size_level0), 'h5' (CLAM), 'pt' (CLAM)
    n_tiles: int
    dim: int | None
    encoder: str | None
    mag: float | None
    patch_size: int | None
    psl0: int | None

    @property
    def preference(self) -> int:
        return {"trident": 0, "h5": 1, "pt": 2}[self.kind]


def _csv_map(path: Path | None, value: str) -> dict[str, str]:
    if path is None:
        return {}
    df = read_csv_str(Path(path))
    missing = [c for c in ("slide_id", value) if c not in df.columns]
    if missing:
        raise ImportDataError(f"{path} line 1: column(s) {missing} missing (has {list(df.columns)})")
    empty = df[(df["slide_id"].str.strip() == "") | (df[value].str.strip() == "")]
    if len(empty):
        raise ImportDataError(f"{path} line {int(empty.index[0]) + 2}: empty slide_id or {value}")
    return dict(zip(df["slide_id"].str.strip(), df[value].str.strip()))


def _slide_id(path: Path) -> str:
    return path.name[: -len(path.suffix)]


def _probe(path: Path, report: ImportReport) -> _Slide | None:
    """Header facts of one feature file, or None (listed) when it is not a tile-feature file."""
    sid = _slide_id(path)
    if path.suffix.lower() == ".pt":
        return _Slide(sid, path, "pt", 0, None, None, None, None, None)  # shape known once read
    try:
        with h5py.File(path, "r") as f:
            feats = f.get("features")
            if not isinstance(feats, h5py.Dataset) or feats.ndim != 2:
                report.unmatch("h5 files without tile features [N, D] (patch or slide-level files)", [str(path)])
                return None
            if not isinstance(f.get("coords"), h5py.Dataset):
                raise ImportDataError(f"{path}: has 'features' but no 'coords' dataset (level-0 tile corners)")
    except OSError as e:
        raise ImportDataError(f"{path}: cannot be read as HDF5 ({e})") from e
    h = read_header(path)
    psl0 = h.patch_size_level0
    trident = psl0 is not None and "target_magnification" in h.coord_attrs
    enc = h.feature_attrs.get("encoder")
    if enc in (None, "None") and path.parent.name.startswith("features_"):  # TRIDENT's features_<encoder>/ folder
        enc = path.parent.name[len("features_"):]
    return _Slide(sid, path, "trident" if psl0 is not None else "h5", h.n_tiles, h.dim,
                  None if enc in (None, "None") else tile_encoders.canonical(str(enc)),
                  float(h.coord_attrs["target_magnification"]) if trident else None,
                  int(h.coord_attrs["patch_size"]) if trident and "patch_size" in h.coord_attrs else None, psl0)


def _coords_file(cfg: FeaturesConfig, slide: _Slide) -> Path | None:
    if cfg.coords_dir is None:
        return None
    for name in (f"{slide.slide_id}.h5", f"{slide.slide_id}_patches.h5"):
        if (Path(cfg.coords_dir) / name).is_file():
            return Path(cfg.coords_dir) / name
    return None


def _load(cfg: FeaturesConfig, slide: _Slide, read_pt: PtReader | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(features, coords, coords attrs of the coordinate source) of a file that is converted into a bag."""
    if slide.kind == "pt":
        if read_pt is None:
            raise ImportDataError(f"{slide.path}: CLAM .pt features are read with PyTorch: run `mmfm import features` "
                                  "(or pass read_pt=mmfm.bridges.clam.read_pt_features), or import CLAM's h5_files/")
        try:
            feats = read_pt(slide.path)
        except ValueError as e:
            raise ImportDataError(str(e)) from e
        src = _coords_file(cfg, slide)
        if src is None:
            raise ImportDataError(f"{slide.path}: a .pt file holds no coordinates; set coords_dir to CLAM's patches/ "
                                  f"(or h5_files/) folder holding {slide.slide_id}.h5")
    else:
        with h5py.File(slide.path, "r") as f:
            feats = f["features"][:]
        src = slide.path
    with h5py.File(src, "r") as f:
        if "coords" not in f:
            raise ImportDataError(f"{src}: no 'coords' dataset")
        coords, attrs = f["coords"][:], {k: v for k, v in f["coords"].attrs.items()}
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(feats):
        raise ImportDataError(f"{slide.path}: features {feats.shape} and coords {coords.shape} (from {src}) do not "
                              "match [N, D] / [N, 2]")
    if not np.issubdtype(coords.dtype, np.integer):
        raise ImportDataError(f"{src}: coords dtype {coords.dtype} is not integer (level-0 pixels)")
    patches = _coords_file(cfg, slide)
    if patches is not None and patches != src:  # CLAM h5_files/ + patches/: the patch file's attrs give the geometry
        with h5py.File(patches, "r") as f:
            if "coords" not in f or not np.array_equal(f["coords"][:], coords):
                raise ImportDataError(f"{patches}: its coords differ from those of {slide.path}; not the same tiles")
            attrs = {**{k: v for k, v in f["coords"].attrs.items()}, **attrs}
    if not np.isfinite(feats).all():
        raise ImportDataError(f"{slide.path}: features hold NaN/inf (first at row "
                              f"{int(np.argmax(~np.isfinite(feats).all(axis=1)))})")
    return feats, coords, attrs


def _level0_side(cfg: FeaturesConfig, slide: _Slide, attrs: dict, mpps: dict[str, str]) -> tuple[int, str]:
    """The tile side in level-0 px and where it came from; ImportDataError when nothing says (never guessed)."""
    if attrs.get("patch_size_level0") is not None:
        return int(attrs["patch_size_level0"]), "coords attribute patch_size_level0"
    if cfg.patch_size_level0 is not None:
        return int(cfg.patch_size_level0), "setting patch_size_level0"
    if "patch_size" in attrs and "downsample" in attrs:  # CLAM patches/: size at patch_level × that level's downsample
        ds = float(np.atleast_1d(attrs["downsample"])[0])
        return int(round(float(attrs["patch_size"]) * ds)), "CLAM patch file patch_size × downsample"
    mpp = mpps.get(slide.slide_id, cfg.mpp)
    if mpp is not None and cfg.mag is not None and cfg.patch_size is not None:
        src = "mpp_csv" if slide.slide_id in mpps else "setting mpp"
        return patch_size_level0(cfg.patch_size, cfg.mag, float(mpp)), f"patch_size·(10/mag)/mpp ({src})"
    raise ImportDataError(f"{slide.path}: no patch_size_level0 (CLAM files do not store it) — set patch_size_level0, "
                          "or mag + patch_size + mpp (or mpp_csv for per-slide µm/px), or coords_dir with CLAM's "
                          "patches/ files; the tile size in level-0 pixels is never guessed")


def _geometry(cfg: FeaturesConfig, slides: list[_Slide]) -> dict:
    """cohort.yaml facts agreed by every file and the settings; an error names the first file that disagrees."""
    want: dict = {"encoder": cfg.encoder and tile_encoders.canonical(cfg.encoder), "mag": cfg.mag,
                  "patch_size": cfg.patch_size, "dim": None}
    origin: dict = {k: "the settings" for k, v in want.items() if v is not None}
    for s in slides:
        for key in ("encoder", "mag", "patch_size", "dim"):
            v = getattr(s, key)
            if v is None:
                continue
            if want[key] is not None and want[key] != v:
                raise ImportDataError(f"{s.path}: {key} {v!r} differs from {want[key]!r} ({origin[key]}); a cohort "
                                      "holds one encoder and one tile geometry")
            want[key], origin[key] = v, origin.get(key, str(s.path))
    for key, hint in (("encoder", "encoder"), ("mag", "mag"), ("patch_size", "patch_size")):
        if want[key] is None:
            raise ImportDataError(f"the feature files do not say the {key} (CLAM files carry no attributes): "
                                  f"set {hint}")
    return want


def _update_spec(out: Path, geo: dict) -> None:
    """Write cohort.yaml's encoder and geometry over the placeholder, or check an existing one agrees."""
    path = out / "cohort.yaml"
    doc = yaml.safe_load(path.read_text()) or {}
    new = {"tile_encoder": {"name": geo["encoder"], "feature_dim": int(geo["dim"])},
           "target_magnification": float(geo["mag"]), "patch_size": int(geo["patch_size"])}
    slides = read_csv_str(out / "slides.csv")
    have = dict(doc.get("tile_encoder") or {})
    if have.get("name") != PLACEHOLDER_ENCODER and len(slides):
        if isinstance(have.get("name"), str):  # a cohort written with TRIDENT's name of the same encoder agrees
            have["name"] = tile_encoders.canonical(have["name"])
        for key, val in new.items():
            if (have if key == "tile_encoder" else doc.get(key)) != val:
                raise ImportDataError(f"{path}: {key} is {doc.get(key)!r} but the imported features have {val!r}; "
                                      "import them into another cohort directory")
        return
    doc.update(new)
    if str(doc.get("description", "")).startswith("imported by mmfm import; no slide features yet"):
        doc["description"] = f"imported by mmfm import ({geo['encoder']} tile features)"
    write_text(path, yaml.safe_dump(doc, sort_keys=False))


def run(cfg: FeaturesConfig, read_pt: PtReader | None = None) -> ImportReport:
    """Import tile-feature files into `cfg.out` (slides.csv rows, bags for converted files, the cases). `read_pt`
    reads a CLAM .pt file (torch lives in the bridges: the command passes mmfm.bridges.clam.read_pt_features)."""
    out = Path(cfg.out)
    report = ImportReport("features", str(out), [str(p) for p in cfg.inputs])
    files = input_files(cfg.inputs, (".h5", ".pt"), recursive=False)
    if not files:
        raise ImportDataError(f"no .h5 / .pt file in {[str(p) for p in cfg.inputs]}")
    case_map, mpps = _csv_map(cfg.case_map, "case_id"), _csv_map(cfg.mpp_csv, "mpp")
    found = [s for s in (_probe(f, report) for f in files) if s is not None]
    by_id: dict[str, list[_Slide]] = {}
    for s in found:
        by_id.setdefault(s.slide_id, []).append(s)
    slides, cases = [], {}
    for sid in sorted(by_id):
        ranked = sorted(by_id[sid], key=lambda s: (s.preference, str(s.path)))
        if len(ranked) > 1:
            report.duplicate("slides with several feature files (TRIDENT h5 > h5 > pt; first used)",
                             [f"{sid}: used {ranked[0].path}; not used {', '.join(str(s.path) for s in ranked[1:])}"])
        s = ranked[0]
        case = case_map.get(sid) or tcga.slide_case(sid)
        if case is None:
            report.unmatch("files with no case (not a TCGA name, not in case_map)", [str(s.path)])
            continue
        pres = tcga.slide_preservation(sid)
        if cfg.preservation != "all" and pres != cfg.preservation:
            report.unmatch(f"slides that are not {cfg.preservation} (preservation setting)", [f"{sid} ({pres})"])
            continue
        if s.kind != "pt" and s.n_tiles == 0:
            report.unmatch("files with zero tiles (no tissue found)", [str(s.path)])
            continue
        slides.append(s)
        cases[sid] = case
    if not slides:
        raise ImportDataError("no feature file could be imported; see the report lists:\n" + report.format())
    if all(s.kind == "pt" for s in slides):  # a .pt's dim is known only once read: read the first one
        slides[0].n_tiles, slides[0].dim = _load(cfg, slides[0], read_pt)[0].shape
    geo = _geometry(cfg, slides)
    ensure_cohort(out)
    _update_spec(out, geo)
    rows = []
    for s in slides:
        facts = {"case": cases[s.slide_id], "file": str(s.path), "preservation": tcga.slide_preservation(s.slide_id)}
        if s.kind == "trident" and cfg.link:
            path = Path(os.path.relpath(s.path.resolve(), out.resolve()))
            if path.parts[0] == "..":  # outside the cohort: absolute (a relative path never climbs out)
                path = s.path.resolve()
            facts.update(stored="linked", patch_size_level0=s.psl0)
        else:
            feats, coords, attrs = _load(cfg, s, read_pt)
            if feats.shape[1] != geo["dim"]:
                raise ImportDataError(f"{s.path}: {feats.shape[1]} features per tile, the other files have "
                                      f"{geo['dim']}")
            side, origin = _level0_side(cfg, s, attrs, mpps)
            if side <= 0:
                raise ImportDataError(f"{s.path}: patch_size_level0 {side} ({origin}) is not positive")
            path = Path("bags") / f"{s.slide_id}.h5"
            write_bag(out / path, feats if feats.dtype in (np.float16, np.float32) else feats.astype(np.float32),
                      coords, patch_size_level0=side, encoder=str(geo["encoder"]),
                      coord_attrs={"patch_size": int(geo["patch_size"]), "target_magnification": float(geo["mag"]),
                                   "name": s.slide_id},
                      feature_attrs={"source": str(s.path.resolve()), "patch_size_level0_source": origin})
            facts.update(stored="converted", patch_size_level0=side, patch_size_level0_source=origin)
        rows.append({"slide_id": s.slide_id, "case_id": cases[s.slide_id], "path": str(path)})
        report.per_case[s.slide_id] = facts
    table = read_csv_str(out / "slides.csv")
    table = pd.concat([table[~table["slide_id"].isin(cases)], pd.DataFrame(rows)]).fillna("")
    write_csv(out / "slides.csv", table.sort_values("slide_id", kind="stable"))
    report.written.append(str(out / "slides.csv"))
    before = set(read_csv_str(out / "cases.csv")["case_id"])
    update_cases(out, cases.values(), report)
    report.matched = [s.slide_id for s in slides]
    report.unmatch("cases of cases.csv without slides", sorted(before - set(table["case_id"])))
    report.rules.update({"encoder": f"{geo['encoder']} (TRIDENT names mapped to mmfm's: "
                                    "data_cards/tile_encoders.md)",
                         "slide→case": "TCGA participant barcode of the file name (case_map first)",
                         "preservation": cfg.preservation, "linked": "TRIDENT-layout h5 referenced in place"
                         if cfg.link else "every file copied into bags/"})
    mixed = pd.DataFrame([{"case": c, "p": tcga.slide_preservation(s)} for s, c in cases.items()])
    both = sorted(c for c, g in mixed.groupby("case")["p"] if {"FFPE", "frozen"} <= set(g.dropna()))
    if both:
        report.notes.append(f"{len(both)} case(s) mix FFPE (DX) and frozen slides, all imported (preservation: FFPE "
                            f"keeps diagnostic slides only): {', '.join(both)}")
    report.notes.append("validation read bag headers only; `mmfm validate` also scans linked features for NaN/inf")
    return finish(report, out, scan_features=False)
