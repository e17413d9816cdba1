"""Remembered NaN/inf scans of feature bags: a cohort's feature rows are read once, not at every open.

The scan reads every feature row (disk speed: minutes for a large cohort) and its answer depends only on the
file, so `validate` / `Cohort.open` keep it in `<cohort>/.feature_scan.json`: one entry per bag, keyed by the
bag's path (relative to the cohort), size and mtime_ns. A bag that is rewritten or edited gets a new size or
mtime and is scanned again. An entry whose bag was modified less than RACY_NS before its scan started is not
trusted (on a coarse-clock file system a later edit could keep the same mtime; git's "racy clean" rule), so a
bag written just before a scan is scanned once more on the next open. A read-only cohort is scanned every time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from mmfm.io import write_json

log = logging.getLogger(__name__)

FILE = ".feature_scan.json"
VERSION = 1
RACY_NS = 2_000_000_000  # the coarsest common mtime granularity (FAT: 2 s)
FIELDS = ("size", "mtime_ns", "scanned_ns", "bad")


def _read(path: Path) -> dict[str, dict]:
    """Well-formed entries of a cache file; a missing, foreign or damaged file is an empty cache."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("bags"), dict):
        return {}
    return {k: e for k, e in doc["bags"].items()
            if isinstance(e, dict) and all(type(e.get(f)) is int for f in FIELDS)
            and (e.get("first") is None or type(e.get("first")) is int)}


class ScanCache:
    """Scan results of one cohort's bags for one validation pass; `save()` writes what changed."""

    def __init__(self, root: Path, reuse: bool = True):
        self.root = root
        self.path = root / FILE
        self.old = _read(self.path) if reuse else {}
        self.new: dict[str, dict] = {}

    def result(self, bag: Path, scan: Callable[[], tuple[int, int | None]]) -> tuple[int, int | None]:
        """(rows with NaN/inf, first such row) of `bag`: remembered if the bag is unchanged, else `scan()`."""
        st = bag.stat()  # before the scan: an edit during the scan leaves a stale key, so it is scanned again
        key = Path(os.path.relpath(bag, self.root)).as_posix()
        e = self.old.get(key)
        if (e is not None and e["size"] == st.st_size and e["mtime_ns"] == st.st_mtime_ns
                and st.st_mtime_ns < e["scanned_ns"] - RACY_NS):
            self.new[key] = e
            return e["bad"], e["first"]
        started = time.time_ns()
        bad, first = scan()
        self.new[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "scanned_ns": started, "bad": int(bad),
                         "first": None if first is None else int(first)}
        return bad, first

    def save(self) -> None:
        """Write the entries of this pass (atomically) if anything changed; skipped where the cohort is read-only."""
        if self.new == self.old:
            return
        try:
            write_json(self.path, {"version": VERSION, "bags": self.new})
        except OSError as e:
            log.debug("feature scan results not remembered, %s is not writable: %s", self.path, e)
