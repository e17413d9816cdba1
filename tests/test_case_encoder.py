"""Case encoder: a set function of the present slides (order-free, absent slots ignored), the pooled-row route
equals encoding every slide alone, mean fusion stays the default, and it trains in the multimodal objective."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfm.data.batch import BatchShapes, random_batch
from mmfm.models import ModelConfig, MultimodalModel
from mmfm.models.abmil import ABMILConfig
from mmfm.models.case import CaseConfig, CaseEncoder
from mmfm.models.config import SlideConfig

CASE = CaseConfig(kind="transformer", max_slides=3, width=16, depth=2, n_heads=2, mlp_ratio=2.0, dropout=0.0)
SHAPES = BatchShapes(batch_size=4, tiles_per_slide=24, feature_dim=12, n_genes=10)


def _model(case=CASE, seed=0):
    cfg = ModelConfig(embed_dim=8, case=case, slide=SlideConfig(abmil=ABMILConfig(hidden=16, attn_dim=8, n_heads=2)))
    return MultimodalModel(cfg, SHAPES, ("slide", "rna"), rngs=nnx.Rngs(seed))


def test_case_encoder_is_a_function_of_the_set_of_present_slides():
    module = CaseEncoder(CASE, 6, rngs=nnx.Rngs(0))
    enc = lambda x, m: nnx.jit(lambda e, x, m: e(x, m))(module, x, m)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    m = np.array([[True, True, False, True], [True, False, False, False]])
    out = np.asarray(enc(x, m))
    perm = np.array([3, 0, 2, 1])
    np.testing.assert_allclose(enc(x[:, perm], m[:, perm]), out, atol=1e-5)  # slide order is irrelevant
    garbage = np.where(m[..., None], x, 1e3 * rng.standard_normal(x.shape)).astype(np.float32)
    np.testing.assert_allclose(enc(garbage, m), out, atol=1e-5)            # absent slots never count
    np.testing.assert_allclose(enc(x[:1, [0, 1, 3]], m[:1, [0, 1, 3]]), out[:1], atol=1e-5)  # any slot count
    assert not np.allclose(enc(x, np.array([[True, True, False, False]] * 2)), out, atol=1e-3)
    assert np.isfinite(np.asarray(enc(x, np.zeros_like(m)))).all()       # a case without slides


def _pooled_batch(seed=0):
    """A loader-style pooled row: tiles of up to 3 slides mixed in one bag, with padding."""
    batch = random_batch(SHAPES, seed=seed)
    rng = np.random.default_rng(seed)
    batch["slide/slide_index"] = rng.integers(0, 3, batch["slide/tile_mask"].shape).astype(np.int32)
    batch["slide/slide_index"][1] = 0                  # a one-slide case
    batch["slide/slide_index"][2][batch["slide/slide_index"][2] == 1] = 2  # slide 1 absent
    return batch


def test_pooled_rows_equal_every_slide_encoded_alone():
    """Reference: each slide's own tiles, compacted into a fresh bag (padding at the end), through the slide
    encoder; then the case encoder over the slides that have tiles."""
    model = _model()
    batch = _pooled_batch()
    got = np.asarray(nnx.jit(lambda mdl, b: mdl.encode("slide", b))(model, batch))
    backbone = nnx.jit(lambda mdl, f, c, m, fr: mdl.encode_slide(f, c, m, fr, project=False).embedding)
    f, c, m, fr, idx = (batch[f"slide/{k}"] for k in ("features", "coords", "tile_mask", "fragment", "slide_index"))
    k = m.shape[1]
    bags = np.zeros((SHAPES.batch_size, 3, k), int)
    mask = np.zeros((SHAPES.batch_size, 3, k), bool)
    for r in range(SHAPES.batch_size):
        for s in range(3):
            own = np.flatnonzero(m[r] & (idx[r] == s))
            bags[r, s, :len(own)], mask[r, s, :len(own)] = own, True
    rows = np.arange(SHAPES.batch_size)[:, None, None]
    alone = np.asarray(backbone(model, *(x[rows, bags].reshape(-1, k, *x.shape[2:]) for x in (f, c)),
                                mask.reshape(-1, k), fr[rows, bags].reshape(-1, k)))
    want = model.aggregate_slides(alone.reshape(SHAPES.batch_size, 3, -1), mask.any(-1))
    assert mask.any(-1).sum(1).tolist() == [3, 1, 2, 3]  # 3 slides, one slide, one absent slide
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


def test_mean_fusion_is_the_default_and_unchanged():
    assert ModelConfig().case.kind == "mean"
    model = _model(CaseConfig())
    assert model.case_encoder is None
    batch = _pooled_batch()  # slide_index is ignored: one bag per row, as before
    args = [batch[f"slide/{k}"] for k in ("features", "coords", "tile_mask", "fragment")]
    np.testing.assert_array_equal(nnx.jit(lambda mdl, b: mdl.encode("slide", b))(model, batch),
                                  nnx.jit(lambda mdl, *a: mdl.encode_slide(*a).embedding)(model, *args))
    with pytest.raises(ValueError, match="no case encoder"):
        model.aggregate_slides(np.zeros((1, 1, 32), np.float32), np.ones((1, 1), bool))


def test_case_encoder_trains_in_the_multimodal_objective():
    from mmfm.objectives import LogitParams, ObjectiveConfig, multimodal_loss

    model = _model(dataclasses.replace(CASE, dropout=0.1))
    logit = LogitParams(ObjectiveConfig(), ("slide", "rna"), rngs=nnx.Rngs(0))
    batch = _pooled_batch(1)

    def loss(model):
        emb = model(batch, deterministic=False)
        return multimodal_loss(emb, {k: batch[f"{k}/present"] for k in emb}, batch["case_index"], logit,
                               ObjectiveConfig(), axis=None)[0]

    grads = nnx.jit(nnx.grad(loss))(model)
    case_grads = jax.tree.leaves(nnx.state(grads, nnx.Param)["case_encoder"])
    assert case_grads and all(float(jnp.abs(g).max()) > 0 for g in case_grads)


def test_bad_case_config_names_the_key():
    with pytest.raises(ValueError, match="case.kind='max'"):
        CaseConfig(kind="max")
    with pytest.raises(ValueError, match="n_heads"):
        CaseConfig(width=10, n_heads=4)


def test_run_config_case_encoder_needs_pooled_slides():
    from mmfm.train.config import ConfigError, load_config

    recipe = Path(__file__).resolve().parents[1] / "mmfm" / "configs" / "demo_case_encoder.yaml"
    cfg = load_config(recipe)
    assert cfg.model.case.kind == "transformer" and cfg.loader.multi_slide == "pool"
    with pytest.raises(ConfigError, match=r"demo_case_encoder\.yaml: model\.case\.kind=transformer needs "
                                          r"loader\.multi_slide=pool \(got 'sample'"):
        load_config(recipe, ["loader.multi_slide=sample"])
    with pytest.raises(ConfigError, match=r"data\.modalities needs 'slide'"):
        load_config(recipe, ["data.modalities=[rna, protein]"])
    assert load_config(recipe, ["loader.multi_slide=sample", "model.case.kind=mean"]).model.case.kind == "mean"
