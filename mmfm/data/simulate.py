"""A simulated slide–omics cohort whose latent truth is known (data card: data_cards/simulated_cohort.md).

One generative story drives every modality, so a method that learns the biology is rewarded and one that
learns the medical centre is caught:

  site (medical centre) → subtype (site-dependent prevalence: confounding as in TCGA)
  subtype → driver mutations (subtype-dependent prevalence)
  subtype + mutations + case noise → biological programmes (proliferation, immune, hypoxia, stromal, differentiation)
  programmes → grade, survival (Weibull proportional hazards), tissue composition and its spatial layout,
               tile features (+ a stain-like site shift), RNA counts (negative binomial, + site batch effect),
               protein panel (log-normal, + site lot effect), and the facts a pathology report states.

Determinism: every random draw comes from `np.random.default_rng([seed, STREAM, ...])`, one stream per
(purpose, case, slide), so case i is the same whatever `n_cases` is and whatever other knobs say about
other modalities, and the same seed gives the same bytes (HDF5 without timestamps, byte-stable h5ad).
Memory: cases are generated and their bags written one at a time; only per-case rows are kept.
Resume: a re-run into the same directory with the same config skips bags that are already complete.
The latent truth goes to `truth/` — training code never reads it; tests and probes grade against it.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import yaml
from scipy import ndimage, optimize
from tqdm.auto import tqdm

from mmfm import MODALITIES
from mmfm.data.bags import write_bag
from mmfm.io import atomic_path, write_csv, write_h5ad, write_json, write_text

SUBTYPES = ("differentiated", "immunoreactive", "mesenchymal", "proliferative")
PROGRAMMES = ("proliferation", "immune", "hypoxia", "stromal", "differentiation")
DRIVERS = ("TP53", "PIK3CA", "KRAS", "PTEN", "ARID1A", "BRCA1")
TILE_TYPES = ("tumour", "stroma", "immune", "necrosis", "normal", "adipose", "artefact")

# Random streams: the second seed word says what a generator is for (never reuse one for two purposes).
_WORLD, _CASE, _SLIDE, _RNA, _PROTEIN, _REPORT, _FOCAL, _SIZE = 1, 2, 3, 4, 5, 6, 7, 8
_W_SITES, _W_FEATURES, _W_GENES, _W_PROTEINS, _W_MLP = 1, 2, 3, 4, 5


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
        for k in ("multi_slide_rate", "focal_rate") + tuple(f"missing_{m}" for m in MODALITIES):
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


# ----------------------------------------------------------------------------------------------- biology
# Programme means per subtype (rows: SUBTYPES, cols: PROGRAMMES), in units of the case-noise scale.
SUBTYPE_MEANS = np.array([
    [-0.5, -0.2, -0.3, -0.2, 1.0],
    [0.0, 1.2, -0.2, -0.3, 0.0],
    [-0.2, 0.0, 0.4, 1.2, -0.6],
    [1.2, -0.5, 0.5, -0.4, -0.5],
])
SUBTYPE_PREVALENCE = np.array([0.30, 0.25, 0.20, 0.25])
# Case-level programme noise: sd 0.7, proliferation–hypoxia and immune–stromal correlations.
PROGRAMME_CORR = np.array([
    [1.0, -0.1, 0.3, 0.0, -0.2],
    [-0.1, 1.0, 0.0, -0.2, 0.0],
    [0.3, 0.0, 1.0, 0.1, -0.1],
    [0.0, -0.2, 0.1, 1.0, -0.1],
    [-0.2, 0.0, -0.1, -0.1, 1.0],
])
PROGRAMME_SD = 0.7
PROGRAMME_CHOL = np.linalg.cholesky(PROGRAMME_CORR)
SLIDE_HETEROGENEITY_SD = 0.25  # a slide samples one block: its programmes deviate from the case's
# Driver prevalence per subtype (rows: DRIVERS, cols: SUBTYPES).
DRIVER_PREVALENCE = np.array([
    [0.45, 0.60, 0.65, 0.85],
    [0.30, 0.15, 0.10, 0.10],
    [0.10, 0.05, 0.20, 0.08],
    [0.15, 0.05, 0.10, 0.12],
    [0.20, 0.25, 0.10, 0.05],
    [0.08, 0.15, 0.06, 0.12],
])
# Programme shift caused by each driver (rows: DRIVERS, cols: PROGRAMMES).
DRIVER_EFFECTS = np.array([
    [0.4, 0.0, 0.2, 0.0, -0.3],
    [0.2, 0.0, 0.0, 0.0, 0.2],
    [0.0, 0.0, 0.2, 0.4, 0.0],
    [0.2, -0.4, 0.0, 0.0, 0.0],
    [0.0, 0.5, 0.0, 0.0, 0.0],
    [0.2, 0.3, 0.0, 0.0, 0.0],
])
# Log-hazard: linear in programmes + subtype + TP53.
HAZARD_PROGRAMMES = np.array([0.4, -0.3, 0.3, 0.25, -0.15])
HAZARD_SUBTYPE = np.array([-0.25, -0.15, 0.3, 0.1])
HAZARD_TP53 = 0.25
LOSS_TO_FOLLOW_UP_MEAN_DAYS = 8 * 365.0
# Grade from a noisy proliferation-minus-differentiation score.
GRADE_WEIGHTS = np.array([0.9, 0.0, 0.0, 0.0, -0.7])
GRADE_NOISE_SD, GRADE_CUTS = 0.5, (-0.6, 0.6)

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
FRAGMENT_COUNT_P = np.array([0.35, 0.35, 0.2, 0.1])
# Harder options (SimConfig focal_*, feature_mlp_hidden, mnar_strength; priors in the data card §Harder options).
FOCAL_LENGTH_SCALE = 4.0  # tiles: a focal region is where one smooth random field is highest (a few compact foci)
MLP_LAYERS, MLP_GAIN, MLP_BIAS_SD = 2, 3.0, 0.5  # tanh layers h ← tanh(gain·h·W/√fan_in + b): a linear map of
#   the latent explains ≈ 60% of the feature variance (one layer, or gain 1, leaves ≥ 80% linear)
MLP_OUT_VAR = 2.5  # output W ~ N(0, MLP_OUT_VAR/H): per-dim feature variance ≈ the linear model's (1.76 vs 1.85)
TUMOUR_SIZE_RISK_CORR = 0.4  # latent tumour size vs log-hazard: HR ≈ 1.46 per SD of size
MNAR_MODALITIES = ("rna", "protein")  # profiles that need fresh-frozen tissue: lost more often for small tumours
HARDER = {  # the value each harder option is benchmarked at (scripts/bench_simulator_options.py), fixed a priori
    "focal": {"focal_rate": 0.5, "focal_fraction": 0.05},
    "nonlinear": {"feature_mlp_hidden": 256},
    "mnar": {"mnar_strength": 1.0},
}
LIBRARY_SIZE_MEDIAN, LIBRARY_SIZE_SD = 3e6, 0.4  # reads over the simulated genes; log-normal depth
GENE_SITE_SD, PROTEIN_SITE_SD, PROTEIN_NOISE_SD = 0.1, 0.2, 0.35

# Named genes per module (marker genes of each programme; drivers' transcriptional read-outs).
GENE_MODULES = {
    "proliferation": ["MKI67", "TOP2A", "CCNB1", "BUB1", "CDK1", "AURKA", "MCM2", "PCNA", "E2F1", "CENPF",
                      "TYMS", "BIRC5", "CCNE1", "FOXM1", "MYBL2", "UBE2C", "PLK1", "CDC20"],
    "immune": ["CD8A", "CD3E", "CD3D", "CD2", "GZMB", "PRF1", "CXCL9", "CXCL10", "CD274", "PDCD1", "LAG3",
               "CD19", "MS4A1", "CD68", "CD163", "PTPRC", "IFNG", "HLA-DRA", "CCL5", "IDO1"],
    "hypoxia": ["VEGFA", "CA9", "SLC2A1", "LDHA", "PGK1", "BNIP3", "ADM", "ANKRD37", "NDRG1", "P4HA1",
                "EGLN3", "ENO1", "HK2", "PDK1"],
    "stromal": ["COL1A1", "COL1A2", "COL3A1", "FN1", "VIM", "SPARC", "ACTA2", "TAGLN", "POSTN", "FAP",
                "PDGFRB", "ZEB1", "SNAI2", "TWIST1", "MMP2", "THY1"],
    "differentiation": ["EPCAM", "KRT8", "KRT18", "KRT19", "CDH1", "CLDN4", "MUC1", "ESR1", "PGR", "GATA3",
                        "FOXA1", "KRT7", "AGR2", "TFF1", "SPDEF"],
    "TP53": ["CDKN1A", "MDM2", "ZMAT3", "RRM2B", "TP53I3"],
    "KRAS": ["DUSP6", "ETV4", "ETV5", "SPRY2", "SPRY4", "PHLDA1"],
    "PTEN": ["PTEN"],
    "ARID1A": ["ARID1A"],
    "BRCA1": ["BRCA1"],
    "housekeeping": ["ACTB", "GAPDH", "B2M", "RPLP0", "PPIA", "TBP", "HPRT1", "PGK2", "GUSB", "HMBS"],
}
# Transcriptional effect of a driver on its read-out genes (log scale).
GENE_DRIVER_EFFECT = {"TP53": -0.7, "KRAS": 0.7, "PTEN": -1.0, "ARID1A": -0.5, "BRCA1": -0.6}

PROTEIN_MODULES = {
    "proliferation": ["Ki-67", "Cyclin_B1", "Cyclin_E1", "PCNA", "FoxM1", "CDK1", "Aurora-A", "PLK1"],
    "immune": ["CD8", "CD3", "CD4", "CD20", "CD68", "PD-L1", "PD-1", "LCK", "Granzyme_B", "HLA-DR"],
    "hypoxia": ["HIF-1-alpha", "CA9", "GLUT1", "LDHA", "VEGFR2", "PDK1", "BNIP3"],
    "stromal": ["Collagen_VI", "Fibronectin", "Vimentin", "alpha-SMA", "Caveolin-1", "N-Cadherin",
                "PDGFR-beta", "MMP2", "Snail"],
    "differentiation": ["E-Cadherin", "Claudin-7", "ER-alpha", "PR", "GATA3", "AR", "Cytokeratin", "EpCAM"],
    "driver": ["p53", "PTEN", "AKT_pS473", "S6_pS235_S236", "MAPK_pT202_Y204", "MEK1_pS217_S221", "ARID1A",
               "BRCA1", "p21"],
    "other": ["GAPDH", "beta-Actin", "beta-Catenin", "EGFR", "HER2", "BCL2", "BAX", "c-Myc", "Rb_pS807_S811",
              "mTOR", "STAT3_pY705", "NF-kB-p65", "SMAD3", "Src", "YAP", "IRS1", "Notch1", "Caspase-7",
              "PARP_cleaved", "Bim", "XIAP", "TSC2"],
}
PROTEIN_DRIVER_EFFECT = {  # (antibody, driver) → log-intensity shift
    ("p53", "TP53"): 0.8, ("p21", "TP53"): -0.5, ("PTEN", "PTEN"): -1.0, ("AKT_pS473", "PIK3CA"): 0.5,
    ("AKT_pS473", "PTEN"): 0.5, ("S6_pS235_S236", "PIK3CA"): 0.3, ("MAPK_pT202_Y204", "KRAS"): 0.7,
    ("MEK1_pS217_S221", "KRAS"): 0.5, ("ARID1A", "ARID1A"): -0.8, ("BRCA1", "BRCA1"): -0.6,
}


def _risk_moments() -> tuple[float, float]:
    """Mean and SD of the log-hazard at the base subtype prevalence, from the constants above (standardises size)."""
    via_drivers = DRIVER_EFFECTS @ HAZARD_PROGRAMMES
    via_drivers[DRIVERS.index("TP53")] += HAZARD_TP53
    mean_s = SUBTYPE_MEANS @ HAZARD_PROGRAMMES + HAZARD_SUBTYPE + via_drivers @ DRIVER_PREVALENCE
    noise_var = HAZARD_PROGRAMMES @ (PROGRAMME_SD ** 2 * PROGRAMME_CORR) @ HAZARD_PROGRAMMES
    var_s = noise_var + via_drivers ** 2 @ (DRIVER_PREVALENCE * (1 - DRIVER_PREVALENCE))
    mean = float(SUBTYPE_PREVALENCE @ mean_s)
    return mean, float(np.sqrt(SUBTYPE_PREVALENCE @ var_s + SUBTYPE_PREVALENCE @ (mean_s - mean) ** 2))


RISK_MEAN, RISK_SD = _risk_moments()


def _round_robin(modules: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(name, module) interleaved across modules, so a truncated panel still covers every module."""
    out, lists, i = [], list(modules.items()), 0
    while any(i < len(v) for _, v in lists):
        out += [(v[i], m) for m, v in lists if i < len(v)]
        i += 1
    return out


# ----------------------------------------------------------------------------------------------- world
@dataclass
class World:
    """Cohort-level parameters (drawn once per seed): sites, feature geometry, gene and protein models."""

    site_weights: np.ndarray  # [S] share of cases per site
    site_subtype: np.ndarray  # [S, n_subtypes] subtype prevalence per site
    site_stain_latent: np.ndarray  # [S, L]
    site_stain_feature: np.ndarray  # [S, D]
    site_gain: np.ndarray  # [S]
    prototypes: np.ndarray  # [T, L] tile-type prototypes
    appearance: np.ndarray  # [T, K, L] appearance change per programme unit
    subtype_tumour: np.ndarray  # [n_subtypes, L]
    projection: np.ndarray  # [L, D]
    genes: pd.DataFrame  # index gene: module, base, dispersion, load_<programme>, sub_<subtype>, mut_<driver>
    gene_site: np.ndarray  # [S, G] batch effect (log scale)
    proteins: pd.DataFrame  # index antibody: module, base, load_<programme>, mut_<driver>
    protein_site: np.ndarray  # [S, P]
    mlp: tuple | None = None  # nonlinear features: (((W [in, H], b [H]), ...), W_out [H, D])

    gene_arrays: dict[str, np.ndarray] = dataclasses.field(init=False)  # the tables as arrays, once
    protein_arrays: dict[str, np.ndarray] = dataclasses.field(init=False)

    def __post_init__(self):
        self.gene_arrays = {"base": self.genes["base"].to_numpy(), "dispersion": self.genes["dispersion"].to_numpy(),
                            "load": _cols(self.genes, "load_", PROGRAMMES), "sub": _cols(self.genes, "sub_", SUBTYPES),
                            "mut": _cols(self.genes, "mut_", DRIVERS)}
        self.protein_arrays = {"base": self.proteins["base"].to_numpy(),
                               "load": _cols(self.proteins, "load_", PROGRAMMES),
                               "mut": _cols(self.proteins, "mut_", DRIVERS)}


def _cols(df: pd.DataFrame, prefix: str, names: tuple[str, ...]) -> np.ndarray:
    return df[[f"{prefix}{n}" for n in names]].to_numpy()


def _rng(cfg: SimConfig, *words: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, *words])


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_world(cfg: SimConfig) -> World:
    """Cohort-level parameters; each block has its own stream so e.g. n_genes never moves the features."""
    s, L, D, K = cfg.n_sites, cfg.latent_dim, cfg.feature_dim, len(PROGRAMMES)
    r = _rng(cfg, _WORLD, _W_SITES)
    site_weights = r.dirichlet(np.full(s, 3.0))
    site_subtype = np.stack([r.dirichlet(cfg.site_confounding * SUBTYPE_PREVALENCE * len(SUBTYPES))
                             for _ in range(s)])
    e = cfg.site_effect
    site_stain_latent = e * SITE_STAIN_LATENT_SD * r.standard_normal((s, L))
    site_stain_feature = e * SITE_STAIN_FEATURE_SD * r.standard_normal((s, D))
    site_gain = 1.0 + e * SITE_GAIN_SD * r.standard_normal(s)

    r = _rng(cfg, _WORLD, _W_FEATURES)
    prototypes = r.standard_normal((len(TILE_TYPES), L))
    appearance = TYPE_APPEARANCE[:, :, None] * _unit_rows(r, len(TILE_TYPES) * K, L).reshape(-1, K, L)
    subtype_tumour = SUBTYPE_TUMOUR_SHIFT * _unit_rows(r, len(SUBTYPES), L)
    projection = r.standard_normal((L, D)) / np.sqrt(L)

    mlp = None
    if cfg.feature_mlp_hidden:
        r, h = _rng(cfg, _WORLD, _W_MLP), cfg.feature_mlp_hidden
        dims = [L] + [h] * MLP_LAYERS
        layers = tuple(((MLP_GAIN / np.sqrt(a) * r.standard_normal((a, b))).astype(np.float32),
                        (MLP_BIAS_SD * r.standard_normal(b)).astype(np.float32)) for a, b in itertools.pairwise(dims))
        mlp = (layers, (np.sqrt(MLP_OUT_VAR / h) * r.standard_normal((h, D))).astype(np.float32))

    genes, gene_site = _gene_model(cfg, _rng(cfg, _WORLD, _W_GENES))
    proteins, protein_site = _protein_model(cfg, _rng(cfg, _WORLD, _W_PROTEINS))
    return World(site_weights, site_subtype, site_stain_latent, site_stain_feature, site_gain, prototypes,
                 appearance, subtype_tumour, projection, genes, gene_site, proteins, protein_site, mlp)


def _gene_model(cfg: SimConfig, r: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """Named marker genes load on their programme (or respond to their driver); fillers are sparse and weak."""
    named = _round_robin(GENE_MODULES)
    rows = (named + [(f"SIMG{j:05d}", "filler") for j in range(max(cfg.n_genes - len(named), 0))])[:cfg.n_genes]
    g = len(rows)
    module = np.array([m for _, m in rows])
    is_prog = np.isin(module, PROGRAMMES)
    base = np.where(module == "housekeeping", r.normal(6.0, 0.5, g),
                    np.where(module == "filler", r.normal(1.5, 1.8, g), r.normal(3.0, 1.0, g)))
    load = np.zeros((g, len(PROGRAMMES)))
    own = [PROGRAMMES.index(m) if p else 0 for m, p in zip(module, is_prog)]
    load[np.arange(g), own] = np.where(is_prog, r.uniform(0.5, 1.0, g), 0.0)
    filler = module == "filler"
    pick = filler & (r.random(g) < 0.3)
    load[np.arange(g), r.integers(0, len(PROGRAMMES), g)] += np.where(pick, r.normal(0.0, 0.35, g), 0.0)
    sub = np.where((filler & (r.random(g) < 0.1))[:, None], r.normal(0.0, 0.6, (g, len(SUBTYPES))), 0.0)
    mut = np.zeros((g, len(DRIVERS)))
    for d, eff in GENE_DRIVER_EFFECT.items():
        mut[module == d, DRIVERS.index(d)] = eff * r.uniform(0.7, 1.3, int((module == d).sum()))
    df = pd.DataFrame({"module": module, "base": base, "dispersion": np.exp(r.normal(np.log(0.12), 0.5, g))},
                      index=pd.Index([n for n, _ in rows], name="gene"))
    for k, p in enumerate(PROGRAMMES):
        df[f"load_{p}"] = load[:, k]
    for k, s in enumerate(SUBTYPES):
        df[f"sub_{s}"] = sub[:, k]
    for k, d in enumerate(DRIVERS):
        df[f"mut_{d}"] = mut[:, k]
    return df, cfg.site_effect * GENE_SITE_SD * r.standard_normal((cfg.n_sites, g))


def _protein_model(cfg: SimConfig, r: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """An RPPA-like panel: module antibodies track their programme, phospho/driver antibodies their driver."""
    named = _round_robin(PROTEIN_MODULES)
    rows = (named + [(f"AB_SIM{j:03d}", "other") for j in range(max(cfg.n_proteins - len(named), 0))])
    rows = rows[:cfg.n_proteins]
    p = len(rows)
    module = np.array([m for _, m in rows])
    load = np.zeros((p, len(PROGRAMMES)))
    for k, prog in enumerate(PROGRAMMES):
        load[module == prog, k] = r.uniform(0.4, 0.8, int((module == prog).sum()))
    pick = ~np.isin(module, PROGRAMMES) & (r.random(p) < 0.3)
    load[np.arange(p), r.integers(0, len(PROGRAMMES), p)] += np.where(pick, r.normal(0.0, 0.25, p), 0.0)
    names = [n for n, _ in rows]
    mut = np.zeros((p, len(DRIVERS)))
    for (ab, d), eff in PROTEIN_DRIVER_EFFECT.items():
        if ab in names:
            mut[names.index(ab), DRIVERS.index(d)] = eff
    df = pd.DataFrame({"module": module, "base": r.normal(6.5, 1.0, p)}, index=pd.Index(names, name="antibody"))
    for k, prog in enumerate(PROGRAMMES):
        df[f"load_{prog}"] = load[:, k]
    for k, d in enumerate(DRIVERS):
        df[f"mut_{d}"] = mut[:, k]
    return df, cfg.site_effect * PROTEIN_SITE_SD * r.standard_normal((cfg.n_sites, p))


# ----------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """The latent state of one case, and which modalities it has."""

    index: int
    case_id: str
    site: int
    subtype: int
    programmes: np.ndarray  # [K]
    mutations: np.ndarray  # [M] bool, true status (known or not)
    grade_score: float
    grade: int
    risk: float  # true log-hazard
    event_days: float
    censor_days: float
    n_slides: int
    has: dict  # modality → bool (slide ⇔ n_slides > 0)
    size_z: float = 0.0  # standardised latent tumour size (drives missingness only when mnar_strength > 0)

    @property
    def os_days(self) -> float:
        return float(np.round(min(self.event_days, self.censor_days)))

    @property
    def os_event(self) -> int:
        return int(self.event_days <= self.censor_days)


def case_id(i: int) -> str:
    return f"case-{i:05d}"


def slide_id(i: int, j: int) -> str:
    return f"{case_id(i)}-s{j}"


def draw_case(cfg: SimConfig, world: World, i: int) -> Case:
    """Case i from its own stream: a fixed number of draws in a fixed order, whatever the knobs."""
    r = _rng(cfg, _CASE, i)
    site = int(r.choice(cfg.n_sites, p=world.site_weights))
    subtype = int(r.choice(len(SUBTYPES), p=world.site_subtype[site]))
    muts = r.random(len(DRIVERS)) < DRIVER_PREVALENCE[:, subtype]
    noise = PROGRAMME_SD * (PROGRAMME_CHOL @ r.standard_normal(len(PROGRAMMES)))
    prog = SUBTYPE_MEANS[subtype] + muts.astype(float) @ DRIVER_EFFECTS + noise
    grade_score = float(GRADE_WEIGHTS @ prog + GRADE_NOISE_SD * r.standard_normal())
    grade = 1 + int(grade_score > GRADE_CUTS[0]) + int(grade_score > GRADE_CUTS[1])
    risk = float(HAZARD_PROGRAMMES @ prog + HAZARD_SUBTYPE[subtype] + HAZARD_TP53 * muts[DRIVERS.index("TP53")])
    k = cfg.weibull_shape
    lam = np.log(2.0) / cfg.median_os_days ** k  # S(t) = exp(-lam t^k e^risk): median at risk 0
    event = float((-np.log(1.0 - r.random()) / (lam * np.exp(risk))) ** (1.0 / k))
    censor = float(min(r.uniform(30.0, cfg.max_follow_up_days), r.exponential(LOSS_TO_FOLLOW_UP_MEAN_DAYS)))
    u = r.random(len(MODALITIES) + 2)  # presence draws, one per modality + slide-count draws
    size_z = tumour_size_z(cfg, i, risk)
    has = {m: bool(u[k_] >= missing_probability(cfg, m, size_z)) for k_, m in enumerate(MODALITIES)}
    n_slides = 0
    if has["slide"]:
        multi = u[-2] < cfg.multi_slide_rate and cfg.max_slides_per_case > 1
        n_slides = 2 + int(u[-1] * (cfg.max_slides_per_case - 1)) if multi else 1
    return Case(i, case_id(i), site, subtype, prog, muts, grade_score, grade, risk, event, censor, n_slides, has,
                size_z)


def tumour_size_z(cfg: SimConfig, i: int, risk: float) -> float:
    """Latent tumour size of case i in SD units, correlated with its log-hazard (bigger tumours do worse).
    Its own stream, so it exists (in truth/) without moving any other draw."""
    rho = TUMOUR_SIZE_RISK_CORR
    eps = _rng(cfg, _SIZE, i).standard_normal()
    return float(rho * (risk - RISK_MEAN) / RISK_SD + np.sqrt(1.0 - rho ** 2) * eps)


def missing_probability(cfg: SimConfig, modality: str, size_z: float) -> float:
    """P(modality absent): the configured rate (MCAR), or for RNA/protein with mnar_strength β > 0
    σ(a − β·size_z): small tumours leave no fresh-frozen tissue for sequencing or RPPA (MNAR). The intercept a
    keeps the cohort-wide rate at the configured one (size_z ~ N(0, 1)), so only *which* cases miss changes."""
    base = getattr(cfg, f"missing_{modality}")
    if modality not in MNAR_MODALITIES or cfg.mnar_strength == 0 or base in (0.0, 1.0):
        return base
    return _sigmoid(_mnar_intercept(base, cfg.mnar_strength) - cfg.mnar_strength * size_z)


@functools.cache
def _mnar_intercept(rate: float, beta: float) -> float:
    """a with E[σ(a − β z)] = rate for z ~ N(0, 1) (Gauss–Hermite quadrature, 64 nodes)."""
    x, w = np.polynomial.hermite_e.hermegauss(64)
    w = w / w.sum()
    return float(optimize.brentq(lambda a: w @ (1.0 / (1.0 + np.exp(-(a - beta * x)))) - rate, -50.0, 50.0))


def is_focal(cfg: SimConfig, i: int) -> bool:
    """Whether case i's case-specific tile appearance is confined to focal regions (own stream)."""
    return cfg.focal_rate > 0 and bool(_rng(cfg, _FOCAL, i).random() < cfg.focal_rate)


# ----------------------------------------------------------------------------------------------- slides
def _field(xy: np.ndarray, r: np.random.Generator, length: float, n_waves: int = 16) -> np.ndarray:
    """A smooth unit-variance random field (random Fourier features of a Gaussian kernel) at points xy."""
    w = r.standard_normal((n_waves, 2)) / length
    phase = r.uniform(0.0, 2 * np.pi, n_waves)
    return np.sqrt(2.0 / n_waves) * np.cos(xy @ w.T + phase).sum(axis=1)


def _connected(score: np.ndarray, m: int) -> np.ndarray:
    """Boolean mask of m connected cells of low score: the m lowest, reduced to their largest piece, then
    regrown from its border always taking the lowest-score neighbour (only the few missing cells loop)."""
    mask = np.zeros(score.shape, bool)
    mask.flat[np.argpartition(score.ravel(), m - 1)[:m]] = True
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    missing = m - int(mask.sum())
    if missing:
        w, flat = score.shape[1], score.ravel()
        seen = mask | ndimage.binary_dilation(mask)
        heap = [(flat[i], i) for i in np.flatnonzero(seen & ~mask)]
        heapq.heapify(heap)
        seen, out = seen.ravel(), mask.ravel()
        for _ in range(missing):
            _, i = heapq.heappop(heap)
            out[i] = True
            for j in (i - w, i + w, i - 1 if i % w else -1, i + 1 if (i + 1) % w else -1):
                if 0 <= j < len(flat) and not seen[j]:
                    seen[j] = True
                    heapq.heappush(heap, (flat[j], j))
        mask = out.reshape(score.shape)
    return mask


def _blob(m: int, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """m contiguous grid cells forming an irregular ellipse; returns (xy from 0, depth 0=edge…1=core)."""
    aspect, theta = r.uniform(0.45, 1.0), r.uniform(0.0, np.pi)
    r1 = np.sqrt(m / (np.pi * aspect))
    half = int(np.ceil(1.5 * r1)) + 2
    y, x = np.mgrid[-half:half + 1, -half:half + 1]
    xy = np.stack([x.ravel(), y.ravel()], 1).astype(np.float64)
    u = (xy[:, 0] * np.cos(theta) + xy[:, 1] * np.sin(theta)) / r1
    v = (-xy[:, 0] * np.sin(theta) + xy[:, 1] * np.cos(theta)) / (aspect * r1)
    score = np.hypot(u, v) + 0.3 * _field(xy, r, max(r1 / 2, 1.5))
    keep = np.flatnonzero(_connected(score.reshape(x.shape), m))
    s = score[keep]
    depth = (s.max() - s) / max(s.max() - s.min(), 1e-9)
    cells = xy[keep].astype(np.int64)
    return cells - cells.min(axis=0), depth


def _layout(n: int, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1–4 tissue fragments (blobs) side by side on the tile grid: (xy [n,2], fragment [n], depth [n])."""
    n_frag = min(1 + int(r.choice(len(FRAGMENT_COUNT_P), p=FRAGMENT_COUNT_P)), max(1, n // 32))
    share = r.dirichlet(np.full(n_frag, 3.0))
    sizes = 8 + r.multinomial(n - 8 * n_frag, share) if n_frag > 1 else np.array([n])
    xy, frag, depth, x0 = [], [], [], 0
    for f, m in enumerate(sizes):
        cells, d = _blob(int(m), r)
        xy.append(cells + np.array([x0, r.integers(0, 8)]))
        x0 += int(cells[:, 0].max()) + 1 + int(r.integers(2, 12))
        frag.append(np.full(int(m), f, np.int32))
        depth.append(d)
    xy = np.concatenate(xy) + r.integers(4, 40, size=2)  # margin to the slide's top-left corner
    return xy, np.concatenate(frag), np.concatenate(depth)


def focal_region(cfg: SimConfig, i: int, j: int, grid: np.ndarray) -> np.ndarray:
    """[N] bool: the tiles of slide j of case i that carry the case's own appearance — all of them, or in a focal
    case the `focal_fraction` where a smooth random field is highest (a few compact foci, as a subclone or a
    subtype-defining pattern occupies a few regions). `grid` = the bag's level-0 coords // patch_size_level0, in
    bag order; deterministic, so attention maps can be graded against it from the bag alone."""
    n = len(grid)
    if not is_focal(cfg, i):
        return np.ones(n, bool)
    score = _field(np.asarray(grid, np.float64), _rng(cfg, _FOCAL, i, j), FOCAL_LENGTH_SCALE)
    m = max(1, round(cfg.focal_fraction * n))
    mask = np.zeros(n, bool)
    mask[np.argsort(-score, kind="stable")[:m]] = True
    return mask


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
    r = _rng(cfg, _SLIDE, case.index, j)
    n = int(np.clip(np.round(cfg.bag_size_median * np.exp(cfg.bag_size_sigma * r.standard_normal())),
                    cfg.bag_size_min, cfg.bag_size_max))
    xy, fragment, depth = _layout(n, r)
    order = np.lexsort((xy[:, 0], xy[:, 1], fragment))  # fragment by fragment, raster order (as extracted)
    xy, fragment, depth = xy[order], fragment[order], depth[order]

    prog = case.programmes + SLIDE_HETEROGENEITY_SD * r.standard_normal(len(PROGRAMMES))
    logits = TYPE_BASE + TYPE_LOADINGS @ prog + SLIDE_COMPOSITION_SD * r.standard_normal(len(TILE_TYPES))
    xyf = xy.astype(np.float64)
    field = np.stack([_field(xyf, r, s) for s in TYPE_LENGTH_SCALE], 1)
    score = (logits + FIELD_AMPLITUDE * field + TYPE_DEPTH * (depth[:, None] - 0.5)
             + TILE_TYPE_NOISE * r.gumbel(size=field.shape))
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
        layers, w_out = world.mlp
        h = z
        for w, b in layers:
            h = np.tanh(h @ w + b)
        feats = h @ (world.site_gain[case.site] * w_out).astype(np.float32)
    noise = r.standard_normal(feats.shape, dtype=np.float32)
    noise *= FEATURE_NOISE_SD  # in place: at 20k × 1024 every temporary costs 80 MB
    feats += noise
    feats += world.site_stain_feature[case.site].astype(np.float32)
    psl0 = cfg.patch_size_level0
    coords = xy.astype(np.int64) * psl0
    extent = (xy.max(axis=0) + 1 + r.integers(4, 40, size=2)) * psl0
    return Slide(feats.astype(np.float16), coords, fragment, types, (int(extent[0]), int(extent[1])), informative)


# ----------------------------------------------------------------------------------------------- omics
def rna_counts(cfg: SimConfig, world: World, case: Case) -> np.ndarray:
    """Bulk RNA-seq counts: gamma–Poisson (negative binomial) around programme-driven means, varying depth."""
    r = _rng(cfg, _RNA, case.index)
    g = world.gene_arrays
    log_mu = (g["base"] + g["load"] @ case.programmes + g["sub"][:, case.subtype]
              + g["mut"] @ case.mutations.astype(float) + world.gene_site[case.site])
    p = np.exp(log_mu - log_mu.max())
    mu = np.exp(np.log(LIBRARY_SIZE_MEDIAN) + LIBRARY_SIZE_SD * r.standard_normal()) * p / p.sum()
    phi = g["dispersion"]
    return r.poisson(r.gamma(1.0 / phi, phi * mu)).astype(np.float32)


def protein_values(cfg: SimConfig, world: World, case: Case) -> np.ndarray:
    """Raw antibody signal in integer scanner units (the contract's raw counts): log-normal around programme-
    and driver-driven means (median signal ~700), plus a per-site antibody-lot effect."""
    r = _rng(cfg, _PROTEIN, case.index)
    pr = world.protein_arrays
    log_v = (pr["base"] + pr["load"] @ case.programmes + pr["mut"] @ case.mutations.astype(float)
             + world.protein_site[case.site] + PROTEIN_NOISE_SD * r.standard_normal(len(pr["base"])))
    return np.round(np.exp(log_v)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- reports
PATTERN = {
    "differentiated": ["a predominantly glandular pattern", "well-formed glandular and papillary architecture",
                       "a tubulopapillary growth pattern"],
    "immunoreactive": ["a solid and glandular pattern with prominent lymphoid stroma",
                       "medullary-like growth with a lymphoid-rich stroma"],
    "mesenchymal": ["infiltrative cords and single cells within a desmoplastic stroma",
                    "an infiltrative pattern with marked desmoplasia"],
    "proliferative": ["solid sheets of tumour cells", "a solid growth pattern with high nuclear grade",
                      "solid nests with frequent mitoses"],
}
GRADE_WORDS = {1: ["grade 1", "well differentiated", "low grade (G1)"],
               2: ["grade 2", "moderately differentiated", "intermediate grade (G2)"],
               3: ["grade 3", "poorly differentiated", "high grade (G3)"]}
DIAGNOSIS = ["Invasive carcinoma, {grade}, with {pattern}.", "Invasive carcinoma showing {pattern}; {grade}.",
             "Carcinoma, {grade}. The tumour shows {pattern}."]
DIAGNOSIS_NOS = ["Invasive carcinoma, {grade}.", "Carcinoma, not otherwise specified, {grade}."]
HEADERS = ["", "FINAL DIAGNOSIS: ", "DIAGNOSIS: ", "Microscopic description: "]
FINDINGS = {
    ("necrosis", True): ["Tumour necrosis is present.", "Areas of geographic necrosis are seen.",
                         "Necrosis: present (approximately {necrosis_pct}%).", "Comedo-type necrosis is identified."],
    ("necrosis", False): ["No tumour necrosis is identified.", "Necrosis: absent.", "Negative for necrosis.",
                          "There is no evidence of necrosis."],
    ("lvi", True): ["Lymphovascular invasion is present.", "LVI: identified.",
                    "Tumour emboli are seen within lymphovascular spaces.", "Lymphovascular invasion: present, focal."],
    ("lvi", False): ["No lymphovascular invasion is identified.", "LVI: not identified.",
                     "Lymphovascular invasion: absent.", "Negative for lymphovascular invasion."],
    ("til", "brisk"): ["Brisk tumour-infiltrating lymphocytes.",
                       "Dense lymphocytic infiltrate within and around the tumour.",
                       "TILs: high (approximately {til_pct}% of stroma)."],
    ("til", "non-brisk"): ["Non-brisk tumour-infiltrating lymphocytes.", "A patchy lymphocytic infiltrate is present.",
                           "TILs: intermediate (approximately {til_pct}% of stroma)."],
    ("til", "absent"): ["No significant lymphocytic infiltrate.", "Tumour-infiltrating lymphocytes are absent.",
                        "TILs: low (under 5% of stroma)."],
    ("mitoses", None): ["Mitotic count: {mitoses} per 10 HPF.", "Mitoses number {mitoses} per 10 high-power fields.",
                        "Mitotic activity: {mitoses}/10 HPF."],
    ("size", None): ["Tumour size: {size} cm.", "The tumour measures {size} cm in greatest dimension.",
                     "Greatest tumour dimension {size} cm."],
    ("nodes", True): ["Lymph nodes: {nodes_pos}/{nodes_exam} positive.",
                      "Metastatic carcinoma in {nodes_pos} of {nodes_exam} lymph nodes."],
    ("nodes", False): ["All {nodes_exam} lymph nodes are negative (0/{nodes_exam}).",
                       "Lymph nodes: 0/{nodes_exam}, negative for metastasis."],
    ("margin", True): ["Tumour extends to the {side} margin.", "The {side} margin is involved by carcinoma."],
    ("margin", False): ["Margins are free of tumour (closest {margin_mm} mm).",
                        "Resection margins clear; closest margin {margin_mm} mm ({side})."],
    ("p53", True): ["p53 immunohistochemistry: aberrant (mutant-type) pattern.", "p53 IHC shows mutant-type staining."],
    ("p53", False): ["p53 immunohistochemistry: wild-type pattern.", "p53 IHC shows wild-type staining."],
}
REPORT_GRADE_ERROR = 0.12  # inter-observer variability: reported grade off by one
FINDING_OMITTED = 0.1


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def report_facts(case: Case, r: np.random.Generator) -> dict:
    """What a pathologist would see, drawn from the latent state (reports are noisy, not a label oracle)."""
    prol, imm, hyp, strom, _ = case.programmes
    f = {"necrosis": r.random() < _sigmoid(1.5 * hyp + 0.5 * prol - 1.0),
         "lvi": r.random() < _sigmoid(0.8 * strom + 0.5 * prol - 0.8)}
    til = imm + 0.4 * r.standard_normal()
    f["til"] = "brisk" if til > 0.7 else "non-brisk" if til > -0.4 else "absent"
    grade_err = r.random() < REPORT_GRADE_ERROR
    f["reported_grade"] = int(np.clip(case.grade + (r.choice([-1, 1]) if grade_err else 0), 1, 3))
    f["mitoses"] = int(r.poisson(np.exp(1.5 + 0.8 * prol)))
    f["size"] = round(float(np.exp(np.log(3.0) + 0.4 * r.standard_normal())), 1)
    f["nodes_exam"] = int(r.integers(6, 26))
    f["nodes_pos"] = int(min(r.poisson(np.exp(-0.5 + 0.6 * strom + 0.6 * f["lvi"])), f["nodes_exam"]))
    f["margin"] = r.random() < 0.12
    f["margin_mm"] = round(float(r.uniform(0.5, 15.0)), 1)
    f["side"] = str(r.choice(["deep", "peripheral", "radial", "medial", "lateral"]))
    f["necrosis_pct"] = int(r.integers(1, 8) * 5)
    f["til_pct"] = int(r.integers(2, 18) * 5 if f["til"] == "brisk" else r.integers(1, 8) * 5)
    p53_done = r.random() < 0.25
    tp53 = bool(case.mutations[DRIVERS.index("TP53")])
    aberrant = r.random() < (0.9 if tp53 else 0.05)
    f["p53"] = aberrant if p53_done else None
    f["pattern_stated"] = r.random() >= 0.15
    return {k: (bool(v) if isinstance(v, np.bool_) else v) for k, v in f.items()}


def report_text(case: Case, facts: dict, r: np.random.Generator) -> str:
    """Templated free text: synonyms, negations, sentence order and omissions vary."""
    subtype = SUBTYPES[case.subtype]
    grade = str(r.choice(GRADE_WORDS[facts["reported_grade"]]))
    if facts["pattern_stated"]:
        diag = str(r.choice(DIAGNOSIS)).format(grade=grade, pattern=str(r.choice(PATTERN[subtype])))
    else:
        diag = str(r.choice(DIAGNOSIS_NOS)).format(grade=grade)
    keys = [("necrosis", facts["necrosis"]), ("lvi", facts["lvi"]), ("til", facts["til"]),
            ("mitoses", None), ("size", None), ("nodes", facts["nodes_pos"] > 0), ("margin", facts["margin"])]
    if facts["p53"] is not None:
        keys.append(("p53", facts["p53"]))
    keep = [k for k in keys if r.random() >= FINDING_OMITTED]
    sentences = [str(r.choice(FINDINGS[k])).format(**facts) for k in keep]
    sentences = [sentences[i] for i in r.permutation(len(sentences))]
    return str(r.choice(HEADERS)) + " ".join([diag] + sentences)


# ----------------------------------------------------------------------------------------------- writing
TRUTH_README = """# Latent truth of a simulated cohort (mmfm.data.simulate)

Training code never reads this folder; tests, probes and the data card grade against it.

- `sim_config.json`: the SimConfig that produced the cohort (a re-run with the same config resumes).
- `model.json`: the generative constants (subtype means, driver prevalence/effects, hazard and
  composition coefficients) and the drawn site weights and per-site subtype prevalence.
- `cases.csv`: one row per case: site, true subtype, programme values (`prog_*`), true driver status
  (`true_mut_*`, also when cases.csv hides it), grade score, true log-hazard `risk`, uncensored event and
  censoring times, observed `os_days`/`os_event`, modality presence, latent `tumour_size_z` and the
  probability `p_missing_rna`/`p_missing_protein` it implies (MNAR option), `focal` (case-specific appearance
  confined to foci), and the report facts (necrosis, lvi, til…).
- `slides.csv`: per slide: n_tiles, n_fragments, the fraction of each tile type (`frac_*`) and of tiles carrying
  the case-specific appearance (`informative_fraction`; which ones: `mmfm.data.simulate.focal_region`).
- `tiles/<slide_id>.npy`: int8 tile type per bag row (same order as the bag), codes = `tile_types` in model.json.
- `genes.csv`, `proteins.csv`: per-feature module, baseline, programme loadings, subtype/driver effects.
"""


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy.tmp") as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def _write_h5ad(path: Path, values: list[np.ndarray], obs: list[str], var: list[str]) -> None:
    x = np.stack(values) if values else np.zeros((0, len(var)), np.float32)
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=pd.Index(obs)), var=pd.DataFrame(index=pd.Index(var)))
    write_h5ad(path, adata)


def _claim(out: Path, cfg: SimConfig) -> None:
    """Refuse to mix configs in one directory; the same config resumes."""
    marker = out / "truth" / "sim_config.json"
    want = dataclasses.asdict(cfg)
    if marker.exists():
        have = json.loads(marker.read_text())
        have = {**{k: v for k, v in dataclasses.asdict(SimConfig()).items() if k not in have}, **have}  # knobs
        # added after the cohort was written held their default value then
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            raise ValueError(f"{out}: holds a cohort simulated with a different config (keys {diff}); "
                             "choose another --out or delete it")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists, is not empty and is not a simulated cohort; refusing to write into it")
    write_json(marker, want)


def _slide_summary(sid: str, case: Case, types: np.ndarray, fragment: np.ndarray, informative: np.ndarray) -> dict:
    counts = np.bincount(types, minlength=len(TILE_TYPES)) / max(len(types), 1)
    return {"slide_id": sid, "case_id": case.case_id, "n_tiles": len(types),
            "n_fragments": int(fragment.max()) + 1 if len(fragment) else 0,
            **{f"frac_{t}": round(float(c), 6) for t, c in zip(TILE_TYPES, counts)},
            "informative_fraction": round(float(informative.mean()), 6)}


def _write_slide(cfg: SimConfig, world: World, out: Path, case: Case, j: int) -> dict:
    """Write (or, when resuming, reuse) one bag and its tile truth; return the slide's truth row."""
    sid = slide_id(case.index, j)
    bag, truth = out / "bags" / f"{sid}.h5", out / "truth" / "tiles" / f"{sid}.npy"
    if bag.exists() and truth.exists():  # both are written atomically, bag first
        with h5py.File(bag, "r") as f:
            grid = f["coords"][:] // cfg.patch_size_level0
            return _slide_summary(sid, case, np.load(truth), f["fragment"][:],
                                  focal_region(cfg, case.index, j, grid))
    s = simulate_slide(cfg, world, case, j)
    write_bag(bag, s.features, s.coords, patch_size_level0=cfg.patch_size_level0, encoder=cfg.encoder_name,
              fragment=s.fragment,
              coord_attrs={"patch_size": cfg.patch_size, "target_magnification": cfg.target_magnification,
                           "level0_magnification": cfg.level0_magnification, "level0_width": s.level0_size[0],
                           "level0_height": s.level0_size[1], "overlap": 0, "name": sid},
              feature_attrs={"simulated": True})
    _save_npy(truth, s.types)
    return _slide_summary(sid, case, s.types, s.fragment, s.informative)


def _model_json(cfg: SimConfig, world: World) -> dict:
    consts = {k: v.tolist() for k, v in globals().items() if k.isupper() and isinstance(v, np.ndarray)}
    return {"subtypes": SUBTYPES, "programmes": PROGRAMMES, "drivers": DRIVERS, "tile_types": TILE_TYPES,
            "patch_size_level0": cfg.patch_size_level0, "site_weights": world.site_weights.tolist(),
            "site_subtype_prevalence": world.site_subtype.tolist(), **consts}


def simulate_cohort(out: str | Path, cfg: SimConfig = SimConfig()) -> Path:
    """Write a complete cohort directory (contract: helpers/COMMON.md) plus its latent truth; return its path."""
    cfg.check()
    out = Path(out)
    _claim(out, cfg)
    world = make_world(cfg)
    genes, proteins = list(world.genes.index), list(world.proteins.index)
    cases, truth, slides, slide_truth, reports = [], [], [], [], []
    rna, rna_ids, prot, prot_ids = [], [], [], []
    for i in tqdm(range(cfg.n_cases), desc="simulate cases", unit="case", disable=cfg.n_cases < 50, leave=False):
        c = draw_case(cfg, world, i)
        rr = _rng(cfg, _REPORT, i)
        facts = report_facts(c, rr)
        for j in range(c.n_slides):
            slide_truth.append(_write_slide(cfg, world, out, c, j))
            slides.append({"slide_id": slide_id(i, j), "case_id": c.case_id, "path": f"bags/{slide_id(i, j)}.h5"})
        if c.has["rna"]:
            rna.append(rna_counts(cfg, world, c))
            rna_ids.append(c.case_id)
        if c.has["protein"]:
            prot.append(protein_values(cfg, world, c))
            prot_ids.append(c.case_id)
        if c.has["report"]:
            reports.append(json.dumps({"case_id": c.case_id, "text": report_text(c, facts, rr)}))
        site = f"site{c.site:02d}"
        muts = {f"mut_{d}": (int(m) if c.has["mutation"] else pd.NA) for d, m in zip(DRIVERS, c.mutations)}
        cases.append({"case_id": c.case_id, "site": site, "os_days": c.os_days, "os_event": c.os_event,
                      "subtype": SUBTYPES[c.subtype], "grade": c.grade, **muts})
        truth.append({"case_id": c.case_id, "site": site, "subtype": SUBTYPES[c.subtype], "grade": c.grade,
                      "grade_score": c.grade_score,
                      **{f"prog_{p}": v for p, v in zip(PROGRAMMES, c.programmes)},
                      **{f"true_mut_{d}": int(m) for d, m in zip(DRIVERS, c.mutations)},
                      "risk": c.risk, "event_days": c.event_days, "censor_days": c.censor_days,
                      "os_days": c.os_days, "os_event": c.os_event, "n_slides": c.n_slides,
                      **{f"has_{m}": c.has[m] for m in MODALITIES if m != "slide"},
                      "tumour_size_z": c.size_z, "focal": is_focal(cfg, i),
                      **{f"p_missing_{m}": missing_probability(cfg, m, c.size_z) for m in MNAR_MODALITIES},
                      **{f"report_{k}": facts[k] for k in ("necrosis", "lvi", "til", "reported_grade")}})

    case_df = pd.DataFrame(cases)
    for d in DRIVERS:
        case_df[f"mut_{d}"] = case_df[f"mut_{d}"].astype("Int64")
    write_csv(out / "cases.csv", case_df, index=False)
    write_csv(out / "slides.csv", pd.DataFrame(slides, columns=["slide_id", "case_id", "path"]), index=False)
    if rna:
        _write_h5ad(out / "rna.h5ad", rna, rna_ids, genes)
    if prot:
        _write_h5ad(out / "protein.h5ad", prot, prot_ids, proteins)
    if reports:
        write_text(out / "reports.jsonl", "\n".join(reports) + "\n")
    write_csv(out / "truth" / "cases.csv", pd.DataFrame(truth), index=False, float_format="%.6g")
    write_csv(out / "truth" / "slides.csv", pd.DataFrame(slide_truth), index=False)
    write_csv(out / "truth" / "genes.csv", world.genes, float_format="%.6g")
    write_csv(out / "truth" / "proteins.csv", world.proteins, float_format="%.6g")
    write_json(out / "truth" / "model.json", _model_json(cfg, world))
    write_text(out / "truth" / "README.md", TRUTH_README)
    spec = {"name": cfg.name, "version": "1.0",
            "description": f"Simulated slide–omics cohort (mmfm.data.simulate, seed {cfg.seed}, "
                           f"{cfg.n_cases} cases); not real patients. Latent truth in truth/.",
            "tile_encoder": {"name": cfg.encoder_name, "feature_dim": cfg.feature_dim},
            "target_magnification": float(cfg.target_magnification), "patch_size": int(cfg.patch_size)}
    write_text(out / "cohort.yaml", yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))  # last: marks done
    return out


# ----------------------------------------------------------------------------------------------- CLI
