"""`mmfm extract`: a folder of whole-slide images → a cohort of TRIDENT-compatible tile-feature bags.

Per slide: open (OpenSlide → tiffslide → plain image), segment tissue on a thumbnail, lay the tile grid, then one
DataLoader for the whole shard streams tile batches (workers read, each with its own slide handles) into the
encoder. Batches never cross slides, so a slide's bag is written (atomically) as soon as its last batch is encoded.

Robustness: every argument (folders, encoder, weights, shard, case map, device) is checked before any slide work
and before anything is written; a complete bag (readable, same encoder and tile geometry) is skipped on re-runs and
anything else is redone; `--shard i/n` takes every n-th slide of the sorted list; a slide that fails is recorded
with its reason in `extract_summary_<i>-of-<n>.json` and the rest go on. `cohort.yaml`, `slides.csv` and
`cases.csv` are written only by a run that has at least one bag (a run where every slide failed leaves no cohort
that `mmfm validate` would accept, and changes no table of an existing one); they are merged under a file lock so
array jobs can finish in any order. Several workers over one slide list share it without `--shard`: each claims a
slide with a lock (`bags/.<slide>.lock`, `mmfm.locks`) before touching it, so no slide is done twice, and a dead
worker's claims are taken over by the next run. A target magnification finer than the scan warns
(`UpsamplingWarning`), and so does one other than the encoder's own (`MagnificationWarning`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import warnings
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
from mmfm.bridges.readers import IMAGE_SUFFIXES, SLIDE_SUFFIXES, SlideError, open_slide, upsampling
from mmfm.bridges.tiles import SlidePlan, TileBatches, mp_context
from mmfm.bridges.tissue import TissueConfig, segment_tissue, tile_grid, write_qc
from mmfm.config import yaml_problem
from mmfm.data import tcga
from mmfm.data.bags import mag_to_mpp, patch_size_level0, read_header, write_bag
from mmfm.io import id_list, write_csv, write_json, write_text
from mmfm.locks import LockedError, OwnerLock

ACCEPTED_SUFFIXES = SLIDE_SUFFIXES + IMAGE_SUFFIXES
UPSAMPLE_TOLERANCE = 1.1  # a 40× scan at 0.263 µm/px read at --mag 40 (5 % finer) is not worth a warning


class UpsamplingWarning(UserWarning):
    """The target magnification is finer than the scan: tiles are interpolated, not read."""


class MagnificationWarning(UserWarning):
    """--mag is not the magnification the encoder was trained at: its features are out of distribution."""


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
    case_map: Path | None = None      # CSV slide_id,case_id listing every slide (default: a TCGA slide name's participant, else the stem)
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast dtype; auto: the encoder's own on GPU
    tissue: TissueConfig = field(default_factory=TissueConfig)  # tissue mask: resolution, smallest fragment
    progress: bool = True             # progress bar per slide


@dataclass
class SlideResult:
    slide_id: str
    path: str
    status: str  # ok | skipped | failed | claimed (another worker extracts it: per-slide lock)
    reason: str = ""
    warning: str = ""
    n_tiles: int = 0
    n_fragments: int = 0
    seconds: float = 0.0


def list_slides(wsi_dir: Path) -> list[Path]:
    """Slide files in `wsi_dir`, sorted by name; none is an error (an empty cohort is never what was meant), and
    two files with one stem would collide in `bags/`."""
    if not wsi_dir.is_dir():
        why = "not a directory" if wsi_dir.exists() else "no such directory"
        raise FileNotFoundError(f"--wsi_dir {wsi_dir}: {why}")
    entries = sorted(wsi_dir.iterdir())
    files = [p for p in entries if p.is_file() and p.suffix.lower() in ACCEPTED_SUFFIXES]
    if not files:
        others = [p.name + ("/" if p.is_dir() else "") for p in entries if not p.name.startswith(".")]
        found = f"it holds only {id_list(others, 5)}" if others else "it is empty"
        raise ValueError(f"--wsi_dir {wsi_dir}: no slides ({found}); "
                         f"accepted suffixes: {' '.join(ACCEPTED_SUFFIXES)}")
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
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from e
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


def _cohort_spec(cfg: ExtractConfig, dim: int) -> dict:
    return {"tile_encoder": {"name": cfg.encoder, "feature_dim": dim},
            "target_magnification": float(cfg.mag), "patch_size": int(cfg.patch_size)}


def check_cohort_yaml(out: Path, cfg: ExtractConfig, dim: int) -> bool:
    """Whether `out` already has a cohort.yaml; refuse to mix bags of another encoder or tile geometry into it."""
    path = out / "cohort.yaml"
    if not path.exists():
        return False
    try:
        have = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({yaml_problem(e)})") from e
    if not isinstance(have, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(have).__name__}")
    for key, val in _cohort_spec(cfg, dim).items():
        if have.get(key) != val:
            raise ValueError(f"{path}: {key} is {have.get(key)!r} but this run would write {val!r}; "
                             "use another --out for a different encoder or tile geometry")
    return True


def _write_cohort_yaml(out: Path, cfg: ExtractConfig, dim: int) -> None:
    if check_cohort_yaml(out, cfg, dim):
        return
    doc = {"name": out.resolve().name, "version": "1",
           "description": f"tile features extracted by mmfm extract from {cfg.wsi_dir}", **_cohort_spec(cfg, dim)}
    write_text(out / "cohort.yaml", yaml.safe_dump(doc, sort_keys=False))


def read_case_map(path: Path | None, slide_ids: list[str]) -> dict[str, str]:
    """slide_id → case_id from the --case_map CSV; every slide of --wsi_dir must be in it (a slide left out
    would silently become a case of its own)."""
    if path is None:
        return {}
    path = Path(path)
    where = f"--case_map {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {'not a file' if path.exists() else 'file not found'}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as e:  # pandas: ParserError, EmptyDataError; binary files
        raise ValueError(f"{where}: cannot be read as CSV ({type(e).__name__}: {e})".replace("\n", " ")) from e
    missing = {"slide_id", "case_id"} - set(df.columns)
    if missing:
        raise ValueError(f"{where}: missing column(s) {sorted(missing)} (has {list(df.columns)[:10]})")
    df = df.assign(slide_id=df["slide_id"].str.strip(), case_id=df["case_id"].str.strip())
    bad = df[df["slide_id"].eq("") | df["case_id"].eq("")]
    if len(bad):
        raise ValueError(f"{where}: empty slide_id/case_id in line {int(bad.index[0]) + 2}")
    pairs = df.drop_duplicates(["slide_id", "case_id"])
    clash = pairs["slide_id"][pairs["slide_id"].duplicated()]
    if len(clash):
        raise ValueError(f"{where}: slide(s) mapped to more than one case_id: {id_list(sorted(set(clash)))}")
    mapping = dict(zip(pairs["slide_id"], pairs["case_id"]))
    unmapped = [s for s in slide_ids if s not in mapping]
    if unmapped:
        raise ValueError(f"{where}: no case_id for {len(unmapped)} slide(s) of --wsi_dir: {id_list(unmapped)} "
                         "(slide_id is the file name without its suffix)")
    return mapping


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


def update_cohort(out: Path, cfg: ExtractConfig, dim: int, done: list[str], failed: list[str],
                  case_map: dict[str, str]) -> None:
    """Write cohort.yaml if missing and merge the finished slides into slides.csv (dropping this run's failures,
    whose bags are not usable) and their cases into cases.csv; atomic, under a lock so concurrent shards never
    lose each other's rows. Called only when this run has at least one bag."""
    with _locked(out):
        _write_cohort_yaml(out, cfg, dim)
        spath, cpath = out / "slides.csv", out / "cases.csv"
        slides = pd.read_csv(spath, dtype=str, keep_default_na=False) if spath.exists() else \
            pd.DataFrame(columns=["slide_id", "case_id", "path"])
        new = pd.DataFrame({"slide_id": done, "case_id": [case_of_slide(s, case_map) for s in done],
                            "path": [f"bags/{s}.h5" for s in done]})
        slides = pd.concat([slides[~slides["slide_id"].isin(done + failed)], new]).sort_values("slide_id")
        write_csv(spath, slides, index=False)
        cases = pd.read_csv(cpath, dtype=str, keep_default_na=False) if cpath.exists() else \
            pd.DataFrame(columns=["case_id", "site"])
        add = sorted(set(slides["case_id"]) - set(cases["case_id"]))
        cases = pd.concat([cases, pd.DataFrame({"case_id": add})]).fillna("").sort_values("case_id")
        cases["site"] = tcga.fill_sites(cases["case_id"], cases["site"])  # TCGA: the tissue source site
        write_csv(cpath, cases, index=False)


def plan_slide(path: Path, cfg: ExtractConfig, out: Path) -> SlidePlan:
    """Open, segment, lay the grid and write the QC picture; raises SlideError for unusable slides and warns
    (UpsamplingWarning) when the target magnification is finer than the scan."""
    with open_slide(path, mpp=cfg.mpp) as reader:
        factor = upsampling(reader.mpp, cfg.mag)
        if factor > UPSAMPLE_TOLERANCE:
            hint = "check --mpp or lower --mag" if reader.mpp_from == "--mpp" else "lower --mag"
            warnings.warn(UpsamplingWarning(
                f"{path}: scanned at {reader.mpp:.3g} µm/px (from {reader.mpp_from}, ≈{10 / reader.mpp:.3g}×) but "
                f"--mag {cfg.mag:g} needs {mag_to_mpp(cfg.mag):.3g} µm/px: tiles are upsampled {factor:.2f}× "
                f"(interpolated pixels, no added detail); {hint}"))
        size0 = patch_size_level0(cfg.patch_size, cfg.mag, reader.mpp)
        tile_um = size0 * reader.mpp
        thumb, _ = reader.thumbnail(cfg.tissue.mask_mpp(tile_um, reader.mpp, reader.dimensions))
        thumb_mpp = reader.mpp * reader.dimensions[0] / thumb.shape[1]
        tissue = segment_tissue(thumb, thumb_mpp, cfg.tissue, tile_um)
        grid = tile_grid(tissue, reader.dimensions, size0, cfg.tissue.min_tissue_fraction)
        qc = write_qc(out / "qc" / f"{path.stem}.png", thumb, tissue, grid, reader.dimensions, size0)
        if len(grid.coords) == 0:
            if tissue.n_fragments == 0:
                raise SlideError(
                    f"{path}: no tissue found (saturation threshold {tissue.threshold:.3f}, mask at "
                    f"{thumb_mpp:.3g} µm/px, pieces under {cfg.tissue.fragment_floor_um2(tile_um):.0f} µm² "
                    f"dropped); see {qc}")
            raise SlideError(
                f"{path}: {tissue.n_fragments} tissue fragment(s) of {tissue.mask.sum() * thumb_mpp**2:.0f} µm² "
                f"but no tile has ≥ {cfg.tissue.min_tissue_fraction:g} tissue; lower "
                f"--tissue.min_tissue_fraction; see {qc}")
        W, H = reader.dimensions
        coord_attrs = {"patch_size": int(cfg.patch_size), "target_magnification": float(cfg.mag),
                       "level0_magnification": 10.0 / reader.mpp, "level0_mpp": float(reader.mpp),
                       "level0_width": int(W), "level0_height": int(H), "overlap": 0, "name": path.stem}
        meta = {"n_fragments": tissue.n_fragments, "n_holes": tissue.n_holes, "reader": reader.backend,
                "tissue_mask_mpp": float(thumb_mpp)}
        return SlidePlan(path.stem, path, reader.mpp, grid.coords, grid.fragment, size0, coord_attrs, meta)


def check_config(cfg: ExtractConfig) -> torch.device:
    """Every scalar argument checked before any work; returns the torch device --device names."""
    for name in ("mag", "patch_size", "batch_size"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name} {getattr(cfg, name)}: must be positive")
    if cfg.workers < 0:
        raise ValueError(f"--workers {cfg.workers}: must be ≥ 0 (0 reads tiles in-process)")
    if cfg.mpp is not None and not cfg.mpp > 0:
        raise ValueError(f"--mpp {cfg.mpp}: must be positive (µm per level-0 pixel)")
    if not 0 <= cfg.tissue.min_tissue_fraction <= 1:
        raise ValueError(f"--tissue.min_tissue_fraction {cfg.tissue.min_tissue_fraction}: must be in [0, 1]")
    if cfg.tissue.mask_px_per_tile < 1:
        raise ValueError(f"--tissue.mask_px_per_tile {cfg.tissue.mask_px_per_tile}: must be ≥ 1")
    if cfg.random_init and cfg.weights is not None:
        raise ValueError("--weights and --random_init exclude each other")
    return _device(cfg.device)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from e
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {name}: no CUDA device here; use --device cpu (or auto)")
        if device.index is not None and device.index >= n:
            raise ValueError(f"--device {name}: only {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return device


def extract(cfg: ExtractConfig, encoder: TileEncoder | None = None) -> dict:
    """Run the extraction for this shard and return the run summary (also written as JSON).
    `encoder` (already loaded, e.g. shared across calls) must be the one `cfg.encoder` names.
    `n_bags` in the summary is 0 when no slide gave a bag: then no cohort file was written or changed."""
    if encoder is not None and encoder.spec.name != cfg.encoder:
        raise ValueError(f"encoder {encoder.spec.name!r} given but the config says {cfg.encoder!r}")
    device = check_config(cfg)
    spec = get_spec(cfg.encoder)
    if spec.mag is not None and not np.isclose(cfg.mag, spec.mag):
        warnings.warn(MagnificationWarning(
            f"--mag {cfg.mag:g}: {spec.name} was trained on tiles at {spec.mag:g}× ({mag_to_mpp(spec.mag):.3g} "
            f"µm/px); features at {cfg.mag:g}× are out of its training distribution"))
    wsi_dir, out = Path(cfg.wsi_dir), Path(cfg.out)
    every = list_slides(wsi_dir)
    case_map = read_case_map(cfg.case_map, [p.stem for p in every])
    i, n = parse_shard(cfg.shard)
    slides = shard_of(every, (i, n))
    if not slides:
        raise ValueError(f"--shard {i}/{n}: no slide falls in this shard ({len(every)} slide(s) in {wsi_dir} "
                         f"fill shards 0..{len(every) - 1}); use at most {len(every)} shards")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a directory")
    check_cohort_yaml(out, cfg, spec.dim)
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
    if todo and encoder is None:  # weights problems surface before any slide work or write
        encoder = load_encoder(cfg.encoder, cfg.weights, random_init=cfg.random_init)
    out.mkdir(parents=True, exist_ok=True)
    plans: list[SlidePlan] = []
    claims: dict[str, OwnerLock] = {}
    mask_s = 0.0
    try:
        for path in tqdm(todo, unit="slide", desc="tissue", disable=not cfg.progress or not todo):
            claim = OwnerLock(out / "bags" / f".{path.stem}.lock", what=f"slide {path.stem}")
            try:
                claim.acquire()
            except LockedError as e:  # another worker extracts it now: its bag and table rows are that worker's
                results[path.stem] = SlideResult(path.stem, str(path), "claimed", str(e))
                continue
            claims[path.stem] = claim
            bag = out / "bags" / f"{path.stem}.h5"
            if bag.exists() and bag_is_complete(bag, cfg, spec.dim, source):  # finished by another worker meanwhile
                results[path.stem] = SlideResult(path.stem, str(path), "skipped", "complete bag exists")
                claims.pop(path.stem).release()
                continue
            t = time.perf_counter()
            _plan_one(path, cfg, out, plans, results)
            mask_s += time.perf_counter() - t
        n_encoded, encode_seconds, precision, stages = 0, 0.0, None, {}
        if plans:
            encoder = encoder.to(device)
            n_encoded, encode_seconds, precision, stages = _encode_plans(plans, cfg, encoder, device, out, results)
        stages = {"mask": _stage(mask_s, sum(len(p.coords) for p in plans)), **stages}
    finally:
        for claim in claims.values():
            claim.release()

    done = [s for s, r in results.items() if r.status in ("ok", "skipped")]
    done = [s for s, r in results.items() if r.status in ("ok", "skipped")]
    failed = [s for s, r in results.items() if r.status == "failed"]
    if done:
        update_cohort(out, cfg, spec.dim, done, failed, case_map)
    summary = {
        "shard": f"{i}/{n}", "encoder": cfg.encoder, "weights": encoder.weights if encoder else None,
        "random_init_weights": bool(encoder.random_init) if encoder else None,
        "device": str(device), "precision": str(precision).replace("torch.", "") if precision else None,
        "mag": cfg.mag, "patch_size": cfg.patch_size, "workers": cfg.workers, "batch_size": cfg.batch_size,
        "n_slides": len(slides), "n_ok": sum(r.status == "ok" for r in results.values()),
        "n_skipped": sum(r.status == "skipped" for r in results.values()),
        "n_failed": len(failed), "n_bags": len(done),
        "n_claimed": sum(r.status == "claimed" for r in results.values()),
        "tiles_encoded": n_encoded, "tiles_per_s": n_encoded / encode_seconds if n_encoded else None,
        "stages": stages,
        "seconds": time.time() - t_start,
        "slides": [asdict(r) for r in results.values()],
    }
    name = f"extract_summary_{i}-of-{n}" + (f".{os.getpid()}" if summary["n_claimed"] else "")  # workers side by side
    write_json(out / f"{name}.json", summary)
    return summary


def _plan_one(path: Path, cfg: ExtractConfig, out: Path, plans: list[SlidePlan],
              results: dict[str, SlideResult]) -> None:
    """Tissue mask and tile grid of one claimed slide → `plans`; a slide that fails is recorded, never raised."""
    for stale in (out / "bags").glob(f".{path.stem}.h5.*"):  # temp files of an interrupted run (ours: claimed)
        stale.unlink()
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UpsamplingWarning)
        try:
            plan = plan_slide(path, cfg, out)
        except Exception as e:  # one bad slide never stops the batch; the summary says why
            plan, msg = None, str(e) if isinstance(e, SlideError) else f"{path}: {type(e).__name__}: {e}"
    note = "; ".join(str(w.message) for w in caught if issubclass(w.category, UpsamplingWarning))
    for w in caught:  # re-issued outside the recorder: the caller (the CLI) decides how to show them
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if plan is None:
        results[path.stem] = SlideResult(path.stem, str(path), "failed", msg, note, seconds=time.time() - t0)
        return
    plans.append(plan)
    results[path.stem] = SlideResult(path.stem, str(path), "failed", "not encoded", note,
                                     n_fragments=plan.meta["n_fragments"], seconds=time.time() - t0)


def _stage(seconds: float, tiles: int) -> dict:
    return {"seconds": seconds, "tiles": tiles, "tiles_per_s": tiles / seconds if seconds > 0 else None}


def _encode_plans(plans: list[SlidePlan], cfg: ExtractConfig, encoder: TileEncoder, device: torch.device,
                  out: Path, results: dict[str, SlideResult]) -> tuple[int, float, torch.dtype | None, dict]:
    """Stream every planned slide's tiles through the encoder; write each bag when its last batch is done.
    Returns (tiles encoded, seconds, autocast dtype, per-stage timing) and records each slide's outcome in
    `results`. Stages: read (seconds summed over the tile-reading workers: with W workers the reader supplies up
    to W × its tiles/s), encode (host → device, forward, device → host), write (bag files), and reader_wait (the
    encoder loop blocked on the reader: a large share of the loop means reading is the bottleneck)."""
    data = TileBatches(plans, cfg.batch_size, cfg.patch_size)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, shuffle=False, num_workers=cfg.workers, pin_memory=device.type == "cuda",
        multiprocessing_context=mp_context(cfg.workers), prefetch_factor=4 if cfg.workers else None)
    feats: dict[int, list[torch.Tensor]] = {}
    failed: set[int] = set()
    precision, n_encoded, t0 = None, 0, time.time()
    total = sum(len(p.coords) for p in plans)
    bar = tqdm(total=total, unit="tile", disable=not cfg.progress, desc=f"extract {cfg.encoder}")
    n_written = 0
    took = dict.fromkeys(("read", "wait", "encode", "write"), 0.0)
    n_read = n_batch_encoded = 0
    try:
        batches = iter(loader)
        while True:
            t = time.perf_counter()
            item = next(batches, None)
            took["wait"] += time.perf_counter() - t
            if item is None:
                break
            took["read"] += item["read_s"]
            n_read += len(item["tiles"])
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
            t = time.perf_counter()
            feats.setdefault(p, []).append(encode(encoder, item["tiles"], precision).cpu())  # .cpu(): synchronised
            dt = time.perf_counter() - t
            took["encode"] += dt
            r.seconds += dt
            n_batch_encoded += len(item["tiles"])
            if start + cfg.batch_size >= n:
                t = time.perf_counter()
                try:
                    _write_slide_bag(out, plan, torch.cat(feats.pop(p)).numpy(), encoder, precision)
                except OSError as e:  # disk full, permissions: this slide fails, the others may still fit
                    r.reason = f"{out / 'bags'}: writing {plan.slide_id}.h5: {e}"
                    continue
                finally:
                    took["write"] += time.perf_counter() - t
                r.status, r.reason, r.n_tiles = "ok", "", n
                n_encoded += n
                n_written += 1
                bar.set_postfix_str(f"{n_written}/{len(plans)} slides", refresh=False)
    except Exception as e:  # a crashed worker ends the loader: the unfinished slides fail, the summary is kept
        for plan in plans:
            if results[plan.slide_id].status != "ok":
                results[plan.slide_id].reason = f"tile loader stopped: {type(e).__name__}: {e}"
    finally:
        bar.close()
        data.close()  # the in-process reader of workers=0
    tiles = {"read": n_read, "encode": n_batch_encoded, "write": n_encoded}
    stages = {k: _stage(took[k], n) for k, n in tiles.items()}
    return n_encoded, time.time() - t0, precision, {**stages, "reader_wait": {"seconds": took["wait"]}}


def _write_slide_bag(out: Path, plan: SlidePlan, features: np.ndarray, encoder: TileEncoder,
                     precision: torch.dtype) -> None:
    write_bag(out / "bags" / f"{plan.slide_id}.h5", features.astype(np.float32), plan.coords,
              patch_size_level0=plan.size_level0, encoder=encoder.spec.name, fragment=plan.fragment,
              coord_attrs=plan.coord_attrs,
              feature_attrs={"name": plan.slide_id, "weights": encoder.weights, "arch": encoder.spec.arch,
                             "autocast": str(precision).replace("torch.", ""), **plan.meta},
              root_attrs={"random_init_weights": bool(encoder.random_init)})
