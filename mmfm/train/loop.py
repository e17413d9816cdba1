"""`mmfm pretrain`: sharded multimodal contrastive pretraining of slide/omics/text encoders.

    mmfm pretrain --config configs/demo.yaml --out RUN_DIR [--set train.steps=50 ...] [--resume]

Python API: `pretrain(config, out_dir, resume=False) -> PretrainResult` and
`load_for_inference(run_dir, step=None) -> (model, run_config, transforms)`.

The step is the functional NNX loop (split once, jit over (graphdef, state), return the new
state) with explicit in/out shardings and donation; the batch is split over every device and fed
per process with `make_array_from_process_local_data`. RUN_DIR receives: config.yaml (resolved),
env.json (package versions, devices), splits.json (train / held-out cases), shapes.json,
transforms/ (fitted omics transforms = gene vocabulary), checkpoints/, metrics.jsonl,
eval.jsonl, tb/ (TensorBoard).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mmfm.data.batch import BatchShapes
from mmfm.io import write_json, write_text
from mmfm.train import evaluate
from mmfm.train.checkpoint import Checkpointer, abstract_target, gather_json
from mmfm.train.config import ConfigError, RunConfig, dump_config, load_config, to_dict
from mmfm.train.metrics import MetricsWriter, NonFiniteError, check_finite, read_jsonl
from mmfm.train.optim import make_optimizer, schedule
from mmfm.train.sharding import (BATCH_AXES, batch_sharding, global_batch, initialize_distributed, make_mesh,
                                 replicated, state_shardings)

RESUME_MAY_CHANGE = ("train.steps", "train.progress", "train.async_checkpoint", "train.log_every",
                     "train.eval_every", "train.ckpt_every", "train.keep_last")  # never the numerics
FLOAT_INPUTS = ("slide/features", "rna/values", "protein/values", "mutation/values")  # NaN injection targets


class TrainModule(nnx.Module):
    """What the optimizer updates: the encoders plus the objective's per-pair (t′, b)."""

    def __init__(self, model: nnx.Module, logit: nnx.Module):
        self.model = model
        self.logit = logit


# ----------------------------------------------------------------------------- state

@dataclass
class TrainState:
    graphdef: nnx.GraphDef
    state: nnx.State          # (TrainModule, nnx.Optimizer), sharded by `shardings`
    shardings: nnx.State
    abstract: nnx.State       # ShapeDtypeStructs carrying `shardings` (restore target)


def init_state(build: Callable[[], TrainModule], tx: optax.GradientTransformation, mesh,
               rules, min_size: int) -> TrainState:
    """Parameters and optimizer state born sharded (jit with out_shardings): no host copy.

    Built with no mesh in context, so the models keep their logical annotations without eager
    sharding; the shardings come from those annotations through `rules` (see sharding.py).
    """
    def create():
        module = build()
        return module, nnx.Optimizer(module, tx, wrt=nnx.Param)

    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    shardings = state_shardings(abstract, mesh, rules, min_size)
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return TrainState(graphdef, state, shardings, abstract_target(abstract, shardings))


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
    from mmfm.objectives import multimodal_loss

    def loss_fn(module, batch):
        emb, norms = module.model(batch, deterministic=False, with_norms=True)
        present = {m: batch[f"{m}/present"] for m in emb}
        return multimodal_loss(emb, present, batch["case_index"], module.logit, cfg.objective,
                               mesh=mesh, axis=BATCH_AXES, norms=norms)
    return loss_fn


def build_module(cfg: RunConfig, shapes: BatchShapes, modalities) -> Callable[[], TrainModule]:
    from mmfm.models import MultimodalModel
    from mmfm.objectives import LogitParams

    def build():
        rngs = nnx.Rngs(jax.random.key(cfg.train.seed, impl=cfg.train.prng_impl))
        return TrainModule(MultimodalModel(cfg.model, shapes, rngs=rngs),
                           LogitParams(cfg.objective, tuple(modalities), rngs=rngs))
    return build


# ----------------------------------------------------------------------------- run directory

def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("mmfm", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "h5py", "anndata"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _write_run_files(out: Path, cfg: RunConfig, mesh, resume: bool) -> None:
    if jax.process_index() != 0:
        return
    text = dump_config(cfg)
    prev = out / "config.yaml"
    if resume and prev.exists():
        import yaml

        old, new = _flat(yaml.safe_load(prev.read_text())), _flat(to_dict(cfg))
        diff = sorted(k for k in set(old) | set(new)
                      if old.get(k) != new.get(k) and k not in RESUME_MAY_CHANGE)
        if diff:
            raise ConfigError(f"{prev}: --resume with a different config ({', '.join(diff)}); "
                              f"only {', '.join(RESUME_MAY_CHANGE)} may change")
    write_text(prev, text)
    write_json(out / "env.json", {
        "versions": _versions(), "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
        "mesh": {k: int(v) for k, v in mesh.shape.items()}})


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def split_cases(case_ids, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Patient-level held-out split (a case is a patient): deterministic in `seed`."""
    ids = sorted(map(str, case_ids))
    n_held = int(round(fraction * len(ids)))
    order = np.random.default_rng(seed).permutation(len(ids))
    held = sorted(ids[i] for i in order[:n_held])
    train = sorted(ids[i] for i in order[n_held:])
    return train, held


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
    from mmfm.data.cohort import Cohort
    from mmfm.data.loader import TileBagLoader

    cfg = config if isinstance(config, RunConfig) else load_config(config)
    t = cfg.train
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.data.cohort:
        raise ConfigError("data.cohort: required (path of a cohort directory)")
    mesh = make_mesh(t.mesh)
    if (cfg.loader.batch_size // t.grad_accum) % mesh.size:
        raise ConfigError(f"loader.batch_size / train.grad_accum = {cfg.loader.batch_size // t.grad_accum} "
                          f"must be a multiple of the {mesh.size} devices")
    _write_run_files(out, cfg, mesh, resume)

    cohort = Cohort.open(cfg.data.cohort)
    train_ids, held_ids = split_cases(cohort.cases.index, cfg.data.heldout_fraction, cfg.data.split_seed)
    if jax.process_index() == 0:
        write_json(out / "splits.json", {"train": train_ids, "heldout": held_ids,
                                         "heldout_fraction": cfg.data.heldout_fraction, "seed": cfg.data.split_seed})
    if cfg.loader.report_cache and "report" in cfg.model.modalities and cohort.reports is not None:
        from mmfm.data.report_cache import resolve_folder
        from mmfm.models.text_cache import fill_report_cache

        fill_report_cache(cohort, cfg.model.report, resolve_folder(cohort.root, cfg.loader.report_cache),
                          cfg.loader.report_max_len)
    loader = TileBagLoader(cohort, cfg.loader, train_ids, process_index=jax.process_index(),
                           process_count=jax.process_count())
    shapes = loader.shapes
    modalities = tuple(m for m in cfg.model.modalities if m in loader.modalities)
    if jax.process_index() == 0:
        write_json(out / "shapes.json", dataclasses.asdict(shapes))
        save_transforms(out / "transforms", loader)

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


# ----------------------------------------------------------------------------- inference

def save_transforms(directory: Path, loader) -> None:
    """The loader's fitted omics transforms (gene vocabulary, scaling) so inference matches training."""
    directory.mkdir(parents=True, exist_ok=True)
    names = {}
    for name, tr in (getattr(loader, "transforms", None) or {}).items():
        if tr is not None:
            tr.save(directory / name)
            names[name] = name
    write_json(directory / "index.json", names)


def load_transforms(directory: Path) -> dict:
    from mmfm.data.omics import OmicsTransform

    index = directory / "index.json"
    if not index.exists():
        return {}
    return {name: OmicsTransform.load(directory / fn) for name, fn in json.loads(index.read_text()).items()}


def best_step(run_dir: Path, metric: str, mode: str, available: list[int]) -> int:
    rows = [r for r in read_jsonl(run_dir / "eval.jsonl") if r.get("step") in available and metric in r]
    if not rows:
        raise ValueError(f"{run_dir}: no checkpoint with eval metric {metric!r}")
    pick = max if mode == "max" else min
    return pick(rows, key=lambda r: r[metric])["step"]


def load_for_inference(run_dir: str | Path, step: int | str | None = None, mesh=None):
    """→ (model, run_config, transforms): the trained `MultimodalModel` (eval with deterministic=True),
    the resolved RunConfig and the fitted omics transforms ({'rna': OmicsTransform, ...}).

    `step`: None = latest checkpoint, an int, or "best" (train.best_metric in eval.jsonl). The
    model is restored onto `mesh` (default: every local device on the data axis), whatever mesh
    it was trained on.
    """
    from mmfm.models.multimodal import INPUTS

    run_dir = Path(run_dir).absolute()
    cfg = load_config(run_dir / "config.yaml")
    shapes = BatchShapes(**json.loads((run_dir / "shapes.json").read_text()))
    ckpt = Checkpointer(run_dir, cfg.train, read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no finished checkpoint")
    if step is None:
        step = steps[-1]
    elif step == "best":
        step = best_step(run_dir, cfg.train.best_metric, cfg.train.best_mode, steps)
    elif step not in steps:
        raise ValueError(f"{run_dir}: no checkpoint for step {step} (have {steps})")
    if mesh is None:
        mesh = make_mesh(dataclasses.replace(cfg.train.mesh, data=-1, fsdp=1), jax.local_devices())
    modalities = tuple(m for m in cfg.model.modalities if getattr(shapes, INPUTS[m][1]))
    ts = init_state(build_module(cfg, shapes, modalities), make_optimizer(cfg.train), mesh,
                    cfg.train.axis_rules, cfg.train.shard_min_size)
    state = ckpt.restore_state(step, ts.abstract)
    ckpt.close()
    module, _ = nnx.merge(ts.graphdef, state)
    return module.model, cfg, load_transforms(run_dir / "transforms")


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=50 (value parsed as YAML)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id")


def run(args) -> int:
    from mmfm.data.cohort import CohortError

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    try:
        cfg = load_config(args.config, args.set)
        res = pretrain(cfg, args.out, resume=args.resume)
    except ConfigError as e:
        print(f"mmfm pretrain: config error: {e}", file=sys.stderr)
        return 2
    except CohortError as e:
        print(f"mmfm pretrain: cohort error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"mmfm pretrain: {e}", file=sys.stderr)
        return 3
    if jax.process_index() == 0:
        print(json.dumps({"run_dir": str(res.run_dir), "step": res.step, "loss": res.metrics.get("loss"),
                          "eval": res.eval, "checkpoints": res.checkpoints}))
    return 0
