"""MultimodalModel on the batch contract: one fp32 unit vector per modality, the same numbers with and
without a sharded mesh, bf16 compute close to fp32, whole-bag encoding at any N, config round trip."""

import json

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mmfm import config as mconfig
from mmfm.data.batch import BatchShapes, random_batch
from mmfm.models import DEFAULT_AXIS_RULES, ModelConfig, MultimodalModel, SlideConfig, text
from mmfm.models.abmil import ABMILConfig
from mmfm.models.omics import OmicsConfig
from mmfm.models.transformer import TransformerConfig

SHAPES = BatchShapes(batch_size=8, tiles_per_slide=16, feature_dim=12, n_genes=20, n_proteins=6, n_mutations=5)
MODS = ("slide", "rna", "protein", "mutation")


def tiny_config(kind="abmil", **kw):
    return ModelConfig(
        embed_dim=16,
        slide=SlideConfig(kind=kind, abmil=ABMILConfig(hidden=16, attn_dim=8),
                          transformer=TransformerConfig(width=16, depth=2, n_heads=2, n_registers=2, mlp_ratio=2.0,
                                                        block_q=8, block_k=8)),
        rna=OmicsConfig(kind="geneset", hidden=8, attn_dim=4, n_heads=2), protein=OmicsConfig(hidden=8),
        mutation=OmicsConfig(hidden=8, n_layers=1), **kw)


@nnx.jit
def embed(model, batch):
    return model(batch)


@pytest.mark.parametrize("kind", ["abmil", "transformer"])
def test_embeddings_per_modality(kind):
    model = MultimodalModel(tiny_config(kind), SHAPES, MODS, rngs=nnx.Rngs(0))
    batch = random_batch(SHAPES, missing_rate=0.3)
    out = embed(model, batch)
    assert sorted(out) == ["mutation", "protein", "rna", "slide"]
    for z in out.values():
        assert z.shape == (8, 16) and z.dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
    # only modalities the batch carries come back
    partial = {k: v for k, v in batch.items() if not k.startswith(("protein/", "mutation/"))}
    assert sorted(embed(model, partial)) == ["rna", "slide"]
    np.testing.assert_allclose(embed(model, partial)["slide"], out["slide"], atol=1e-6)


def test_every_parameter_gets_a_gradient():
    model = MultimodalModel(tiny_config("abmil", head_hidden=8), SHAPES, MODS, rngs=nnx.Rngs(1))  # transformer: test_slide_encoders
    batch = random_batch(SHAPES)

    @nnx.jit
    def grads(model):
        def loss(m):
            z = m(batch, deterministic=False)
            return sum(jnp.sum(z[a] * z["slide"]) for a in ("rna", "protein", "mutation"))
        return nnx.grad(loss)(model)

    flat = nnx.to_flat_state(grads(model))
    dead = [".".join(map(str, path)) for path, v in flat if not np.any(np.asarray(v[...]) != 0)]
    assert not dead, dead


def test_same_numbers_with_a_sharded_mesh():
    cfg = tiny_config("transformer")
    batch = random_batch(SHAPES, seed=3)
    ref = embed(MultimodalModel(cfg, SHAPES, MODS, rngs=nnx.Rngs(2)), batch)

    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_AXIS_RULES):
        model = MultimodalModel(cfg, SHAPES, MODS, rngs=nnx.Rngs(2))
        kernel = model.encoders["slide"].proj.kernel  # ("embed", "hidden") → P("fsdp", None)
        assert kernel[...].sharding.spec == P("fsdp", None)
        assert nnx.get_partition_spec(nnx.state(model)) is not None
        sharded = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
        out = embed(model, sharded)
    for m in ref:
        np.testing.assert_allclose(out[m], ref[m], atol=1e-5)


def test_bf16_compute_keeps_fp32_params_and_outputs():
    batch = random_batch(SHAPES, seed=4)
    ref = embed(MultimodalModel(tiny_config("transformer"), SHAPES, MODS, rngs=nnx.Rngs(5)), batch)
    model = MultimodalModel(tiny_config("transformer", compute_dtype="bfloat16"), SHAPES, MODS, rngs=nnx.Rngs(5))
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    out = embed(model, batch)
    for m in ref:
        assert out[m].dtype == jnp.float32
        cos = np.sum(np.asarray(out[m]) * np.asarray(ref[m]), -1)
        assert cos.min() > 0.98, (m, cos)


def test_encode_slide_on_whole_bags_of_any_size():
    model = MultimodalModel(tiny_config("transformer"), SHAPES, MODS, rngs=nnx.Rngs(6))
    rng = np.random.default_rng(6)
    n = 53  # not the training tiles_per_slide
    feats = rng.standard_normal((1, n, 12)).astype(np.float32)
    coords = rng.integers(0, 8, (1, n, 2)).astype(np.int32)
    mask, frag = np.ones((1, n), bool), np.zeros((1, n), np.int32)
    out, raw = nnx.jit(lambda m: (m.encode_slide(feats, coords, mask, frag),
                                  m.encode_slide(feats, coords, mask, frag, project=False)))(model)
    assert out.embedding.shape == (1, 16) and raw.embedding.shape == (1, 12 + 16) and out.tokens.shape == (1, n, 16)
    np.testing.assert_allclose(out.embedding, model.heads["slide"](raw.embedding), atol=1e-6)


def test_config_round_trip_and_clear_errors():
    cfg = tiny_config("transformer", head_hidden=32)
    assert mconfig.decode(ModelConfig, json.loads(json.dumps(mconfig.to_dict(cfg)))) == cfg
    bad = mconfig.to_dict(cfg)
    bad["slide"]["transformer"]["widht"] = 3
    with pytest.raises(ValueError, match=r"model: unknown config key\(s\) slide\.transformer\.widht"):
        mconfig.decode(ModelConfig, bad, "model")
    bad = mconfig.to_dict(cfg)
    bad["slide"]["kind"] = "perceiver"
    with pytest.raises(ValueError, match=r"slide\.kind: Cannot convert 'perceiver'"):
        mconfig.decode(ModelConfig, bad)
    with pytest.raises(ValueError, match="n_proteins=0"):
        MultimodalModel(cfg, BatchShapes(batch_size=2, tiles_per_slide=4, feature_dim=12, n_genes=20,
                                         n_mutations=5), MODS, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"data\.modalities: unknown 'dna'"):
        MultimodalModel(cfg, SHAPES, ("slide", "dna"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="slide.kind='perceiver'"):  # built in code, past the decoder
        MultimodalModel(ModelConfig(slide=SlideConfig(kind="perceiver")), SHAPES, ("slide", "rna"), rngs=nnx.Rngs(0))


def test_report_modality_uses_the_pretrained_text_encoder():
    shapes = BatchShapes(batch_size=2, report_len=12)
    model = MultimodalModel(ModelConfig(embed_dim=8), shapes, ("report",), rngs=nnx.Rngs(7))
    ids, mask = text.tokenize(["invasive ductal carcinoma, grade 3", "benign breast tissue"], 12)
    batch = {"report/input_ids": ids, "report/attention_mask": mask, "report/present": np.ones(2, bool),
             "case_index": np.arange(2, dtype=np.int32)}
    z = model(batch)["report"]
    assert z.shape == (2, 8) and z.dtype == jnp.float32
    pooled = model.encoders["report"](ids, mask)
    np.testing.assert_allclose(z, model.heads["report"](pooled), atol=1e-6)


def test_norms_before_normalisation_are_returned_for_diagnostics():
    model = MultimodalModel(tiny_config(), SHAPES, MODS, rngs=nnx.Rngs(3))
    batch = random_batch(SHAPES, seed=2)
    @nnx.jit  # one compile, not one per eager op
    def outputs(model, batch):
        emb, norms = model(batch, with_norms=True)
        return emb, norms, {m: model.encode(m, batch, normalize=False) for m in emb}

    emb, norms, raws = outputs(model, batch)
    for m in emb:
        raw = np.asarray(raws[m])
        np.testing.assert_allclose(np.asarray(norms[m]), np.linalg.norm(raw, axis=-1), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(emb[m]), raw / np.linalg.norm(raw, axis=-1, keepdims=True), atol=1e-5)
