"""What is observed of a case: survival follow-up (Weibull event time, censoring) and which modalities are missing.

Missingness is completely at random (one rate per modality) unless `mnar_strength` > 0: then RNA and protein
profiles go missing more often for small tumours (missing not at random), and tumour size correlates with risk.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import optimize

from mmfm.simulate.latent import (DRIVER_EFFECTS, DRIVER_PREVALENCE, DRIVERS, HAZARD_PROGRAMMES, HAZARD_SUBTYPE,
                                  HAZARD_TP53, PROGRAMME_CORR, PROGRAMME_SD, SUBTYPE_MEANS, SUBTYPE_PREVALENCE,
                                  sigmoid)
from mmfm.simulate.sim_config import SIZE, SimConfig, rng

LOSS_TO_FOLLOW_UP_MEAN_DAYS = 8 * 365.0
TUMOUR_SIZE_RISK_CORR = 0.4  # latent tumour size vs log-hazard: HR ≈ 1.46 per SD of size
MNAR_MODALITIES = ("rna", "protein")  # profiles that need fresh-frozen tissue: lost more often for small tumours


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


def survival_days(cfg: SimConfig, risk: float, r: np.random.Generator) -> tuple[float, float]:
    """(event, censoring) days: Weibull proportional hazards at log-hazard `risk`; censoring uniform up to
    max_follow_up_days or earlier by exponential loss to follow-up."""
    k = cfg.weibull_shape
    lam = np.log(2.0) / cfg.median_os_days ** k  # S(t) = exp(-lam t^k e^risk): median at risk 0
    event = float((-np.log(1.0 - r.random()) / (lam * np.exp(risk))) ** (1.0 / k))
    censor = float(min(r.uniform(30.0, cfg.max_follow_up_days), r.exponential(LOSS_TO_FOLLOW_UP_MEAN_DAYS)))
    return event, censor


def tumour_size_z(cfg: SimConfig, i: int, risk: float) -> float:
    """Latent tumour size of case i in SD units, correlated with its log-hazard (bigger tumours do worse).
    Its own stream, so it exists (in truth/) without moving any other draw."""
    rho = TUMOUR_SIZE_RISK_CORR
    eps = rng(cfg, SIZE, i).standard_normal()
    return float(rho * (risk - RISK_MEAN) / RISK_SD + np.sqrt(1.0 - rho ** 2) * eps)


def missing_probability(cfg: SimConfig, modality: str, size_z: float) -> float:
    """P(modality absent): the configured rate (MCAR), or for RNA/protein with mnar_strength β > 0
    σ(a − β·size_z): small tumours leave no fresh-frozen tissue for sequencing or RPPA (MNAR). The intercept a
    keeps the cohort-wide rate at the configured one (size_z ~ N(0, 1)), so only *which* cases miss changes."""
    base = getattr(cfg, f"missing_{modality}")
    if modality not in MNAR_MODALITIES or cfg.mnar_strength == 0 or base in (0.0, 1.0):
        return base
    return sigmoid(_mnar_intercept(base, cfg.mnar_strength) - cfg.mnar_strength * size_z)


@functools.cache
def _mnar_intercept(rate: float, beta: float) -> float:
    """a with E[σ(a − β z)] = rate for z ~ N(0, 1) (Gauss–Hermite quadrature, 64 nodes)."""
    x, w = np.polynomial.hermite_e.hermegauss(64)
    w = w / w.sum()
    return float(optimize.brentq(lambda a: w @ (1.0 / (1.0 + np.exp(-(a - beta * x)))) - rate, -50.0, 50.0))

