"""Device mesh and the sharding of parameters, optimizer state and batches.

One mesh for every run, 1 CPU device to a pod: axes ("data", "fsdp"), both `AxisType.Auto`
(classic jit with in/out shardings and automatic propagation — the style chosen on purpose).
Logical axis names and their default placement live in `mmfm.models.axes`: the "batch" axis spans
both mesh axes (`BATCH_AXES`, what the trainer also hands the objective's shard_map); parameters
and optimizer moments follow `train.axis_rules` over `DEFAULT_AXIS_RULES` (the "embed" side of every
large matrix over `fsdp`, everything else replicated); arrays below `train.shard_min_size`
elements stay replicated because gathering them costs more than it saves.

Several processes (`initialize_distributed`): one per GPU under SLURM and Open MPI, one per host on TPU VMs
and GKE GPU nodes. `jax.devices()` lists devices process by process and the launchers number processes node
by node, so with `train.mesh.fsdp` = devices per node the fsdp axis (parameter all-gathers) stays inside a
node's NVLink / ICI domain and only the data axis (one gradient reduction per step) crosses nodes.
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


class DistributedError(ValueError):
    """A multi-process launch that cannot be set up from what the environment and flags say."""


@dataclass(frozen=True)
class Cluster:
    """How this process joins a multi-process run (see `detect_cluster`)."""

    kind: str                              # flags | env | gke | slurm | openmpi | tpu
    coordinator: str | None = None         # host:port; None = JAX derives it (SLURM node list, MPI URI, TPU metadata)
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _ints(env, *names) -> list[int] | None:
    try:
        return [int(env[n]) for n in names]
    except (KeyError, ValueError):
        return None


def _tpu_vm(env) -> bool:
    from importlib.util import find_spec

    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):  # GKE multi-host TPU slice (JobSet webhook)
        return True
    return find_spec("libtpu") is not None and (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"))


def detect_cluster(env=None, coordinator: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None) -> Cluster | None:
    """Which multi-process launch this is, from flags and the environment; None = one process on its own.

    In order: explicit flags; MMFM_COORDINATOR / MMFM_NUM_PROCESSES / MMFM_PROCESS_ID; GKE GPU workloads (xpk /
    JobSet: JAX_COORDINATOR_ADDRESS[+JAX_COORDINATOR_PORT], NNODES, NODE_RANK — one process per node, all its
    GPUs); a SLURM job step with several tasks (`srun`: one process per GPU, SLURM_LOCALID picks it); Open MPI
    (`mpirun`, ORTE URI, one process per GPU); a Cloud TPU VM (one process per host, JAX reads the metadata).
    For the last three JAX's own auto-detection computes the coordinator.
    """
    env = os.environ if env is None else env
    if coordinator or num_processes is not None or process_id is not None:
        return Cluster("flags", coordinator, num_processes, process_id)
    if env.get("MMFM_COORDINATOR") or env.get("MMFM_NUM_PROCESSES"):
        n, i = _ints(env, "MMFM_NUM_PROCESSES") or [None], _ints(env, "MMFM_PROCESS_ID") or [None]
        return Cluster("env", env.get("MMFM_COORDINATOR"), n[0], i[0])
    gke = _ints(env, "NNODES", "NODE_RANK")
    if gke and env.get("JAX_COORDINATOR_ADDRESS") and gke[0] > 1:
        addr = env["JAX_COORDINATOR_ADDRESS"]
        if ":" not in addr:
            addr = f"{addr}:{env.get('JAX_COORDINATOR_PORT', '1234')}"
        return Cluster("gke", addr, gke[0], gke[1])
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and (_ints(env, "SLURM_NTASKS") or [1])[0] > 1:
        return Cluster("slurm")
    if (_ints(env, "OMPI_COMM_WORLD_SIZE") or [1])[0] > 1:
        if "OMPI_MCA_orte_hnp_uri" not in env:
            raise DistributedError("Open MPI without an ORTE URI (Open MPI 5 / PMIx): pass --coordinator host:port "
                                   "--num_processes $OMPI_COMM_WORLD_SIZE --process_id $OMPI_COMM_WORLD_RANK")
        return Cluster("openmpi")
    if _tpu_vm(env):
        return Cluster("tpu")
    return None


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, mode: str = "auto", env=None,
                           local_device_ids=None) -> Cluster | None:
    """`jax.distributed.initialize` for the launch `detect_cluster` finds; None (nothing done) for one process.

    `mode="off"` never initialises (a single process even inside a cluster job). Explicit values are passed
    through; for SLURM, Open MPI and TPU VMs JAX derives them. On CPU, cross-process collectives use gloo.
    Calling it again in an initialised process is a no-op.
    """
    if mode == "off":
        return None
    cluster = detect_cluster(env, coordinator, num_processes, process_id)
    if cluster is None:
        return None
    if cluster.kind in ("flags", "env") and cluster.coordinator is None:
        raise DistributedError("multi-process: --coordinator host:port (or MMFM_COORDINATOR) is required with "
                               "--num_processes / --process_id")
    if jax.distributed.is_initialized():
        return cluster
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects the CPU backend
    jax.distributed.initialize(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                               process_id=cluster.process_id,
                               local_device_ids=local_device_ids if local_device_ids is not None
                               else cluster.local_device_ids)
    return cluster
