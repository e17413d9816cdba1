"""Tile features of a simulated slide: layout → tile types (composition + spatial clustering) → a latent per
tile (type prototype + programme-driven appearance + site stain) → features (a linear projection, or the MLP of
the nonlinear option) + noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmfm.simulate.harder import apply_mlp, focal_region
from mmfm.simulate.latent import PROGRAMMES, SLIDE_HETEROGENEITY_SD, TILE_TYPES, Case, World
from mmfm.simulate.layout import field, tissue_layout
from mmfm.simulate.sim_config import SLIDE, SimConfig, rng


# Tissue composition: logit_t = base_t + loadings_t · programmes (rows: TILE_TYPES).
TYPE_BASE = np.array([1.4, 0.7, -0.5, -2.0, -1.0, -1.3, -3.0])
TYPE_LOADINGS = np.array([
    [0.3, 0.0, 0.0, -0.3, 0.0],
    [0.0, 0.0, 0.0, 1.0, 0.0],
    [0.0, 1.0, 0.0, 0.0, 0.0],
    [0.3, 0.0, 0.9, 0.0, 0.0],
    [-0.2, 0.0, 0.0, 0.0, 0.4],
    [0.0] * 5,
    [0.0] * 5,
])
SLIDE_COMPOSITION_SD = 0.5  # per-slide logit jitter (which block was cut)
# Spatial clustering: smooth random field per type (length scale in tiles), and a depth preference
# (depth 1 = fragment core, 0 = edge): necrosis in cores, fat and normal tissue at edges.
TYPE_LENGTH_SCALE = np.array([10.0, 6.0, 3.0, 4.0, 6.0, 8.0, 2.0])
TYPE_DEPTH = np.array([0.5, -0.5, 0.0, 2.0, -1.0, -2.0, -0.5])
FIELD_AMPLITUDE = 2.0
TILE_TYPE_NOISE = 0.6  # Gumbel scale of the per-tile type draw (lower = smoother maps)
# How strongly each programme changes the *appearance* of each tile type (rows: TILE_TYPES).
TYPE_APPEARANCE = np.array([
    [0.5, 0.0, 0.3, 0.0, 0.5],
    [0.0, 0.2, 0.0, 0.5, 0.0],
    [0.0, 0.4, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.3, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.2],
    [0.0] * 5,
    [0.0] * 5,
])
SUBTYPE_TUMOUR_SHIFT = 0.5  # growth-pattern shift of tumour tiles per subtype (norm, in tile-noise units)
TILE_NOISE_SD, FEATURE_NOISE_SD = 1.0, 0.5
SITE_STAIN_LATENT_SD, SITE_STAIN_FEATURE_SD, SITE_GAIN_SD, SLIDE_STAIN_SD = 0.35, 0.08, 0.05, 0.2


@dataclass(frozen=True)
class Slide:
    features: np.ndarray  # [N, D] float16
    coords: np.ndarray  # [N, 2] int64 level-0 px
    fragment: np.ndarray  # [N] int32
    types: np.ndarray  # [N] int8 index into TILE_TYPES (truth)
    level0_size: tuple[int, int]
    informative: np.ndarray  # [N] bool: tiles carrying the case-specific appearance (all unless focal)


def simulate_slide(cfg: SimConfig, world: World, case: Case, j: int) -> Slide:
    """Slide j of a case: layout → tile types (composition + spatial clustering) → features."""
    r = rng(cfg, SLIDE, case.index, j)
    n = int(np.clip(np.round(cfg.bag_size_median * np.exp(cfg.bag_size_sigma * r.standard_normal())),
                    cfg.bag_size_min, cfg.bag_size_max))
    xy, fragment, depth = tissue_layout(n, r)
    order = np.lexsort((xy[:, 0], xy[:, 1], fragment))  # fragment by fragment, raster order (as extracted)
    xy, fragment, depth = xy[order], fragment[order], depth[order]

    prog = case.programmes + SLIDE_HETEROGENEITY_SD * r.standard_normal(len(PROGRAMMES))
    logits = TYPE_BASE + TYPE_LOADINGS @ prog + SLIDE_COMPOSITION_SD * r.standard_normal(len(TILE_TYPES))
    xyf = xy.astype(np.float64)
    fields = np.stack([field(xyf, r, s) for s in TYPE_LENGTH_SCALE], 1)
    score = (logits + FIELD_AMPLITUDE * fields + TYPE_DEPTH * (depth[:, None] - 0.5)
             + TILE_TYPE_NOISE * r.gumbel(size=fields.shape))
    types = np.argmax(score, axis=1).astype(np.int8)

    shift = np.einsum("k,tkl->tl", prog, world.appearance)
    shift[TILE_TYPES.index("tumour")] += world.subtype_tumour[case.subtype]
    offset = world.site_stain_latent[case.site] + SLIDE_STAIN_SD * r.standard_normal(cfg.latent_dim)
    z = (world.prototypes + shift + offset).astype(np.float32)[types]
    informative = focal_region(cfg, case.index, j, xy)
    if not informative.all():  # outside the foci a tile looks like its type in a programme-neutral case
        z = np.where(informative[:, None], z, (world.prototypes + offset).astype(np.float32)[types])
    z += TILE_NOISE_SD * r.standard_normal(z.shape, dtype=np.float32)
    if world.mlp is None:
        feats = z @ (world.site_gain[case.site] * world.projection).astype(np.float32)
    else:  # stain and tissue state interact: no linear read-out of the latent, pooling is no longer sufficient
        feats = apply_mlp(world.mlp, z, world.site_gain[case.site])
    noise = r.standard_normal(feats.shape, dtype=np.float32)
    noise *= FEATURE_NOISE_SD  # in place: at 20k × 1024 every temporary costs 80 MB
    feats += noise
    feats += world.site_stain_feature[case.site].astype(np.float32)
    psl0 = cfg.patch_size_level0
    coords = xy.astype(np.int64) * psl0
    extent = (xy.max(axis=0) + 1 + r.integers(4, 40, size=2)) * psl0
    return Slide(feats.astype(np.float16), coords, fragment, types, (int(extent[0]), int(extent[1])), informative)

