"""A supervised MIL predictor: any slide encoder, late fusion of a case's slides, dropout and a linear head.

Rows of a batch are slides; `case_of_row` says which case slot each row belongs to (`packed`: rows are cases, their
slides' tiles back to back, for encoders that pool chunk by chunk). A case's embedding is the mean of its slides'
encoder embeddings — the late fusion `mmfm embed` uses for the linear probes — so a multi-slide case is treated by
the MIL rows as by the linear rows. `clam_abmil` is the from-scratch baseline at CLAM's sizes:
Linear(D → 512) + ReLU + dropout 0.25, one gated attention branch of 256, dropout 0.25 (CLAM `Attn_Net_Gated`,
models/model_clam.py; Lu et al. 2021), classifier Linear(512 → K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm.models.abmil import ABMIL, ABMILConfig
from mmfm.models.axes import EMBED, JOINT
from mmfm.models.layers import Dense, Dropout


def clam_abmil(feature_dim: int, *, hidden: int = 512, attn_dim: int = 256, dropout: float = 0.25,
               rngs: nnx.Rngs) -> ABMIL:
    """Gated ABMIL at CLAM's default ('small') sizes, from scratch."""
    cfg = ABMILConfig(hidden=hidden, n_heads=1, attn_dim=attn_dim, n_pre_layers=1, act="relu", dropout=dropout,
                      attn_dropout=dropout, merge="concat", pre_norm=False)
    return ABMIL(cfg, feature_dim, rngs=rngs)


def clam_mil(feature_dim: int, n_out: int, *, hidden: int = 512, attn_dim: int = 256, dropout: float = 0.25,
             seed: int = 0) -> MILModel:
    """`MILModel(clam_abmil(..., rngs=nnx.Rngs(seed)), n_out, dropout=dropout, rngs=nnx.Rngs(seed + 1))`, its
    parameters drawn by one compiled call that every fold and seed of these sizes shares (built eagerly, each
    initialiser op compiles on its own: ~20 small compilations per process)."""
    graphdef, init = _clam_init(feature_dim, n_out, hidden, attn_dim, dropout)
    return nnx.merge(graphdef, init(seed))


@functools.cache
def _clam_init(feature_dim: int, n_out: int, hidden: int, attn_dim: int, dropout: float):
    def build(seed):  # nnx.Rngs(seed) draws jax.random.key(seed): a traced seed passes that key
        return MILModel(clam_abmil(feature_dim, hidden=hidden, attn_dim=attn_dim, dropout=dropout,
                                   rngs=nnx.Rngs(jax.random.key(seed))),
                        n_out, dropout=dropout, rngs=nnx.Rngs(jax.random.key(seed + 1)))

    return nnx.split(nnx.eval_shape(lambda: build(0)))[0], jax.jit(lambda seed: nnx.state(build(seed)))


class MILModel(nnx.Module):
    """encoder → per-case mean over its slides → dropout → Linear(out_dim → n_out)."""

    def __init__(self, encoder: nnx.Module, n_out: int, *, dropout: float = 0.0, rngs: nnx.Rngs):
        self.encoder = encoder
        self.drop = Dropout(dropout, rngs=rngs)
        self.head = Dense(encoder.out_dim, n_out, (EMBED, JOINT), rngs=rngs)

    def embed(self, features, coords, mask, fragment=None, *, deterministic: bool = True) -> jax.Array:
        """[R, out_dim] fp32 slide embeddings of the rows (every tile of a row that its mask keeps)."""
        return self.encoder(features, coords, mask, fragment, deterministic=deterministic).embedding.astype(
            jnp.float32)

    def chunk_sizes(self, chunks: tuple[int, ...]) -> tuple[int, ...]:
        """`chunks` if the encoder can pool slides packed in a row chunk by chunk (`embed_chunked`: gated ABMIL),
        else ()."""
        return chunks if hasattr(self.encoder, "embed_chunked") else ()

    def embed_packed(self, features, mask, slide, n_slides: int, chunks: tuple[int, ...], *, index=None,
                     deterministic: bool = True) -> jax.Array:
        """[C, out_dim] fp32 embeddings of C cases, each a row holding its slides' tiles back to back (`slide`: which
        of its ≤ n_slides slides a tile is of): the mean of the embeddings of the slides with a tile (late fusion, as
        `__call__`), pooled chunk by chunk (sizes `chunks`) by the encoder's `embed_chunked` (`index`: `features` is
        a table of tiles, `index` [C, N] their rows)."""
        emb = self.encoder.embed_chunked(features, mask, slide, n_slides, chunks, index=index,
                                         deterministic=deterministic)
        present = ((slide[..., None] == jnp.arange(n_slides)) & mask[..., None]).any(1).astype(jnp.float32)
        return (jnp.einsum("csd,cs->cd", emb.astype(jnp.float32), present)
                / jnp.maximum(present.sum(1, keepdims=True), 1.0))

    def predict(self, case_emb: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """[C, n_out] fp32 outputs from case embeddings."""
        return self.head(self.drop(case_emb, deterministic=deterministic)).astype(jnp.float32)

    def __call__(self, features, coords, mask, fragment, case_of_row, row_valid, *, deterministic: bool = True,
                 frozen: bool = False) -> jax.Array:
        """[R, n_out] outputs per case slot (slot c = mean of the valid rows with case_of_row == c). `frozen`: the
        encoder runs deterministic and passes no gradient (only the head trains)."""
        emb = self.embed(features, coords, mask, fragment, deterministic=deterministic or frozen)
        r = emb.shape[0]
        member = ((case_of_row[None, :] == jnp.arange(r)[:, None]) & row_valid[None, :]).astype(jnp.float32)
        return self._head(member @ emb / jnp.maximum(member.sum(1, keepdims=True), 1.0), frozen, deterministic)

    def packed(self, features, mask, slide, n_slides: int, chunks: tuple[int, ...], *, index=None,
               deterministic: bool = True, frozen: bool = False) -> jax.Array:
        """[C, n_out] outputs of C cases packed one per row (`embed_packed`); `frozen` as `__call__`."""
        emb = self.embed_packed(features, mask, slide, n_slides, chunks, index=index,
                                deterministic=deterministic or frozen)
        return self._head(emb, frozen, deterministic)

    def _head(self, case_emb: jax.Array, frozen: bool, deterministic: bool) -> jax.Array:
        return self.predict(jax.lax.stop_gradient(case_emb) if frozen else case_emb, deterministic=deterministic)
