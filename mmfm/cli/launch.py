"""`mmfm launch`: `mmfm pretrain` as a submitit job — SLURM, or processes on this machine — that re-queues itself."""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Literal

import submitit

from mmfm.cli import pretrain
from mmfm.train.preempt import EXIT_PREEMPTED

DESCRIPTION = """\
Submit `mmfm pretrain` with submitit: --executor slurm writes and submits an sbatch job of --nodes nodes ×
--gpus_per_node tasks (one process per GPU, with --requeue and a SIGUSR2 warning before --time runs out);
--executor local runs the same job as --gpus_per_node processes on this machine (what the tests use). Every
task runs `mmfm pretrain --resume auto`, so the first run starts fresh and every re-queued run continues from
the newest checkpoint. On SIGUSR2 (time-out warning) the run checkpoints and the job re-queues itself, at most
--max_requeues times; after a SLURM pre-emption (SIGTERM) SLURM re-queues it. All pretrain flags apply
(--config, --out, --set …); --fsdp_per_node shards parameters over the GPUs of a node. The job's scripts, logs
and pickles go to --logs.

example: mmfm launch --executor slurm --nodes 2 --gpus_per_node 8 --partition gpu --time 1440 \\
    --config configs/tangle_like.yaml --out /shared/runs/tangle --set data.cohort=/shared/cohorts/tcga \\
    --setup "[module load cuda, source .venv/bin/activate]\""""

Executor = Literal["slurm", "local"]


@dataclass
class Config(pretrain.Config):
    executor: Executor = "slurm"       # slurm: sbatch; local: processes on this machine
    nodes: int = 1                     # SLURM nodes (local: 1)
    gpus_per_node: int = 1             # processes per node, one per GPU (local on CPU: processes)
    partition: str = ""                # SLURM partition ("" = the cluster's default)
    account: str = ""                  # SLURM account
    qos: str = ""                      # SLURM quality of service
    time: int = 1440                   # minutes per job; a run longer than that re-queues itself
    cpus_per_task: int = 8             # CPU cores per process (loader workers, host-side work)
    mem_gb: int = 0                    # memory per node in GB (0 = the partition's default)
    max_requeues: int = 20             # time-outs after which the job gives up
    job_name: str = "mmfm-pretrain"
    logs: str = "submitit/%j"          # submitit folder: sbatch script, pickles, stdout/stderr (%%j = job id)
    setup: list[str] = field(default_factory=list)  # shell lines run before the job: "[module load cuda, source .venv/bin/activate]"
    fsdp_per_node: bool = False        # train.mesh.fsdp = gpus_per_node: parameter shards stay inside a node
    wait: bool = False                 # block until the job ends and exit with its code (local: always)


class PretrainJob(submitit.helpers.Checkpointable):
    """What every task of the job runs: `mmfm pretrain --resume auto` as one process of the run.

    submitit pickles this object; on its time-out signal it calls `checkpoint()` (inherited: the same job
    again) and re-queues, which is safe because each run resumes from the newest complete checkpoint.
    """

    def __init__(self, cfg: pretrain.Config, port: int | None = None):
        self.cfg = cfg
        self.port = port  # the local executor's coordinator port; SLURM tasks find theirs from srun's variables

    def __call__(self) -> dict:
        from mmfm.train.preempt import Preempted
        from mmfm.train.sharding import initialize_distributed

        env = submitit.JobEnvironment()
        if self.port is not None and env.num_tasks > 1:  # one GPU per task, as srun gives it on SLURM
            initialize_distributed(f"127.0.0.1:{self.port}", env.num_tasks, env.global_rank,
                                   local_device_ids=[env.local_rank])
        cfg = dataclasses.replace(self.cfg, resume="auto")

        requeue_sig = submitit.JobEnvironment._usr_sig()  # submitit's time-out signal (SIGUSR2 unless changed)
        try:
            res = pretrain.train(cfg)
        except Preempted as e:
            print(f"mmfm launch: {e}", file=sys.stderr, flush=True)
            handler = signal.getsignal(requeue_sig)
            if e.signal_name == signal.Signals(requeue_sig).name and callable(handler):
                handler(requeue_sig, None)  # submitit: checkpoint() + re-queue (task 0), then exit
            sys.exit(EXIT_PREEMPTED)  # SIGTERM: SLURM re-queues a pre-empted --requeue job itself
        return {"run_dir": str(res.run_dir), "step": res.step, "loss": res.metrics.get("loss"),
                "checkpoints": res.checkpoints}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_config(cfg: Config) -> pretrain.Config:
    """The pretrain part of `cfg`, with the mesh following the launch (`--fsdp_per_node`)."""
    out = pretrain.Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(pretrain.Config)})
    if cfg.fsdp_per_node:
        out.train = dataclasses.replace(out.train, mesh=dataclasses.replace(out.train.mesh, data=-1,
                                                                             fsdp=cfg.gpus_per_node))
    return out


def make_executor(cfg: Config):
    """A configured submitit executor for `cfg` (nothing submitted yet)."""
    if cfg.nodes < 1 or cfg.gpus_per_node < 1:
        raise ValueError(f"--nodes {cfg.nodes} --gpus_per_node {cfg.gpus_per_node}: both must be >= 1")
    if cfg.executor == "local":
        if cfg.nodes != 1:
            raise ValueError(f"--nodes {cfg.nodes}: the local executor runs on this machine (--nodes 1)")
        ex = submitit.LocalExecutor(folder=cfg.logs, max_num_timeout=cfg.max_requeues)
        ex.update_parameters(timeout_min=cfg.time, tasks_per_node=cfg.gpus_per_node, gpus_per_node=cfg.gpus_per_node,
                             setup=list(cfg.setup))
        return ex
    ex = submitit.SlurmExecutor(folder=cfg.logs, max_num_timeout=cfg.max_requeues)
    params = dict(job_name=cfg.job_name, nodes=cfg.nodes, ntasks_per_node=cfg.gpus_per_node,
                  gpus_per_node=cfg.gpus_per_node, cpus_per_task=cfg.cpus_per_task, time=cfg.time,
                  setup=list(cfg.setup), additional_parameters={"requeue": True})
    for key in ("partition", "account", "qos"):
        if getattr(cfg, key):
            params[key] = getattr(cfg, key)
    if cfg.mem_gb:
        params["mem"] = f"{cfg.mem_gb}G"
    ex.update_parameters(**params)
    return ex


def submit(cfg: Config):
    """Submit the job → submitit Job (`.job_id`, `.result()`, `.paths`)."""
    if not cfg.out:
        raise ValueError("--out: required (the run directory)")
    port = _free_port() if cfg.executor == "local" and cfg.gpus_per_node > 1 else None
    return make_executor(cfg).submit(PretrainJob(pretrain_config(cfg), port))


def run(cfg: Config) -> int:
    job = submit(cfg)
    print(json.dumps({"job_id": job.job_id, "executor": cfg.executor, "logs": str(job.paths.folder)}), flush=True)
    if not (cfg.wait or cfg.executor == "local"):
        return 0
    try:
        print(json.dumps(job.results()[0]))  # task 0's summary (every task returns one)
    except submitit.core.utils.FailedJobError as e:
        print(f"mmfm launch: job {job.job_id} failed:\n{e}", file=sys.stderr)
        return 1
    except submitit.core.utils.UncompletedJobError as e:  # stopped by SIGTERM without a re-queue
        print(f"mmfm launch: job {job.job_id} stopped:\n{e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0
