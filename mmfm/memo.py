"""Results computed once per pipeline run: inside `reusing()`, `once(key, compute)` returns the first answer for
its key instead of computing it again.

A pipeline (`mmfm demo`, `mmfm run`) opens the same cohort and restores the same checkpoint at several steps (embed,
MIL probe, text tower, heatmaps), each step a public function that takes paths. Within one run neither the cohort
nor a finished checkpoint changes, so the pipeline opens this scope and those functions share one answer; outside
it (a library call, a test that edits a cohort between opens) every call computes afresh. Callers hand out
answers they do not mutate (a fresh object around shared immutable parts). Safe from several threads (the
pipeline's heatmaps and probe tasks run beside each other): a key is computed by one of them, the others wait.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")
_LOCK = threading.Lock()
_STORE: dict | None = None  # None: no scope open, compute every time
_BUSY: dict = {}  # key → the lock its first computation holds (a second thread waits for that answer)


@contextlib.contextmanager
def reusing():
    """A scope whose `once` answers are kept until it closes (nested scopes share the outermost)."""
    global _STORE, _BUSY
    with _LOCK:
        outer = _STORE is not None
        if not outer:
            _STORE, _BUSY = {}, {}
    try:
        yield
    finally:
        if not outer:
            with _LOCK:
                _STORE, _BUSY = None, {}


def once(key: Hashable, compute: Callable[[], T]) -> T:
    """`compute()` the first time `key` is asked inside the scope, its kept answer after (a thread asking while
    another computes it waits for that answer); always computed outside a scope. An error is raised, not kept."""
    with _LOCK:
        store, busy = _STORE, _BUSY
        if store is None:
            busy = None
        elif key in store:
            return store[key]
        else:
            busy = busy.setdefault(key, threading.Lock())
    if busy is None:
        return compute()
    with busy:
        with _LOCK:
            if key in store:
                return store[key]
        value = compute()
        with _LOCK:
            store[key] = value
        return value


def kept(key: Hashable) -> bool:
    """Whether the open scope holds an answer for `key`."""
    with _LOCK:
        return _STORE is not None and key in _STORE


def offer(key: Hashable, value) -> None:
    """Keep `value` as the open scope's answer for `key`: its producer already holds what a later `once(key, …)`
    would compute (a finished training run's state, which a restore would read back). Nothing outside a scope or
    for a key already answered."""
    with _LOCK:
        if _STORE is not None and key not in _STORE:
            _STORE[key] = value
