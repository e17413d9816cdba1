"""Run-directory paths: one path type (`etils.epath`, the one orbax uses) for local, NFS/Lustre and `gs://` runs.

Everything `mmfm pretrain` writes under `--out` and everything inference reads from it goes through `run_path`
and the two writers below, so `--out gs://bucket/run` works for checkpoints, metrics, configs and transforms
(remote schemes need their epath backend installed: `pip install gcsfs` for `gs://`). Cohorts are *not* run
directories: they are read with memory-mapped HDF5 and stay on a file system (local disk or shared NFS/Lustre).

Writes are whole-file and atomic: on a file system through the package's one atomic writer (`mmfm.io`: a hidden
temporary name beside the target, then `os.replace`); on an object store an object appears whole when its upload
completes, so it is written directly. Nothing appends, because object stores cannot.
"""

from __future__ import annotations

import json
import os

from etils import epath

from mmfm import io


def run_path(path: str | os.PathLike) -> epath.Path:
    """`epath.Path` of a run directory or a file in it; local paths made absolute, URLs (`gs://…`) kept."""
    p = epath.Path(os.fspath(path)) if not isinstance(path, epath.Path) else path
    return p if p.is_absolute() else p.absolute()


def write_text(path: epath.Path, text: str) -> None:
    """Atomic whole-file write; creates the parent directory."""
    path = run_path(path)
    if "://" not in os.fspath(path):  # a file system (local, NFS, Lustre)
        io.write_text(path, text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_json(path: epath.Path, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def read_json(path: epath.Path):
    return json.loads(run_path(path).read_text())
