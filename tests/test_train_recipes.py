"""Every recipe in configs/ loads, validates against the typed schema, and takes a real training step
(real model, objective and optimizer; widths shrunk with the same `--set` overrides a user would type)."""

from pathlib import Path

import jax
import numpy as np
import pytest

from mmfm.data.batch import BatchShapes, random_batch
from mmfm import MODALITIES
from mmfm.train import config, loop, optim, sharding, state
from mmfm.train.sharding import MeshConfig

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if p.stem != "base")
SHRINK = ["loader.batch_size=8", "loader.tiles_per_slide=16", "loader.n_genes=32", "loader.report_max_len=16",
          "model.embed_dim=16", "model.slide.abmil.hidden=16", "model.slide.abmil.attn_dim=8",
          "model.slide.transformer.width=32", "model.slide.transformer.depth=2", "model.slide.transformer.n_heads=2",
          "model.slide.transformer.block_q=8", "model.slide.transformer.block_k=8", "model.rna.hidden=16",
          "model.rna.attn_dim=8", "model.protein.hidden=16", "model.mutation.hidden=16"]
SIZES = {"slide": dict(tiles_per_slide=16, feature_dim=24), "rna": dict(n_genes=32), "protein": dict(n_proteins=8),
         "report": dict(report_len=16), "mutation": dict(n_mutations=6)}


def test_all_recipes_present():
    assert {p.stem for p in CONFIGS} >= {"demo", "tangle_like", "threads_like", "mstar_like", "exaone_like"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_validates_and_trains_one_step(path):
    cfg = config.load_config(path)
    assert cfg.data.cohort and cfg.train.steps > 0
    assert cfg.data.modalities and set(cfg.data.modalities) <= set(MODALITIES)  # one field: loader and model
    assert path.read_text().lstrip().startswith("#") and "Differs" in path.read_text()  # states what it mirrors
    cfg = config.load_config(path, SHRINK)
    mods = tuple(cfg.data.modalities)
    shapes = BatchShapes(batch_size=8, **{k: v for m in mods for k, v in SIZES[m].items()})
    mesh = sharding.make_mesh(MeshConfig(1, 1), jax.devices()[:1])
    ts = state.init_state(state.build_module(cfg, shapes, mods), optim.make_optimizer(cfg.train), mesh,
                         cfg.train.axis_rules, cfg.train.shard_min_size, state.pretrained_inputs(cfg, mods))
    step = loop.make_train_step(ts, loop.objective_loss(cfg, mesh), mesh, lr_schedule=optim.schedule(cfg.train),
                                grad_accum=cfg.train.grad_accum)
    batch = sharding.global_batch(random_batch(shapes, seed=0, n_cases=6), sharding.batch_sharding(mesh))
    params = lambda: [np.asarray(x) for x in jax.tree.leaves(ts.state) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
    before = params()
    ts.state, m = step(ts.state, batch)
    m = loop._host_metrics(m)
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    assert {f"loss/{a}-{b}" for a, b in ts_pairs(cfg, mods)} <= set(m)
    assert any(not np.array_equal(a, b) for a, b in zip(before, params()))


def ts_pairs(cfg, mods):
    from mmfm.objectives import resolve_pairs

    return resolve_pairs(cfg.objective.pairs, mods)


def test_unknown_and_mistyped_recipe_keys_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 10\n  lerning_rate: 0.1\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml: unknown config key\(s\) train\.lerning_rate"):
        config.load_config(bad)
    with pytest.raises(config.ConfigError, match=r"model\.slide\.abmil\.hidden: Couldn't parse 'wide' into an int"):
        config.load_config(CONFIGS[0], ["model.slide.abmil.hidden=wide"])
    with pytest.raises(config.ConfigError, match=r"unknown config key\(s\) trian \(not fields of RunConfig\)"):
        config.load_config(CONFIGS[0], ["trian.steps=3"])
    with pytest.raises(config.ConfigError, match=r"data\.modalities\.1: Cannot convert 'dna'"):
        config.load_config(CONFIGS[0], ["data.modalities=[slide, dna]"])
    with pytest.raises(config.ConfigError, match=r"data\.modalities: needs distinct entries"):
        config.load_config(CONFIGS[0], ["data.modalities=[slide, slide]"])
