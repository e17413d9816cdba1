"""What the optimizer updates and how it is born sharded: shared by the training loop and inference loading."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import optax
from flax import nnx

from mmfm.data.batch import BatchShapes
from mmfm.models import MultimodalModel
from mmfm.models.heads import ProjectionHead
from mmfm.models.multimodal import pretrained_weights
from mmfm.objectives import LogitParams
from mmfm.train.checkpoint import abstract_target
from mmfm.train.config import RunConfig
from mmfm.train.sharding import state_shardings


class TrainModule(nnx.Module):
    """What the optimizer updates: the encoders plus the objective's per-pair (t′, b), and the adversarial site
    head when `objective.site_adversary` > 0 (`mmfm.objectives.adversary`; None otherwise)."""

    def __init__(self, model: nnx.Module, logit: nnx.Module, site_head: nnx.Module | None = None):
        self.model = model
        self.logit = logit
        self.site_head = site_head


@dataclass
class TrainState:
    graphdef: nnx.GraphDef
    state: nnx.State | None   # (TrainModule, nnx.Optimizer), sharded by `shardings`; None: abstract only
    shardings: nnx.State
    abstract: nnx.State       # ShapeDtypeStructs carrying `shardings` (restore target)


def abstract_state(build: Callable[..., TrainModule], tx: optax.GradientTransformation, mesh, rules,
                   min_size: int, inputs=None) -> TrainState:
    """The train state's structure, shardings and restore target, nothing computed (`state` is None): what
    restoring a checkpoint needs. `inputs`: the arguments `build` takes (see `init_state`); a restore passes `{}`
    to a `build_module` build: no encoder reads its pretrained weights, the checkpoint holds every value."""
    graphdef, abstract = nnx.split(nnx.eval_shape(_creator(build, tx), inputs))
    shardings = state_shardings(abstract, mesh, rules, min_size)
    return TrainState(graphdef, None, shardings, abstract_target(abstract, shardings))


def init_state(build: Callable[..., TrainModule], tx: optax.GradientTransformation, mesh,
               rules, min_size: int, inputs=None) -> TrainState:
    """Parameters and optimizer state born sharded (jit with out_shardings): no host copy.

    Built with no mesh in context, so the models keep their logical annotations without eager
    sharding; the shardings come from those annotations through `rules` (see sharding.py).
    `inputs` (weights read from files, see `pretrained_inputs`) enter the jit as arguments, `build(inputs)`:
    closed over, they would be compiled into the program as constants.
    """
    ts = abstract_state(build, tx, mesh, rules, min_size, inputs)
    ts.state = materialise(ts, build, tx, inputs)
    return ts


def materialise(ts: TrainState, build: Callable[..., TrainModule], tx: optax.GradientTransformation,
                inputs=None) -> nnx.State:
    """The state of the abstract `ts` computed (see `init_state`): the training loop runs it beside the train
    step's compile, which needs only the abstract state."""
    create = _creator(build, tx)
    return jax.jit(lambda inputs: nnx.split(create(inputs))[1], out_shardings=ts.shardings)(inputs)


def _creator(build, tx):
    def create(inputs):
        module = build() if inputs is None else build(inputs)
        return module, nnx.Optimizer(module, tx, wrt=nnx.Param)
    return create


def build_module(cfg: RunConfig, shapes: BatchShapes, modalities: Sequence[str]) -> Callable[..., TrainModule]:
    """`build(pretrained=None)`: the fresh TrainModule; `pretrained` as `pretrained_inputs` gives (`{}`: random
    encoders, a restore target's abstract build)."""
    o = cfg.objective
    if o.site_adversary > 0 and ("slide" not in modalities or shapes.n_sites < 2):
        raise ValueError(f"objective.site_adversary predicts the site from the slide embedding: it needs 'slide' "
                         f"among the modalities ({list(modalities)}) and ≥ 2 training sites (got {shapes.n_sites})")

    def build(pretrained=None):
        rngs = nnx.Rngs(jax.random.key(cfg.train.seed, impl=cfg.train.prng_impl))
        model = MultimodalModel(cfg.model, shapes, modalities, rngs=rngs, pretrained=pretrained)
        logit = LogitParams(o, tuple(modalities), rngs=rngs)
        site_head = None if o.site_adversary == 0 else ProjectionHead(
            cfg.model.embed_dim, shapes.n_sites, o.site_adversary_hidden or None, rngs=rngs)
        return TrainModule(model, logit, site_head)
    return build


def pretrained_inputs(cfg: RunConfig, modalities: Sequence[str]) -> dict | None:
    """The encoders' pretrained weights read from files, host arrays (None when no encoder has any)."""
    return pretrained_weights(cfg.model, modalities) or None
