"""Atomic file writes: a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from mmfm import faults


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The temp file lives in the same directory so the final `os.replace` is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the final file gets ordinary permissions
    try:
        yield tmp
        faults.point(f"write:{path.name}")  # a testing aid (mmfm.faults): killed here, the old file stays whole
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(e.errno, f"{path}: no space left on device ({e.strerror}); the previous "
                                   f"{path.name} is intact") from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def write_csv(path: str | os.PathLike, df, **to_csv) -> None:
    """A pandas table, atomically (`to_csv` keywords pass through)."""
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, **to_csv)


def write_h5ad(path: str | os.PathLike, adata) -> None:
    """An AnnData, atomically."""
    with atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)


def ends_mid_line(path: str | os.PathLike) -> bool:
    """A text file cut short (a truncated download or copy): not empty and its last byte is not a newline."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) not in (b"\n", b"\r")


HEADER_LIMIT = 1 << 20  # a table's header line longer than this is not a header (a binary or a one-line dump)


def check_header(path: str | os.PathLike, limit: int = HEADER_LIMIT) -> None:
    """Raise ValueError naming `path` when its first line is longer than `limit` bytes, reading at most `limit`
    bytes: a huge or malformed file fails in bounded memory instead of being parsed whole."""
    with open(path, "rb") as fh:
        head = fh.read(limit + 1)
    if len(head) > limit and b"\n" not in head:
        raise ValueError(f"{path}: no line break in the first {limit >> 20} MiB: not a table (a binary file, or a "
                         f"header cut or corrupted?)")


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (pins an export's weights to its config)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def id_list(values, limit: int = 10) -> str:
    """'a, b, c ... and 7 more': the ids an error message names, never thousands of them."""
    values = [str(v) for v in values]
    return ", ".join(values[:limit]) + (f" ... and {len(values) - limit} more" if len(values) > limit else "")
