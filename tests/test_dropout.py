"""The byte-mask dropout: the stated rate, unbiased, deterministic per key, identity at eval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfm.models.layers import Dropout


@pytest.mark.parametrize("rate,shape", [(0.1, (64, 512)), (0.25, (3, 1001))])  # word-aligned and ragged last axis
def test_rate_scale_and_determinism(rate, shape):
    drop = Dropout(rate, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones(shape, jnp.float32)
    y = np.asarray(drop(x, deterministic=False, rngs=jax.random.key(7)))
    again = np.asarray(drop(x, deterministic=False, rngs=jax.random.key(7)))
    np.testing.assert_array_equal(y, again)
    threshold = round(rate * 256)
    kept = y != 0
    assert abs((~kept).mean() - threshold / 256) < 4 * np.sqrt(rate * (1 - rate) / y.size)
    np.testing.assert_allclose(y[kept], 256 / (256 - threshold))  # exact keep fraction → unbiased
    assert abs(y.mean() - 1.0) < 0.02
    np.testing.assert_array_equal(np.asarray(drop(x, deterministic=True)), np.asarray(x))


def test_stream_advances_between_calls():
    drop = Dropout(0.5, rngs=nnx.Rngs(dropout=1))
    x = jnp.ones((256,))
    assert not np.array_equal(np.asarray(drop(x, deterministic=False)), np.asarray(drop(x, deterministic=False)))
