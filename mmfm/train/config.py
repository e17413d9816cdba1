"""Typed run configuration: nested dataclasses built from YAML with strict checking.

A run config composes the owners' configs (model, objective, loader) with the trainer's own
(`DataConfig`, `TrainConfig`). Every key is checked against the dataclass fields and their type
hints; an unknown key or a wrong type is an error naming the full dotted key. Overrides
(`--set train.lr=3e-4`) are parsed with `yaml.safe_load` — never `eval`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmfm.train.sharding import MeshConfig, default_axis_rules as _default_axis_rules


class ConfigError(ValueError):
    """A config file or override that does not match the typed schema."""


@dataclass
class TrainConfig:
    steps: int = 200
    seed: int = 0
    lr: float = 1e-4
    warmup: int = 10                   # linear warm-up steps, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.01         # AdamW, masked: no decay on biases, norms, embeddings tables, t', b
    b1: float = 0.9
    b2: float = 0.999
    clip: float = 1.0                  # global-norm clipping; 0 disables
    grad_accum: int = 1                # micro-batches per optimizer step (scan inside the jitted step)
    log_every: int = 10
    eval_every: int = 100              # 0 disables held-out evaluation during training
    ckpt_every: int = 100
    keep_last: int = 3
    best_metric: str = ""              # eval.jsonl key (e.g. "recall@5/slide->rna") whose best ckpt is kept
    best_mode: Literal["max", "min"] = "max"
    async_checkpoint: bool = True
    axis_rules: list[tuple[str, str | None]] = field(default_factory=lambda: _default_axis_rules())
    shard_min_size: int = 2 ** 16      # arrays with fewer elements stay replicated (cheaper than gathering)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    prng_impl: Literal["threefry2x32", "rbg"] = "threefry2x32"  # dropout RNG: threefry gives the same curve on
    #                                    any mesh; rbg can be cheaper (backend-dependent) but its bits depend on it
    progress: bool = True              # tqdm bar with ETA on process 0
    inject_nan_step: int = -1          # fault injection for tests: feed NaN tile features at this step


@dataclass
class DataConfig:
    cohort: str = ""                   # cohort directory (see mmfm.data.cohort)
    heldout_fraction: float = 0.2      # cases held out (patient-level) for retrieval / RankMe during training
    split_seed: int = 0
    eval_max_cases: int = 256          # cap on held-out cases evaluated (fixed subset, same every eval)


def _run_config_types():
    """The owners' config classes, imported lazily so `mmfm validate` never imports jax."""
    from mmfm.data.loader import LoaderConfig
    from mmfm.models import ModelConfig
    from mmfm.objectives import ObjectiveConfig

    return ModelConfig, ObjectiveConfig, LoaderConfig


@dataclass
class RunConfig:
    data: DataConfig
    train: TrainConfig
    model: Any
    objective: Any
    loader: Any


# ----------------------------------------------------------------------------- building from dicts

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, key: str):
    """Check/convert one YAML value against a type hint; raise ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for alt in args:
            if alt is type(None):
                continue
            try:
                return _convert(value, alt, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} matches none of {' | '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple and isinstance(value, dict) and args and typing.get_origin(args[0]) is tuple:
        value = [list(kv) for kv in value.items()]  # {a-b: w} for a tuple of (key, value) pairs
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [_convert(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type hint {tp!r}")


def from_dict(cls, raw: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types name the dotted key."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {raw!r}")
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = prefix or "<root>"
        raise ConfigError(f"unknown config key(s) {', '.join(_join(prefix, k) for k in unknown)} "
                          f"(known in {where}: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            tp = hints[name]
            if dataclasses.is_dataclass(tp):
                kwargs[name] = from_dict(tp, {}, key)
            else:
                raise ConfigError(f"{key}: required key missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the owners' __post_init__ checks
        raise ConfigError(f"{prefix or '<root>'}: {e}") from e


def _type_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except NameError:  # ModelConfig names TextConfig under TYPE_CHECKING (keeps torch-free imports light)
        from mmfm.models.text import TextConfig

        return typing.get_type_hints(cls, localns={"TextConfig": TextConfig})


def _join(prefix: str, name) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def to_dict(cfg) -> dict:
    """Plain YAML-able dict (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


# ----------------------------------------------------------------------------- overrides and loading

def apply_override(raw: dict, assignment: str) -> dict:
    """Apply one `a.b.c=value` override in place; value parsed by yaml.safe_load."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value")
    key, text = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {assignment!r}: bad dotted key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse {text!r}: {e}") from e
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = nxt
    node[parts[-1]] = value
    return raw


def build_run_config(raw: dict) -> RunConfig:
    model_cls, objective_cls, loader_cls = _run_config_types()
    raw = dict(raw or {})
    sections = {"data": DataConfig, "train": TrainConfig, "model": model_cls,
                "objective": objective_cls, "loader": loader_cls}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section(s) {', '.join(unknown)} (known: {', '.join(sections)})")
    built = {name: from_dict(cls, raw.get(name), name) for name, cls in sections.items()}
    cfg = RunConfig(**built)
    check(cfg)
    return cfg


def check(cfg: RunConfig) -> None:
    """Cross-field checks the types cannot express."""
    t = cfg.train
    if t.steps < 1:
        raise ConfigError("train.steps: must be >= 1")
    if t.grad_accum < 1 or cfg.loader.batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum: {t.grad_accum} must divide loader.batch_size={cfg.loader.batch_size}")
    from mmfm.train.sharding import AXES

    for i, (name, axis) in enumerate(t.axis_rules):
        if axis is not None and axis not in AXES:
            raise ConfigError(f"train.axis_rules[{i}]: {name!r} -> {axis!r}; mesh axes are {AXES} or null")
    if not 0.0 <= cfg.data.heldout_fraction < 1.0:
        raise ConfigError("data.heldout_fraction: must be in [0, 1)")
    if (t.mesh.data == -1) and (t.mesh.fsdp == -1):
        raise ConfigError("train.mesh: at most one axis may be -1")


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """YAML file (optional) + `key=value` overrides → checked RunConfig."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for o in overrides:
        apply_override(raw, o)
    try:
        return build_run_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from e


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
