"""What the optimizer updates and how it is born sharded: shared by the training loop and inference loading."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import optax
from flax import nnx

from mmfm.data.batch import BatchShapes
from mmfm.models import MultimodalModel
from mmfm.objectives import LogitParams
from mmfm.train.checkpoint import abstract_target
from mmfm.train.config import RunConfig
from mmfm.train.sharding import state_shardings


class TrainModule(nnx.Module):
    """What the optimizer updates: the encoders plus the objective's per-pair (t′, b)."""

    def __init__(self, model: nnx.Module, logit: nnx.Module):
        self.model = model
        self.logit = logit


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


def build_module(cfg: RunConfig, shapes: BatchShapes, modalities: Sequence[str]) -> Callable[[], TrainModule]:
    def build():
        rngs = nnx.Rngs(jax.random.key(cfg.train.seed, impl=cfg.train.prng_impl))
        return TrainModule(MultimodalModel(cfg.model, shapes, modalities, rngs=rngs),
                           LogitParams(cfg.objective, tuple(modalities), rngs=rngs))
    return build
