"""torch ⇄ JAX hand-off through DLPack, for in-memory pipelines (encode tiles in torch, train in JAX).

Zero-copy when the producer's buffer is compact (row-major or a transposition of it) and, on CPU, aligned the way
XLA wants; otherwise JAX silently copies. `torch_to_jax` makes the tensor contiguous first so strided views work,
and `shares_memory` lets callers (and tests) check that no copy happened.
"""

from __future__ import annotations

import jax
import torch


def torch_to_jax(t: torch.Tensor) -> jax.Array:
    """A JAX array over the same memory as `t` (on the matching device); detaches from autograd."""
    return jax.dlpack.from_dlpack(t.detach().contiguous())


def jax_to_torch(a: jax.Array) -> torch.Tensor:
    """A torch tensor over the same memory as the single-device array `a`."""
    return torch.from_dlpack(a)


def shares_memory(a: jax.Array, t: torch.Tensor) -> bool:
    return a.unsafe_buffer_pointer() == t.data_ptr()
