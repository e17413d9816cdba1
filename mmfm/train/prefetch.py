"""Batches on the devices before the step asks for them: a background thread runs `depth` steps ahead.

The thread takes this process's rows from the loader, applies the loop's host-side hook (fault injection),
counts tiles and cases for the throughput log, and makes the global `jax.Array`s with
`make_array_from_process_local_data` (the host→device copy overlaps the running step). The loader state
travels with each batch, so a checkpoint records where the *consumed* batch left the loader, not where
the prefetcher has got to. `depth=0` produces each batch in the caller's thread (no overlap; a baseline).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mmfm.train.sharding import global_batch


@dataclass
class Prefetched:
    step: int              # the 1-based training step this batch is for
    batch: dict            # global jax.Arrays on the batch sharding
    tiles: int             # valid tiles in this process's rows (0 without slides)
    cases: int             # real cases in this process's rows
    loader_state: dict     # the loader's state after this batch


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetcher:
    """Iterator of `Prefetched` for steps start+1, start+2, …; `close()` stops the thread."""

    def __init__(self, loader, sharding, *, depth: int = 2, start_step: int = 0,
                 prepare: Callable[[int, dict], dict] | None = None):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.loader, self.sharding, self.prepare = loader, sharding, prepare
        self.step = start_step
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._produce, name="mmfm-device-prefetch", daemon=True)
            self._thread.start()

    def _make(self) -> Prefetched:
        host = next(self.loader)
        state = self.loader.get_state()
        self.step += 1
        if self.prepare is not None:
            host = self.prepare(self.step, host)
        tiles = int(np.sum(host["slide/tile_mask"])) if "slide/tile_mask" in host else 0
        cases = int(np.sum(np.asarray(host["case_index"]) >= 0))
        return Prefetched(self.step, global_batch(host, self.sharding), tiles, cases, state)

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._make()
            except BaseException as e:  # noqa: BLE001 — handed to the consumer, raised there
                item = _Failed(e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failed):
                return

    def __iter__(self):
        return self

    def __next__(self) -> Prefetched:
        if self._thread is None:
            return self._make()
        item = self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()  # unblock a pending put
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
