"""Tile batches for a torch DataLoader: worker processes read tiles, each with its own slide handles.

Kept apart from `extract` so that spawned workers import only torch and the readers (not timm), which makes
worker start-up several seconds cheaper.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmfm.bridges.readers import open_slide


@dataclass(frozen=True)
class SlidePlan:
    """Everything the workers need to read one slide's tiles."""

    slide_id: str
    path: Path
    mpp: float
    coords: np.ndarray
    fragment: np.ndarray
    size_level0: int
    coord_attrs: dict  # TRIDENT `coords` attributes of the bag
    meta: dict  # fragments, holes, reader backend: recorded on `features`


class TileBatches(torch.utils.data.Dataset):
    """Item k = one batch of one slide's tiles as uint8 [n, P, P, 3]. Each worker opens its own slide handles
    (kept for the slide it is on); a read error is returned, not raised, so one slide cannot stop the loader."""

    def __init__(self, plans: list[SlidePlan], batch_size: int, patch_size: int):
        self.plans, self.patch_size = plans, patch_size
        self.keys = [(p, s, min(s + batch_size, len(plan.coords)))
                     for p, plan in enumerate(plans) for s in range(0, len(plan.coords), batch_size)]
        self._open: tuple[int, object] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):  # slide handles never cross process boundaries
        return {**self.__dict__, "_open": None}

    def close(self) -> None:
        if self._open is not None:
            handle, self._open = self._open[1], None
            handle.close()

    def _reader(self, p: int):
        if self._open is None or self._open[0] != p:
            self.close()
            plan = self.plans[p]
            self._open = (p, open_slide(plan.path, mpp=plan.mpp))
        return self._open[1]

    def __getitem__(self, k: int) -> dict:
        p, start, stop = self.keys[k]
        plan = self.plans[p]
        t0 = time.perf_counter()  # read_s: this batch's read time in its worker (the reader stage of the summary)
        try:
            reader = self._reader(p)
            tiles = np.stack([reader.read_tile(xy, plan.size_level0, self.patch_size)
                              for xy in plan.coords[start:stop]])
            return {"slide": p, "start": start, "tiles": torch.from_numpy(tiles), "error": "",
                    "read_s": time.perf_counter() - t0}
        except Exception as e:  # corrupt tile data etc.: the slide fails, the loader goes on
            self.close()
            return {"slide": p, "start": start, "tiles": torch.zeros(0, dtype=torch.uint8),
                    "read_s": time.perf_counter() - t0,
                    "error": f"{plan.path}: reading tiles {start}..{stop - 1} of {len(plan.coords)}: "
                             f"{type(e).__name__}: {e}"}


def mp_context(workers: int) -> str | None:
    """fork is cheapest, but forking a process in which JAX started its threads can deadlock: then spawn
    (workers import only this module, torch and the readers, not timm)."""
    return None if workers == 0 else ("spawn" if "jax" in sys.modules else "fork")
