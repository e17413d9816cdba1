"""Owner locks: one writer per run directory (or per slide), a dead owner's lock taken over and said so.

A lock is a small JSON file, written whole under a temporary name and hard-linked onto the lock's name (link
fails if the name exists: atomic on POSIX and NFS, and never a half-written lock), that names its owner:
host, pid, the process's start time (so a recycled pid is not mistaken for the owner) and when it was taken. The
owner refreshes the file's mtime every `heartbeat` seconds from a daemon thread.

Whether the owner is alive is decided by what can be known: on the same host, by its pid and start time; on
another host (a shared file system, a job re-queued onto another node), only by the heartbeat — a lock not
refreshed for `stale_after` seconds is stale. A stale lock is taken over with a message naming the dead owner; a
live one is refused with `LockedError` naming host, pid and start, so a second job never writes beside the first.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class LockedError(RuntimeError):
    """The lock is held by a live owner; the message names it and the lock file."""


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3


def pid_alive(pid: int, start: str | None) -> bool:
    """Is `pid` (started at `start` ticks, when known) still running on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    now = _start_ticks(pid)
    return start is None or now is None or now == start


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: str | None
    since: str

    @classmethod
    def me(cls) -> "Owner":
        return cls(socket.gethostname(), os.getpid(), _start_ticks(os.getpid()),
                   time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} (since {self.since})"

    def same_process(self, other: "Owner") -> bool:
        return (self.host, self.pid, self.start) == (other.host, other.pid, other.start)


class OwnerLock:
    """`with OwnerLock(path, what="run directory …"):` — exclusive while the block runs (see the module doc).

    `report(msg)` receives the one-line notice when a stale lock is taken over (default: stderr).
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "", stale_after: float = 600.0,
                 heartbeat: float = 30.0, report: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.what = what or str(self.path.parent)
        self.stale_after, self.heartbeat = stale_after, heartbeat
        self.report = report or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.owner = Owner.me()
        self._stop: threading.Event | None = None

    def holder(self) -> Owner | None:
        """The lock's recorded owner, or None when there is no lock (an unreadable lock file is named)."""
        try:
            rec = json.loads(self.path.read_text())
            return Owner(str(rec["host"]), int(rec["pid"]), rec.get("start"), str(rec.get("since", "?")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LockedError(f"{self.path}: unreadable lock file ({e}); remove it if no job uses "
                              f"{self.what}") from e

    def is_stale(self, owner: Owner) -> bool:
        if owner.host == self.owner.host:
            return not pid_alive(owner.pid, owner.start)
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{self.owner.host}.{self.owner.pid}")
        tmp.write_text(json.dumps(self.owner.__dict__))
        try:
            for _ in range(3):  # a takeover races another taker at most a couple of times
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    owner = self.holder()
                    if owner is None:
                        continue
                    if owner.same_process(self.owner):
                        return
                    if not self.is_stale(owner):
                        raise LockedError(f"{self.what}: in use by {owner} (lock {self.path}); wait for that job, "
                                          f"or remove the lock if it is gone") from None
                    self.report(f"{self.what}: taking over the lock of {owner}, which is gone (lock {self.path})")
                    stale = self.path.with_name(f".{self.path.name}.stale.{self.owner.pid}")
                    try:
                        os.replace(self.path, stale)  # one taker wins the rename; the others retry and see its lock
                    except FileNotFoundError:
                        continue
                    moved = OwnerLock(stale).holder()
                    if moved is not None and not moved.same_process(owner):  # a fresh lock taken meanwhile: back
                        try:
                            os.link(stale, self.path)
                        except FileExistsError:
                            pass
                    stale.unlink(missing_ok=True)
                    continue
                self._beat()
                return
        finally:
            tmp.unlink(missing_ok=True)
        raise LockedError(f"{self.what}: could not take the lock {self.path} (other jobs keep taking it)")

    def _beat(self) -> None:
        self._stop = stop = threading.Event()

        def touch():
            while not stop.wait(self.heartbeat):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        threading.Thread(target=touch, name=f"lock-heartbeat:{self.path.name}", daemon=True).start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        try:
            owner = self.holder()
            if owner is not None and owner.same_process(self.owner):
                self.path.unlink()
        except (LockedError, FileNotFoundError):
            pass

    def __enter__(self) -> "OwnerLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
