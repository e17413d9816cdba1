"""The one output type every slide encoder returns.

`encoder(features [B,N,D], coords [B,N,2] int grid, mask [B,N] bool, fragment [B,N] int | None, *,
deterministic) -> SlideOutput`. `embedding` is fp32 [B, encoder.out_dim]; `tokens` are per-tile
embeddings [B, N, H]; `attention` is [B, heads, N] pooling weights (zero on padding) when the readout
has them. Padding tiles (mask False) never change the embedding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class SlideOutput(NamedTuple):
    embedding: jax.Array
    tokens: jax.Array | None
    attention: jax.Array | None
