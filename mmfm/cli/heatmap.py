"""`mmfm heatmap`: what a trained run sees in one slide, tile by tile."""

from __future__ import annotations

import logging

from mmfm.bridges.heatmap_render import HeatmapConfig as Config
from mmfm.bridges.heatmap_render import heatmap
from mmfm.config import ConfigError

DESCRIPTION = """\
Per-tile scores of a trained run on one slide of a cohort: the slide encoder's attention (every ABMIL head; the
transformer's attention-pool weights) and, per --query, each tile's cosine similarity in the shared space to the
case's own RNA / protein / report / mutation embedding or to a typed text prompt (through the run's text tower).
Writes OUT/<slide>.tile_scores.h5 (level-0 coords + scores, TRIDENT convention) and one PNG per score: over the
slide thumbnail when --wsi is given (plus the bare overlay and a strip of the top-k tiles), else on the tile grid.
Several queries: --queries "[rna, report, 'Tumour necrosis is present.']".

example: mmfm heatmap --run runs/demo --cohort cohort --slide S0001 --wsi slides/S0001.svs --query report --out hm"""

ALIASES = {"query": "queries"}


def run(cfg: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = heatmap(cfg)
    except ModuleNotFoundError as e:  # a slide reader of the bridges extra
        raise ConfigError(f"--wsi needs the optional dependency {e.name!r}: pip install 'mmfm[bridges]'") from e
    n = sum(len(p) for p in res.figures.values())
    print(f"wrote {res.h5} ({len(res.scores.coords)} tiles; scores {', '.join(res.scores.scores)}) "
          f"and {n} PNG(s) to {cfg.out}")
    return 0
