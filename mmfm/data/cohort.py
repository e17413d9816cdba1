"""The cohort directory contract: open eagerly, check everything, report every problem at once.

A cohort is a directory (full contract: data_cards/cohort_format.md):
  cohort.yaml    name, version, description, tile_encoder {name, feature_dim}, target_magnification, patch_size
  cases.csv      case_id, site, optional clinical columns (os_days, os_event, subtype, grade, mut_<GENE>, ...)
  slides.csv     slide_id, case_id, path (bag path relative to the cohort directory)
  bags/*.h5      TRIDENT-layout tile-feature bags (`mmfm.data.bags`)
  rna.h5ad, protein.h5ad, reports.jsonl   optional modalities, keyed by case_id
  spots/<slide>.h5ad   optional spot tables of spatial transcriptomics (slides.csv column `spots`, mmfm.data.spots)

Validation is one pass that collects every error and warning, each naming the file and the row,
slide or case, so a broken cohort is fixed in one round instead of one crash at a time. Each error
either says what a non-strict open drops (`ValidationReport.excluded`) or is fatal (a missing
file or column): nothing is ever dropped without being listed.

Why one module of ~600 lines: the contract is one pass over every file of the directory, each reader feeding the
same report and the cross-file checks (a slide's case, an omics row's case, presence); split by file, the
contract would be read in five places and the one-round error list would need a shared protocol.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import yaml

from mmfm import MODALITIES, memo
from mmfm.config import yaml_problem
from mmfm.data import tcga, tile_encoders
from mmfm.data.bags import read_header
from mmfm.data.scan_cache import ScanCache
from mmfm.io import check_header, ends_mid_line, id_list

SMALL_BAG_TILES = 16  # bags below this are legal but suspicious (a failed tissue mask, a thumbnail)
SCAN_CHUNK_BYTES = 64 << 20  # feature rows are scanned for NaN/inf in blocks of about this size
MISSING = frozenset({"", "na", "nan", "none", "null"})  # spellings of "unknown" in numeric CSV cells
LIST_MAX = 20  # ids listed in one message before "... and N more"

CASE_COLUMNS = ("case_id", "site")
SLIDE_COLUMNS = ("slide_id", "case_id", "path")
SPEC_KEYS = {"name", "version", "description", "tile_encoder", "target_magnification", "patch_size"}


class CohortError(ValueError):
    """A cohort that cannot be opened; the message lists every problem found."""

    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__(report.format())


@dataclass
class ValidationReport:
    """All problems of one cohort. `excluded` says what `Cohort.open(strict=False)` leaves out."""

    root: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    fatal: bool = False  # some error cannot be repaired by excluding data (missing file, column, key)

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, msg: str, exclude: str | None = None) -> None:
        self.errors.append(msg)
        if exclude is None:
            self.fatal = True
        elif exclude not in self.excluded:  # several problems of one bag exclude it once
            self.excluded.append(exclude)

    def warn(self, msg: str, exclude: str | None = None) -> None:
        self.warnings.append(msg)
        if exclude is not None and exclude not in self.excluded:
            self.excluded.append(exclude)

    def format(self) -> str:
        head = (f"cohort {self.root}: {len(self.errors)} error(s), {len(self.warnings)} warning(s), "
                f"{len(self.excluded)} exclusion(s) under strict=False")
        lines = [head]
        lines += [f"ERROR    {m}" for m in self.errors]
        lines += [f"WARNING  {m}" for m in self.warnings]
        lines += [f"EXCLUDED {m}" for m in self.excluded]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "ok": self.ok, "fatal": self.fatal, "errors": self.errors,
                "warnings": self.warnings, "excluded": self.excluded}


@dataclass(frozen=True)
class CohortSpec:
    """cohort.yaml, flattened."""

    name: str
    version: str
    description: str
    encoder_name: str
    feature_dim: int
    target_magnification: float
    patch_size: int

    def to_dict(self) -> dict[str, Any]:
        """The cohort.yaml mapping (writers: `yaml.safe_dump(spec.to_dict())`)."""
        d = asdict(self)
        return {"name": d["name"], "version": d["version"], "description": d["description"],
                "tile_encoder": {"name": d["encoder_name"], "feature_dim": d["feature_dim"]},
                "target_magnification": d["target_magnification"], "patch_size": d["patch_size"]}




def _positive(value, kind) -> int | float | None:
    """`value` as a positive int/float of that kind, else None (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    if kind is int and not float(value).is_integer():
        return None
    return kind(value)


def _text(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _read_spec(root: Path, rep: ValidationReport) -> CohortSpec | None:
    path = root / "cohort.yaml"
    if not path.is_file():
        rep.error(f"cohort.yaml: missing (expected at {path})")
        return None
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        rep.error(f"cohort.yaml: not valid YAML ({yaml_problem(e)})")
        return None
    if not isinstance(d, dict):
        rep.error("cohort.yaml: must be a mapping of keys to values")
        return None
    enc = d.get("tile_encoder") if isinstance(d.get("tile_encoder"), dict) else {}
    for key in sorted(set(d) - SPEC_KEYS) + [f"tile_encoder.{k}" for k in sorted(set(enc) - {"name", "feature_dim"})]:
        rep.warn(f"cohort.yaml: unknown key '{key}' ignored")
    version = d.get("version")
    fields = {  # CohortSpec field: (yaml key, raw value, parsed value or None, what is expected)
        "name": ("name", d.get("name"), _text(d.get("name")), "a non-empty string"),
        "version": ("version", version, None if isinstance(version, bool) or not isinstance(version, (str, int, float))
                    else _text(str(version)), "a string"),
        "description": ("description", d.get("description", ""),
                        d.get("description", "") if isinstance(d.get("description", ""), str) else None, "a string"),
        "encoder_name": ("tile_encoder.name", enc.get("name"), _text(enc.get("name")), "a non-empty string"),
        "feature_dim": ("tile_encoder.feature_dim", enc.get("feature_dim"), _positive(enc.get("feature_dim"), int),
                        "a positive integer"),
        "target_magnification": ("target_magnification", d.get("target_magnification"),
                                 _positive(d.get("target_magnification"), float), "a positive number"),
        "patch_size": ("patch_size", d.get("patch_size"), _positive(d.get("patch_size"), int),
                       "a positive integer (px at target_magnification)"),
    }
    bad = [(key, raw, what) for key, raw, value, what in fields.values() if value is None]
    for key, raw, what in bad:
        rep.error(f"cohort.yaml: key '{key}' missing or invalid (expected {what}, got {raw!r})")
    return None if bad else CohortSpec(**{f: v[2] for f, v in fields.items()})


def _read_csv(path: Path, required: tuple[str, ...], rep: ValidationReport) -> pd.DataFrame | None:
    """All cells as stripped strings (ids like 'NA' or '007' survive); None when unusable."""
    if not path.is_file():
        rep.error(f"{path.name}: missing (expected at {path})")
        return None
    try:
        check_header(path)
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        rep.error(f"{path.name}: cannot be parsed as CSV ({str(e).replace(str(path), path.name)})")
        return None
    if ends_mid_line(path):
        rep.error(f"{path.name}: ends in the middle of line {len(df) + 1} (a truncated copy or download?); "
                  f"nothing of it is used")
        return None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        rep.error(f"{path.name}: required column(s) {missing} missing (has {list(df.columns)})")
        return None
    dup = df.columns[df.columns.duplicated()].tolist()
    if dup:
        rep.error(f"{path.name}: duplicate column(s) {dup}")
        return None
    return df.apply(lambda s: s.str.strip())


def _unique_ids(df: pd.DataFrame, col: str, fname: str, rep: ValidationReport) -> np.ndarray:
    """Keep mask: rows with an empty id, a slide id that is not a file name (slide ids name output files, so one
    read from a file must never climb out of an output directory) or a repeat of an earlier id are errors and
    excluded."""
    keep = np.ones(len(df), bool)
    first: dict[str, int] = {}
    for i, v in enumerate(df[col]):
        line = i + 2  # header is line 1
        if not v:
            rep.error(f"{fname} line {line}: empty {col}", exclude=f"{fname} line {line} (empty {col})")
            keep[i] = False
        elif col == "slide_id" and (v in (".", "..") or any(c in v for c in "/\\\0")):  # names bag / heatmap files
            rep.error(f"{fname} line {line}: {col} {v!r} is not a file name (no '/', '\\', '.' or '..')",
                      exclude=f"{fname} line {line} ({col} {v!r}, not a file name)")
            keep[i] = False
        elif v in first:
            rep.error(f"{fname} line {line}: duplicate {col} '{v}' (first on line {first[v]})",
                      exclude=f"{fname} line {line} ({col} {v}, duplicate; line {first[v]} kept)")
            keep[i] = False
        else:
            first[v] = line
    return keep


def _numeric(raw: pd.Series, col: str, rep: ValidationReport, ids: pd.Series, lines: np.ndarray,
             integer: bool = False, choices: tuple[float, ...] | None = None, nonneg: bool = False,
             warn_only: bool = False) -> pd.Series:
    """Parse a numeric clinical column; bad cells are reported and become missing (listed as excluded)."""
    out = np.full(len(raw), np.nan)
    for i, (cell, cid, line) in enumerate(zip(raw, ids, lines)):
        if cell.lower() in MISSING:
            continue
        try:
            v = float(cell)
        except ValueError:
            v = None
        problem = None
        if choices is not None and v not in choices:
            problem = f"{col} {cell!r} is not one of {[int(c) for c in choices]}"
        elif v is None or not math.isfinite(v):
            problem = f"{col} {cell!r} is not a finite number"
        elif integer and not v.is_integer():
            problem = f"{col} {cell!r} is not an integer"
        elif nonneg and v < 0:
            problem = f"{col} {cell!r} is negative"
        if problem is None:
            out[i] = v
            continue
        where = f"cases.csv line {line} (case {cid})"
        (rep.warn if warn_only else rep.error)(f"{where}: {problem}", exclude=f"{where}: {col} set to missing")
    return pd.Series(out, index=raw.index, name=col)


def _read_cases(root: Path, rep: ValidationReport) -> pd.DataFrame | None:
    df = _read_csv(root / "cases.csv", CASE_COLUMNS, rep)
    if df is None:
        return None
    lines = np.arange(len(df)) + 2
    keep = _unique_ids(df, "case_id", "cases.csv", rep)
    df, lines = df[keep], lines[keep]
    out = df.copy()
    ids = df["case_id"]
    for col in df.columns:
        if col == "os_days":
            out[col] = _numeric(df[col], col, rep, ids, lines, nonneg=True)
        elif col == "os_event":
            out[col] = _numeric(df[col], col, rep, ids, lines, choices=(0.0, 1.0))
        elif col == "grade":
            out[col] = _numeric(df[col], col, rep, ids, lines, integer=True)
        elif col.startswith("mut_"):
            out[col] = _numeric(df[col], col, rep, ids, lines, choices=(0.0, 1.0), warn_only=True)
        elif col != "case_id":
            out[col] = df[col].mask(df[col].eq(""))  # empty = unknown (NaN), dtype stays object
    no_site = out.loc[out["site"].isna(), "case_id"].tolist()
    if no_site:
        rep.warn(f"cases.csv: {len(no_site)} case(s) with empty site (site-preserved splits and robustness "
                 f"metrics cannot use them): {id_list(no_site, LIST_MAX)}")
    if "os_days" in out and "os_event" in out:
        half = out["os_days"].isna() != out["os_event"].isna()
        if half.any():
            rep.warn(f"cases.csv: {int(half.sum())} case(s) with only one of os_days/os_event known "
                     f"(unusable for survival): {id_list(out.loc[half, 'case_id'], LIST_MAX)}")
        known = out["os_event"].dropna()
        if len(known) and not known.any():
            rep.warn(f"cases.csv: every one of the {len(known)} case(s) with a known os_event is censored (0): "
                     f"survival probes on this cohort have no events to score")
    return out.set_index("case_id")


def _check_bag(path: Path, where: str, spec: CohortSpec | None, rep: ValidationReport,
               scan: ScanCache | None) -> dict | None:
    """Header checks plus a chunked NaN/inf scan (none when `scan` is None); the slide's bag facts, or None."""
    problems: list[str] = []
    try:
        hdr = read_header(path)
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as e:
        rep.error(f"{where}: unreadable bag, needs datasets 'features' and 'coords' ({e})",
                  exclude=f"{where} (unreadable bag)")
        return None
    with h5py.File(path, "r") as f:
        feats, coords = f["features"], f["coords"]
        if feats.ndim != 2:
            problems.append(f"features must be rank 2 [N, D], got shape {feats.shape}")
        if feats.dtype not in (np.float16, np.float32):
            problems.append(f"features dtype {feats.dtype} is not float16/float32")
        if coords.shape != (hdr.n_tiles, 2):
            problems.append(f"coords shape {coords.shape} does not match features {feats.shape} (want [N, 2])")
        if not np.issubdtype(coords.dtype, np.integer):
            problems.append(f"coords dtype {coords.dtype} is not integer (level-0 pixels)")
        frag = f.get("fragment")
        if frag is not None and not (isinstance(frag, h5py.Dataset) and frag.shape == (hdr.n_tiles,)
                                     and np.issubdtype(frag.dtype, np.integer)):
            problems.append(f"fragment must be an integer dataset of shape ({hdr.n_tiles},), got "
                            f"{getattr(frag, 'shape', 'a group')} {getattr(frag, 'dtype', '')}")
        if hdr.n_tiles == 0:
            problems.append("zero tiles")
        if hdr.patch_size_level0 is None:
            problems.append("coords attribute 'patch_size_level0' missing")
        elif hdr.patch_size_level0 <= 0:
            problems.append(f"coords attribute patch_size_level0={hdr.patch_size_level0} is not positive")
        if spec is not None and feats.ndim == 2 and hdr.dim != spec.feature_dim:
            problems.append(f"feature dim {hdr.dim} differs from cohort.yaml tile_encoder.feature_dim "
                            f"{spec.feature_dim}")
        problems += _provenance_problems(hdr, spec)
        if scan is not None and not problems:
            bad, first = scan.result(path, lambda: _scan_nonfinite(feats))
            if bad:
                problems.append(f"{bad} feature row(s) contain NaN/inf (first at row {first})")
    for p in problems:
        rep.error(f"{where}: {p}", exclude=f"{where} (invalid bag)")
    if problems:
        return None
    if hdr.random_init:
        rep.warn(f"{where}: features come from a RANDOMLY INITIALISED tile encoder (random_init_weights=True); "
                 "they are for testing pipelines, not for results")
    enc = hdr.feature_attrs.get("encoder")
    ps = hdr.coord_attrs.get("patch_size")
    if spec is not None and ps is not None and _as_float(ps) != spec.patch_size:
        rep.warn(f"{where}: coords attr patch_size={ps!r} differs from cohort.yaml {spec.patch_size}")
    if hdr.n_tiles < SMALL_BAG_TILES:
        rep.warn(f"{where}: only {hdr.n_tiles} tiles (< {SMALL_BAG_TILES})")
    return {"n_tiles": hdr.n_tiles, "patch_size_level0": hdr.patch_size_level0, "feature_dim": hdr.dim,
            "encoder": None if enc is None else str(enc), "has_fragment": hdr.has_fragment}


def _provenance_problems(hdr, spec: CohortSpec | None) -> list[str]:
    """A bag of another tile encoder or magnification than cohort.yaml's: its features live in another space (a
    probe or slide encoder would mix them silently). TRIDENT's and mmfm's names of one encoder are one encoder."""
    if spec is None:
        return []
    out = []
    enc = hdr.feature_attrs.get("encoder")
    if enc is not None and tile_encoders.canonical(str(enc)) != tile_encoders.canonical(spec.encoder_name):
        out.append(f"features attr encoder={enc!r} differs from cohort.yaml tile_encoder.name "
                   f"{spec.encoder_name!r} (a cohort holds features of one tile encoder)")
    mag = hdr.coord_attrs.get("target_magnification")
    if mag is not None and _as_float(mag) != spec.target_magnification:
        out.append(f"coords attr target_magnification={mag!r} differs from cohort.yaml "
                   f"{spec.target_magnification} (a cohort holds tiles of one magnification)")
    return out


def _climbs_out(rel: str) -> bool:
    """A relative path read from a table that leaves the cohort directory (`../`): names read from files must not
    reach outside it. Absolute paths are the way to point elsewhere, on purpose."""
    return not Path(rel).is_absolute() and os.path.normpath(rel).split(os.sep)[0] == ".."


def _check_spots(root: Path, rel: str, bag: Path, tile_size: int, where: str, rep: ValidationReport,
                 counts: bool) -> int:
    """A slide's spot table (mmfm.data.spots): readable, on the contract (its counts scanned too when `counts`, as
    bag features are), its spot centres on the slide's tiles. Returns the number of spots matched to a tile (0 =
    unusable: an error, the slide's bag stays usable)."""
    from mmfm.data.spots import MIN_MATCHED, SpotError, match_spots, read_spots

    where = f"{where}: spots {rel}"
    if _climbs_out(rel):
        rep.error(f"{where}: climbs out of the cohort directory (a relative path stays inside it)",
                  exclude=f"{where} (spot table outside)")
        return 0
    if not (root / rel).is_file():
        rep.error(f"{where}: file missing", exclude=f"{where} (spot table missing)")
        return 0
    try:
        spots = read_spots(root / rel, counts=counts)
    except SpotError as e:
        rep.error(f"{where}: {e}", exclude=f"{where} (invalid spot table)")
        return 0
    with h5py.File(bag, "r") as f:
        coords = f["coords"][:]
    hit = match_spots(spots.obsm["spatial"], coords, tile_size) >= 0
    if not hit.any():
        rep.error(f"{where}: none of its {spots.n_obs} spot centres lies on one of the slide's {len(coords)} tiles "
                  "(obsm['spatial'] must be level-0 pixels of the slide the bag was cut from)",
                  exclude=f"{where} (spots off the tiles)")
        return 0
    if hit.mean() < MIN_MATCHED:
        rep.warn(f"{where}: only {int(hit.sum())} of {spots.n_obs} spot centres lie on a tile (spots off the tissue "
                 "mask, or coordinates at another level?)")
    return int(hit.sum())


def _as_float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _scan_nonfinite(ds: h5py.Dataset) -> tuple[int, int | None]:
    """(rows with NaN/inf, first such row), reading ~SCAN_CHUNK_BYTES at a time (bags can be GBs)."""
    n, d = ds.shape
    step = max(1, SCAN_CHUNK_BYTES // max(1, d * ds.dtype.itemsize))
    if ds.chunks:  # whole HDF5 chunks per read
        step = max(ds.chunks[0], step - step % ds.chunks[0])
    bad, first = 0, None
    for start in range(0, n, step):
        rows = ~np.isfinite(ds[start:start + step]).all(axis=1)
        if rows.any():
            bad += int(rows.sum())
            first = start + int(np.argmax(rows)) if first is None else first
    return bad, first


def _read_slides(root: Path, cases: pd.DataFrame | None, spec: CohortSpec | None, rep: ValidationReport,
                 scan: ScanCache | None) -> pd.DataFrame | None:
    df = _read_csv(root / "slides.csv", SLIDE_COLUMNS, rep)
    if df is None:
        return None
    keep = _unique_ids(df, "slide_id", "slides.csv", rep)
    facts = []
    for i in np.flatnonzero(keep):
        row = df.iloc[i]
        sid, cid, rel = row["slide_id"], row["case_id"], row["path"]
        where = f"slides.csv line {i + 2} (slide {sid})"
        if cases is not None and cid not in cases.index:
            rep.error(f"{where}: case_id '{cid}' not in cases.csv", exclude=f"{where} (unknown case)")
            keep[i] = False
            continue
        if not rel:
            rep.error(f"{where}: empty path", exclude=f"{where} (no bag path)")
            keep[i] = False
            continue
        if _climbs_out(rel):
            rep.error(f"{where}: bag path {rel} climbs out of the cohort directory (a relative path stays inside "
                      f"it; write an absolute path to use a bag elsewhere)", exclude=f"{where} (path outside)")
            keep[i] = False
            continue
        path = (root / rel).resolve()
        if not path.is_file():
            rep.error(f"{where}: bag file {rel} missing", exclude=f"{where} (bag missing)")
            keep[i] = False
            continue
        fact = _check_bag(path, f"{rel} (slide {sid}, case {cid})", spec, rep, scan)
        if fact is None:
            keep[i] = False
            continue
        spots = str(row.get("spots", "") or "")
        fact["n_spots"] = (_check_spots(root, spots, path, fact["patch_size_level0"], where, rep, scan is not None)
                           if spots else 0)
        fact["spots"] = str((root / spots).resolve()) if spots and fact["n_spots"] else ""
        facts.append({"path": str(path), **fact})
    out = df[keep].drop(columns=["path", *(["spots"] if "spots" in df else [])]).reset_index(drop=True)
    out = pd.concat([out, pd.DataFrame(facts, columns=["path", "n_tiles", "patch_size_level0", "feature_dim",
                                                       "encoder", "has_fragment", "spots", "n_spots"])], axis=1)
    for col in ("n_tiles", "patch_size_level0", "feature_dim", "n_spots"):
        out[col] = out[col].astype(np.int64)
    out["has_fragment"] = out["has_fragment"].astype(bool)
    return out.set_index("slide_id")


def _read_omics(root: Path, name: str, cases: pd.DataFrame | None, rep: ValidationReport):
    """AnnData restricted to valid rows of known cases, or None when the file is absent or unusable."""
    import anndata

    fname = f"{name}.h5ad"
    path = root / fname
    if not path.exists():
        return None
    try:
        with warnings.catch_warnings():  # duplicate names are reported below, with the file name
            warnings.filterwarnings("ignore", message=".*names are not unique")
            ad = anndata.read_h5ad(path)
    except Exception as e:  # noqa: BLE001 - h5ad readers raise many types; report, never crash validation
        rep.error(f"{fname}: cannot be read as AnnData ({type(e).__name__}: {e})",
                  exclude=f"{fname} (modality {name} dropped)")
        return None
    obs = pd.Index(ad.obs_names.astype(str))
    keep = np.ones(ad.n_obs, bool)
    dup = obs.duplicated()
    if dup.any():
        rep.error(f"{fname}: duplicate obs (case) names {id_list(obs[dup].unique(), LIST_MAX)}",
                  exclude=f"{fname}: {int(dup.sum())} repeated row(s) (first kept): {id_list(obs[dup], LIST_MAX)}")
        keep &= ~dup
    if cases is not None:
        unknown = ~obs.isin(cases.index)
        if unknown.any():
            rep.error(f"{fname}: {int(unknown.sum())} row(s) for case_id(s) not in cases.csv: {id_list(obs[unknown], LIST_MAX)}",
                      exclude=f"{fname}: rows of unknown cases {id_list(obs[unknown], LIST_MAX)}")
            keep &= ~unknown
    var = pd.Index(ad.var_names.astype(str))
    vkeep = ~var.duplicated(keep=False)
    if not vkeep.all():
        rep.error(f"{fname}: duplicate var names {id_list(var[~vkeep].unique(), LIST_MAX)}",
                  exclude=f"{fname}: every copy of duplicated var(s) {id_list(var[~vkeep].unique(), LIST_MAX)}")
    if ad.n_vars == 0:
        rep.error(f"{fname}: no variables (genes/proteins)", exclude=f"{fname} (modality {name} dropped)")
        return None
    source = "layers['counts']" if "counts" in ad.layers else "X"
    counts = ad.layers["counts"] if "counts" in ad.layers else ad.X
    if not np.issubdtype(counts.dtype, np.number) or np.issubdtype(counts.dtype, np.complexfloating):
        rep.error(f"{fname}: {source} dtype {counts.dtype} is not numeric", exclude=f"{fname} (modality {name} dropped)")
        return None
    nonfinite, negative, fractional = _scan_counts(counts)
    for mask, what in ((nonfinite, "NaN/inf"), (negative, "negative values")):
        if mask.any():
            rep.error(f"{fname}: {source} has {what} in {int(mask.sum())} row(s) (case(s) {id_list(obs[mask], LIST_MAX)})",
                      exclude=f"{fname}: rows with {what} {id_list(obs[mask], LIST_MAX)}")
            keep &= ~mask
    if name == "rna" and fractional.any():  # protein panels may legitimately be intensities
        rep.warn(f"{fname}: {source} holds non-integer values in {int(fractional.sum())} row(s) "
                 f"(expected raw counts; e.g. case {obs[fractional][0]})")
    if keep.all() and vkeep.all():
        return ad
    return ad[keep][:, vkeep].copy()


def _scan_counts(m, rows: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row masks (non-finite, negative, non-integer) over a dense or sparse matrix, in row blocks."""
    import scipy.sparse as sp

    n = m.shape[0]
    out = [np.zeros(n, bool) for _ in range(3)]
    for start in range(0, n, rows):
        block = m[start:start + rows]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        block = block.astype(np.float64, copy=False)
        fin = np.isfinite(block)
        out[0][start:start + rows] = ~fin.all(axis=1)
        safe = np.where(fin, block, 0.0)
        out[1][start:start + rows] = (safe < 0).any(axis=1)
        out[2][start:start + rows] = (safe != np.round(safe)).any(axis=1)
    return out[0], out[1], out[2]


def _read_reports(root: Path, cases: pd.DataFrame | None, rep: ValidationReport) -> pd.Series | None:
    path = root / "reports.jsonl"
    if not path.exists():
        return None
    texts: dict[str, str] = {}
    first: dict[str, int] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"reports.jsonl line {line_no}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            rep.error(f"{where}: not valid JSON ({e.msg})", exclude=f"{where} (unparseable)")
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("case_id"), str) or "text" not in rec:
            rep.error(f'{where}: expected {{"case_id": str, "text": str}}', exclude=f"{where} (malformed)")
            continue
        cid, text = rec["case_id"], rec["text"]
        where = f"{where} (case {cid})"
        if not isinstance(text, str) or not text.strip():
            rep.error(f"{where}: empty report text", exclude=f"{where} (empty text)")
        elif cases is not None and cid not in cases.index:
            rep.error(f"{where}: case_id not in cases.csv", exclude=f"{where} (unknown case)")
        elif cid in first:
            rep.error(f"{where}: second report for the case (first on line {first[cid]})",
                      exclude=f"{where} (duplicate; line {first[cid]} kept)")
        else:
            first[cid] = line_no
            texts[cid] = text
    return pd.Series(texts, dtype=object, name="text").rename_axis("case_id")


@dataclass
class _Parts:
    spec: CohortSpec | None
    cases: pd.DataFrame | None
    slides: pd.DataFrame | None
    rna: Any
    protein: Any
    reports: pd.Series | None
    packed: Any = None


def _read_packed(root: Path, slides: pd.DataFrame | None, rep: ValidationReport):
    """The packed store `mmfm pack` wrote (`mmfm.data.packed`), checked whole, or None. Damaged, it is an error the
    non-strict open repairs by reading the h5 bags; slides packed from an older bag (or not at all) are read from
    their bag, with a warning."""
    from mmfm.data.packed import PACKED_DIR, PackedStore

    d = root / PACKED_DIR
    if not (d / "index.json").exists() or slides is None:
        return None
    try:
        store = PackedStore.open(d)
    except ValueError as e:
        rep.error(str(e).replace(str(root) + os.sep, ""), exclude=f"{PACKED_DIR}/ (the loader reads the h5 bags)")
        return None
    _, stale = store.usable(slides)
    if stale:
        rep.warn(f"{PACKED_DIR}/index.json: {len(stale)} slide(s) not packed, or whose bag changed since `mmfm pack` "
                 f"(size or mtime; the loader reads their h5 bags; re-run `mmfm pack`): {id_list(stale, LIST_MAX)}")
    return store


def _check(root: Path, scan_features: bool = True, scan_cache: bool = True,
           packed: bool = True) -> tuple[ValidationReport, _Parts]:
    rep = ValidationReport(root=root)
    if not root.is_dir():
        rep.error(f"{root}: not a directory")
        return rep, _Parts(None, None, None, None, None, None)
    spec = _read_spec(root, rep)
    cases = _read_cases(root, rep)
    scan = ScanCache(root, reuse=scan_cache) if scan_features else None
    slides = _read_slides(root, cases, spec, rep, scan)
    if scan is not None:
        scan.save()
    parts = _Parts(spec=spec, cases=cases, slides=slides,
                   rna=_read_omics(root, "rna", cases, rep), protein=_read_omics(root, "protein", cases, rep),
                   reports=_read_reports(root, cases, rep), packed=_read_packed(root, slides, rep) if packed else None)
    if parts.slides is not None:
        _warn_mixed_preservation(parts.slides, rep)
    if cases is not None and parts.slides is not None:
        empty = ~_presence(parts).any(axis=1)
        if empty.any():
            rep.warn(f"{int(empty.sum())} case(s) in cases.csv have no usable modality: {id_list(empty.index[empty], LIST_MAX)}")
    return rep, parts


def _warn_mixed_preservation(slides: pd.DataFrame, rep: ValidationReport) -> None:
    """TCGA slide names say FFPE (DX) or frozen (TS/BS/MS); their features differ systematically, so a case with
    both mixes two domains into one patient (slide id first, else the bag file name)."""
    kinds: dict[str, set[str]] = {}
    for sid, path, cid in zip(slides.index, slides["path"], slides["case_id"]):
        kind = tcga.slide_preservation(sid) or tcga.slide_preservation(Path(path).name)
        if kind is not None:
            kinds.setdefault(cid, set()).add(kind)
    mixed = sorted(c for c, k in kinds.items() if len(k) > 1)
    if mixed:
        rep.warn(f"slides.csv: {len(mixed)} case(s) mix FFPE (DX) and frozen (TS/BS/MS) slides, whose features "
                 f"differ systematically (keep one kind, e.g. `mmfm import features --preservation FFPE`): "
                 f"{id_list(mixed, LIST_MAX)}")


def _presence(p: _Parts) -> pd.DataFrame:
    idx = p.cases.index
    muts = [c for c in p.cases.columns if c.startswith("mut_")]
    cols = {
        "slide": idx.isin(p.slides["case_id"]) if p.slides is not None else np.zeros(len(idx), bool),
        "rna": idx.isin(p.rna.obs_names) if p.rna is not None else np.zeros(len(idx), bool),
        "protein": idx.isin(p.protein.obs_names) if p.protein is not None else np.zeros(len(idx), bool),
        "report": idx.isin(p.reports.index) if p.reports is not None else np.zeros(len(idx), bool),
        "mutation": p.cases[muts].notna().any(axis=1).to_numpy() if muts else np.zeros(len(idx), bool),
    }
    return pd.DataFrame({m: np.asarray(cols[m], bool) for m in MODALITIES}, index=idx)


def validate(path: str | Path, scan_features: bool = True, scan_cache: bool = True) -> ValidationReport:
    """Check a cohort directory; never raises for bad content, the report lists every problem.

    scan_features=False checks bag headers only (no NaN/inf scan). The scan of a bag is remembered in
    <cohort>/.feature_scan.json until the bag's size or mtime changes (`mmfm.data.scan_cache`), so only
    new or modified bags are read; scan_cache=False scans every bag again (and remembers the result).
    """
    return _checked(Path(path).resolve(), scan_features, scan_cache)[0]


def validation(path: str | Path) -> tuple:
    """`validate(path)`'s answer with what it read (inside `memo.reusing()`, the kept one): for `adopt_validation`
    in another process (a pipeline validates the cohort in the child process that simulated it)."""
    return _checked(Path(path).resolve(), True, True)


def adopt_validation(path: str | Path, answer: tuple) -> None:
    """Inside `memo.reusing()`: `answer` (`validation`'s, from another process) serves this process's later
    `validate` and `Cohort.open` of the cohort, as if validated here."""
    memo.once((*_key(Path(path).resolve(), True), True), lambda: answer)


def _key(root: Path, packed: bool) -> tuple:
    return "cohort", str(root), packed


def _checked(root: Path, scan_features: bool, scan_cache: bool, packed: bool = True) -> tuple[ValidationReport, _Parts]:
    """`_check`, once per cohort inside `memo.reusing()` (a pipeline run, which never edits its cohort): every
    step opens it by path. A scanned answer also serves a request without the scan."""
    key = _key(root, packed)
    scanned = scan_features or memo.kept((*key, True))
    return memo.once((*key, scanned), lambda: _check(root, scanned, scan_cache, packed))


class Cohort:
    """An opened, validated cohort. Build with `Cohort.open(path)`."""

    def __init__(self, root: Path, parts: _Parts, validation: ValidationReport):
        self.root = root
        self.spec: CohortSpec = parts.spec
        self.cases: pd.DataFrame = parts.cases
        self.slides: pd.DataFrame = parts.slides
        self.rna = parts.rna
        self.protein = parts.protein
        self.reports: pd.Series | None = parts.reports
        self.validation = validation
        self.packed = parts.packed  # mmfm.data.packed.PackedStore or None
        self.mutation_columns = [c for c in self.cases.columns if c.startswith("mut_")]
        self.case_index = {c: i for i, c in enumerate(self.cases.index)}
        self._presence = _presence(parts)
        self._by_case = self.slides.groupby("case_id", sort=False).groups

    @classmethod
    def open(cls, path: str | Path, strict: bool = True, scan_features: bool = True,
             scan_cache: bool = True, packed: bool = True) -> Cohort:
        """Validate and load. strict=True raises CohortError on any error; strict=False drops what is
        invalid (listed in `.validation.excluded`) and raises only when nothing sensible is left.
        scan_features, scan_cache: as in `validate`; packed=False ignores `packed/` (`mmfm pack` rewrites it)."""
        root = Path(path).resolve()
        rep, parts = _checked(root, scan_features, scan_cache, packed)
        if rep.fatal or (strict and rep.errors):
            raise CohortError(rep)
        return cls(root, parts, rep)

    def slides_of(self, case_id: str) -> pd.DataFrame:
        """Rows of `.slides` for one case (zero rows for a case without slides)."""
        if case_id not in self.case_index:
            raise KeyError(f"{self.root}: case {case_id!r} not in cases.csv")
        return self.slides.loc[self._by_case.get(case_id, [])]

    def presence(self) -> pd.DataFrame:
        """case × modality bool (slide, rna, protein, report, mutation = any known mut_* flag)."""
        return self._presence.copy()

    def __repr__(self) -> str:
        counts = self._presence.sum().to_dict()
        return f"Cohort({self.spec.name!r} v{self.spec.version}, {len(self.cases)} cases, {len(self.slides)} slides, {counts})"
