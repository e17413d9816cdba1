"""Spot-level expression (Visium-like) of a simulated slide, from the same latent state as the bulk RNA and the
tiles: each spot expresses its case's bulk profile (programmes, subtype, drivers, site batch:
mmfm.simulate.molecular.rna_log_mean) shifted by the tissue type of the tile under it (immune genes in immune
tiles, stromal genes in stroma, …), so the tile a spot lies on carries tile-level truth (truth/tiles/).

Geometry (Visium): spots of 55 µm on a hexagonal lattice of 100 µm centre spacing, level-0 µm/px = 10 /
`level0_magnification` (the convention of mmfm.data.bags); spots whose centre lies on no tile (background) are not
written. Depth: log-normal UMIs per spot around a few thousand, negative-binomial counts with the genes' dispersion.
"""

from __future__ import annotations

import numpy as np

from mmfm.data.bags import mag_to_mpp
from mmfm.data.spots import match_spots
from mmfm.simulate.latent import TILE_TYPES, Case, World
from mmfm.simulate.molecular import nb_counts, rna_log_mean
from mmfm.simulate.sim_config import SPOTS, SimConfig, rng
from mmfm.simulate.tile_features import Slide

SPOT_DIAMETER_UM, SPOT_SPACING_UM = 55.0, 100.0
SPOT_LIBRARY_MEDIAN, SPOT_LIBRARY_SD, SPOT_NOISE_SD = 4000.0, 0.5, 0.25
# log-expression shift of a gene module in a spot on each tile type (rows: TILE_TYPES; unlisted modules: 0)
TYPE_MODULE_SHIFT = {
    "tumour": {"proliferation": 1.0, "differentiation": 0.8, "stromal": -0.5, "immune": -0.5},
    "stroma": {"stromal": 1.5, "proliferation": -0.5, "differentiation": -0.8},
    "immune": {"immune": 2.0, "differentiation": -0.8},
    "necrosis": {"hypoxia": 1.5, "proliferation": -0.8, "immune": -0.5},
    "normal": {"differentiation": 0.5, "proliferation": -0.8},
    "adipose": {"stromal": 0.3, "proliferation": -1.0, "differentiation": -1.0},
    "artefact": {},
}


def spot_shift(world: World) -> np.ndarray:
    """[tile types, genes] log-expression shift of a spot by the type of the tile under it."""
    module = world.genes["module"].to_numpy()
    out = np.zeros((len(TILE_TYPES), len(module)))
    for t, shifts in TYPE_MODULE_SHIFT.items():
        for m, v in shifts.items():
            out[TILE_TYPES.index(t), module == m] = v
    return out


def spot_lattice(extent: tuple[int, int], spacing_px: float) -> np.ndarray:
    """Hexagonal lattice of spot centres (x, y) over [0, width) × [0, height): rows √3/2 apart, odd rows shifted."""
    rows = []
    for i, y in enumerate(np.arange(spacing_px / 2, extent[1], spacing_px * np.sqrt(3) / 2)):
        xs = np.arange(spacing_px / 2 * (1 + i % 2), extent[0], spacing_px)
        rows.append(np.column_stack([xs, np.full(len(xs), y)]))
    return np.concatenate(rows) if rows else np.zeros((0, 2))


def has_spots(cfg: SimConfig, case: Case, j: int) -> bool:
    """Whether slide j of a case gets a spot table (a share `spatial_rate` of slides)."""
    return cfg.spatial_rate > 0 and rng(cfg, SPOTS, case.index, j, 0).random() < cfg.spatial_rate


def simulate_spots(cfg: SimConfig, world: World, case: Case, j: int, slide: Slide):
    """(spot centres [S, 2] level-0 px, tile row under each spot [S], counts [S, genes], diameter px)."""
    mpp = mag_to_mpp(cfg.level0_magnification)
    centres = spot_lattice(slide.level0_size, SPOT_SPACING_UM / mpp)
    tile = match_spots(centres, slide.coords, cfg.patch_size_level0)
    centres, tile = centres[tile >= 0], tile[tile >= 0]
    r = rng(cfg, SPOTS, case.index, j, 1)
    log_mu = (rna_log_mean(world, case)[None] + spot_shift(world)[slide.types[tile]]
              + SPOT_NOISE_SD * r.standard_normal((len(tile), len(world.genes))))
    library = np.exp(np.log(SPOT_LIBRARY_MEDIAN) + SPOT_LIBRARY_SD * r.standard_normal(len(tile)))
    counts = nb_counts(r, log_mu, library, world.gene_arrays["dispersion"])
    return np.round(centres).astype(np.int64), tile, counts, SPOT_DIAMETER_UM / mpp
