"""`mmfm import hest` / `mmfm import visium`: spatial transcriptomics samples → spot tables of a cohort
(mmfm.data.spots), beside tile features of the same slides.

HEST-1k's per-sample layout (HEST's Hugging Face card and repository, checked; data_cards/hest.md says what could
not be): a metadata table `HEST_v*.csv` (one row per sample: `id`, `patient`, `st_technology`, `spot_diameter` and
`inter_spot_dist` in µm, `pixel_size_um_estimated` = µm per full-resolution pixel, `dataset_title`, `organ`,
`oncotree_code`, …), `st/<id>.h5ad` (spot × gene counts, spot centres in `obsm['spatial']`, full-resolution pixels
of `wsis/<id>.tif`), `patches/<id>.h5` (patches around the spots: `img`, `coords`, `barcode`), `wsis/<id>.tif`.
A Visium Space Ranger `outs/` folder is read by scanpy (`read_visium`: counts, `obsm['spatial']` in full-resolution
pixels, `scalefactors.spot_diameter_fullres`).

Tile features are not in either layout: extract them from the slide (`mmfm extract` or TRIDENT on `wsis/<id>.tif`)
into `--features`, one `<id>.h5` per sample; they are imported by `mmfm import features` (linked, case from the
metadata's `patient`, the sample id when empty). Then each sample's spot table is written to `spots/<id>.h5ad`
(counts, level-0 spot centres, spot diameter in level-0 px = `spot_diameter` / `pixel_size_um_estimated`) and named
in slides.csv's `spots` column; validation matches every spot to the slide's tiles. Samples without tile features,
without a spot table or of a technology not asked for are listed, never dropped silently.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from mmfm.importers import features
from mmfm.importers.common import ImportDataError, ImportReport, finish, read_csv_str, write_csv
from mmfm.io import write_h5ad


@dataclass
class HestConfig:
    out: Path  # cohort directory to create or extend
    root: Path  # HEST-1k download folder (the metadata table, st/, patches/, wsis/)
    features: Path  # folder of TRIDENT-layout tile features, one <id>.h5 per sample (from wsis/<id>.tif)
    metadata: Path | None = None  # the metadata table (default: the one HEST_v*.csv in root)
    ids: tuple[str, ...] = ()  # samples to import (default: every sample of the table with st/<id>.h5ad)
    technologies: tuple[str, ...] = ("Visium",)  # st_technology values imported (spot-based ones)


@dataclass
class VisiumConfig:
    out: Path  # cohort directory to create or extend
    inputs: tuple[Path, ...]  # Space Ranger output folders (each holding filtered_feature_bc_matrix.h5, spatial/)
    features: Path  # folder of TRIDENT-layout tile features, one <sample>.h5 per folder (sample = the folder's
    #                 name, or its parent's for an `outs/` folder)
    case_map: Path | None = None  # CSV slide_id,case_id (default: the case is the sample)


@dataclass
class _Sample:
    sample: str
    case: str
    counts: ad.AnnData  # obs = spots, obsm['spatial'] = full-resolution px
    diameter_px: float
    facts: dict


def _metadata(cfg: HestConfig) -> pd.DataFrame:
    path = cfg.metadata
    if path is None:
        found = sorted(Path(cfg.root).glob("HEST_v*.csv"))
        if len(found) != 1:
            raise ImportDataError(f"{cfg.root}: expected one metadata table HEST_v*.csv, found "
                                  f"{[f.name for f in found] or 'none'}; give --metadata")
        path = found[0]
    df = read_csv_str(Path(path))
    missing = [c for c in ("id", "patient", "st_technology", "spot_diameter", "pixel_size_um_estimated")
               if c not in df.columns]
    if missing:
        raise ImportDataError(f"{path} line 1: column(s) {missing} missing (has {list(df.columns)})")
    if df["id"].duplicated().any():
        raise ImportDataError(f"{path}: duplicate sample id(s) {sorted(df.id[df.id.duplicated()])[:5]}")
    return df.set_index("id")


def _hest_samples(cfg: HestConfig, report: ImportReport) -> list[_Sample]:
    meta = _metadata(cfg)
    st = Path(cfg.root) / "st"
    ids = list(cfg.ids) or [i for i in meta.index if (st / f"{i}.h5ad").is_file()]
    unknown = [i for i in ids if i not in meta.index]
    report.unmatch("ids not in the metadata table", unknown)
    report.unmatch("samples of the table without st/<id>.h5ad",
                   [i for i in meta.index if not (st / f"{i}.h5ad").is_file()])
    out = []
    for sid in [i for i in ids if i in meta.index]:
        row = meta.loc[sid]
        if row["st_technology"] not in cfg.technologies:
            report.unmatch(f"samples of another technology (technologies: {list(cfg.technologies)})",
                           [f"{sid} ({row['st_technology']})"])
            continue
        path = st / f"{sid}.h5ad"
        if not path.is_file():
            report.unmatch("ids without st/<id>.h5ad", [sid])
            continue
        try:
            diameter, mpp = float(row["spot_diameter"]), float(row["pixel_size_um_estimated"])
        except ValueError:
            diameter = mpp = float("nan")
        if not (np.isfinite(diameter) and np.isfinite(mpp) and diameter > 0 and mpp > 0):
            report.unmatch("samples without spot_diameter / pixel_size_um_estimated", [sid])
            continue
        counts = ad.read_h5ad(path)
        facts = {"st": str(path), "spot_diameter_um": diameter, "pixel_size_um": mpp, "n_spots": counts.n_obs,
                 "technology": row["st_technology"]}
        patches = Path(cfg.root) / "patches" / f"{sid}.h5"
        if patches.is_file():  # the join HEST ships: patch ↔ spot by barcode
            with h5py.File(patches, "r") as f:
                codes = {b.decode() if isinstance(b, bytes) else str(b) for b in np.asarray(f["barcode"]).ravel()}
            facts["spots_with_a_patch"] = int(counts.obs_names.isin(list(codes)).sum())
        out.append(_Sample(sid, row["patient"] or sid, counts, diameter / mpp, facts))
    return out


def _visium_samples(cfg: VisiumConfig, report: ImportReport) -> list[_Sample]:
    import scanpy as sc

    cases = {}
    if cfg.case_map is not None:
        m = read_csv_str(Path(cfg.case_map))
        cases = dict(zip(m["slide_id"], m["case_id"]))
    out = []
    for folder in map(Path, cfg.inputs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # read_visium moves to squidpy; same reader
            try:
                a = sc.read_visium(folder)
            except (OSError, KeyError, ValueError) as e:
                raise ImportDataError(f"{folder}: not a Space Ranger output folder ({e})") from e
        lib = next(iter(a.uns["spatial"]))
        diameter = float(a.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"])
        if "in_tissue" in a.obs:
            a = a[a.obs["in_tissue"].astype(int) == 1].copy()
        a.var_names_make_unique()
        sid = folder.parent.name if folder.name == "outs" else folder.name
        out.append(_Sample(sid, cases.get(sid, sid), a, diameter,
                           {"folder": str(folder), "n_spots": a.n_obs, "library": lib}))
    return out


def _write(out: Path, feature_dir: Path, samples: list[_Sample], report: ImportReport, rules: dict) -> ImportReport:
    """Tile features through `mmfm import features`, then spots/<id>.h5ad and the slides.csv `spots` column."""
    files = {s.sample: Path(feature_dir) / f"{s.sample}.h5" for s in samples}
    report.unmatch("samples without tile features (<id>.h5 in --features; extract them from the slide)",
                   [s for s, f in files.items() if not f.is_file()])
    samples = [s for s in samples if files[s.sample].is_file()]
    if not samples:
        raise ImportDataError("no sample has both a spot table and tile features; see the report lists:\n"
                              + report.format())
    case_map = out / "imports" / f"{report.importer}_case_map.csv"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(case_map, pd.DataFrame({"slide_id": [s.sample for s in samples], "case_id": [s.case for s in samples]}))
    features.run(features.FeaturesConfig(out=out, inputs=tuple(files[s.sample] for s in samples), case_map=case_map))
    for s in samples:
        x = s.counts.layers["counts"] if "counts" in s.counts.layers else s.counts.X
        table = ad.AnnData(X=x, obs=pd.DataFrame(index=s.counts.obs_names.astype(str)),
                           var=pd.DataFrame(index=s.counts.var_names.astype(str)),
                           obsm={"spatial": np.asarray(s.counts.obsm["spatial"], np.float64)},
                           uns={"spot_diameter_px": float(s.diameter_px)})
        write_h5ad(out / "spots" / f"{s.sample}.h5ad", table)
        report.per_case[s.sample] = {"case": s.case, **s.facts, "spot_diameter_px": round(s.diameter_px, 3)}
    slides = read_csv_str(out / "slides.csv")
    slides["spots"] = slides.get("spots", pd.Series("", index=slides.index))
    mine = slides["slide_id"].isin([s.sample for s in samples])
    slides.loc[mine, "spots"] = "spots/" + slides.loc[mine, "slide_id"] + ".h5ad"
    write_csv(out / "slides.csv", slides)
    report.written += [str(out / "slides.csv"), str(out / "spots"), str(case_map)]
    report.matched = [s.sample for s in samples]
    report.rules.update(rules)
    return finish(report, out, scan_features=False)


def run_hest(cfg: HestConfig) -> ImportReport:
    report = ImportReport("hest", str(cfg.out), [str(cfg.root), str(cfg.features)])
    return _write(Path(cfg.out), cfg.features, _hest_samples(cfg, report), report, {
        "sample→case": "metadata column `patient` (the sample id when empty)",
        "spot centres": "st/<id>.h5ad obsm['spatial'], full-resolution (level-0) pixels of wsis/<id>.tif",
        "spot diameter": "spot_diameter (µm) / pixel_size_um_estimated (µm/px), level-0 px",
        "technologies": ", ".join(cfg.technologies)})


def run_visium(cfg: VisiumConfig) -> ImportReport:
    report = ImportReport("visium", str(cfg.out), [str(p) for p in cfg.inputs] + [str(cfg.features)])
    return _write(Path(cfg.out), cfg.features, _visium_samples(cfg, report), report, {
        "sample→case": "case_map, else the folder name",
        "spots": "in_tissue == 1 (scanpy read_visium: obsm['spatial'] in full-resolution px)",
        "spot diameter": "scalefactors spot_diameter_fullres (level-0 px)"})
