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

import importlib

_WHERE = {"HARDER": "harder", "focal_region": "harder", "DRIVERS": "latent", "PROGRAMMES": "latent",
          "SUBTYPES": "latent", "TILE_TYPES": "latent", "missing_probability": "observation",
          "SimConfig": "sim_config", "join_truth": "truth", "oracle_embedding": "truth", "read_truth": "truth",
          "simulate_cohort": "writer"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """The package's names, each imported from its module when first asked (PEP 562): `from mmfm.simulate.sim_config
    import SimConfig` (a pipeline's config) does not import the writer and what it writes with."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
