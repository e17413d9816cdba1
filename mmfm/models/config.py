"""`ModelConfig`: the typed dataclass tree that fully describes a MultimodalModel.

Decoded from YAML / JSON by `mmfm.config.decode` (draccus), which names an unknown or mistyped key by its
dotted path (e.g. `model.slide.transformer.widht`). Which modalities a run uses is not a model setting: it is
`data.modalities` of the run config, passed to the model when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmfm.models.abmil import ABMILConfig
from mmfm.models.case import CaseConfig
from mmfm.models.gigapath import GigaPathConfig
from mmfm.models.omics import OmicsConfig
from mmfm.models.transformer import TransformerConfig


@dataclass(frozen=True)
class TextConfig:
    path: str | None = None                    # weights folder (config.json, model.safetensors, tokenizer.json)
    trainable: Literal["frozen", "last_k", "all"] = "last_k"
    last_k: int = 2
    max_len: int = 128
    dropout: float | None = None               # None: the checkpoint's hidden_dropout_prob
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def weights_dir(self) -> Path:
        from mmfm.data.text import minilm_dir

        return Path(self.path) if self.path else minilm_dir()


@dataclass(frozen=True)
class SlideConfig:
    kind: Literal["abmil", "transformer", "gigapath"] = "abmil"
    abmil: ABMILConfig = field(default_factory=ABMILConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    gigapath: GigaPathConfig = field(default_factory=GigaPathConfig)  # Prov-GigaPath's LongNet (import-encoder)


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 512                  # shared embedding space
    head_hidden: int | None = None        # None: Linear head; int: 2-layer MLP head of this width
    head_dropout: float = 0.0
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # params and outputs stay fp32
    slide: SlideConfig = field(default_factory=SlideConfig)
    case: CaseConfig = field(default_factory=CaseConfig)  # multi-slide cases: mean late fusion or a case encoder
    rna: OmicsConfig = field(default_factory=OmicsConfig)
    protein: OmicsConfig = field(default_factory=lambda: OmicsConfig(hidden=256))
    mutation: OmicsConfig = field(default_factory=lambda: OmicsConfig(hidden=64, n_layers=1, dropout=0.1))
    report: TextConfig = field(default_factory=TextConfig)
