"""Slide, omics and text encoders, projection heads, and the MultimodalModel that ties them together.

Parameters carry *logical* axis names (`nnx.with_partitioning`), mapped to mesh axes by one rules table
in the trainer (`nnx.logical_axis_rules`). The whole vocabulary, with what each name marks:
  "embed"   the model/input width side of a matrix (residual stream, tile-feature or omics input dim)
  "hidden"  the inner side of an MLP or projection (MLP hidden, encoder output width)
  "heads"   the concatenated attention-head side (q/k/v/out projections, attention-pool branches)
  "vocab"   rows of an embedding table (gene ids)
  None      replicated (small vectors, registers' count axis)
`DEFAULT_AXIS_RULES` shards the "embed" side over `fsdp` and replicates the rest: every large matrix has
exactly one "embed" axis, so FSDP splits it once. Models build with no mesh as well (annotations are
kept, eager sharding is off), e.g. for single-device inference.
"""

from mmfm.models.config import ModelConfig, SlideConfig
from mmfm.models.multimodal import MultimodalModel, build_slide_encoder
from mmfm.models.slide import SlideOutput

LOGICAL_AXES = ("embed", "hidden", "heads", "vocab")
DEFAULT_AXIS_RULES = (("embed", "fsdp"), ("hidden", None), ("heads", None), ("vocab", None))

__all__ = ["DEFAULT_AXIS_RULES", "LOGICAL_AXES", "ModelConfig", "MultimodalModel", "SlideConfig",
           "SlideOutput", "build_slide_encoder"]
