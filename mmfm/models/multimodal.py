"""MultimodalModel: one encoder + projection head per configured modality, fed by the batch contract.

`model(batch)` returns {modality: [B, embed_dim] fp32 unit vectors} for the configured modalities the
batch carries (`mmfm/data/batch.py`). Rows of absent modalities are still computed (fixed shapes, one
compile); the objective masks them with `<modality>/present`. Inference code uses the per-modality
entry points (`encode_slide` on whole bags of any N, `encode`) directly. With a case encoder
(`model.case.kind: transformer`, `mmfm/models/case.py`) the "slide" modality of a row is its case:
`encode_case` encodes each slide of the row's pooled tiles and aggregates them (`aggregate_slides`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm import MODALITIES
from mmfm.data.batch import BatchShapes, present_key
from mmfm.models.abmil import ABMIL
from mmfm.models.case import CaseEncoder
from mmfm.models.config import ModelConfig, SlideConfig
from mmfm.models.gigapath import GigaPathSlideEncoder
from mmfm.models.heads import ProjectionHead, l2_normalize
from mmfm.models.layers import compute_dtype
from mmfm.models.omics import build_omics_encoder
from mmfm.models.slide import SlideOutput
from mmfm.models.transformer import TransformerSlideEncoder

# modality -> (batch keys passed to its encoder, the BatchShapes field sizing it)
INPUTS = {
    "slide": (("features", "coords", "tile_mask", "fragment"), "feature_dim"),
    "rna": (("values", "gene_mask"), "n_genes"),
    "protein": (("values", "mask"), "n_proteins"),
    "mutation": (("values", "mask"), "n_mutations"),
    "report": (("input_ids", "attention_mask"), "report_len"),
}


def build_slide_encoder(cfg: SlideConfig, feature_dim: int, *, dtype, rngs: nnx.Rngs):
    if cfg.kind == "abmil":
        return ABMIL(cfg.abmil, feature_dim, dtype=dtype, rngs=rngs)
    if cfg.kind == "transformer":
        return TransformerSlideEncoder(cfg.transformer, feature_dim, dtype=dtype, rngs=rngs)
    if cfg.kind == "gigapath":
        return GigaPathSlideEncoder(cfg.gigapath, feature_dim, dtype=dtype, rngs=rngs)
    raise ValueError(f"model.slide.kind={cfg.kind!r}; choose abmil, transformer or gigapath")


def _build_report_encoder(cfg: ModelConfig, rngs: nnx.Rngs, pretrained: dict | None):
    """The text trunk with its weights from `pretrained`, read from files when None; random when `pretrained` lacks
    them: a restore target's abstract build, whose values come from the checkpoint (reading them cost ~1 s)."""
    from mmfm.models.text import TextEncoder, load_pretrained  # heavy: only when used

    text_cfg = dataclasses.replace(cfg.report, compute_dtype=cfg.compute_dtype)
    if pretrained is not None and "report" not in pretrained:
        return TextEncoder(text_cfg, rngs=rngs)
    return load_pretrained(text_cfg, rngs, None if pretrained is None else pretrained["report"])


def pretrained_weights(cfg: ModelConfig, modalities: Sequence[str]) -> dict[str, dict]:
    """{modality: its encoder's pretrained weights read from files} (the report text trunk), host arrays: a jitted
    constructor takes them as arguments (`MultimodalModel(..., pretrained=)`), so they are not compiled in as
    constants (the MiniLM trunk alone made an 83 MB program that compiled slowly)."""
    if "report" not in modalities:
        return {}
    from mmfm.models.text import pretrained_weights as text_weights

    return {"report": text_weights(cfg.report)}


class MultimodalModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, shapes: BatchShapes, modalities: Sequence[str], *, rngs: nnx.Rngs,
                 pretrained: dict[str, dict] | None = None):
        """`pretrained`: as `pretrained_weights` gives (arrays or a jit's arguments); by default read from files; an
        encoder it lacks keeps its random init (`{}`: a restore target, the checkpoint holds every value)."""
        errors = [f"data.modalities: unknown {m!r} (known: {MODALITIES})" for m in modalities if m not in INPUTS]
        errors += [f"data.modalities has {m!r} but the batch shapes give {INPUTS[m][1]}=0"
                   for m in modalities if m in INPUTS and not getattr(shapes, INPUTS[m][1])]
        if errors:
            raise ValueError("; ".join(errors))
        dtype = compute_dtype(cfg.compute_dtype)
        self.modalities = tuple(modalities)
        self.dtype = dtype
        encoders, heads, case_encoder = {}, {}, None
        for m in self.modalities:
            size = getattr(shapes, INPUTS[m][1])
            if m == "slide":
                enc = build_slide_encoder(cfg.slide, size, dtype=dtype, rngs=rngs)
            elif m == "report":
                enc = _build_report_encoder(cfg, rngs, pretrained)
            else:
                enc = build_omics_encoder(getattr(cfg, m), size, dtype=dtype, rngs=rngs)
            encoders[m] = enc
            out_dim = enc.dim if m == "report" else enc.out_dim
            if m == "slide" and cfg.case.kind == "transformer":
                case_encoder = CaseEncoder(cfg.case, out_dim, dtype=dtype, rngs=rngs)
                out_dim = case_encoder.out_dim
            heads[m] = ProjectionHead(out_dim, cfg.embed_dim, cfg.head_hidden, dropout=cfg.head_dropout, rngs=rngs)
        self.encoders = nnx.data(encoders)
        self.heads = nnx.data(heads)
        self.case_encoder = case_encoder
        self.max_slides = cfg.case.max_slides

    def __call__(self, batch: dict, *, deterministic: bool = True, with_norms: bool = False):
        """{modality: [B, E] unit vectors}; with `with_norms`, also {modality: [B] norms before normalising}
        (a diagnostic the objective logs: collapsing or exploding projections show there first)."""
        raw = {m: self.encode(m, batch, deterministic=deterministic, normalize=False)
               for m in self.modalities if present_key(m) in batch}
        emb = {m: l2_normalize(v) for m, v in raw.items()}
        if not with_norms:
            return emb
        return emb, {m: jnp.sqrt(jnp.sum(jax.lax.stop_gradient(v) ** 2, axis=-1)) for m, v in raw.items()}

    def encode(self, modality: str, batch: dict, *, deterministic: bool = True, normalize: bool = True) -> jax.Array:
        """[B, embed_dim] fp32 unit vectors (raw projections if not `normalize`) for one modality of a batch."""
        args = [batch.get(f"{modality}/{k}") for k in INPUTS[modality][0]]
        if modality == "slide" and self.case_encoder is not None:
            return self.encode_case(*args, batch.get("slide/slide_index"), deterministic=deterministic,
                                    normalize=normalize)
        if modality == "slide":
            return self.encode_slide(*args, deterministic=deterministic, normalize=normalize).embedding
        if modality == "report" and "report/features" in batch:  # the frozen trunk's cached output
            if jax.tree.leaves(nnx.state(self.encoders["report"], nnx.Param)):
                raise ValueError("the batch carries cached report/features but the text trunk has trainable "
                                 "layers: set model.report.trainable='frozen' or drop loader.report_cache")
            raw = jnp.asarray(batch["report/features"])
        else:
            raw = self.encoders[modality](*args, deterministic=deterministic)
        return self.heads[modality](raw.astype(self.dtype), deterministic=deterministic, normalize=normalize)

    def encode_slide(self, features, coords, mask, fragment=None, *, deterministic: bool = True,
                     project: bool = True, normalize: bool = True) -> SlideOutput:
        """Slide encoder on bags of any N; `project=False` keeps the encoder's own embedding (fp32).

        With a case encoder, a projected slide embedding is that of a case made of this slide alone."""
        out = self.encoders["slide"](features, coords, mask, fragment, deterministic=deterministic)
        emb = out.embedding.astype(jnp.float32)
        if project and self.case_encoder is not None:
            emb = self.aggregate_slides(emb[:, None], jnp.ones((emb.shape[0], 1), bool),
                                        deterministic=deterministic, normalize=normalize)
        elif project:
            emb = self.heads["slide"](emb.astype(self.dtype), deterministic=deterministic, normalize=normalize)
        return out._replace(embedding=emb)

    def encode_case(self, features, coords, mask, fragment=None, slide_index=None, *, deterministic: bool = True,
                    normalize: bool = True) -> jax.Array:
        """[B, embed_dim] case embeddings of rows whose tiles pool several slides (`slide_index` [B, K] says
        which, None = one slide): each of the first `max_slides` slides is encoded as its own masked bag,
        which equals encoding it alone (padding invariance), then the case encoder aggregates them."""
        b, k = mask.shape
        s = self.max_slides
        index = jnp.zeros((b, k), jnp.int32) if slide_index is None else slide_index
        masks = mask[:, None, :] & (index[:, None, :] == jnp.arange(s)[None, :, None])  # [B, S, K]

        def per_slide(x):  # row-major: (row, slide)
            return None if x is None else jnp.repeat(x, s, axis=0)

        out = self.encoders["slide"](per_slide(features), per_slide(coords), masks.reshape(b * s, k),
                                     per_slide(fragment), deterministic=deterministic)
        emb = out.embedding.astype(jnp.float32).reshape(b, s, -1)
        return self.aggregate_slides(emb, masks.any(-1), deterministic=deterministic, normalize=normalize)

    def aggregate_slides(self, slide_emb, slide_mask, *, deterministic: bool = True,
                         normalize: bool = True) -> jax.Array:
        """Slide-encoder embeddings [B, S, E] of a case's slides (+ presence [B, S]) → [B, embed_dim]: the case
        encoder, then the slide projection head. Only for models with a case encoder."""
        if self.case_encoder is None:
            raise ValueError("aggregate_slides: this model has no case encoder (model.case.kind is 'mean')")
        case = self.case_encoder(slide_emb, slide_mask, deterministic=deterministic)
        return self.heads["slide"](case.astype(self.dtype), deterministic=deterministic, normalize=normalize)

