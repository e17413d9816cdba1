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
        filled[path] = arr
    missing = [".".join(map(str, p)) for p in flat if p not in filled]
    problems = []
    for title, items in (("missing (model variables not in the checkpoint)", missing),
                         ("unexpected (checkpoint keys the name map does not place)", unexpected),
                         ("shape mismatch", mismatched), ("mapped twice", duplicate)):
        if items:
            problems.append(f"{title}: " + "; ".join(items[:20]) + (" …" if len(items) > 20 else ""))
    if problems:
        raise PortingError(f"cannot load {source}:\n  " + "\n  ".join(problems))
    for path, arr in filled.items():
        var = flat[path]
        var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))
    nnx.update(module, nnx.from_flat_state(flat))
