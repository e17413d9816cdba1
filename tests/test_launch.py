"""Launch kits: cluster detection for `jax.distributed`, SLURM auto-initialisation of two real processes, the
submitit launcher's sbatch job, and its local executor training as two processes exactly like one process —
through a time-out signal, a checkpoint, a re-queue and a resume."""

import os
import pickle
import random
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import host_devices, jit_cache_dir
from mmfm.cli import launch
from mmfm.config import parse_cli
from mmfm.train import monitor
from mmfm.train.sharding import Cluster, DistributedError, detect_cluster

REPO = Path(__file__).resolve().parents[1]
SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1"}


def test_detect_cluster_from_flags_and_environments():
    assert detect_cluster({}) is None
    assert detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None  # sbatch shell / one task: alone
    assert detect_cluster(SRUN) == Cluster("slurm")  # JAX derives host (gpu01) and port from these
    assert detect_cluster(dict(SRUN, SLURM_NTASKS="1")) is None
    assert detect_cluster({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}) \
        == Cluster("openmpi")
    with pytest.raises(DistributedError, match="--coordinator host:port --num_processes"):
        detect_cluster({"OMPI_COMM_WORLD_SIZE": "4"})
    gke = {"JAX_COORDINATOR_ADDRESS": "job-workers-0-0.job", "JAX_COORDINATOR_PORT": "6002", "NNODES": "4",
           "NODE_RANK": "3"}
    assert detect_cluster(gke) == Cluster("gke", "job-workers-0-0.job:6002", 4, 3)
    assert detect_cluster({"MMFM_COORDINATOR": "h:1", "MMFM_NUM_PROCESSES": "2", "MMFM_PROCESS_ID": "1"}) \
        == Cluster("env", "h:1", 2, 1)
    assert detect_cluster(SRUN, "h:9", 2, 0) == Cluster("flags", "h:9", 2, 0)  # flags win over everything
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == Cluster("tpu")


def test_two_srun_tasks_initialise_jax_distributed_from_slurm_variables_alone(tmp_path):
    """What `srun mmfm pretrain` does on each task: no flags, JAX's SLURM detection finds the coordinator."""
    script = tmp_path / "task.py"
    script.write_text(textwrap.dedent("""
        import pathlib, sys
        import jax, jax.numpy as jnp, numpy as np
        from jax.experimental import multihost_utils
        from mmfm.train.sharding import initialize_distributed
        cluster = initialize_distributed()
        total = multihost_utils.process_allgather(np.array([jax.process_index() + 1]))
        result = (cluster.kind, jax.process_count(), jax.process_index(), len(jax.devices()), int(total.sum()))
        pathlib.Path(sys.argv[1]).write_text(" ".join(map(str, result)))
    """))
    job = str(random.randrange(100000, 900000))  # JAX puts the coordinator on port 61440 + job id % 4096
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS=host_devices(2), JAX_PLATFORMS="cpu",
                   PYTHONPATH=str(REPO), SLURM_JOB_ID=job, SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_PROCID=str(i),
                   SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / f"task{i}.txt")], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    # each task writes its answer to a file of its own: gloo's C++ logging shares the tasks' stdout and may split a line
    result = [(tmp_path / f"task{i}.txt").read_text() for i in range(2)]
    assert result == ["slurm 2 0 4 3", "slurm 2 1 4 3"], outs


def test_launch_slurm_writes_a_requeueing_job_of_one_process_per_gpu(tmp_path, monkeypatch):
    """The real submitit SLURM executor against a stand-in `sbatch` that keeps the script it is given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho 'Submitted batch job 4242'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; never run here
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg = parse_cli(launch.Config, [
        "--executor", "slurm", "--nodes", "2", "--gpus_per_node", "8", "--partition", "gpu", "--time", "120",
        "--account", "lab", "--mem_gb", "512", "--logs", str(tmp_path / "logs/%j"), "--fsdp_per_node",
        "--setup", "[module load cuda/12.4, source .venv/bin/activate]", "--config", str(REPO / "configs/demo.yaml"),
        "--out", "gs://bucket/runs/a", "--set", "train.steps=1000"])
    assert launch.run(cfg) == 0
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@90", "#SBATCH --time=120", "#SBATCH --partition=gpu",
                 "#SBATCH --account=lab", "#SBATCH --mem=512G", "#SBATCH --job-name=mmfm-pretrain",
                 "module load cuda/12.4", "source .venv/bin/activate"):
        assert line in script.splitlines(), (line, script)
    assert "srun --unbuffered" in script and "submitit.core._submit" in script
    pickled = next((tmp_path / "logs").glob("*/*_submitted.pkl"))
    job = pickle.loads(pickled.read_bytes()).function
    assert isinstance(job, launch.PretrainJob) and job.port is None  # SLURM tasks detect their coordinator
    assert job.cfg.out == "gs://bucket/runs/a" and job.cfg.train.steps == 1000
    assert (job.cfg.train.mesh.data, job.cfg.train.mesh.fsdp) == (-1, 8)  # shards inside a node, data across


def _logs(tmp_path) -> str:
    return "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*_log.err")))


@pytest.mark.slow
def test_launch_local_two_processes_match_one_process_through_a_requeue(tmp_path, monkeypatch):
    """Both tasks get submitit's time-out signal (SIGUSR2) right after step 3 (`mmfm.faults`, inherited through the
    job's environment): JAX's preemption sync stops both after step 3 exactly, the job re-queues itself once and the
    resumed run (past step 3, so the fault never fires again) ends with the curve of one process."""
    from mmfm.simulate import SimConfig, simulate_cohort

    cohort = tmp_path / "cohort"
    simulate_cohort(cohort, SimConfig(n_cases=40, n_sites=3, feature_dim=16, n_genes=32, n_proteins=8,
                                      bag_size_median=48, bag_size_max=128))
    n, stop = 6, 3
    sets = [f"data.cohort={cohort}", "loader.batch_size=8", "loader.tiles_per_slide=16", "loader.n_genes=32",
            f"train.steps={n}", f"train.ckpt_every={n}", "train.eval_every=0", "train.log_every=1",
            "train.progress=false", "data.heldout_fraction=0.25", "model.embed_dim=16", "model.slide.abmil.hidden=16",
            "model.slide.abmil.attn_dim=8", "model.rna.hidden=16", "model.protein.hidden=16"]
    flags = ["--config", str(REPO / "configs/demo.yaml"), *[a for s in sets for a in ("--set", s)]]
    cache = dict(JAX_COMPILATION_CACHE_DIR=jit_cache_dir(tmp_path / "jit"),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    for k, v in dict(cache, XLA_FLAGS=host_devices(1), JAX_PLATFORMS="cpu",
                     MMFM_FAULTS=f"train.step@{stop}:SIGUSR2").items():
        monkeypatch.setenv(k, v)  # what each task inherits: one CPU device per process, the time-out warning
    cfg = parse_cli(launch.Config, ["--executor", "local", "--gpus_per_node", "2", "--time", "30",
                                    "--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "two"), *flags])
    result = launch.submit(cfg).results()[0]  # the job re-queued itself once and finished
    assert result["step"] == n and result["checkpoints"] == [stop, n], result
    log = _logs(tmp_path)
    stops = [int(x.split(";")[0]) for x in log.split("stopped by SIGUSR2 after step ")[1:]]
    assert stops == [stop, stop], log  # each task once, after the same step: one re-queue, no second fault
    monkeypatch.delenv("MMFM_FAULTS")
    one = subprocess.run([sys.executable, "-m", "mmfm.cli", "pretrain", "--out", str(tmp_path / "one"), *flags],
                         env=dict(os.environ, XLA_FLAGS=host_devices(2)), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    a = monitor.read_jsonl(tmp_path / "two" / "metrics.jsonl")
    b = monitor.read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, n + 1))  # no step logged twice
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in a], [r["grad_norm"] for r in b], rtol=1e-4)
