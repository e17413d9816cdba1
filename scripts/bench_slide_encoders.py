"""Peak memory and time of the transformer slide encoder forward vs bag size (CPU).

Each row runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own. The encoder is the 6-layer /
width-768 / 12-head transformer on D=1024 tile features, B=1, with tiles sorted by fragment as they come
from a TRIDENT bag. Series (`layers`):
  "alternate": the default EXAONE-style stack — 3 global position-free layers + 3 fragment-local RoPE
      layers (4 fragments), 4 registers. Global attention is N² work however it is computed, so on a
      2-core CPU this series stops at --alternate-max-n tiles.
  "local": all 6 layers fragment-local RoPE, fragments of ≤ --region tiles (TITAN/EXAONE-style local
      context): same buffers as the global kernel, but skipped key blocks make the work ~linear, so the
      memory curve can be measured up to 100k tiles on a CPU.
  "dense": the default stack with impl="xla" (jax.nn.dot_product_attention, N×N logits) for contrast.
`seconds` is one compiled forward; compile time is reported apart.

  python scripts/bench_slide_encoders.py --json out/bench/bench_slide_encoders.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_N = (1_000, 4_000, 16_000, 64_000, 100_000)
DENSE_N = (1_000, 4_000)


def worker(n: int, layers: str, width: int, depth: int, dim: int, region: int) -> dict:
    import numpy as np
    import jax
    from flax import nnx

    from mmfm.models.transformer import TransformerConfig, TransformerSlideEncoder

    if layers == "local":
        cfg = TransformerConfig(width=width, depth=depth, n_heads=12, n_registers=0, layer_pattern="rope")
        n_fragments = -(-n // region)
    else:
        cfg = TransformerConfig(width=width, depth=depth, n_heads=12, n_registers=4,
                                attn_impl="xla" if layers == "dense" else "blockwise")
        n_fragments = 4
    enc = TransformerSlideEncoder(cfg, dim, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(enc)
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="xy"), -1).reshape(-1, 2)[:n]
    feats = rng.standard_normal((1, n, dim), dtype=np.float32)
    coords = grid[None].astype(np.int32)
    mask = np.ones((1, n), bool)
    fragment = (np.arange(n)[None] * n_fragments // n).astype(np.int32)  # bands of rows, sorted

    @jax.jit
    def forward(state, feats, coords, mask, fragment):
        return nnx.merge(graphdef, state)(feats, coords, mask, fragment).embedding

    t0 = time.perf_counter()
    compiled = forward.lower(state, feats, coords, mask, fragment).compile()
    t1 = time.perf_counter()
    out = jax.block_until_ready(compiled(state, feats, coords, mask, fragment))
    t2 = time.perf_counter()
    assert np.all(np.isfinite(np.asarray(out)))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"n_tiles": n, "layers": layers, "peak_rss_gb": round(peak_gb, 3), "seconds": round(t2 - t1, 3),
            "compile_seconds": round(t1 - t0, 3), "width": width, "depth": depth, "feature_dim": dim,
            "n_fragments": n_fragments, "cpu_count": os.cpu_count()}


def run_one(n: int, layers: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(n), "--layers", layers, "--width", str(args.width),
           "--depth", str(args.depth), "--dim", str(args.dim), "--region", str(args.region)]
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"n_tiles": n, "layers": layers, "error": f"timed out after {args.timeout}s"}
    if proc.returncode:
        return {"n_tiles": n, "layers": layers, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the result rows here")
    p.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_N))
    p.add_argument("--alternate-max-n", type=int, default=16_000, help="largest N for the global-layer series")
    p.add_argument("--dense-n", type=int, nargs="*", default=list(DENSE_N), help="N for the dense contrast rows")
    p.add_argument("--series", nargs="+", default=["local", "alternate", "dense"],
                   choices=["local", "alternate", "dense"])
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--region", type=int, default=1600, help="max tiles per fragment in the local series")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--layers", default="alternate", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.layers, args.width, args.depth, args.dim, args.region)))
        return 0
    rows = []
    series = (("local", args.n), ("alternate", [n for n in args.n if n <= args.alternate_max_n]),
              ("dense", args.dense_n))
    for layers, ns in series:
        for n in ns if layers in args.series else ():
            rows.append(run_one(n, layers, args))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        from mmfm.io import write_json

        write_json(args.json, rows)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
