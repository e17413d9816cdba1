"""`ModelConfig`: the typed dataclass tree that fully describes a MultimodalModel.

Saved with every run as plain JSON (`to_dict`) and read back with `from_dict`, which names the first
unknown key by its dotted path (e.g. `model.slide.transformer.widht`) instead of ignoring it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TYPE_CHECKING

from mmfm.models.abmil import ABMILConfig
from mmfm.models.case import CaseConfig
from mmfm.models.omics import OmicsConfig
from mmfm.models.transformer import TransformerConfig

if TYPE_CHECKING:
    from mmfm.models.text import TextConfig


@dataclass(frozen=True)
class SlideConfig:
    kind: str = "abmil"  # abmil | transformer
    abmil: ABMILConfig = field(default_factory=ABMILConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)


@dataclass(frozen=True)
class ModelConfig:
    modalities: tuple[str, ...] = ("slide", "rna")
    embed_dim: int = 512                  # shared embedding space
    head_hidden: int | None = None        # None: Linear head; int: 2-layer MLP head of this width
    head_dropout: float = 0.0
    compute_dtype: str = "float32"        # float32 | bfloat16 (params and outputs stay fp32)
    slide: SlideConfig = field(default_factory=SlideConfig)
    case: CaseConfig = field(default_factory=CaseConfig)  # multi-slide cases: mean late fusion or a case encoder
    rna: OmicsConfig = field(default_factory=OmicsConfig)
    protein: OmicsConfig = field(default_factory=lambda: OmicsConfig(hidden=256))
    mutation: OmicsConfig = field(default_factory=lambda: OmicsConfig(hidden=64, n_layers=1, dropout=0.1))
    report: "TextConfig | None" = None    # None: mmfm.models.text.TextConfig() defaults

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d, "model")


def _from_dict(cls, d: dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}")
    kwargs = {}
    defaults = cls()
    for name, value in d.items():
        default = getattr(defaults, name)
        if name == "report" and cls is ModelConfig and value is not None:
            from mmfm.models.text import TextConfig
            value = _from_dict(TextConfig, value, f"{where}.report")
        elif dataclasses.is_dataclass(default):
            value = _from_dict(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
