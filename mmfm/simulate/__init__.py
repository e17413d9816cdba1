"""The simulator: a slide–omics cohort whose latent truth is known (data card: data_cards/simulated_cohort.md).

A producer of cohorts above the contract (mmfm.data): it writes what `mmfm.data.cohort` reads, plus `truth/`.
One module per mechanism, in the order of the generative story:
  sim_config     every knob (SimConfig) and the random streams
  latent         the story's vocabulary and biology; a cohort's World and a Case
  observation    survival follow-up and missingness (MCAR, or MNAR by tumour size)
  layout         tissue fragments on the tile grid, smooth random fields
  harder         the harder options: focal morphology, nonlinear tile features (HARDER: benchmarked values)
  tile_features  tile types → tile features
  molecular      RNA counts and the protein panel
  pathology      report facts and free text
  world          the draws: the World once per seed, then each Case
  writer         simulate_cohort: the cohort directory and truth/
  truth          reading truth/: the oracle embedding, truth columns joined into embeddings
"""

from mmfm.simulate.harder import HARDER, focal_region
from mmfm.simulate.latent import DRIVERS, PROGRAMMES, SUBTYPES, TILE_TYPES
from mmfm.simulate.observation import missing_probability
from mmfm.simulate.sim_config import SimConfig
from mmfm.simulate.truth import join_truth, oracle_embedding, read_truth
from mmfm.simulate.writer import simulate_cohort

__all__ = ["DRIVERS", "HARDER", "PROGRAMMES", "SUBTYPES", "TILE_TYPES", "SimConfig", "focal_region", "join_truth",
           "missing_probability", "oracle_embedding", "read_truth", "simulate_cohort"]
