"""Slide, omics and text encoders, projection heads, and the MultimodalModel that ties them together.

Every parameter carries *logical* axis names (`nnx.with_partitioning`) from the one vocabulary in
`mmfm.models.axes`, which also holds their default placement on the mesh (`DEFAULT_AXIS_RULES`: the
"embed" side of every large matrix over `fsdp`, the rest replicated). The trainer turns the names into
shardings (`mmfm.train.sharding.state_shardings`). Models build with no mesh as well (annotations are
kept, eager sharding is off), e.g. for single-device inference.
"""

from mmfm.models.axes import DEFAULT_AXIS_RULES, LOGICAL_AXES
from mmfm.models.config import ModelConfig, SlideConfig
from mmfm.models.multimodal import MultimodalModel, build_slide_encoder
from mmfm.models.slide import SlideOutput

__all__ = ["DEFAULT_AXIS_RULES", "LOGICAL_AXES", "ModelConfig", "MultimodalModel", "SlideConfig",
           "SlideOutput", "build_slide_encoder"]
