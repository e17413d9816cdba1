"""Projection heads into the shared embedding space: Linear or 2-layer MLP, then L2 normalisation in fp32.

The contrastive objective compares unit vectors across modalities, so every head ends in fp32 and
normalises there even when the encoders compute in bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm.models.axes import EMBED, HIDDEN, JOINT
from mmfm.models.layers import Dense, Dropout


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / max(‖x‖, eps) in fp32; an all-zero row (empty bag) stays zero instead of NaN.

    The norm is sqrt(max(Σx², eps²)), not max(‖x‖, eps): the gradient of ‖x‖ at 0 is 0/0, and
    `maximum` would multiply that NaN by 0 — absent rows would poison every gradient.
    """
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class ProjectionHead(nnx.Module):
    def __init__(self, din: int, dout: int, hidden: int | None = None, *, dropout: float = 0.0,
                 rngs: nnx.Rngs):
        if hidden:
            self.fc1 = Dense(din, hidden, (EMBED, HIDDEN), rngs=rngs)
            self.fc2 = Dense(hidden, dout, (HIDDEN, JOINT), rngs=rngs)
        else:
            self.fc1, self.fc2 = Dense(din, dout, (EMBED, JOINT), rngs=rngs), None
        self.drop = Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool = True, normalize: bool = True) -> jax.Array:
        """Unit vectors in the shared space; `normalize=False` gives the raw projection (fp32)."""
        x = self.drop(x, deterministic=deterministic)
        y = self.fc1(x)
        if self.fc2 is not None:
            y = self.fc2(nnx.gelu(y))
        return l2_normalize(y) if normalize else y.astype(jnp.float32)
