"""The latent state of a simulated cohort: the generative story's vocabulary and biology, a cohort's World and a Case.

One generative story drives every modality (data card: data_cards/simulated_cohort.md), so a method that learns
the biology is rewarded and one that learns the medical centre is caught:

  site (medical centre) → subtype (site-dependent prevalence: confounding as in TCGA)
  subtype → driver mutations (subtype-dependent prevalence)
  subtype + mutations + case noise → biological programmes (proliferation, immune, hypoxia, stromal, differentiation)
  programmes → grade, true log-hazard (`risk`), and through the other modules of this package: survival and
               missingness (observation), tissue layout and tile features (+ a stain-like site shift), RNA counts
               and protein panel (molecular, + site batch effects), and the facts a pathology report states.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

SUBTYPES = ("differentiated", "immunoreactive", "mesenchymal", "proliferative")
PROGRAMMES = ("proliferation", "immune", "hypoxia", "stromal", "differentiation")
DRIVERS = ("TP53", "PIK3CA", "KRAS", "PTEN", "ARID1A", "BRCA1")
TILE_TYPES = ("tumour", "stroma", "immune", "necrosis", "normal", "adipose", "artefact")


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
# Grade from a noisy proliferation-minus-differentiation score.
GRADE_WEIGHTS = np.array([0.9, 0.0, 0.0, 0.0, -0.7])
GRADE_NOISE_SD, GRADE_CUTS = 0.5, (-0.6, 0.6)


def sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


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

