"""Small building blocks shared by every encoder: partitioned parameters, Dense, LayerNorm, masked means.

Parameters are fp32 and carry logical axis names (see `mmfm.models.axes`). Compute happens in
the dtype of the activations: encoders cast their inputs to the configured compute dtype once and every
layer follows (kernels are cast at use), while normalisation statistics and softmaxes run in fp32.

Flax ≥0.12 shards annotated variables eagerly and raises when no mesh is active; `partitioned` keeps
the annotation but turns eager sharding off when there is no mesh. The trainer builds with no mesh (it
reads the annotations from an `nnx.eval_shape` and creates the state under `jit` with out_shardings);
a caller that sets `jax.set_mesh(mesh)` + `nnx.logical_axis_rules(rules)` gets parameters born sharded.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm.models.axes import EMBED, HIDDEN

Names = tuple[str, ...]

# "gelu" is the tanh approximation (nnx.gelu's default); "gelu_exact" is the erf form of torch's nn.GELU(),
# needed to reproduce imported PyTorch checkpoints to float precision.
_ACTIVATIONS: dict[str, Callable] = {"gelu": nnx.gelu, "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
                                     "relu": nnx.relu, "silu": nnx.silu}


def activation(name: str) -> Callable:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def mesh_active() -> bool:
    return not jax.sharding.get_abstract_mesh().empty


def partitioned(init: Callable, names: Names) -> Callable:
    """`init` whose variables carry logical `names`; sharded at creation only when a mesh is active."""
    return nnx.with_partitioning(init, names, eager_sharding=mesh_active())


def param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], names: Names) -> nnx.Param:
    return nnx.Param(partitioned(init, names)(rngs.params(), shape, jnp.float32))


def variable(kind: type[nnx.Variable], value: jax.Array, names: Names) -> nnx.Variable:
    """`kind(value)` (a Param, or a frozen weight) carrying logical `names`, like `param`."""
    return kind(value, out_sharding=names, eager_sharding=mesh_active())


class Dense(nnx.Module):
    """x @ W + b with W [din, dout] named `names` (fp32 storage, compute in x.dtype)."""

    def __init__(self, din: int, dout: int, names: Names = (EMBED, HIDDEN), *, use_bias: bool = True,
                 rngs: nnx.Rngs, init: Callable = nnx.initializers.lecun_normal()):
        self.kernel = param(rngs, init, (din, dout), names)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (dout,), names[1:]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with fp32 statistics; returns the input dtype."""

    def __init__(self, dim: int, name: str = EMBED, *, rngs: nnx.Rngs, eps: float = 1e-6):
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), (name,))
        self.bias = param(rngs, nnx.initializers.zeros_init(), (dim,), (name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mu = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mu).mean(-1, keepdims=True)
        y = (xf - mu) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class Dropout(nnx.Dropout):
    """Inverted dropout whose mask costs a fraction of nnx.Dropout's random numbers.

    nnx.Dropout draws one 32-bit threefry word per element; here each word is split into fields of `bits` bits (8,
    or fewer when they hold the rate exactly: 2 for 0.25, 1 for 0.5) and an element is kept iff its field ≥
    round(rate · 2^bits) — 4 to 32 elements per word instead of one (random bits were ~30% of the ABMIL train step
    on CPU). The rate is thus quantised to 1/256 (0.1 → 0.1016) and kept values are scaled by the exact keep
    fraction, so the layer stays unbiased.
    """

    def key(self, rngs=None) -> jax.Array:
        """The next key of `rngs` (default: the layer's own stream), as a call would draw it."""
        stream = rngs if rngs is not None else self.rngs
        return stream[self.rng_collection]() if isinstance(stream, nnx.Rngs) else stream()

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        key = rngs if isinstance(rngs, jax.Array) else self.key(rngs)
        bits = mask_bits(self.rate)
        threshold = round(self.rate * 2**bits)
        scale = jnp.asarray(2**bits / (2**bits - threshold), inputs.dtype)
        return jnp.where(random_fields(key, inputs.shape, bits) >= threshold, inputs * scale, jnp.zeros_like(inputs))


def mask_bits(rate: float) -> int:
    """Bits per element of a dropout mask at `rate`: the fewest (1, 2, 4) that hold it exactly, else 8."""
    return next((b for b in (1, 2, 4) if (rate * 2**b).is_integer()), 8)


def random_fields(key: jax.Array, shape: tuple[int, ...], bits: int) -> jax.Array:
    """uint32 values uniform in [0, 2^bits) of `shape`: each random 32-bit word split into 32 / bits fields, lowest
    bits first, laid along the last axis when it holds whole words (8 bits: the word's little-endian bytes)."""
    per = 32 // bits
    size = 1
    for n in shape:
        size *= n
    aligned = bool(shape) and shape[-1] % per == 0
    words = jax.random.bits(key, shape[:-1] + (shape[-1] // per,) if aligned else (-(-size // per),), jnp.uint32)
    fields = (words[..., None] >> (bits * jnp.arange(per, dtype=jnp.uint32))) & (2**bits - 1)
    return fields.reshape(shape) if aligned else fields.reshape(-1)[:size].reshape(shape)


class MLPBlock(nnx.Module):
    """Linear → (LayerNorm) → activation → Dropout: the unit of every MLP encoder here."""

    def __init__(self, din: int, dout: int, *, act: str = "gelu", dropout: float = 0.0, layer_norm: bool = True,
                 names: Names = (EMBED, HIDDEN), eps: float = 1e-6, rngs: nnx.Rngs):
        self.linear = Dense(din, dout, names, rngs=rngs)
        self.norm = LayerNorm(dout, names[1], rngs=rngs, eps=eps) if layer_norm else None
        self.act = activation(act)
        self.drop = Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs=None) -> jax.Array:
        x = self.linear(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(self.act(x), deterministic=deterministic, rngs=rngs)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int = 1) -> jax.Array:
    """Mean of x over `axis` counting only mask=True entries (fp32 sum); zeros for an empty set."""
    m = jnp.expand_dims(mask, -1).astype(jnp.float32)
    total = jnp.sum(x.astype(jnp.float32) * m, axis=axis)
    count = jnp.sum(m, axis=axis)
    return total / jnp.maximum(count, 1.0)


def compute_dtype(name: str) -> jnp.dtype:
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"compute_dtype={name!r}: choose float32, bfloat16 or float16")
    return jnp.dtype(name)
