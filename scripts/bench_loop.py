"""Benchmark: the full `pretrain` loop's steps/s against the same jitted step on batches already on the devices.

    python scripts/bench_loop.py --json out/bench/bench_loop.json [--steps 60 --log-every 10 --batch 32 ...]

One process, one simulated cohort. The *raw* rate is the training step `pretrain` builds (same config, shapes,
mesh, optimizer) dispatched back to back on batches placed on the devices beforehand, synchronised once per
block of --log-every steps: what the devices could do with a host that never makes them wait. The *loop* rate
is `pretrain()` itself — loader, host→device transfer, NaN guard, metrics, logging — timed between consecutive
metrics records (the first interval, with compilation, is dropped; checkpoints and evaluation fall outside the
timed steps). Raw blocks run before and after the loop in the same process, so machine load hits both alike;
medians are reported and `ratio` = loop / raw. Works against any mmfm checkout that has `pretrain(config,
out_dir, resume)` (run it with PYTHONPATH=<checkout> to measure an older loop).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import jax

from mmfm.data.cohort import Cohort
from mmfm.data.loader import TileBagLoader
from mmfm.simulate import SimConfig, simulate_cohort
from mmfm.data.splits import split_cases
from mmfm.train import config as tconfig, loop, monitor, optim, sharding

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown"


def run_config(cohort: Path, a) -> tconfig.RunConfig:
    return tconfig.load_config(CONFIG, [
        f"data.cohort={cohort}", "data.modalities=[slide, rna]", f"loader.batch_size={a.batch}",
        f"loader.tiles_per_slide={a.tiles}", f"loader.n_genes={a.genes}", f"train.steps={a.steps}",
        f"train.log_every={a.log_every}", f"train.ckpt_every={a.steps}", "train.eval_every=0",
        "train.progress=false", f"model.embed_dim={a.width}", f"model.slide.abmil.hidden={a.width}",
        f"model.slide.abmil.attn_dim={a.width // 2}", f"model.rna.hidden={a.width}"])


def raw_blocks(cfg: tconfig.RunConfig, cohort: Path, blocks: int, block: int) -> list[float]:
    """Steps/s of the jitted step on device-resident batches, per block (one sync per block)."""
    t = cfg.train
    c = Cohort.open(cfg.data.cohort)
    train_ids, _, _ = split_cases(c.cases.index, cfg.data.heldout_fraction, cfg.data.split_seed,
                                  val_fraction=cfg.data.val_fraction)
    mesh = sharding.make_mesh(t.mesh)
    with TileBagLoader(c, cfg.loader, train_ids, cfg.data.modalities) as loader:
        bsh = sharding.batch_sharding(mesh)
        batches = [sharding.global_batch(loader.batch(s), bsh) for s in range(4)]
        ts = loop.init_state(loop.build_module(cfg, loader.shapes, loader.modalities), optim.make_optimizer(t),
                             mesh, t.axis_rules, t.shard_min_size)
    step = loop.make_train_step(ts, loop.objective_loss(cfg, mesh), mesh, lr_schedule=optim.schedule(t),
                                grad_accum=t.grad_accum)
    state = ts.state
    state, m = step(state, batches[0])
    jax.block_until_ready(m)
    rates = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for i in range(block):
            state, m = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, m))
        rates.append(block / (time.perf_counter() - t0))
    return rates


def loop_intervals(cfg: tconfig.RunConfig, out: Path, device_prefetch: int | None) -> list[float]:
    """Steps/s of `pretrain()` between consecutive metrics records (first interval dropped)."""
    stamps = []
    original = monitor.MetricsWriter.log

    def log(self, step, m, file="metrics.jsonl", prefix="train"):
        if file == "metrics.jsonl":
            stamps.append((step, time.perf_counter()))
        return original(self, step, m, file=file, prefix=prefix)

    monitor.MetricsWriter.log = log
    try:
        kwargs = {"device_prefetch": device_prefetch} if device_prefetch is not None else {}
        loop.pretrain(cfg, out, **kwargs)
    finally:
        monitor.MetricsWriter.log = original
    stamps = [s for s in stamps if s[0] % cfg.train.log_every == 0]  # drop the step-1 record
    return [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(stamps[1:], stamps[2:])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--steps", type=int, default=80, help="loop steps (the first log interval is not timed)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--dim", type=int, default=128, help="tile feature dim of the simulated cohort")
    ap.add_argument("--genes", type=int, default=256)
    ap.add_argument("--width", type=int, default=128, help="embed / ABMIL / RNA hidden width")
    ap.add_argument("--cases", type=int, default=160)
    ap.add_argument("--device-prefetch", type=int, default=None, help="pretrain(device_prefetch=...) (default: the loop's)")
    a = ap.parse_args(argv)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        cohort = Path(tmp) / "cohort"
        simulate_cohort(cohort, SimConfig(n_cases=a.cases, feature_dim=a.dim, n_genes=max(a.genes, 64),
                                          bag_size_median=2 * a.tiles, bag_size_max=8 * a.tiles))
        cfg = run_config(cohort, a)
        blocks = max(2, (a.steps // a.log_every - 1) // 2)
        raw = raw_blocks(cfg, cohort, blocks, a.log_every)
        looped = loop_intervals(cfg, Path(tmp) / "run", a.device_prefetch)
        raw += raw_blocks(cfg, cohort, blocks, a.log_every)
    raw_rate, loop_rate = statistics.median(raw), statistics.median(looped)
    out = {
        "ratio": loop_rate / raw_rate, "loop_steps_per_s": loop_rate, "raw_steps_per_s": raw_rate,
        "loop_intervals_steps_per_s": looped, "raw_blocks_steps_per_s": raw,
        "has_device_prefetch": "device_prefetch" in inspect.signature(loop.pretrain).parameters,
        "config": {k: v for k, v in vars(a).items() if k != "json"},
        "cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
        "backend": jax.default_backend(), "devices": len(jax.devices()),
        "device_kind": jax.devices()[0].device_kind,
        "train": dataclasses.asdict(cfg.train)["mesh"],
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("ratio", "loop_steps_per_s", "raw_steps_per_s", "cpu", "cores")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
