"""A per-machine cache of simulated cohorts: a second `mmfm demo` copies its cohort instead of simulating it again.

The simulator is a pure function of its config (the seed is one of its keys) and of its code: the same inputs give
the same bytes (`writer`). So a cohort is stored once under `<folder>/<key>/`, `key` hashing the full SimConfig, the
source of every mmfm module the simulator runs (found from its imports, so a new module is never missed) and the
versions of the libraries that write the files; any change is a different key, never a stale cohort.

Writes are atomic (a complete copy under a temporary name, then one rename): a reader sees a whole entry or none,
and of several processes storing the same key one wins, the others drop their copy. A restore copies the entry
(`shutil.copytree`: the kernel's file copy, modification times kept, as `cp -a`) to a temporary folder beside the
destination, then renames it there: a real copy, never hard links, because a caller may rewrite a cohort file in
place (h5py "w" truncates the same inode) and must not reach the cache. A cohort is stored after the caller's
`check` (the pipeline validates it), so what that leaves in the folder comes back too: `validate`'s NaN scan of
every bag (`.feature_scan.json`, keyed by each bag's size and mtime) holds for the copy, whose bags are the same.
Entries are dropped least recently used past `MAX_BYTES`; an entry whose files do not match its manifest (cut short
or edited by hand) is a miss and removed. A cache folder that cannot be read or written is a miss, never an error.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from mmfm.io import write_json
from mmfm.simulate.sim_config import SimConfig

FORMAT = "mmfm-cohort-cache-v1"
MANIFEST = ".mmfm-cohort-cache.json"  # in the entry only, never copied out: relative path → size in bytes
MAX_BYTES = 8 << 30  # the demo's 500-case cohort is 1.93 GB
STALE_SECS = 86400  # a temporary folder this old belongs to no live process
LIBRARIES = ("numpy", "pandas", "h5py", "anndata", "PyYAML")  # they write the bytes (HDF5 layout, CSV floats, YAML)
PKG = Path(__file__).resolve().parents[1]
_PARSING = threading.Lock()


def _module_file(name: str) -> Path | None:
    rel = PKG.parent / name.replace(".", "/")
    for p in (rel.with_suffix(".py"), rel / "__init__.py"):
        if p.is_file():
            return p
    return None


@functools.lru_cache(maxsize=1)
def code_files() -> tuple[Path, ...]:
    """Every module of the simulate package and every mmfm source file they import, transitively (read from the
    source, imports inside functions included): the simulator, the bag writer, the atomic writes, the package
    constants."""
    todo = ["mmfm.simulate"] + [f"mmfm.simulate.{p.stem}" for p in sorted((PKG / "simulate").glob("*.py"))]
    seen = {}
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen.values() or name == __name__:
            continue
        seen[name] = path
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mmfm"):
                todo.append(node.module)
                todo.extend(f"{node.module}.{a.name}" for a in node.names)  # `from mmfm.simulate import latent`
            elif isinstance(node, ast.Import):
                todo.extend(a.name for a in node.names if a.name.startswith("mmfm"))
    return tuple(sorted(seen.values()))


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 of the simulator's source files and of the writing libraries' versions."""
    from importlib.metadata import version

    with _PARSING:  # CPython 3.11's ast.parse is not safe in two threads at once
        files = code_files()
    h = hashlib.sha256(FORMAT.encode())
    for path in files:
        h.update(f"{os.path.relpath(path, PKG.parent)}:".encode() + hashlib.sha256(path.read_bytes()).digest())
    for lib in LIBRARIES:
        h.update(f"{lib}={version(lib)};".encode())
    import h5py

    h.update(f"hdf5={h5py.version.hdf5_version};python={sys.version_info[0]}.{sys.version_info[1]}".encode())
    return h.hexdigest()


def cache_key(cfg: SimConfig) -> str:
    """20 hex digits of the full config (every knob, the seed included) and the code fingerprint."""
    config = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    return hashlib.sha256(f"{code_fingerprint()};{config}".encode()).hexdigest()[:20]


def _manifest(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _remove(path: Path) -> None:
    """Rename away first (atomic: a reader never sees a half-deleted entry), then delete."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    try:
        os.rename(path, trash)
    except OSError:
        return  # gone already (another process evicted it)
    shutil.rmtree(trash, ignore_errors=True)


def _copy_to(src: Path, dst: Path, ignore=None) -> None:
    """`src`'s tree at `dst` (absent or empty), complete or not at all: copied beside it, then renamed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=ignore)
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cached(folder: str | Path | None, cfg: SimConfig) -> bool:
    """Whether the cache at `folder` (None: none) holds an entry for `cfg` (`restore` still checks its files)."""
    return folder is not None and (Path(folder) / cache_key(cfg) / MANIFEST).is_file()


def restore(folder: str | Path, cfg: SimConfig, out: str | Path) -> bool:
    """Copy the cached cohort for `cfg` to `out` (absent or empty); False on a miss."""
    entry = Path(folder) / cache_key(cfg)
    try:
        want = json.loads((entry / MANIFEST).read_text())["files"]
        if _manifest(entry) != want:
            raise ValueError("files differ from the manifest")
        os.utime(entry)  # recently used: the last to be evicted
        _copy_to(entry, Path(out), ignore=shutil.ignore_patterns(MANIFEST))
    except OSError:
        return False  # no entry, evicted while we copied it, or no cache folder to read
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        print(f"[cohort cache] {entry}: {e}; removing it and simulating again", file=sys.stderr)
        _remove(entry)
        return False
    return True


def store(folder: str | Path, cfg: SimConfig, cohort: str | Path) -> Path | None:
    """Copy a freshly simulated `cohort` into the cache (one rename; a concurrent writer's copy wins or loses whole),
    then drop least recently used entries past MAX_BYTES. None when the cohort alone is larger than that."""
    folder, cohort = Path(folder), Path(cohort)
    files = _manifest(cohort)
    if sum(files.values()) > MAX_BYTES:
        return None
    entry, tmp = folder / cache_key(cfg), None
    try:
        if not entry.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=folder))
            shutil.copytree(cohort, tmp, dirs_exist_ok=True)
            write_json(tmp / MANIFEST, {"format": FORMAT, "code": code_fingerprint(),
                                        "config": dataclasses.asdict(cfg), "files": files})
            os.rename(tmp, entry)  # fails when another process stored the same key first: theirs is as good
        _evict(folder, keep=entry)
    except OSError as e:  # a cache is an optimisation: a full disk must not fail the run that simulated
        if not entry.exists():
            print(f"[cohort cache] not stored in {folder} ({type(e).__name__}: {e})", file=sys.stderr)
            return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _evict(folder: Path, keep: Path) -> None:
    """Least recently used entries out past MAX_BYTES; a temporary copy a killed process left (a day old) too."""
    entries = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for p in folder.glob(".*"):
        if p.is_dir() and time.time() - p.stat().st_mtime > STALE_SECS:
            shutil.rmtree(p, ignore_errors=True)
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in entries}
    total = sum(sizes.values())
    for p in sorted(entries, key=lambda p: p.stat().st_mtime):
        if total <= MAX_BYTES:
            break
        if p != keep:
            _remove(p)
            total -= sizes[p]


def simulate_cached(out: str | Path, cfg: SimConfig, folder: str | Path | None,
                    check: Callable[[Path], object] | None = None) -> tuple[Path, bool]:
    """`simulate_cohort(out, cfg)` through the cache at `folder` (None: no cache), then `check(out)` (raising: not
    stored); (out, restored from the cache). A cohort already at `out` resumes as ever; only a new one is restored
    or stored."""
    from mmfm.simulate.writer import simulate_cohort

    out = Path(out)
    use = folder is not None and (not out.exists() or (out.is_dir() and not any(out.iterdir())))
    if use:
        cfg.check()
    restored = use and restore(folder, cfg, out)
    if not restored:
        simulate_cohort(out, cfg)
    if check is not None:
        check(out)
    if use and not restored:
        store(folder, cfg, out)
    return out, restored
