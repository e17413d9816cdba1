"""Every knob of the simulator (`SimConfig`) and its random streams: one generator per (purpose, case, slide).

Determinism: every random draw comes from `np.random.default_rng([seed, STREAM, ...])`, so case i is the same
whatever `n_cases` is and whatever other knobs say about other modalities, and the same seed gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmfm import MODALITIES

# Random streams: the second seed word says what a generator is for (never reuse one for two purposes).
WORLD, CASE, SLIDE, RNA, PROTEIN, REPORT, FOCAL, SIZE, SPOTS = 1, 2, 3, 4, 5, 6, 7, 8, 9
W_SITES, W_FEATURES, W_GENES, W_PROTEINS, W_MLP = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class SimConfig:
    """Every knob of the simulator; the defaults are the demo cohort (data card: why each value)."""

    name: str = "simulated"  # cohort name written to cohort.yaml
    n_cases: int = 300  # cases (patients); --cases on the command line
    seed: int = 0  # same seed and config, same bytes; case i does not depend on n_cases
    n_sites: int = 7  # medical centres (TCGA tissue-source-site analogue), written as cases.csv `site`
    site_confounding: float = 4.0  # Dirichlet concentration of per-site subtype mix: lower = stronger confounding
    site_effect: float = 1.0  # scale of stain-like feature shifts and omics batch effects (0 = none)
    feature_dim: int = 1024  # tile-feature width (1024 = UNI, 1536 = UNI2-h / H-optimus, 2560 = Virchow2)
    latent_dim: int = 48  # dimension of the morphology space that tile features are projected from
    encoder_name: str = "sim-uni"  # tile_encoder.name in cohort.yaml
    bag_size_median: int = 1000  # median tiles per slide
    bag_size_sigma: float = 0.9  # log-normal sigma of tiles per slide (heavy right tail)
    bag_size_min: int = 16  # tiles per slide are clipped to [bag_size_min, bag_size_max]
    bag_size_max: int = 20000
    multi_slide_rate: float = 0.2  # fraction of cases with slides that have 2+ slides
    max_slides_per_case: int = 3  # upper bound for multi-slide cases
    patch_size: int = 256  # tile size in px at target_magnification
    target_magnification: float = 20.0  # magnification the tiles are read at
    level0_magnification: float = 40.0  # scan magnification (patch_size_level0 = patch_size × level0 / target)
    n_genes: int = 2000  # genes in rna.h5ad (negative-binomial counts; 107 carry names)
    n_proteins: int = 64  # markers in protein.h5ad (RPPA-like panel)
    missing_slide: float = 0.08  # fraction of cases without a slide (each missing_* independent)
    missing_rna: float = 0.15  # fraction of cases without RNA-seq
    missing_protein: float = 0.35  # fraction without the protein panel (RPPA covers fewer TCGA cases)
    missing_report: float = 0.10  # fraction without a pathology report
    missing_mutation: float = 0.10  # fraction with unknown mutation status (never read as wild-type)
    median_os_days: float = 1500.0  # baseline median survival at zero log-hazard
    weibull_shape: float = 1.3  # Weibull shape of the proportional-hazards survival times
    max_follow_up_days: float = 3650.0  # censoring: uniform up to this, or earlier by exponential loss to follow-up
    # Harder options (data card §Harder options; `HARDER` holds the value each is benchmarked at). All off by
    # default: the default cohort stays the documented demo cohort, byte for byte.
    focal_rate: float = 0.0  # share of cases whose case-specific tile appearance is confined to a focal region
    focal_fraction: float = 0.05  # share of a focal slide's tiles inside that region (when focal_rate > 0)
    feature_mlp_hidden: int = 0  # > 0: tile features = a fixed random tanh MLP of this width (0 = linear)
    mnar_strength: float = 0.0  # log-odds of a missing RNA/protein profile per SD of smaller tumour (0 = MCAR)
    # Spatial transcriptomics (off by default: the default cohort is unchanged): a share of slides gets a Visium-like
    # spot table spots/<slide>.h5ad (mmfm.simulate.spatial), from the same latent state as the bulk RNA and tiles.
    spatial_rate: float = 0.0  # share of slides with a spot table

    @property
    def patch_size_level0(self) -> int:
        return int(round(self.patch_size * self.level0_magnification / self.target_magnification))

    def check(self) -> None:
        """Reject impossible settings, naming the key."""
        bad = []
        for k in ("n_cases", "n_sites", "feature_dim", "latent_dim", "bag_size_median", "bag_size_min",
                  "max_slides_per_case", "patch_size", "n_genes", "n_proteins"):
            if getattr(self, k) < 1:
                bad.append(f"{k}={getattr(self, k)} must be >= 1")
        for k in ("multi_slide_rate", "focal_rate", "spatial_rate") + tuple(f"missing_{m}" for m in MODALITIES):
            if not 0.0 <= getattr(self, k) <= 1.0:
                bad.append(f"{k}={getattr(self, k)} must be in [0, 1]")
        if self.bag_size_max < self.bag_size_min:
            bad.append(f"bag_size_max={self.bag_size_max} < bag_size_min={self.bag_size_min}")
        if self.level0_magnification < self.target_magnification:
            bad.append("level0_magnification must be >= target_magnification")
        for k in ("site_confounding", "median_os_days", "weibull_shape", "max_follow_up_days"):
            if getattr(self, k) <= 0:
                bad.append(f"{k}={getattr(self, k)} must be > 0")
        if not 0.0 < self.focal_fraction <= 1.0:
            bad.append(f"focal_fraction={self.focal_fraction} must be in (0, 1]")
        for k in ("seed", "site_effect", "bag_size_sigma", "feature_mlp_hidden", "mnar_strength"):
            if getattr(self, k) < 0:
                bad.append(f"{k}={getattr(self, k)} must be >= 0")
        if bad:
            raise ValueError("SimConfig: " + "; ".join(bad))


def rng(cfg: SimConfig, *words: int) -> np.random.Generator:
    """The generator of one stream: `words` = (purpose, case, slide, ...)."""
    return np.random.default_rng([cfg.seed, *words])
