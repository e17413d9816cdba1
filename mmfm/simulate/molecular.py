"""Molecular profiles of a simulated case: bulk RNA-seq counts (negative binomial) and an RPPA-like protein panel
(log-normal), both driven by the programmes and drivers, with per-site batch / antibody-lot effects. The gene and
protein tables (which feature loads on what) are drawn once per cohort, in its World."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mmfm.simulate.latent import DRIVERS, PROGRAMMES, SUBTYPES, Case, World
from mmfm.simulate.sim_config import PROTEIN, RNA, SimConfig, rng

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


def _round_robin(modules: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(name, module) interleaved across modules, so a truncated panel still covers every module."""
    out, lists, i = [], list(modules.items()), 0
    while any(i < len(v) for _, v in lists):
        out += [(v[i], m) for m, v in lists if i < len(v)]
        i += 1
    return out


def gene_model(cfg: SimConfig, r: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
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


def protein_model(cfg: SimConfig, r: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
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


def rna_log_mean(world: World, case: Case) -> np.ndarray:
    """Per-gene log expression of a case (programmes, subtype, drivers, site batch), before sequencing depth."""
    g = world.gene_arrays
    return (g["base"] + g["load"] @ case.programmes + g["sub"][:, case.subtype]
            + g["mut"] @ case.mutations.astype(float) + world.gene_site[case.site])


def nb_counts(r: np.random.Generator, log_mu: np.ndarray, library: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Gamma–Poisson (negative binomial) counts: relative expression exp(log_mu) scaled to each row's library."""
    p = np.exp(log_mu - log_mu.max(axis=-1, keepdims=True))
    mu = np.asarray(library)[..., None] * p / p.sum(axis=-1, keepdims=True)
    return r.poisson(r.gamma(1.0 / phi, phi * mu)).astype(np.float32)


def rna_counts(cfg: SimConfig, world: World, case: Case) -> np.ndarray:
    """Bulk RNA-seq counts: gamma–Poisson (negative binomial) around programme-driven means, varying depth."""
    r = rng(cfg, RNA, case.index)
    library = np.exp(np.log(LIBRARY_SIZE_MEDIAN) + LIBRARY_SIZE_SD * r.standard_normal())
    return nb_counts(r, rna_log_mean(world, case), library, world.gene_arrays["dispersion"])


def protein_values(cfg: SimConfig, world: World, case: Case) -> np.ndarray:
    """Raw antibody signal in integer scanner units (the contract's raw counts): log-normal around programme-
    and driver-driven means (median signal ~700), plus a per-site antibody-lot effect."""
    r = rng(cfg, PROTEIN, case.index)
    pr = world.protein_arrays
    log_v = (pr["base"] + pr["load"] @ case.programmes + pr["mut"] @ case.mutations.astype(float)
             + world.protein_site[case.site] + PROTEIN_NOISE_SD * r.standard_normal(len(pr["base"])))
    return np.round(np.exp(log_v)).astype(np.float32)

