"""The harder options (data card §Harder options), all off by default: focal morphology (the case-specific
appearance confined to a few compact foci) and nonlinear tile features (a fixed random tanh MLP of the latent).
The third, MNAR omics (`mnar_strength`), is a missingness mechanism: mmfm.simulate.observation.
`HARDER` holds the value each option is benchmarked at (scripts/bench_simulator_options.py), fixed a priori.
"""

from __future__ import annotations

import itertools

import numpy as np

from mmfm.simulate.layout import field
from mmfm.simulate.sim_config import FOCAL, W_MLP, WORLD, SimConfig, rng

# Harder options (SimConfig focal_*, feature_mlp_hidden, mnar_strength; priors in the data card §Harder options).
FOCAL_LENGTH_SCALE = 4.0  # tiles: a focal region is where one smooth random field is highest (a few compact foci)
MLP_LAYERS, MLP_GAIN, MLP_BIAS_SD = 2, 3.0, 0.5  # tanh layers h ← tanh(gain·h·W/√fan_in + b): a linear map of
#   the latent explains ≈ 60% of the feature variance (one layer, or gain 1, leaves ≥ 80% linear)
MLP_OUT_VAR = 2.5  # output W ~ N(0, MLP_OUT_VAR/H): per-dim feature variance ≈ the linear model's (1.76 vs 1.85)
HARDER = {  # the value each harder option is benchmarked at (scripts/bench_simulator_options.py), fixed a priori
    "focal": {"focal_rate": 0.5, "focal_fraction": 0.05},
    "nonlinear": {"feature_mlp_hidden": 256},
    "mnar": {"mnar_strength": 1.0},
}


def feature_mlp(cfg: SimConfig) -> tuple | None:
    """The fixed random MLP of the nonlinear option, drawn once per seed: (((W [in, H], b [H]), ...), W_out [H, D])."""
    if not cfg.feature_mlp_hidden:
        return None
    r, h = rng(cfg, WORLD, W_MLP), cfg.feature_mlp_hidden
    dims = [cfg.latent_dim] + [h] * MLP_LAYERS
    layers = tuple(((MLP_GAIN / np.sqrt(a) * r.standard_normal((a, b))).astype(np.float32),
                    (MLP_BIAS_SD * r.standard_normal(b)).astype(np.float32)) for a, b in itertools.pairwise(dims))
    return layers, (np.sqrt(MLP_OUT_VAR / h) * r.standard_normal((h, cfg.feature_dim))).astype(np.float32)


def apply_mlp(mlp: tuple, z: np.ndarray, gain: float) -> np.ndarray:
    """Tile features of latents z [N, L] through the MLP; `gain` = the site's scanner gain."""
    layers, w_out = mlp
    h = z
    for w, b in layers:
        h = np.tanh(h @ w + b)
    return h @ (gain * w_out).astype(np.float32)


def is_focal(cfg: SimConfig, i: int) -> bool:
    """Whether case i's case-specific tile appearance is confined to focal regions (own stream)."""
    return cfg.focal_rate > 0 and bool(rng(cfg, FOCAL, i).random() < cfg.focal_rate)


def focal_region(cfg: SimConfig, i: int, j: int, grid: np.ndarray) -> np.ndarray:
    """[N] bool: the tiles of slide j of case i that carry the case's own appearance — all of them, or in a focal
    case the `focal_fraction` where a smooth random field is highest (a few compact foci, as a subclone or a
    subtype-defining pattern occupies a few regions). `grid` = the bag's level-0 coords // patch_size_level0, in
    bag order; deterministic, so attention maps can be graded against it from the bag alone."""
    n = len(grid)
    if not is_focal(cfg, i):
        return np.ones(n, bool)
    score = field(np.asarray(grid, np.float64), rng(cfg, FOCAL, i, j), FOCAL_LENGTH_SCALE)
    m = max(1, round(cfg.focal_fraction * n))
    mask = np.zeros(n, bool)
    mask[np.argsort(-score, kind="stable")[:m]] = True
    return mask

