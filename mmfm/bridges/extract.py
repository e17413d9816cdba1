"""`mmfm extract`: a folder of whole-slide images → a cohort of TRIDENT-compatible tile-feature bags.

Per slide: open (OpenSlide → tiffslide → plain image), segment tissue on a thumbnail, lay the tile grid, then one
DataLoader for the whole shard streams tile batches (workers read, each with its own slide handles) into the
encoder. Batches never cross slides, so a slide's bag is written (atomically) as soon as its last batch is encoded.

Robustness: a complete bag (readable, same encoder and tile geometry) is skipped on re-runs and anything else is
redone; `--shard i/n` takes every n-th slide of the sorted list; a slide that fails is recorded with its reason in
`extract_summary_<i>-of-<n>.json` and the rest go on; the exit code is non-zero if any slide failed.
`slides.csv` / `cases.csv` are merged under a file lock so array jobs can finish in any order.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from mmfm.bridges.encoders import (TileEncoder, autocast_dtype, encode,
                                   get_spec, load_encoder, weights_source)
from mmfm.bridges.readers import (IMAGE_SUFFIXES, SLIDE_SUFFIXES, SlideError, open_slide, patch_size_level0)
from mmfm.bridges.tiles import SlidePlan, TileBatches, mp_context
from mmfm.bridges.tissue import TissueConfig, segment_tissue, tile_grid, write_qc
from mmfm.data import tcga
from mmfm.data.bags import read_header, write_bag
from mmfm.io import atomic_path, write_json, write_text


@dataclass(frozen=True)
class ExtractConfig:
    """Whole-slide images → TRIDENT tile-feature bags in a cohort directory."""

    wsi_dir: Path                     # folder of slides (SVS, NDPI, MRXS, TIFF, PNG, …)
    out: Path                         # cohort directory to create or update
    encoder: str                      # tile encoder name (uni, uni2-h, virchow2, h-optimus-0, conch-v1.5, vit-test, …)
    weights: Path | None = None       # weights file (.safetensors or a torch state dict); never downloaded
    random_init: bool = False         # untrained weights (tests only; flagged in the bags)
    mag: float = 20.0                 # target magnification (20 = 0.5 µm/px)
    patch_size: int = 256             # tile size in px at the target magnification
    mpp: float | None = None          # level-0 µm/px for slides whose files carry none (plain images)
    shard: str = "0/1"                # i/n: this job's share of the sorted slides
    workers: int = 2                  # tile-reading worker processes (0 = in-process)
    batch_size: int = 64              # tiles per encoder call
    case_map: Path | None = None      # CSV with slide_id, case_id (default: a TCGA slide name's participant, else the stem)
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast dtype; auto: the encoder's own on GPU
    tissue: TissueConfig = field(default_factory=TissueConfig)
    progress: bool = True             # progress bar per slide


@dataclass
class SlideResult:
    slide_id: str
    path: str
    status: str  # ok | skipped | failed
    reason: str = ""
    n_tiles: int = 0
    n_fragments: int = 0
    seconds: float = 0.0


def list_slides(wsi_dir: Path) -> list[Path]:
    """Slide files in `wsi_dir`, sorted by name; two files with one stem would collide in `bags/`."""
    if not wsi_dir.is_dir():
        raise FileNotFoundError(f"--wsi-dir {wsi_dir}: not a directory")
    files = sorted(p for p in wsi_dir.iterdir()
                   if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES + IMAGE_SUFFIXES)
    seen: dict[str, Path] = {}
    for p in files:
        if p.stem in seen:
            raise ValueError(f"slide id {p.stem!r} is used by both {seen[p.stem].name} and {p.name}")
        seen[p.stem] = p
    return files


def shard_of(items: list, shard: tuple[int, int]) -> list:
    """Deterministic round-robin split of an already-sorted list (SLURM array task i of n)."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {i}/{n}: need 0 <= i < n")
    return items[i::n]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError as e:
        raise ValueError(f"shard {text!r}: expected i/n, e.g. 0/4") from e
    shard_of([], (i, n))
    return i, n


def bag_is_complete(path: Path, cfg: ExtractConfig, dim: int, weights: str | None) -> bool:
    """A bag counts as done only if it opens and matches this run's encoder, weights and tile geometry
    (so features from random-init or other weights are redone, never kept by a resumed run)."""
    try:
        h = read_header(path)
    except Exception:  # truncated / not HDF5 / missing datasets: redo
        return False
    return (h.n_tiles > 0 and h.dim == dim and h.feature_attrs.get("encoder") == cfg.encoder
            and h.feature_attrs.get("weights") == weights
            and h.coord_attrs.get("patch_size") == cfg.patch_size
            and np.isclose(float(h.coord_attrs.get("target_magnification", -1)), cfg.mag))


def ensure_cohort_yaml(out: Path, cfg: ExtractConfig, dim: int) -> None:
    """Write cohort.yaml if missing; refuse to mix bags of another encoder or tile geometry into a cohort."""
    path = out / "cohort.yaml"
    want = {"tile_encoder": {"name": cfg.encoder, "feature_dim": dim},
            "target_magnification": float(cfg.mag), "patch_size": int(cfg.patch_size)}
    if path.exists():
        have = yaml.safe_load(path.read_text()) or {}
        for key, val in want.items():
            if have.get(key) != val:
                raise ValueError(f"{path}: {key} is {have.get(key)!r} but this run would write {val!r}; "
                                 "use another --out for a different encoder or tile geometry")
        return
    doc = {"name": out.resolve().name, "version": "1",
           "description": f"tile features extracted by mmfm extract from {cfg.wsi_dir}", **want}
    write_text(path, yaml.safe_dump(doc, sort_keys=False))


def read_case_map(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    df = pd.read_csv(path, dtype=str)
    missing = {"slide_id", "case_id"} - set(df.columns)
    if missing:
        raise ValueError(f"--case-map {path}: missing column(s) {sorted(missing)}")
    bad = df[df["slide_id"].isna() | df["case_id"].isna()]
    if len(bad):
        raise ValueError(f"--case-map {path}: empty slide_id/case_id in row {int(bad.index[0]) + 2}")
    return dict(zip(df["slide_id"], df["case_id"]))


def case_of_slide(slide_id: str, case_map: dict[str, str]) -> str:
    """The case map's entry, else the TCGA participant of a TCGA slide name (`TCGA-…-DX1.<uuid>` → `TCGA-…`),
    else the slide id itself (one case per slide)."""
    return case_map.get(slide_id) or tcga.slide_case(slide_id) or slide_id


@contextlib.contextmanager
def _locked(out: Path):
    with open(out / ".extract.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update_tables(out: Path, done: list[str], failed: list[str], case_map: dict[str, str]) -> None:
    """Merge the finished slides into slides.csv (dropping this run's failures, whose bags are not usable) and
    their cases into cases.csv; atomic, under a lock so concurrent shards never lose each other's rows."""
    with _locked(out):
        spath, cpath = out / "slides.csv", out / "cases.csv"
        slides = pd.read_csv(spath, dtype=str, keep_default_na=False) if spath.exists() else \
            pd.DataFrame(columns=["slide_id", "case_id", "path"])
        new = pd.DataFrame({"slide_id": done, "case_id": [case_of_slide(s, case_map) for s in done],
                            "path": [f"bags/{s}.h5" for s in done]})
        slides = pd.concat([slides[~slides["slide_id"].isin(done + failed)], new]).sort_values("slide_id")
        with atomic_path(spath, suffix=".csv") as tmp:
            slides.to_csv(tmp, index=False)
        cases = pd.read_csv(cpath, dtype=str, keep_default_na=False) if cpath.exists() else \
            pd.DataFrame(columns=["case_id", "site"])
        add = sorted(set(slides["case_id"]) - set(cases["case_id"]))
        cases = pd.concat([cases, pd.DataFrame({"case_id": add})]).fillna("").sort_values("case_id")
        with atomic_path(cpath, suffix=".csv") as tmp:
            cases.to_csv(tmp, index=False)


def plan_slide(path: Path, cfg: ExtractConfig, out: Path) -> SlidePlan:
    """Open, segment, lay the grid and write the QC picture; raises SlideError for unusable slides."""
    with open_slide(path, mpp=cfg.mpp) as reader:
        size0 = patch_size_level0(cfg.patch_size, cfg.mag, reader.mpp)
        thumb, _ = reader.thumbnail(cfg.tissue.thumb_mpp)
        thumb_mpp = reader.mpp * reader.dimensions[0] / thumb.shape[1]
        tissue = segment_tissue(thumb, thumb_mpp, cfg.tissue)
        grid = tile_grid(tissue, reader.dimensions, size0, cfg.tissue.min_tissue_fraction)
        write_qc(out / "qc" / f"{path.stem}.png", thumb, tissue, grid, reader.dimensions, size0)
        if len(grid.coords) == 0:
            raise SlideError(f"{path}: no tissue found (saturation threshold {tissue.threshold:.3f}, "
                             f"min tissue fraction {cfg.tissue.min_tissue_fraction})")
        W, H = reader.dimensions
        coord_attrs = {"patch_size": int(cfg.patch_size), "target_magnification": float(cfg.mag),
                       "level0_magnification": 10.0 / reader.mpp, "level0_mpp": float(reader.mpp),
                       "level0_width": int(W), "level0_height": int(H), "overlap": 0, "name": path.stem}
        meta = {"n_fragments": tissue.n_fragments, "n_holes": tissue.n_holes, "reader": reader.backend}
        return SlidePlan(path.stem, path, reader.mpp, grid.coords, grid.fragment, size0, coord_attrs, meta)


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def extract(cfg: ExtractConfig, encoder: TileEncoder | None = None) -> dict:
    """Run the extraction for this shard and return the run summary (also written as JSON).
    `encoder` (already loaded, e.g. shared across calls) must be the one `cfg.encoder` names."""
    if encoder is not None and encoder.spec.name != cfg.encoder:
        raise ValueError(f"encoder {encoder.spec.name!r} given but the config says {cfg.encoder!r}")
    if cfg.random_init and cfg.weights is not None:
        raise ValueError("--weights and --random-init exclude each other")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_spec(cfg.encoder)
    case_map = read_case_map(cfg.case_map)
    slides = shard_of(list_slides(Path(cfg.wsi_dir)), parse_shard(cfg.shard))
    ensure_cohort_yaml(out, cfg, spec.dim)
    t_start = time.time()
    source = encoder.weights if encoder is not None else weights_source(spec, cfg.weights, cfg.random_init)
    results: dict[str, SlideResult] = {}
    todo: list[Path] = []
    for path in slides:
        bag = out / "bags" / f"{path.stem}.h5"
        if bag.exists() and bag_is_complete(bag, cfg, spec.dim, source):
            results[path.stem] = SlideResult(path.stem, str(path), "skipped", "complete bag exists")
        else:
            todo.append(path)
            for stale in bag.parent.glob(f".{bag.name}.*"):  # temp files of an interrupted run
                stale.unlink()
    if todo and encoder is None:  # weights problems surface before any slide work
        encoder = load_encoder(cfg.encoder, cfg.weights, random_init=cfg.random_init)
    plans: list[SlidePlan] = []
    for path in todo:
        t0 = time.time()
        try:
            plan = plan_slide(path, cfg, out)
        except Exception as e:  # one bad slide never stops the batch; the summary says why
            msg = str(e) if isinstance(e, SlideError) else f"{path}: {type(e).__name__}: {e}"
            results[path.stem] = SlideResult(path.stem, str(path), "failed", msg, seconds=time.time() - t0)
            continue
        plans.append(plan)
        results[path.stem] = SlideResult(path.stem, str(path), "failed", "not encoded",
                                         n_fragments=plan.meta["n_fragments"], seconds=time.time() - t0)

    device = _device(cfg.device)
    n_encoded, encode_seconds, precision = 0, 0.0, None
    if plans:
        encoder = encoder.to(device)
        n_encoded, encode_seconds, precision = _encode_plans(plans, cfg, encoder, device, out, results)

    done = [s for s, r in results.items() if r.status in ("ok", "skipped")]
    failed = [s for s, r in results.items() if r.status == "failed"]
    update_tables(out, done, failed, case_map)
    i, n = parse_shard(cfg.shard)
    summary = {
        "shard": f"{i}/{n}", "encoder": cfg.encoder, "weights": encoder.weights if encoder else None,
        "random_init_weights": bool(encoder.random_init) if encoder else None,
        "device": str(device), "precision": str(precision).replace("torch.", "") if precision else None,
        "mag": cfg.mag, "patch_size": cfg.patch_size, "workers": cfg.workers, "batch_size": cfg.batch_size,
        "n_slides": len(slides), "n_ok": sum(r.status == "ok" for r in results.values()),
        "n_skipped": sum(r.status == "skipped" for r in results.values()),
        "n_failed": sum(r.status == "failed" for r in results.values()),
        "tiles_encoded": n_encoded, "tiles_per_s": n_encoded / encode_seconds if encode_seconds else None,
        "seconds": time.time() - t_start,
        "unmapped_slides": [s for s in done if case_map and case_of_slide(s, case_map) == s],  # case_id = slide id
        "slides": [asdict(r) for r in results.values()],
    }
    write_json(out / f"extract_summary_{i}-of-{n}.json", summary)
    return summary


def _encode_plans(plans: list[SlidePlan], cfg: ExtractConfig, encoder: TileEncoder, device: torch.device,
                  out: Path, results: dict[str, SlideResult]) -> tuple[int, float, torch.dtype | None]:
    """Stream every planned slide's tiles through the encoder; write each bag when its last batch is done.
    Returns (tiles encoded, seconds, autocast dtype) and records each slide's outcome in `results`."""
    data = TileBatches(plans, cfg.batch_size, cfg.patch_size)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, shuffle=False, num_workers=cfg.workers, pin_memory=device.type == "cuda",
        multiprocessing_context=mp_context(cfg.workers), prefetch_factor=4 if cfg.workers else None)
    feats: dict[int, list[torch.Tensor]] = {}
    failed: set[int] = set()
    precision, n_encoded, t0 = None, 0, time.time()
    total = sum(len(p.coords) for p in plans)
    bar = tqdm(total=total, unit="tile", disable=not cfg.progress, desc=f"extract {cfg.encoder}")
    try:
        for item in loader:
            p, start = item["slide"], item["start"]
            plan, r = plans[p], results[plans[p].slide_id]
            n = len(plan.coords)
            bar.update(min(cfg.batch_size, n - start))
            if p in failed:
                continue
            if item["error"]:
                failed.add(p)
                feats.pop(p, None)
                r.reason = item["error"]
                continue
            if precision is None:
                precision = autocast_dtype(encoder, device, cfg.precision, item["tiles"])
            t = time.time()
            feats.setdefault(p, []).append(encode(encoder, item["tiles"], precision).cpu())
            r.seconds += time.time() - t
            if start + cfg.batch_size >= n:
                try:
                    _write_slide_bag(out, plan, torch.cat(feats.pop(p)).numpy(), encoder, precision)
                except OSError as e:  # disk full, permissions: this slide fails, the others may still fit
                    r.reason = f"{out / 'bags'}: writing {plan.slide_id}.h5: {e}"
                    continue
                r.status, r.reason, r.n_tiles = "ok", "", n
                n_encoded += n
    except Exception as e:  # a crashed worker ends the loader: the unfinished slides fail, the summary is kept
        for plan in plans:
            if results[plan.slide_id].status != "ok":
                results[plan.slide_id].reason = f"tile loader stopped: {type(e).__name__}: {e}"
    finally:
        bar.close()
        data.close()  # the in-process reader of workers=0
    return n_encoded, time.time() - t0, precision


def _write_slide_bag(out: Path, plan: SlidePlan, features: np.ndarray, encoder: TileEncoder,
                     precision: torch.dtype) -> None:
    write_bag(out / "bags" / f"{plan.slide_id}.h5", features.astype(np.float32), plan.coords,
              patch_size_level0=plan.size_level0, encoder=encoder.spec.name, fragment=plan.fragment,
              coord_attrs=plan.coord_attrs,
              feature_attrs={"name": plan.slide_id, "weights": encoder.weights, "arch": encoder.spec.arch,
                             "autocast": str(precision).replace("torch.", ""), **plan.meta},
              root_attrs={"random_init_weights": bool(encoder.random_init)})
