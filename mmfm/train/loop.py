"""The pretraining loop: sharded multimodal contrastive pretraining of slide/omics/text encoders.

Python API: `pretrain(config, out_dir, resume=False, device_prefetch=2) -> PretrainResult` (command: `mmfm pretrain`).

The step is the functional NNX loop (split once, jit over (graphdef, state), return the new
state) with explicit in/out shardings and donation; the batch is split over every device and fed
per process with `make_array_from_process_local_data`. What the run directory receives is listed in
`mmfm.train.rundir`, which also loads a finished run for inference.

The host never makes the devices wait. Batches are put on the devices `device_prefetch` steps ahead by a
background thread (`mmfm.train.prefetch`); metrics stay on the devices and are fetched only for log
steps, one step late (step s's metrics are read once step s+1 is queued behind them); the NaN guard runs
on the devices every step (`NonFiniteWatch`) and is read with those metrics and before every evaluation
and checkpoint, so no non-finite state is ever saved and the run stops with exit 3 at the first bad step,
the last good checkpoint kept. Checkpoints stay asynchronous. A stop signal (`mmfm.train.preempt`)
ends the run after the current step with a checkpoint.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from mmfm import faults
from mmfm.data.cohort import Cohort
from mmfm.data.loader import TileBagLoader
from mmfm.data.splits import pretrain_split
from mmfm.objectives import adversary, multimodal_loss
from mmfm.train import evaluate, rundir
from mmfm.train.checkpoint import Checkpointer, gather_json
from mmfm.train.config import ConfigError, RunConfig, load_config
from mmfm.train.monitor import MetricsWriter, NonFiniteWatch, check_finite
from mmfm.train.optim import make_optimizer, schedule
from mmfm.train.paths import run_path
from mmfm.train.preempt import Preempted, StopRequest
from mmfm.train.prefetch import DevicePrefetcher
from mmfm.train.sharding import BATCH_AXES, batch_sharding, make_mesh, replicated
from mmfm.train.state import TrainState, abstract_state, build_module, materialise, pretrained_inputs

FLOAT_INPUTS = ("slide/features", "rna/values", "protein/values", "mutation/values")  # NaN injection targets


def _micro_batches(batch: dict, n: int) -> dict:
    """[B, ...] → [n, B/n, ...] with micro-batch j = rows j::n, so each stays evenly sharded."""
    return {k: jnp.swapaxes(v.reshape(v.shape[0] // n, n, *v.shape[1:]), 0, 1) for k, v in batch.items()}


def make_train_step(ts: TrainState, loss_fn, mesh, *, lr_schedule, grad_accum: int = 1):
    """Jitted `(state, batch) -> (state, metrics)`; `loss_fn(module, batch, step) -> (loss, dict)`, `step` the
    number of optimizer updates done (int32 scalar; for loss-side schedules).

    Gradient accumulation scans over micro-batches (contrastive negatives come from the micro-
    batch, as with optax.MultiSteps). Mixed precision is the model's own `model.compute_dtype`
    (bf16 activations, fp32 master weights); gradients, optimizer and loss stay fp32.
    """
    graphdef = ts.graphdef

    def step(state, batch):
        module, opt = nnx.merge(graphdef, state)
        mdef, params, rest = nnx.split(module, nnx.Param, ...)
        n_updates = opt.step[...]
        lr = lr_schedule(n_updates)

        def micro(params, rest, mb):
            m = nnx.merge(mdef, params, rest, copy=True)  # fresh Variables at this trace level
            loss, metrics = loss_fn(m, mb, n_updates)
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
    (the recipes' choice); 'global' leaves the cross-device gathers to XLA. With `objective.site_adversary`,
    the gradient-reversed site head's cross-entropy is added (`mmfm.objectives.adversary`)."""
    o = cfg.objective

    def loss_fn(module, batch, step):
        emb, norms = module.model(batch, deterministic=False, with_norms=True)
        present = {m: batch[f"{m}/present"] for m in emb}
        loss, diag = multimodal_loss(emb, present, batch["case_index"], module.logit, o, mesh=mesh,
                                     axis=BATCH_AXES, norms=norms, site=batch.get("site_index"))
        if module.site_head is not None:
            lam = adversary.schedule(step, o.site_adversary, o.site_adversary_warmup)
            logits = module.site_head(adversary.grad_reverse(emb["slide"], lam), deterministic=False,
                                      normalize=False)
            site_loss, site_diag = adversary.site_loss(logits, batch["site_index"],
                                                       present["slide"] & (batch["case_index"] >= 0))
            loss, diag = loss + site_loss, dict(diag, **site_diag, **{"site_adv/lambda": lam})
        return loss, diag
    return loss_fn


# ----------------------------------------------------------------------------- pretrain

@dataclass
class PretrainResult:
    run_dir: epath.Path
    step: int
    metrics: dict                 # last logged training metrics
    eval: dict | None             # last held-out evaluation
    checkpoints: list[int]


def _fresh_state(ts: TrainState, build, tx, inputs, init_weights) -> nnx.State:
    """The initial state of the abstract `ts` (with `train.init_slide_encoder`'s weights placed)."""
    ts = TrainState(ts.graphdef, materialise(ts, build, tx, inputs), ts.shardings, ts.abstract)
    if init_weights is not None:
        from mmfm.train.export import place_weights

        place_weights(ts, init_weights)
    return ts.state


def _host_metrics(metrics) -> dict:
    flat = {}
    for path, v in jax.tree_util.tree_flatten_with_path(metrics)[0]:
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        flat[key] = float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
    return flat


def _inject_nan(step: int):
    """Fault injection (`train.inject_nan_step`): NaN tile features (or another float input) at that step."""
    def prepare(s, host):
        if s != step:
            return host
        host = dict(host)
        key = "slide/features" if "slide/features" in host else next(k for k in host if k in FLOAT_INPUTS)
        host[key] = np.full_like(host[key], np.nan)
        return host
    return prepare


class _Logs:
    """Log steps whose metrics are still on the devices, fetched one step late, with the throughput of their
    interval: wall time between fetches (evaluation and checkpointing excluded), tiles and cases counted on
    the host as the batches were made."""

    def __init__(self, writer: MetricsWriter, watch: NonFiniteWatch, step: int):
        self.writer, self.watch, self.pending, self.last = writer, watch, [], {}
        self.n_proc = jax.process_count()
        self.restart(step)

    def restart(self, step: int) -> None:
        self.t, self.step, self.tiles, self.cases, self.has_slides = time.perf_counter(), step, 0, 0, False

    def count(self, item) -> None:
        self.tiles += item.tiles
        self.cases += item.cases
        self.has_slides |= "slide/tile_mask" in item.batch

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, metrics, self.watch.snapshot(), self.tiles, self.cases))
        self.tiles = self.cases = 0

    def fetch(self) -> None:
        """Write the pending records; raise `NonFiniteError` at the first bad step (records before it kept)."""
        pending, self.pending = self.pending, []
        for step, metrics, snap, tiles, cases in pending:
            host, (first, values) = jax.device_get((metrics, snap))
            if first:
                check_finite({k: float(v) for k, v in values.items()}, int(first))
            now = time.perf_counter()
            dt = max(now - self.t, 1e-9)
            m = _host_metrics(host)
            m["step_time_s"] = dt / (step - self.step)
            if self.has_slides:
                m["tiles_per_s"] = tiles * self.n_proc / dt
            m["cases_per_s"] = cases * self.n_proc / dt
            self.writer.log(step, m)
            self.last = m
            self.t, self.step = now, step


def close_all(closers, failing: bool) -> None:
    """Run every closer. While an error propagates (`failing`), a closer's own error (often the same full disk
    or lost file system) is logged, not raised, so the first error is the one the user sees."""
    first = None
    for close in closers:
        if not close:
            continue
        try:
            close()
        except Exception as e:
            if failing:
                logging.getLogger(__name__).warning("while stopping after an error: %s", e)
            elif first is None:
                first = e
    if first is not None:
        raise first


def pretrain(config: RunConfig | str | Path, out_dir, resume: rundir.Resume = False, *,
             device_prefetch: int = 2) -> PretrainResult:
    """Train per `config` into `out_dir` (a path or `gs://…` URL).

    `resume`: False = a new run (the directory must be new or empty); True / "auto" = continue from the newest
    complete checkpoint, or start fresh when there is none. `device_prefetch`: batches put on the devices ahead of
    the step (0 = none). Raises `NonFiniteError` (NaN/inf; last good checkpoint kept) and `Preempted` (a stop
    signal; checkpoint written).
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    t = cfg.train
    out = run_path(out_dir)
    resume = rundir.resume_flag(resume)
    if not cfg.data.cohort:
        raise ConfigError("data.cohort: required (path of a cohort directory)")
    mesh = make_mesh(t.mesh)
    if (cfg.loader.batch_size // t.grad_accum) % mesh.size:
        raise ConfigError(f"loader.batch_size / train.grad_accum = {cfg.loader.batch_size // t.grad_accum} "
                          f"must be a multiple of the {mesh.size} devices")
    cohort = Cohort.open(cfg.data.cohort)
    try:
        train_ids, val_ids, held_ids = pretrain_split(cohort.cases, cfg.data)
    except ValueError as e:
        raise ConfigError(f"data.split_by_site: {cfg.data.cohort}/cases.csv: {e}") from e
    if cfg.loader.report_cache and "report" in cfg.data.modalities and cohort.reports is not None:
        from mmfm.data.report_cache import resolve_folder
        from mmfm.models.text_cache import fill_report_cache

        fill_report_cache(cohort, cfg.model.report, resolve_folder(cohort.root, cfg.loader.report_cache),
                          cfg.loader.report_max_len)
    try:
        loader = TileBagLoader(cohort, cfg.loader, train_ids, cfg.data.modalities,
                               process_index=jax.process_index(), process_count=jax.process_count())
    except ValueError as e:  # too few usable cases for a batch, a modality no case has
        raise ConfigError(f"{cfg.data.cohort}: {e}") from e
    try:
        build = build_module(cfg, loader.shapes, loader.modalities)  # checks objective.site_adversary's sites
    except ValueError as e:
        loader.close()
        raise ConfigError(f"{cfg.data.cohort}: {e}") from e
    init_weights = None  # checked against model.slide before the run directory is touched; unused on resume
    if t.init_slide_encoder:
        from mmfm.train.export import slide_weights

        try:
            init_weights = slide_weights(t.init_slide_encoder, cfg.model.slide, loader.shapes.feature_dim)
        except Exception:
            loader.close()
            raise
    lock = ckpt = None
    try:  # only now: a config or cohort error leaves no directory behind
        rundir.prepare(out, resume)  # every process checks before any process writes
        lock = rundir.lock(out)  # a second job into a live run directory stops here, before it writes
        multihost_utils.sync_global_devices("mmfm:run-dir-checked")
        rundir.write_run_files(out, cfg, mesh, resume)
    except Exception:
        loader.close()
        if lock is not None:
            lock.release()
        raise
    last_eval, evaluator, writer, feed = None, None, None, None
    logs, failed = None, True
    beside = ThreadPoolExecutor(1, thread_name_prefix="mmfm-init")
    try:
        shapes = loader.shapes
        modalities = loader.modalities
        if jax.process_index() == 0:
            rundir.write_splits(out, {"train": train_ids, "val": val_ids, "heldout": held_ids}, cfg.data)
            rundir.write_shapes(out, shapes)
            rundir.save_transforms(out / "transforms", loader.transforms)

        tx = make_optimizer(t)
        ckpt = Checkpointer(out, t)
        start, fresh = 0, None
        if resume and ckpt.latest_step() is not None:  # the checkpoint holds every value: nothing initialised
            ts = abstract_state(build, tx, mesh, t.axis_rules, t.shard_min_size, inputs={})
            start, (state, loader_state, _) = rundir.restore_newest_intact(ckpt, ts.abstract)
            # re-materialise through an identity jit so the restored buffers are donatable
            ts.state = jax.jit(lambda s: s, out_shardings=ts.shardings)(state)
            loader.set_state(loader_state)
        else:
            inputs = pretrained_inputs(cfg, modalities)
            ts = abstract_state(build, tx, mesh, t.axis_rules, t.shard_min_size, inputs)
            fresh = beside.submit(_fresh_state, ts, build, tx, inputs, init_weights)

        step_fn = make_train_step(ts, objective_loss(cfg, mesh), mesh, lr_schedule=schedule(t),
                                  grad_accum=t.grad_accum)
        if t.eval_every > 0 and val_ids:  # validation cases only: the held-out ones stay unseen until the probes
            evaluator = evaluate.HeldOutEvaluator(cohort, cfg, val_ids, loader, ts, mesh, modalities)
        writer = MetricsWriter(out, t.steps, start, progress=t.progress)
        watch = NonFiniteWatch()
        feed = DevicePrefetcher(loader, batch_sharding(mesh), depth=device_prefetch, start_step=start,
                                prepare=_inject_nan(t.inject_nan_step) if t.inject_nan_step > 0 else None)
        logs = _Logs(writer, watch, start)
        with StopRequest() as stop:
            for _ in range(start, t.steps):
                item = next(feed)
                step = item.step
                if fresh is not None:  # the step compiled on its first batch while the state is computed beside
                    step_fn = step_fn.lower(ts.abstract, item.batch).compile()
                    ts.state, fresh = fresh.result(), None
                ts.state, metrics = step_fn(ts.state, item.batch)
                faults.point("train.step", step)  # testing aid (mmfm.faults): a stop signal here stops after it
                watch.update(metrics, step)
                logs.count(item)
                logs.fetch()  # the previous log step's metrics: this step is already queued behind them
                if step % t.log_every == 0 or step == t.steps or step == 1:
                    logs.add(step, metrics)
                writer.advance()
                evaluate_now = evaluator is not None and (step % t.eval_every == 0 or step == t.steps)
                stop_now = stop.should_stop(step) and step < t.steps
                if not (evaluate_now or stop_now or step % t.ckpt_every == 0 or step == t.steps):
                    continue
                logs.fetch()
                watch.check()  # never evaluate or save a non-finite state
                ev = None
                if evaluate_now:
                    ev = last_eval = evaluator(ts.state)
                    writer.log(step, ev, file="eval.jsonl", prefix="eval")
                score = {t.best_metric: ev[t.best_metric]} if (ev is not None and t.best_metric in ev) else None
                ckpt.save(step, ts.state, gather_json(item.loader_state), {"seed": t.seed}, metrics=score)
                writer.flush()
                if stop_now:
                    ckpt.wait()
                    raise Preempted(step, stop.received, out)
                logs.restart(step)  # evaluation and checkpointing are not training time
            logs.fetch()
        failed = False
    finally:
        close_all([beside.shutdown, feed and feed.close, writer and writer.close, ckpt and ckpt.close, loader.close,
                   evaluator and evaluator.close, lock and lock.release], failing=failed)
    rundir.offer_trained(out, ts.graphdef, ts.state, mesh)  # a pipeline's next steps need not restore it
    return PretrainResult(out, t.steps, logs.last, last_eval, ckpt.all_steps())
