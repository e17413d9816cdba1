"""Cached sentence features of a frozen report-text trunk: one safetensors table per (tokenizer, weights, length).

With a frozen trunk a report's sentence embedding never changes, so computing it at every step (6 BERT
layers × 128 tokens × batch) is pure waste: it is computed once (`mmfm.models.text_cache.fill_report_cache`)
and the loader emits it as `report/features` beside the token ids; only the projection head trains.

Layout: `<folder>/<key>.safetensors` with `sha256` uint8 [n, 32] (SHA-256 of each report's UTF-8 text) and
`features` float32 [n, H]. `key` hashes the tokenizer, config and weight files' *contents* and `max_len`, so a
different checkpoint or truncation length can never be served stale rows; a text is found by its own hash, so
editing a report only recomputes that report. Writes are atomic (merge, then rename); concurrent writers lose
nothing but work. This module only reads and writes tables: computing features needs the model layer.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmfm.io import atomic_path

FORMAT = "mmfm-report-cache-v1"
KEY_FILES = ("config.json", "tokenizer.json", "model.safetensors")


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(weights_dir: str | Path, max_len: int) -> str:
    """Content hash of the trunk (tokenizer, config, weights) and the truncation length; 20 hex digits."""
    h = hashlib.sha256(FORMAT.encode())
    for name in KEY_FILES:
        p = Path(weights_dir) / name
        if not p.exists():
            raise FileNotFoundError(f"{p}: missing; a report-text trunk folder holds {', '.join(KEY_FILES)}")
        st = p.stat()
        h.update(f"{name}:{_file_digest(str(p), st.st_size, st.st_mtime_ns)};".encode())
    h.update(f"max_len={int(max_len)};pooling=mean;dtype=float32".encode())
    return h.hexdigest()[:20]


def text_digests(texts: Sequence[str]) -> np.ndarray:
    """[n, 32] uint8 SHA-256 of each text (UTF-8)."""
    return np.frombuffer(b"".join(hashlib.sha256(t.encode()).digest() for t in texts),
                         np.uint8).reshape(len(texts), 32)


def table_path(folder: str | Path, key: str) -> Path:
    return Path(folder) / f"{key}.safetensors"


def read_table(folder: str | Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(sha256 [n, 32] uint8, features [n, H] float32); empty arrays when the table does not exist."""
    from safetensors.numpy import load_file

    path = table_path(folder, key)
    if not path.exists():
        return np.zeros((0, 32), np.uint8), np.zeros((0, 0), np.float32)
    try:
        t = load_file(str(path))
        digests, feats = t["sha256"], t["features"]
    except Exception as e:  # a truncated or foreign file: name it, never serve it
        raise ValueError(f"{path}: not a report-feature cache table ({type(e).__name__}: {e}); delete it") from e
    if digests.shape != (len(feats), 32) or feats.ndim != 2:
        raise ValueError(f"{path}: sha256 {digests.shape} and features {feats.shape} do not match [n, 32] / [n, H]")
    return digests, feats


def lookup(folder: str | Path, key: str, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, H] float32, zeros where not cached; found [n] bool) for `texts`."""
    digests, feats = read_table(folder, key)
    index = {d.tobytes(): i for i, d in enumerate(digests)}
    rows = np.array([index.get(d.tobytes(), -1) for d in text_digests(texts)], np.int64)
    found = rows >= 0
    out = np.zeros((len(texts), feats.shape[1] if feats.size else 0), np.float32)
    out[found] = feats[rows[found]]
    return out, found


def store(folder: str | Path, key: str, texts: Sequence[str], features: np.ndarray, meta: dict | None = None) -> Path:
    """Merge rows for `texts` into the table (new rows win) and write it atomically."""
    from safetensors.numpy import save_file

    features = np.asarray(features, np.float32)
    if features.shape[0] != len(texts) or features.ndim != 2:
        raise ValueError(f"features {features.shape} do not match {len(texts)} texts")
    old_d, old_f = read_table(folder, key)
    new_d = text_digests(texts)
    if old_f.size and old_f.shape[1] != features.shape[1]:
        raise ValueError(f"{table_path(folder, key)}: cached width {old_f.shape[1]} ≠ new {features.shape[1]}")
    new = {d.tobytes() for d in new_d}
    keep = np.array([d.tobytes() not in new for d in old_d], bool)
    digests = np.concatenate([old_d[keep], new_d])
    feats = np.concatenate([old_f[keep].reshape(-1, features.shape[1]), features])
    path = table_path(folder, key)
    info = {"format": FORMAT, "key": key, "n": str(len(feats)), **{k: str(v) for k, v in (meta or {}).items()}}
    with atomic_path(path, suffix=".safetensors.tmp") as tmp:
        save_file({"sha256": np.ascontiguousarray(digests), "features": np.ascontiguousarray(feats)}, str(tmp),
                  metadata=info)
    return path


def resolve_folder(cohort_root: str | Path, setting: str) -> Path:
    """`loader.report_cache`: an absolute folder, or one relative to the cohort directory."""
    p = Path(setting).expanduser()
    return p if p.is_absolute() else Path(cohort_root) / p
