"""The pretraining loop: sharded multimodal contrastive pretraining of slide/omics/text encoders.

Python API: `pretrain(config, out_dir, resume=False) -> PretrainResult` (command: `mmfm pretrain`).

The step is the functional NNX loop (split once, jit over (graphdef, state), return the new
state) with explicit in/out shardings and donation; the batch is split over every device and fed
per process with `make_array_from_process_local_data`. What the run directory receives is listed in
`mmfm.train.rundir`, which also loads a finished run for inference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from mmfm.data.cohort import Cohort
from mmfm.data.loader import TileBagLoader
from mmfm.data.splits import split_cases
from mmfm.objectives import multimodal_loss
from mmfm.train import evaluate, rundir
from mmfm.train.checkpoint import Checkpointer, gather_json
from mmfm.train.config import ConfigError, RunConfig, load_config
from mmfm.train.metrics import MetricsWriter, check_finite
from mmfm.train.optim import make_optimizer, schedule
from mmfm.train.sharding import BATCH_AXES, batch_sharding, global_batch, make_mesh, replicated
from mmfm.train.state import TrainState, build_module, init_state

FLOAT_INPUTS = ("slide/features", "rna/values", "protein/values", "mutation/values")  # NaN injection targets


def _micro_batches(batch: dict, n: int) -> dict:
    """[B, ...] → [n, B/n, ...] with micro-batch j = rows j::n, so each stays evenly sharded."""
    return {k: jnp.swapaxes(v.reshape(v.shape[0] // n, n, *v.shape[1:]), 0, 1) for k, v in batch.items()}


def make_train_step(ts: TrainState, loss_fn, mesh, *, lr_schedule, grad_accum: int = 1):
    """Jitted `(state, batch) -> (state, metrics)`; `loss_fn(module, batch) -> (loss, dict)`.

    Gradient accumulation scans over micro-batches (contrastive negatives come from the micro-
    batch, as with optax.MultiSteps). Mixed precision is the model's own `model.compute_dtype`
    (bf16 activations, fp32 master weights); gradients, optimizer and loss stay fp32.
    """
    graphdef = ts.graphdef

    def step(state, batch):
        module, opt = nnx.merge(graphdef, state)
        mdef, params, rest = nnx.split(module, nnx.Param, ...)
        lr = lr_schedule(opt.step[...])

        def micro(params, rest, mb):
            m = nnx.merge(mdef, params, rest, copy=True)  # fresh Variables at this trace level
            loss, metrics = loss_fn(m, mb)
            return loss.astype(jnp.float32), (metrics, nnx.state(m, nnx.Not(nnx.Param)))

        grad_fn = jax.value_and_grad(micro, has_aux=True)
        if grad_accum == 1:
            (loss, (metrics, rest)), grads = grad_fn(params, rest, batch)
        else:
            def body(carry, mb):
                acc, rest = carry
                (loss, (metrics, rest)), g = grad_fn(params, rest, mb)
                return (jax.tree.map(jnp.add, acc, g), rest), (loss, metrics)

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, rest), (losses, metrics) = jax.lax.scan(body, (zeros, rest), _micro_batches(batch, grad_accum))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            loss, metrics = losses.mean(), jax.tree.map(lambda x: x.mean(0), metrics)
        nnx.update(module, rest)
        opt.update(module, grads)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), lr=lr)
        return nnx.state((module, opt)), metrics

    return jax.jit(step, in_shardings=(ts.shardings, batch_sharding(mesh)),
                   out_shardings=(ts.shardings, replicated(mesh)), donate_argnums=0)


def objective_loss(cfg: RunConfig, mesh):
    """The production loss: encoders → L2-normalised embeddings → multimodal objective.

    objective.impl 'gather'/'ring' run the objective inside shard_map over every device of the mesh
    (the recipes' choice); 'global' leaves the cross-device gathers to XLA."""
    def loss_fn(module, batch):
        emb, norms = module.model(batch, deterministic=False, with_norms=True)
        present = {m: batch[f"{m}/present"] for m in emb}
        return multimodal_loss(emb, present, batch["case_index"], module.logit, cfg.objective,
                               mesh=mesh, axis=BATCH_AXES, norms=norms)
    return loss_fn


# ----------------------------------------------------------------------------- pretrain

@dataclass
class PretrainResult:
    run_dir: Path
    step: int
    metrics: dict                 # last logged training metrics
    eval: dict | None             # last held-out evaluation
    checkpoints: list[int]


def _host_metrics(metrics) -> dict:
    flat = {}
    for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(metrics))[0]:
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        flat[key] = float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
    return flat


def pretrain(config: RunConfig | str | Path, out_dir: str | Path, resume: bool = False) -> PretrainResult:
    """Train per `config`; resumable (`resume=True` continues from the latest checkpoint)."""
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    t = cfg.train
    out = Path(out_dir).absolute()
    if not cfg.data.cohort:
        raise ConfigError("data.cohort: required (path of a cohort directory)")
    mesh = make_mesh(t.mesh)
    if (cfg.loader.batch_size // t.grad_accum) % mesh.size:
        raise ConfigError(f"loader.batch_size / train.grad_accum = {cfg.loader.batch_size // t.grad_accum} "
                          f"must be a multiple of the {mesh.size} devices")
    cohort = Cohort.open(cfg.data.cohort)
    train_ids, held_ids = split_cases(cohort.cases.index, cfg.data.heldout_fraction, cfg.data.split_seed)
    try:
        loader = TileBagLoader(cohort, cfg.loader, train_ids, cfg.data.modalities,
                               process_index=jax.process_index(), process_count=jax.process_count())
    except ValueError as e:  # too few usable cases for a batch, a modality no case has
        raise ConfigError(f"{cfg.data.cohort}: {e}") from e
    try:  # only now: a config or cohort error leaves no directory behind
        rundir.prepare(out, resume)  # every process checks before any process writes
        multihost_utils.sync_global_devices("mmfm:run-dir-checked")
        rundir.write_run_files(out, cfg, mesh, resume)
    except Exception:
        loader.close()
        raise
    shapes = loader.shapes
    modalities = loader.modalities
    if jax.process_index() == 0:
        rundir.write_splits(out, train_ids, held_ids, cfg.data.heldout_fraction, cfg.data.split_seed)
        rundir.write_shapes(out, shapes)
        rundir.save_transforms(out / "transforms", loader.transforms)

    tx = make_optimizer(t)
    ts = init_state(build_module(cfg, shapes, modalities), tx, mesh, t.axis_rules, t.shard_min_size)
    ckpt = Checkpointer(out, t)
    start = 0
    if resume and ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        state, loader_state, _ = ckpt.restore(start, ts.abstract)
        # re-materialise through an identity jit so the restored buffers are donatable
        ts.state = jax.jit(lambda s: s, out_shardings=ts.shardings)(state)
        loader.set_state(loader_state)

    step_fn = make_train_step(ts, objective_loss(cfg, mesh), mesh, lr_schedule=schedule(t),
                              grad_accum=t.grad_accum)
    bsh = batch_sharding(mesh)
    last, last_eval, evaluator, writer = {}, None, None, None
    try:
        if t.eval_every > 0 and held_ids:
            evaluator = evaluate.HeldOutEvaluator(cohort, cfg, held_ids, loader, ts, mesh, modalities)
        writer = MetricsWriter(out, t.steps, start, progress=t.progress)
        it = iter(loader)
        tick = time.perf_counter()
        for s in range(start, t.steps):
            step = s + 1
            host = next(it)
            if step == t.inject_nan_step:
                host = dict(host)
                key = "slide/features" if "slide/features" in host else next(k for k in host if k in FLOAT_INPUTS)
                host[key] = np.full_like(host[key], np.nan)
            ts.state, metrics = step_fn(ts.state, global_batch(host, bsh))
            m = _host_metrics(metrics)
            check_finite(m, step)
            now = time.perf_counter()
            dt, tick = now - tick, now
            n_proc = jax.process_count()
            m["step_time_s"] = dt
            if "slide/tile_mask" in host:
                m["tiles_per_s"] = float(np.sum(host["slide/tile_mask"])) * n_proc / dt
            m["cases_per_s"] = float(np.sum(np.asarray(host["case_index"]) >= 0)) * n_proc / dt
            writer.advance()
            if step % t.log_every == 0 or step == t.steps or step == 1:
                writer.log(step, m)
            last = m
            ev = None
            if evaluator is not None and (step % t.eval_every == 0 or step == t.steps):
                ev = evaluator(ts.state)
                last_eval = ev
                writer.log(step, ev, file="eval.jsonl", prefix="eval")
            if step % t.ckpt_every == 0 or step == t.steps or ev is not None:
                score = {t.best_metric: ev[t.best_metric]} if (ev is not None and t.best_metric in ev) else None
                ckpt.save(step, ts.state, gather_json(loader.get_state()), {"seed": t.seed}, metrics=score)
            tick = time.perf_counter()  # evaluation and checkpointing are not training time
    finally:
        if writer is not None:
            writer.close()
        ckpt.close()
        loader.close()
        if evaluator is not None:
            evaluator.close()
    return PretrainResult(out, t.steps, last, last_eval, ckpt.all_steps())
