"""Benchmark the objective's implementations side by side: loss + gradient time and per-device temp memory.

  single  impl='global', every array on one device (the reference)
  global  impl='global' under jit with batch-sharded inputs (XLA inserts the gathers)
  gather  shard_map, y side all-gathered (b_local × B logits per device)
  ring    shard_map, y blocks passed around the ring with ppermute (b_local² logits per device)

Runs on N forced CPU devices (default 8) unless --platform says otherwise. Each row:
{"impl", "global_batch", "seconds" (median of --reps timed calls after one warm-up), "temp_bytes" (compiled
memory analysis, per device), "compile_seconds", "vs_single" (time ratio in this run), "max_abs_diff"
(loss and gradients vs single)}.

  python scripts/bench_objective.py --json bench_objective.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="output file (JSON list of rows)")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--devices", type=int, default=8, help="forced host-platform devices (CPU)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--kind", default="siglip", choices=["siglip", "infonce"])
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Must happen before jax is imported anywhere.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from mmfm.io import write_json
    from mmfm.objectives import LogitParams, ObjectiveConfig, multimodal_loss

    mods = ("slide", "rna", "protein")
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(AxisType.Auto,))
    rows_sharding = NamedSharding(mesh, P("data"))
    one_device = jax.devices()[0]
    out = []
    for b in args.batches:
        rng = np.random.default_rng(b)
        emb = {m: rng.standard_normal((b, args.dim)).astype(np.float32) for m in mods}
        emb = {m: x / np.linalg.norm(x, axis=1, keepdims=True) for m, x in emb.items()}
        present = {m: rng.random(b) < 0.8 for m in mods}
        ci = rng.integers(0, b // 2, size=b).astype(np.int32)  # ~2 rows per case: multi-positives
        ref = single_s = None
        for impl in ("single", "global", "gather", "ring"):
            cfg = ObjectiveConfig(kind=args.kind, impl="global" if impl == "single" else impl)
            graphdef, state = nnx.split(LogitParams(cfg, mods, rngs=nnx.Rngs(0)))
            place = (lambda x: jax.device_put(x, one_device)) if impl == "single" else \
                (lambda x: jax.device_put(x, rows_sharding))
            e, pr, c = jax.tree.map(place, (emb, present, ci))

            def loss(e, s, pr, c, cfg=cfg, sharded=impl != "single"):
                return multimodal_loss(e, pr, c, nnx.merge(graphdef, s), cfg,
                                       mesh=mesh if sharded else None, axis="data")[0]

            t0 = time.perf_counter()
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(e, state, pr, c).compile()
            compile_s = time.perf_counter() - t0
            result = jax.block_until_ready(compiled(e, state, pr, c))
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(e, state, pr, c))
                times.append(time.perf_counter() - t0)
            leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(result))]
            ref = ref or leaves
            row = {"impl": impl, "global_batch": b, "seconds": float(np.median(times)),
                   "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
                   "compile_seconds": compile_s,
                   "max_abs_diff": float(max(np.abs(x - y).max() for x, y in zip(leaves, ref)))}
            single_s = single_s or row["seconds"]
            row["vs_single"] = row["seconds"] / single_s
            out.append(row)
            print(json.dumps(row), file=sys.stderr)
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
