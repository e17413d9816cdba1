"""Omics encoders and projection heads: absent ≠ zero, panels may differ, heads give fp32 unit vectors."""

import numpy as np
import jax.numpy as jnp
import pytest
from flax import nnx

from mmfm.models.heads import ProjectionHead, l2_normalize
from mmfm.models.omics import GeneSetEncoder, MaskedMLP, OmicsConfig, build_omics_encoder


def _omics(seed, b=4, g=10):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, g)).astype(np.float32), rng.random((b, g)) < 0.7


@pytest.mark.parametrize("kind", ["mlp", "geneset"])
def test_masked_values_are_ignored_but_absence_is_not_zero(kind):
    enc = build_omics_encoder(OmicsConfig(kind=kind, hidden=8, attn_dim=4, n_heads=2), 10, dtype=jnp.float32,
                              rngs=nnx.Rngs(0))
    values, mask = _omics(0)
    run = nnx.jit(lambda enc, v, m: enc(v, m))  # one compile, not one per eager op
    ref = run(enc, values, mask)
    scrambled = np.where(mask, values, 1e3)  # whatever sits under the mask must not matter
    np.testing.assert_allclose(run(enc, scrambled, mask), ref, atol=1e-6)
    # "not measured" is different from "measured as 0"
    zeros = np.zeros_like(values)
    assert not np.allclose(run(enc, zeros, np.zeros_like(mask)), run(enc, zeros, np.ones_like(mask)), atol=1e-4)


def test_masked_mlp_matches_numpy_reference():
    cfg = OmicsConfig(hidden=6, n_layers=2, act="relu", dropout=0.5)
    enc = MaskedMLP(cfg, 10, rngs=nnx.Rngs(1))
    values, mask = _omics(1)
    x = np.concatenate([np.where(mask, values, 0), mask], -1).astype(np.float64)
    for block in enc.blocks:
        x = x @ np.asarray(block.linear.kernel[...]) + np.asarray(block.linear.bias[...])
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
        x = np.maximum(x * np.asarray(block.norm.scale[...]) + np.asarray(block.norm.bias[...]), 0)
    np.testing.assert_allclose(enc(values, mask), x, atol=1e-5)  # deterministic=True: dropout off
    noisy = enc(values, mask, deterministic=False)
    assert not np.allclose(noisy, x, atol=1e-3)


def test_gene_set_encoder_handles_a_different_panel():
    """A cohort measuring a subset of genes, in another column order, encodes exactly like the full-width
    vocabulary with the other genes masked: panels need not match across cohorts."""
    enc = GeneSetEncoder(OmicsConfig(kind="geneset", hidden=8, attn_dim=4, n_heads=2), 10, rngs=nnx.Rngs(2))
    values, _ = _omics(2)
    panel = np.array([7, 2, 5, 0])  # this cohort's columns → vocabulary ids
    full_mask = np.zeros((4, 10), bool)
    full_mask[:, panel] = True
    ref = enc(values, full_mask)
    sub = enc(values[:, panel], np.ones((4, 4), bool), gene_ids=panel)
    np.testing.assert_allclose(sub, ref, atol=1e-5)
    assert enc.out_dim == ref.shape[-1] == 16


def test_gene_identity_matters():
    enc = GeneSetEncoder(OmicsConfig(kind="geneset", hidden=8, attn_dim=4, n_heads=2), 10, rngs=nnx.Rngs(3))
    values, mask = _omics(3)
    swapped = enc(values, mask, gene_ids=np.roll(np.arange(10), 1))
    assert not np.allclose(swapped, enc(values, mask), atol=1e-4)


@pytest.mark.parametrize("hidden", [None, 12])
def test_projection_head_gives_fp32_unit_vectors(hidden):
    head = ProjectionHead(7, 5, hidden, rngs=nnx.Rngs(4))
    x = np.random.default_rng(4).standard_normal((3, 7)).astype(np.float32)
    out = head(jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.float32 and out.shape == (3, 5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)
    if hidden is None:
        y = x @ np.asarray(head.fc1.kernel[...]) + np.asarray(head.fc1.bias[...])
        np.testing.assert_allclose(head(x), y / np.linalg.norm(y, axis=-1, keepdims=True), atol=1e-6)


def test_l2_normalize_keeps_zero_rows_finite():
    out = l2_normalize(jnp.zeros((2, 4)))
    np.testing.assert_array_equal(out, 0.0)


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="kind='transformer'"):
        build_omics_encoder(OmicsConfig(kind="transformer"), 4, dtype=jnp.float32, rngs=nnx.Rngs(0))
