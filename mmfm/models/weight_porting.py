"""Port a PyTorch/safetensors state dict into an NNX module with a declarative name map.

A `NameMap` is an ordered list of (regex over state-dict keys, target path template, transform).
The first matching rule wins; `\\1`-style groups fill the template, whose '.'-separated parts
become the NNX path (digits become integer indices). Every model variable must be filled,
every state-dict key must be used or explicitly ignored, and shapes must agree — any violation
is one error listing all offending names, so a new BERT-family checkpoint either loads exactly
or says precisely what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Transform = Callable[[np.ndarray], np.ndarray]


def transpose(x: np.ndarray) -> np.ndarray:
    """torch Linear weights are [out, in]; NNX kernels are [in, out]."""
    return np.ascontiguousarray(x.T)


def identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclass(frozen=True)
class Rule:
    pattern: str
    target: str
    transform: Transform = identity


@dataclass(frozen=True)
class NameMap:
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = field(default_factory=tuple)  # regexes of keys that are deliberately unused

    def target_of(self, key: str) -> tuple[tuple, Transform] | None:
        for rule in self.rules:
            m = re.fullmatch(rule.pattern, key)
            if m:
                path = m.expand(rule.target)
                return tuple(int(p) if p.isdigit() else p for p in path.split(".")), rule.transform
        return None

    def ignored(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.ignore)


class PortingError(ValueError):
    pass


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read weights without unpickling anything."""
    from safetensors.numpy import load_file

    return load_file(str(path))


def port_state_dict(module: nnx.Module, state_dict: Mapping[str, np.ndarray], name_map: NameMap,
                    *, source: str = "state dict") -> None:
    """Copy `state_dict` into `module` in place (all variable types, trainable or frozen)."""
    set_weights(module, mapped_state_dict(module, state_dict, name_map, source=source))


def mapped_state_dict(module: nnx.Module, state_dict: Mapping[str, np.ndarray], name_map: NameMap,
                      *, source: str = "state dict") -> dict[str, np.ndarray]:
    """`state_dict` placed by `name_map` as {'.'-joined module path: host array}, checked against `module` (which
    may be abstract, from nnx.eval_shape): every variable filled, every key placed or ignored, shapes agreeing."""
    flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState))))  # weights, not RNG streams
    filled: dict[tuple, np.ndarray] = {}
    unexpected, mismatched, duplicate = [], [], []
    for key, value in state_dict.items():
        hit = name_map.target_of(key)
        if hit is None:
            if not name_map.ignored(key):
                unexpected.append(key)
            continue
        path, transform = hit
        if path not in flat:
            unexpected.append(f"{key} → {'.'.join(map(str, path))} (no such model variable)")
            continue
        arr = np.asarray(transform(np.asarray(value)))
        want = tuple(flat[path].shape)
        if arr.shape != want:
            mismatched.append(f"{key}: checkpoint {arr.shape} vs model {want} at {'.'.join(map(str, path))}")
            continue
        if path in filled:
            duplicate.append(key)
        filled[path] = arr.astype(flat[path].dtype, copy=False)
    missing = [".".join(map(str, p)) for p in flat if p not in filled]
    problems = []
    for title, items in (("missing (model variables not in the checkpoint)", missing),
                         ("unexpected (checkpoint keys the name map does not place)", unexpected),
                         ("shape mismatch", mismatched), ("mapped twice", duplicate)):
        if items:
            problems.append(f"{title}: " + "; ".join(items[:20]) + (" …" if len(items) > 20 else ""))
    if problems:
        raise PortingError(f"cannot load {source}:\n  " + "\n  ".join(problems))
    return {".".join(map(str, path)): arr for path, arr in filled.items()}


def set_weights(module: nnx.Module, weights: Mapping[str, jax.Array | np.ndarray]) -> None:
    """Set `module`'s variables from {'.'-joined path: array} (as `mapped_state_dict` gives; inside a jit the
    arrays are its arguments, never constants baked into the program)."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState)))
    for path, var in flat:
        var.set_value(jnp.asarray(weights[".".join(map(str, path))], dtype=var.get_value().dtype))
    nnx.update(module, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------- mmfm's own PyTorch names
# Exports name every weight after its NNX path, as a PyTorch twin built from nn.Linear / nn.LayerNorm with the
# same attribute names would (`mmfm/bridges/torch_slide.py`): a Dense `kernel` [in, out] becomes `weight`
# [out, in], a LayerNorm `scale` becomes `weight`, everything else keeps its name and layout.

def _torch_leaf(leaf: str) -> tuple[str, Transform]:
    if leaf == "kernel":
        return "weight", transpose
    if leaf == "scale":
        return "weight", identity
    return leaf, identity


def _weights(module: nnx.Module):
    return nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState)))


def to_torch_state(module: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """Every weight of `module` (not RNG streams) under mmfm's PyTorch names, in PyTorch layout, fp32 host arrays."""
    out = {}
    for path, var in _weights(module):
        leaf, fn = _torch_leaf(str(path[-1]))
        name = prefix + ".".join(map(str, (*path[:-1], leaf)))
        out[name] = np.ascontiguousarray(fn(np.asarray(jax.device_get(var.get_value()), np.float32)))
    return out


def torch_name_map(module: nnx.Module, prefix: str = "", ignore: tuple[str, ...] = ()) -> NameMap:
    """The inverse of `to_torch_state` for `module`: loads mmfm's PyTorch names (an export, or the state_dict of
    the PyTorch twin) back into it; `ignore` lists regexes of keys that belong to other parts of the model."""
    rules = []
    for path, _ in _weights(module):
        leaf, _ = _torch_leaf(str(path[-1]))
        inverse = transpose if path[-1] == "kernel" else identity
        rules.append(Rule(re.escape(prefix + ".".join(map(str, (*path[:-1], leaf)))), ".".join(map(str, path)),
                          inverse))
    return NameMap(tuple(rules), ignore)
