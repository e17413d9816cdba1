"""The logical axis names of every array in mmfm, and where each goes on the device mesh by default.

Models name the axes of their parameters (`nnx.with_partitioning`); the trainer names the axes of its
batches. Only the rules below turn names into the mesh axes ("data", "fsdp"), so a model never mentions
a mesh and the trainer never mentions a layer.

Batches and activations (the batch contract, `mmfm/data/batch.py`):
  "batch"    rows of a batch (cases): split over every device, so each device encodes its own rows
  "tiles"    tokens of a bag: a bag stays whole on its device (also the transformer's register count,
             since registers are tokens prepended to the tiles)
  "feature"  the trailing value axis of a batch array (also the raw scalar input of a gene token)
Parameters (every large matrix has exactly one "embed" axis, which the default rules split over "fsdp"):
  "embed"    the model/input width side of a matrix (residual stream, tile-feature or omics input dim)
  "hidden"   the inner side of an MLP or projection (MLP hidden, encoder output width, the scoring
             width of an attention-pool head)
  "heads"    the attention-head side (concatenated q/k/v/out heads, attention-pool branches and heads)
  "vocab"    rows of an embedding table (gene ids, word pieces, text positions, token types)
  "joint"    the shared embedding space every projection head ends in
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp")

BATCH, TILES, FEATURE = "batch", "tiles", "feature"
EMBED, HIDDEN, HEADS, VOCAB, JOINT = "embed", "hidden", "heads", "vocab", "joint"
LOGICAL_AXES = (BATCH, TILES, FEATURE, EMBED, HIDDEN, HEADS, VOCAB, JOINT)

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# How parameters (and the optimizer moments that mirror them) are placed: `train.axis_rules` overrides it.
DEFAULT_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    (EMBED, "fsdp"), (HIDDEN, None), (HEADS, None), (VOCAB, None), (JOINT, None), (TILES, None), (FEATURE, None))

# How batches and activations are placed: fixed, because the trainer feeds every device its own rows.
BATCH_RULES: tuple[tuple[str, MeshAxes], ...] = ((BATCH, MESH_AXES), (TILES, None), (FEATURE, None))


def complete_rules(rules: Rules) -> tuple[tuple[str, MeshAxes], ...]:
    """`rules` over `DEFAULT_AXIS_RULES`: every parameter axis name mapped, unknown names rejected.

    A logical name left without a rule would reach the PartitionSpec as-is (flax passes unknown names
    through) and fail far from the config, so it takes its default instead.
    """
    table = dict(DEFAULT_AXIS_RULES)
    for i, rule in enumerate(rules):
        name, axes = tuple(rule)
        if name not in table:
            raise ValueError(f"axis_rules[{i}]: {name!r} is not a parameter axis name "
                             f"(known: {', '.join(table)}; 'batch' is placed by the trainer)")
        for mesh_axis in (axes if isinstance(axes, (tuple, list)) else (axes,)):
            if mesh_axis is not None and mesh_axis not in MESH_AXES:
                raise ValueError(f"axis_rules[{i}]: {name!r} -> {axes!r}; mesh axes are {MESH_AXES} or null")
        table[name] = tuple(axes) if isinstance(axes, list) else axes
    return tuple(table.items())


def logical_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec of an array whose axes carry `names` (None: replicated along that axis)."""
    table = dict(rules)
    missing = [n for n in names if n is not None and n not in table]
    if missing:
        raise ValueError(f"logical axes {missing} have no rule (rules name {', '.join(table)})")
    return PartitionSpec(*(None if n is None else table[n] for n in names))
