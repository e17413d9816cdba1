"""Axial 2D rotary position embedding on tile grid indices.

Each head's d dimensions form d/2 rotation pairs (split-halves convention: dims i and i + d/2).
The first d/4 pairs rotate by the tile's grid column x, the last d/4 by its grid row y, with
frequencies base^(-j/(d/4)). A rotation by angle θ·p applied to q at p and k at p' makes q·k depend
only on p − p', so shifting every coordinate of a slide leaves attention unchanged — tiles are placed
by relative layout, not by where the tissue sits on the glass. Grid indices come from the batch
(level-0 coords // patch_size_level0), so the position scale is the same at 20× and 40×.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(coords: jax.Array, head_dim: int, base: float = 100.0) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, N, head_dim/2] for integer grid coords [B, N, 2] (col, row)."""
    if head_dim % 4:
        raise ValueError(f"axial 2D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = base ** (-jnp.arange(quarter, dtype=jnp.float32) / quarter)
    c = coords.astype(jnp.float32)
    angles = jnp.concatenate([c[..., :1] * freqs, c[..., 1:2] * freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, N, H, d] by angles [B, N, d/2] (broadcast over heads); fp32 math, x.dtype out."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).astype(x.dtype)
