"""Slide encoders: blockwise attention = naive attention (forward and grad), 2D RoPE is relative,
padding never changes an embedding, ABMIL matches a NumPy reference."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mmfm.models.abmil import ABMIL, ABMILConfig
from mmfm.models.attention import DistanceBias, alibi_slopes, attention
from mmfm.models.rope import apply_rope, rope_angles
from mmfm.models.transformer import TransformerConfig, TransformerSlideEncoder


def naive_attention(q, k, v, valid, seg, bias=0.0):
    """NumPy reference: dense softmax over allowed keys (+ an additive [B, H, N, N] bias), zero rows where nothing
    is allowed."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
    ok = (np.asarray(valid)[:, None, :] & (np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :]))[:, None]
    s = np.where(ok, s, -np.inf)
    mx = np.max(s, -1, keepdims=True)
    e = np.where(ok, np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0)
    p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _qkv(seed, b=2, n=37, h=3, d=8, sorted_segments=False):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(3))
    valid = rng.random((b, n)) < 0.75
    seg = rng.integers(0, 3, (b, n)).astype(np.int32)
    if sorted_segments:
        seg = np.sort(seg, axis=1)
    return q, k, v, valid, seg


@pytest.mark.parametrize("impl,bq,bk,sorted_segments", [
    ("blockwise", 8, 16, False), ("blockwise", 16, 5, True), ("blockwise", 64, 64, False), ("xla", 0, 0, False)])
def test_attention_matches_naive_forward_and_grad(impl, bq, bk, sorted_segments):
    q, k, v, valid, seg = _qkv(0, sorted_segments=sorted_segments)
    out = jax.jit(lambda q, k, v: attention(q, k, v, valid, seg, seg, impl=impl, block_q=bq or 512,
                                            block_k=bk or 512))(q, k, v)
    np.testing.assert_allclose(out, naive_attention(q, k, v, valid, seg), atol=2e-6)

    w = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    def dense(q, k, v):  # same maths as naive_attention, in JAX for autodiff
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        ok = (valid[:, None, :] & (seg[:, :, None] == seg[:, None, :]))[:, None]
        p = jnp.where(ok, jax.nn.softmax(jnp.where(ok, s, -1e30), -1), 0)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    got = jax.jit(jax.grad(loss(lambda q, k, v: attention(q, k, v, valid, seg, seg, impl=impl, block_q=bq or 512,
                                                            block_k=bk or 512)), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=2e-5)


def test_alibi_bias_in_every_kernel_matches_numpy():
    """2D ALiBi −slope_h·‖p_i − p_j‖₂ between positioned tokens (0 where either has none): blockwise (bias built per
    block, blocks that do not divide N) = dense = NumPy; ALiBi's slopes. The bias is a constant added to the logits
    inside the autodiffed kernel (no custom gradient), so its backward pass is JAX's autodiff of this forward."""
    np.testing.assert_allclose(alibi_slopes(4), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8], rtol=1e-12)
    np.testing.assert_allclose(alibi_slopes(12), [2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 8, .5, 1.5, 2.5, 3.5)],
                               rtol=1e-12)
    q, k, v, valid, seg = _qkv(5, h=4)
    rng = np.random.default_rng(6)
    pos = rng.integers(0, 20, (2, 37, 2)).astype(np.float32)
    on = rng.random((2, 37)) < 0.85
    slopes = np.asarray(alibi_slopes(4), np.float32)
    dist = np.sqrt(((pos[:, :, None] - pos[:, None]) ** 2).sum(-1)) * (on[:, :, None] & on[:, None])
    want = naive_attention(q, k, v, valid, seg, -slopes[None, :, None, None] * dist[:, None])
    bias = DistanceBias(slopes, pos, on)
    np.testing.assert_allclose(attention(q, k, v, valid, seg, seg, block_q=8, block_k=16, bias=bias), want, atol=2e-6)
    np.testing.assert_allclose(attention(q, k, v, valid, seg, seg, impl="xla", bias=bias), want, atol=2e-6)


def test_attention_query_without_allowed_key_is_zero():
    q, k, v, valid, seg = _qkv(2, b=1, n=10)
    seg[0, 0] = 2
    valid[:] = True
    valid[0, seg[0] == 2] = False  # segment 2 has no valid key left
    out = np.asarray(attention(q, k, v, valid, seg, seg, block_q=4, block_k=4))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, seg[0] == 2], 0.0)


def test_blockwise_attention_memory_is_linear_in_n():
    """The compiler's own buffer plan: 4× the tiles costs ≤ ~4× temp memory, while dense attention holds
    B·H·N² logits. Compile only — nothing runs."""
    def temp(n, impl):
        s = jax.ShapeDtypeStruct
        q = s((1, n, 4, 16), jnp.float32)
        f = jax.jit(lambda q, k, v, m, g: attention(q, k, v, m, g, g, impl=impl, block_q=128, block_k=128))
        return f.lower(q, q, q, s((1, n), bool), s((1, n), jnp.int32)).compile().memory_analysis().temp_size_in_bytes

    small, big = temp(1024, "blockwise"), temp(4096, "blockwise")
    assert big <= 4.5 * small, (small, big)
    assert big < 4 * 4096 * 4096 * 4 / 10  # far below one head's dense logits
    assert temp(4096, "xla") >= 4 * 4096 * 4096 * 4  # dense: every head's N×N logits exist


def test_rope_matches_complex_rotation_reference():
    rng = np.random.default_rng(0)
    d, base = 8, 100.0
    x = rng.standard_normal((1, 5, 2, d)).astype(np.float32)
    coords = rng.integers(0, 50, (1, 5, 2)).astype(np.int32)
    got = np.asarray(apply_rope(x, *rope_angles(coords, d, base)))
    z = x[..., : d // 2] + 1j * x[..., d // 2:]
    freqs = base ** (-np.arange(d // 4) / (d // 4))
    theta = np.concatenate([coords[..., :1] * freqs, coords[..., 1:] * freqs], -1)[:, :, None, :]
    want = z * np.exp(1j * theta)
    np.testing.assert_allclose(got, np.concatenate([want.real, want.imag], -1), atol=1e-5)


def test_rope_attention_is_invariant_to_a_global_shift():
    q, k, v, valid, seg = _qkv(3, n=20, d=16)
    coords = np.random.default_rng(4).integers(0, 40, (2, 20, 2)).astype(np.int32)

    def attend(c):
        cs = rope_angles(c, 16)
        return attention(apply_rope(q, *cs), apply_rope(k, *cs), v, valid, seg, seg, block_q=8, block_k=8)

    shifted = attend(coords + np.array([37, 11], np.int32))
    np.testing.assert_allclose(attend(coords), shifted, atol=2e-5)
    assert not np.allclose(attend(coords), attend(coords[:, ::-1]), atol=1e-3)  # positions do matter


def _bag(seed, n=24, d=12, side=6):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((1, n, d)).astype(np.float32)
    coords = rng.integers(0, side, (1, n, 2)).astype(np.int32) + 100
    frag = rng.integers(0, 3, (1, n)).astype(np.int32)
    return feats, coords, np.ones((1, n), bool), frag


def _pad(bag, n_pad, seed):
    """Insert n_pad masked garbage tiles at random positions (not only at the end)."""
    feats, coords, mask, frag = bag
    rng = np.random.default_rng(seed)
    n = feats.shape[1] + n_pad
    real_pos = np.sort(rng.choice(n, feats.shape[1], replace=False))
    out_f = rng.standard_normal((1, n, feats.shape[2])).astype(np.float32) * 50
    out_c = rng.integers(0, 1000, (1, n, 2)).astype(np.int32)
    out_fr = rng.integers(0, 3, (1, n)).astype(np.int32)
    out_m = np.zeros((1, n), bool)
    out_f[0, real_pos], out_c[0, real_pos], out_fr[0, real_pos], out_m[0, real_pos] = feats[0], coords[0], frag[0], True
    return out_f, out_c, out_m, out_fr, real_pos


TINY = dict(width=16, depth=2, n_heads=2, mlp_ratio=2.0, n_registers=3, readout_heads=2, block_q=8, block_k=8,
            mlp_chunk=16)  # N > 16 below: the token-chunked MLP path is what runs
@nnx.jit
@nnx.jit  # one compile per encoder and shape, not one per eager op
def fwd(enc, feats, coords, mask, frag=None):
    return enc(feats, coords, mask, frag)


ENCODERS = {
    "abmil": lambda: ABMIL(ABMILConfig(hidden=16, attn_dim=8, n_heads=2), 12, rngs=nnx.Rngs(0)),
    "transformer_mean_concat": lambda: TransformerSlideEncoder(TransformerConfig(**TINY), 12, rngs=nnx.Rngs(0)),
    "transformer_attention": lambda: TransformerSlideEncoder(
        TransformerConfig(**TINY, readout="attention", fragment_local=False), 12, rngs=nnx.Rngs(0)),
    "transformer_rope_only": lambda: TransformerSlideEncoder(
        TransformerConfig(**{**TINY, "n_registers": 0}, layer_pattern="rope"), 12, rngs=nnx.Rngs(0)),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_padding_invariance(name):
    enc = ENCODERS[name]()
    bag = _bag(0)
    ref = fwd(enc, *bag)
    f, c, m, fr, pos = _pad(bag, 29, seed=1)
    out = fwd(enc, f, c, m, fr)
    np.testing.assert_allclose(out.embedding, ref.embedding, atol=1e-5)
    assert out.embedding.dtype == jnp.float32
    if ref.attention is not None:
        np.testing.assert_allclose(out.attention[..., pos], ref.attention, atol=1e-6)
        np.testing.assert_array_equal(np.delete(np.asarray(out.attention), pos, axis=-1), 0.0)
        np.testing.assert_allclose(np.asarray(out.attention).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.tokens[:, pos], ref.tokens, atol=1e-5)


@pytest.mark.parametrize("name", ["transformer_mean_concat", "transformer_rope_only"])
def test_transformer_is_translation_invariant(name):
    enc = ENCODERS[name]()
    feats, coords, mask, frag = _bag(5)
    a = fwd(enc, feats, coords, mask, frag).embedding
    b = fwd(enc, feats, coords + np.array([[[250, 17]]], np.int32), mask, frag).embedding
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_fragment_local_layers_isolate_fragments():
    """With only fragment-local RoPE layers, a tile's token depends on its own fragment only."""
    enc = TransformerSlideEncoder(TransformerConfig(**{**TINY, "n_registers": 0}, layer_pattern="rope"), 12,
                                  rngs=nnx.Rngs(0))
    feats, coords, mask, frag = _bag(6)
    tokens = fwd(enc, feats, coords, mask, frag).tokens
    other = feats.copy()
    other[0, frag[0] != 0] += 3.0
    tokens2 = fwd(enc, other, coords, mask, frag).tokens
    np.testing.assert_allclose(tokens2[0, frag[0] == 0], tokens[0, frag[0] == 0], atol=1e-5)
    assert not np.allclose(tokens2[0, frag[0] == 1], tokens[0, frag[0] == 1], atol=1e-3)


def test_blockwise_and_dense_transformer_agree_in_value_and_gradient():
    cfg = TransformerConfig(**TINY, readout="attention")
    feats, coords, mask, frag = _bag(7, n=20)
    mask[0, 15:] = False

    def value_and_grads(impl):
        enc = TransformerSlideEncoder(cfg.__class__(**{**cfg.__dict__, "attn_impl": impl}), 12, rngs=nnx.Rngs(0))
        loss = lambda e: jnp.sum(e(feats, coords, mask, frag).embedding ** 2)
        return nnx.jit(nnx.value_and_grad(loss))(enc)

    (v1, g1), (v2, g2) = value_and_grads("blockwise"), value_and_grads("xla")
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g1))  # every parameter is used


def test_abmil_matches_numpy_reference():
    cfg = ABMILConfig(hidden=16, attn_dim=8, n_heads=2, act="relu")
    enc = ABMIL(cfg, 12, rngs=nnx.Rngs(3))
    feats, coords, mask, frag = _bag(8)
    mask[0, 20:] = False
    out = fwd(enc, feats, coords, mask)

    p = lambda x: np.asarray(x[...], np.float64)
    blk = enc.pre[0].linear
    h = np.maximum(feats[0] @ p(blk.kernel) + p(blk.bias), 0)
    pool = enc.pool
    a = np.tanh(h @ p(pool.tanh_branch.kernel) + p(pool.tanh_branch.bias))
    g = 1 / (1 + np.exp(-(h @ p(pool.gate_branch.kernel) + p(pool.gate_branch.bias))))
    logits = np.einsum("nha,ha->hn", (a * g).reshape(-1, 2, 8), p(pool.score))
    logits = np.where(mask[0], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(out.attention[0], w, atol=1e-6)
    np.testing.assert_allclose(out.embedding[0], (w @ h).reshape(-1), atol=1e-5)


@pytest.mark.parametrize("name", ["abmil", "transformer_attention"])
def test_empty_bag_is_finite(name):
    feats, coords, mask, frag = _bag(9)
    out = fwd(ENCODERS[name](), feats, coords, np.zeros_like(mask), frag)
    assert np.all(np.isfinite(out.embedding))


def test_bf16_compute_is_close_to_fp32():
    feats, coords, mask, frag = _bag(10)
    ref = fwd(ENCODERS["transformer_mean_concat"](), feats, coords, mask, frag).embedding
    enc = TransformerSlideEncoder(TransformerConfig(**TINY), 12, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = fwd(enc, feats, coords, mask, frag).embedding
    assert out.dtype == jnp.float32 and enc.proj.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.1)
    assert not np.array_equal(out, ref)


def test_bad_transformer_config_names_every_problem():
    with pytest.raises(ValueError, match="layer_pattern='x'.*readout='max'"):
        TransformerConfig(layer_pattern="x", readout="max").validate()
    with pytest.raises(ValueError, match="n_registers"):
        TransformerConfig(layer_pattern="rope", n_registers=2).validate()


def test_token_chunked_mlp_equals_whole_mlp():
    feats, coords, mask, frag = _bag(11, n=37)
    whole = TransformerSlideEncoder(TransformerConfig(**{**TINY, "mlp_chunk": 4096}), 12, rngs=nnx.Rngs(0))
    chunked = ENCODERS["transformer_mean_concat"]()
    np.testing.assert_allclose(fwd(chunked, feats, coords, mask, frag).embedding,
                               fwd(whole, feats, coords, mask, frag).embedding, atol=1e-6)


def test_training_loop_and_inference_scan_agree():
    """deterministic=False runs the layers as a Python loop (dropout streams advance), deterministic=True as
    a scan over stacked weights; with dropout 0 they are the same function."""
    enc = TransformerSlideEncoder(TransformerConfig(**TINY, dropout=0.0), 12, rngs=nnx.Rngs(0))
    feats, coords, mask, frag = _bag(12)
    train = nnx.jit(lambda e: e(feats, coords, mask, frag, deterministic=False).embedding)(enc)
    np.testing.assert_allclose(train, fwd(enc, feats, coords, mask, frag).embedding, atol=1e-5)
