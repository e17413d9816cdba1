"""The draws of a simulated cohort: its World (sites, feature geometry, gene and protein tables; once per seed),
then each Case from its own stream (latent state → survival → which modalities it has)."""

from __future__ import annotations

import numpy as np

from mmfm import MODALITIES
from mmfm.simulate.harder import feature_mlp
from mmfm.simulate.latent import (DRIVER_EFFECTS, DRIVER_PREVALENCE, DRIVERS, GRADE_CUTS, GRADE_NOISE_SD,
                                  GRADE_WEIGHTS, HAZARD_PROGRAMMES, HAZARD_SUBTYPE, HAZARD_TP53, PROGRAMME_CHOL,
                                  PROGRAMME_SD, PROGRAMMES, SUBTYPE_MEANS, SUBTYPE_PREVALENCE, SUBTYPES, TILE_TYPES,
                                  Case, World, case_id)
from mmfm.simulate.molecular import gene_model, protein_model
from mmfm.simulate.observation import missing_probability, survival_days, tumour_size_z
from mmfm.simulate.sim_config import CASE, W_FEATURES, W_GENES, W_PROTEINS, W_SITES, WORLD, SimConfig, rng
from mmfm.simulate.tile_features import (SITE_GAIN_SD, SITE_STAIN_FEATURE_SD, SITE_STAIN_LATENT_SD,
                                         SUBTYPE_TUMOUR_SHIFT, TYPE_APPEARANCE)


def _unit_rows(r: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = r.standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_world(cfg: SimConfig) -> World:
    """Cohort-level parameters; each block has its own stream so e.g. n_genes never moves the features."""
    s, L, D, K = cfg.n_sites, cfg.latent_dim, cfg.feature_dim, len(PROGRAMMES)
    r = rng(cfg, WORLD, W_SITES)
    site_weights = r.dirichlet(np.full(s, 3.0))
    site_subtype = np.stack([r.dirichlet(cfg.site_confounding * SUBTYPE_PREVALENCE * len(SUBTYPES))
                             for _ in range(s)])
    e = cfg.site_effect
    site_stain_latent = e * SITE_STAIN_LATENT_SD * r.standard_normal((s, L))
    site_stain_feature = e * SITE_STAIN_FEATURE_SD * r.standard_normal((s, D))
    site_gain = 1.0 + e * SITE_GAIN_SD * r.standard_normal(s)

    r = rng(cfg, WORLD, W_FEATURES)
    prototypes = r.standard_normal((len(TILE_TYPES), L))
    appearance = TYPE_APPEARANCE[:, :, None] * _unit_rows(r, len(TILE_TYPES) * K, L).reshape(-1, K, L)
    subtype_tumour = SUBTYPE_TUMOUR_SHIFT * _unit_rows(r, len(SUBTYPES), L)
    projection = r.standard_normal((L, D)) / np.sqrt(L)


    genes, gene_site = gene_model(cfg, rng(cfg, WORLD, W_GENES))
    proteins, protein_site = protein_model(cfg, rng(cfg, WORLD, W_PROTEINS))
    return World(site_weights, site_subtype, site_stain_latent, site_stain_feature, site_gain, prototypes,
                 appearance, subtype_tumour, projection, genes, gene_site, proteins, protein_site, feature_mlp(cfg))


def draw_case(cfg: SimConfig, world: World, i: int) -> Case:
    """Case i from its own stream: a fixed number of draws in a fixed order, whatever the knobs."""
    r = rng(cfg, CASE, i)
    site = int(r.choice(cfg.n_sites, p=world.site_weights))
    subtype = int(r.choice(len(SUBTYPES), p=world.site_subtype[site]))
    muts = r.random(len(DRIVERS)) < DRIVER_PREVALENCE[:, subtype]
    noise = PROGRAMME_SD * (PROGRAMME_CHOL @ r.standard_normal(len(PROGRAMMES)))
    prog = SUBTYPE_MEANS[subtype] + muts.astype(float) @ DRIVER_EFFECTS + noise
    grade_score = float(GRADE_WEIGHTS @ prog + GRADE_NOISE_SD * r.standard_normal())
    grade = 1 + int(grade_score > GRADE_CUTS[0]) + int(grade_score > GRADE_CUTS[1])
    risk = float(HAZARD_PROGRAMMES @ prog + HAZARD_SUBTYPE[subtype] + HAZARD_TP53 * muts[DRIVERS.index("TP53")])
    event, censor = survival_days(cfg, risk, r)
    u = r.random(len(MODALITIES) + 2)  # presence draws, one per modality + slide-count draws
    size_z = tumour_size_z(cfg, i, risk)
    has = {m: bool(u[k_] >= missing_probability(cfg, m, size_z)) for k_, m in enumerate(MODALITIES)}
    n_slides = 0
    if has["slide"]:
        multi = u[-2] < cfg.multi_slide_rate and cfg.max_slides_per_case > 1
        n_slides = 2 + int(u[-1] * (cfg.max_slides_per_case - 1)) if multi else 1
    return Case(i, case_id(i), site, subtype, prog, muts, grade_score, grade, risk, event, censor, n_slides, has,
                size_z)

