"""Device mesh and the sharding of parameters, optimizer state and batches.

One mesh for every run, 1 CPU device to a pod: axes ("data", "fsdp"), both `AxisType.Auto`
(classic jit with in/out shardings and automatic propagation — the style chosen on purpose).
The batch is split over both axes. Parameters and optimizer moments follow a rules table keyed
by parameter path (big_vision's `sharding_strategy`): `fsdp` shards the largest dimension that
divides the fsdp axis, `replicate` keeps a full copy; arrays below `shard_min_size` elements stay
replicated because gathering them costs more than it saves. Optimizer moments have the same
path suffix and shape as their parameter, so they get the same spec.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mmfm.train.config import MeshConfig

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


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


def spec_for(path: str, shape: tuple[int, ...], rules, fsdp_size: int, min_size: int) -> P:
    """PartitionSpec of one array: the first matching rule wins; no match = replicate."""
    for pattern, rule in rules:
        if re.search(pattern, path):
            break
    else:
        return P()
    if rule == "replicate" or fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    dims = sorted(range(len(shape)), key=lambda i: -shape[i])
    for d in dims:
        if shape[d] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh, rules, min_size: int):
    """NamedSharding for every leaf of an (abstract) state pytree."""
    fsdp = mesh.shape["fsdp"]

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(leaf_path(path), shape, rules, fsdp, min_size))

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of every batch array split over all devices (a prefix spec: trailing dims whole)."""
    return NamedSharding(mesh, P(BATCH_AXES))


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
