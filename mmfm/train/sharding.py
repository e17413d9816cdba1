"""Device mesh and the sharding of parameters, optimizer state and batches.

One mesh for every run, 1 CPU device to a pod: axes ("data", "fsdp"), both `AxisType.Auto`
(classic jit with in/out shardings and automatic propagation — the style chosen on purpose).
Logical axis names and their default placement live in `mmfm.models.axes`: the "batch" axis spans
both mesh axes (`BATCH_AXES`, what the trainer also hands the objective's shard_map); parameters
and optimizer moments follow `train.axis_rules` over `DEFAULT_AXIS_RULES` (the "embed" side of every
large matrix over `fsdp`, everything else replicated); arrays below `train.shard_min_size`
elements stay replicated because gathering them costs more than it saves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mmfm.models.axes import BATCH, BATCH_RULES, DEFAULT_AXIS_RULES, MESH_AXES, complete_rules, logical_spec

AXES = MESH_AXES
BATCH_AXES = dict(BATCH_RULES)[BATCH]  # every device: each one encodes (and contrasts) its own rows


@dataclass
class MeshConfig:
    """Device mesh shape; -1 on one axis takes every remaining device."""

    data: int = -1
    fsdp: int = 1


def default_axis_rules() -> list[list]:
    """`train.axis_rules` default: the parameter placement of `mmfm.models.axes`, as YAML-able lists."""
    return [list(r) for r in DEFAULT_AXIS_RULES]


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int]:
    """Resolve the one -1 axis; the product must equal the device count."""
    data, fsdp = cfg.data, cfg.fsdp
    if data == -1:
        data = n_devices // fsdp if fsdp > 0 and n_devices % fsdp == 0 else 0
    elif fsdp == -1:
        fsdp = n_devices // data if data > 0 and n_devices % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != n_devices:
        raise ValueError(f"train.mesh: data={cfg.data}, fsdp={cfg.fsdp} does not fit {n_devices} devices")
    return data, fsdp


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def leaf_path(path) -> str:
    """'0/model/slide/proj/kernel' for an nnx state path (the trailing '/value' dropped)."""
    s = jax.tree_util.keystr(path, simple=True, separator="/")
    return s[: -len("/value")] if s.endswith("/value") else s


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
    """Drop mesh axes a dimension cannot take: arrays under `min_size` elements, dims the axis size
    does not divide, and mesh axes an earlier dim already took (two logical names mapped to one mesh
    axis) stay replicated along that dim."""
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    out, taken = [], set()
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        size = int(np.prod([mesh.shape[a] for a in names], dtype=np.int64))
        fits = bool(names) and dim % size == 0 and size > 1 and not taken.intersection(names)
        out.append(axes if fits else None)
        taken.update(names if fits else ())
    return P(*out)


def state_shardings(abstract_state, mesh: Mesh, rules, min_size: int):
    """NamedSharding for every leaf of an (abstract) nnx state.

    Logical axis names on the variables (`mmfm.models` annotates every parameter) are mapped to mesh
    axes by `rules` over the defaults (`mmfm.models.axes.complete_rules`); the optimizer's moments
    carry their parameter's names, so they shard alike. Unannotated leaves (RNG keys, counters) are
    replicated.
    """
    with nnx.logical_axis_rules(complete_rules(rules)):
        specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(lambda leaf, spec: NamedSharding(mesh, fit_spec(spec, tuple(leaf.shape), mesh, min_size)),
                        abstract_state, specs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of every batch array split over all devices (a prefix spec: trailing dims whole)."""
    return NamedSharding(mesh, logical_spec((BATCH,), BATCH_RULES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(host_batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows (NumPy) → global jax.Arrays; every process passes its own rows."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in host_batch.items()}


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """`jax.distributed.initialize` from flags or the usual env vars; False when single-process.

    Env fallbacks: MMFM_COORDINATOR / MMFM_NUM_PROCESSES / MMFM_PROCESS_ID, else JAX's own
    auto-detection (SLURM, TPU, ...) when JAX_COORDINATOR_ADDRESS is set. On CPU, cross-process
    collectives use gloo.
    """
    coordinator = coordinator or os.environ.get("MMFM_COORDINATOR") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("MMFM_NUM_PROCESSES"):
        num_processes = int(os.environ["MMFM_NUM_PROCESSES"])
    if process_id is None and os.environ.get("MMFM_PROCESS_ID"):
        process_id = int(os.environ["MMFM_PROCESS_ID"])
    if not coordinator and num_processes is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects the CPU backend
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True
