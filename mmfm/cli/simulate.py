"""`mmfm simulate`: a synthetic cohort in the cohort contract, with its latent truth."""

from __future__ import annotations

from dataclasses import dataclass

from mmfm.config import narrow
from mmfm.simulate import SimConfig, simulate_cohort

DESCRIPTION = """\
Simulate a cohort directory (cases.csv, slides.csv, TRIDENT h5 bags, rna.h5ad, protein.h5ad, reports.jsonl)
with confounded sites, subtypes, driver mutations and survival; the latent truth goes to OUT/truth/. Same
config, same bytes; a re-run with the same config resumes. The data card data_cards/simulated_cohort.md says
where each default comes from.

example: mmfm simulate --out cohort --cases 300 --seed 0"""

ALIASES = {"cases": "n_cases"}


@dataclass(frozen=True)
class Config(SimConfig):
    out: str = ""                      # cohort directory to write (required)


def run(cfg: Config) -> int:
    if not cfg.out:
        raise ValueError("--out: required (the cohort directory to write)")
    sim = narrow(cfg, SimConfig)
    out = simulate_cohort(cfg.out, sim)
    n_slides = sum(1 for _ in (out / "bags").glob("*.h5")) if (out / "bags").exists() else 0
    print(f"wrote {out}: {sim.n_cases} cases, {n_slides} slides (truth in {out / 'truth'})")
    return 0
