"""torch → JAX hand-off is zero-copy on CPU (same buffer), and JAX → torch back."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from mmfm.bridges.dlpack import jax_to_torch, shares_memory, torch_to_jax


def test_torch_to_jax_shares_memory():
    t = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)
    a = torch_to_jax(t)
    assert isinstance(a, jax.Array) and a.shape == (64, 8) and a.dtype == jnp.float32
    assert a.unsafe_buffer_pointer() == t.data_ptr() and shares_memory(a, t)
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    np.testing.assert_allclose(float(jnp.sum(a)), float(t.sum()))


def test_bf16_features_cross_without_copy():
    t = torch.randn(16, 32).to(torch.bfloat16)
    a = torch_to_jax(t)
    assert a.dtype == jnp.bfloat16 and shares_memory(a, t)
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), t.float().numpy())


def test_strided_view_is_made_contiguous():
    base = torch.randn(8, 10)
    view = base[:, 2:7]  # not compact: DLPack consumers reject it as is
    a = torch_to_jax(view)
    np.testing.assert_array_equal(np.asarray(a), view.numpy())


def test_jax_to_torch_shares_memory():
    a = jnp.arange(24, dtype=jnp.float32).reshape(4, 6) * 2
    t = jax_to_torch(a)
    assert t.data_ptr() == a.unsafe_buffer_pointer()
    np.testing.assert_array_equal(t.numpy(), np.asarray(a))
