"""Absent modalities (all-masked rows) give finite embeddings AND finite gradients for every encoder.

One NaN gradient from a case without RNA or without a slide would end a run at its first step,
so this is checked for both slide encoders and the omics encoders together.
"""

import numpy as np
import pytest
from flax import nnx

from mmfm.data.batch import BatchShapes, random_batch
from mmfm.models import ModelConfig, MultimodalModel, SlideConfig
from mmfm.models.abmil import ABMILConfig
from mmfm.models.transformer import TransformerConfig

SHAPES = BatchShapes(batch_size=4, tiles_per_slide=16, feature_dim=24, n_genes=20, n_proteins=6, n_mutations=3)
SLIDES = {
    "abmil": SlideConfig(kind="abmil", abmil=ABMILConfig(hidden=16, n_heads=2, attn_dim=8)),
    "transformer": SlideConfig(kind="transformer", transformer=TransformerConfig(
        width=16, depth=2, n_heads=2, n_registers=2, block_q=8, block_k=8)),
}


@pytest.mark.parametrize("kind", sorted(SLIDES))
def test_all_masked_rows_have_finite_gradients(kind):
    cfg = ModelConfig(slide=SLIDES[kind], embed_dim=8)
    model = MultimodalModel(cfg, SHAPES, ("slide", "rna", "protein", "mutation"), rngs=nnx.Rngs(0))
    b = random_batch(SHAPES, seed=1)
    b["slide/tile_mask"][0], b["slide/present"][0] = False, False
    b["rna/gene_mask"][1], b["rna/present"][1] = False, False
    b["protein/mask"][2], b["protein/present"][2] = False, False
    b["mutation/mask"][3], b["mutation/present"][3] = False, False

    out = nnx.jit(lambda m: m(b))(model)  # compiled, as a train step runs it: one compile, not one per eager op
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
    grads = nnx.jit(nnx.grad(lambda m: sum((v ** 2).sum() + v.sum() for v in m(b).values())))(model)
    bad = [p for p, g in nnx.to_flat_state(grads) if not np.isfinite(np.asarray(g)).all()]
    assert bad == []
