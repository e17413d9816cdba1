"""Benchmark: mmfm's jitted train step vs the same step in PyTorch eager, and FLOP/s vs a large matmul.

    python scripts/bench_train.py --json out/bench/bench_train.json [--batch 32 --tiles 2048 --dim 1024]

One process, same shapes (gated 2-head ABMIL slide encoder, 2-block masked-MLP RNA encoder on 2,000 genes,
linear projection heads, SigLIP slide↔RNA, AdamW with clipping). The PyTorch model is written here layer
for layer after mmfm.models (Linear→GELU(tanh)→Dropout pre-MLP; tanh·sigmoid gated attention; masked
softmax; [values·mask, mask] RNA input; LayerNorm blocks). Steps are timed interleaved (jax, torch, jax, …)
so machine load hits both alike; the median is reported. Achieved FLOP/s uses XLA's cost analysis of the
compiled step (the analytic matmul count is reported beside it) against a jitted square matmul in the same
process. The mmfm step runs twice: the default config (threefry dropout RNG: the same curve on any mesh) —
that is `jax_step_s`/`speedup` — and `train.prng_impl=rbg` (`*_rbg`). JSON: jax_step_s, torch_step_s,
speedup, matmul_fraction, and the details — including `step_shape_matmul_fraction`, the step's FLOP/s
against XLA's own throughput on the step's matmul shapes (tall-skinny, with B·N-long contractions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmfm.data.batch import BatchShapes, random_batch
from mmfm.io import write_json
from mmfm.models import ModelConfig
from mmfm.objectives import ObjectiveConfig
from mmfm.train import config as tconfig, loop, optim, sharding


# ----------------------------------------------------------------------------- JAX (mmfm itself)

def jax_step(shapes: BatchShapes, mcfg: ModelConfig, tcfg):
    ocfg = ObjectiveConfig(kind="siglip", pairs=(("slide", "rna"),))
    cfg = tconfig.RunConfig(data=tconfig.DataConfig(), train=tcfg, model=mcfg, objective=ocfg, loader=None)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1))
    ts = loop.init_state(loop.build_module(cfg, shapes, ("slide", "rna")), optim.make_optimizer(tcfg), mesh,
                         tcfg.axis_rules, tcfg.shard_min_size)
    step = loop.make_train_step(ts, loop.objective_loss(cfg, mesh), mesh, lr_schedule=optim.schedule(tcfg))
    return ts, step, mesh


# ----------------------------------------------------------------------------- PyTorch eager

def torch_model(shapes: BatchShapes, mcfg: ModelConfig):
    import torch
    from torch import nn

    a, r = mcfg.slide.abmil, mcfg.rna

    class ABMIL(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Sequential(nn.Linear(shapes.feature_dim, a.hidden), nn.GELU(approximate="tanh"),
                                     nn.Dropout(a.dropout))
            self.tanh_branch = nn.Linear(a.hidden, a.n_heads * a.attn_dim)
            self.gate_branch = nn.Linear(a.hidden, a.n_heads * a.attn_dim)
            self.score = nn.Parameter(torch.randn(a.n_heads, a.attn_dim) / math.sqrt(a.attn_dim))
            self.drop = nn.Dropout(a.attn_dropout)
            self.head = nn.Linear(a.hidden * a.n_heads, mcfg.embed_dim)

        def forward(self, x, mask):
            b, n, _ = x.shape
            h = self.pre(x)
            g = self.drop(torch.tanh(self.tanh_branch(h)) * torch.sigmoid(self.gate_branch(h)))
            logits = torch.einsum("bnha,ha->bhn", g.view(b, n, a.n_heads, a.attn_dim), self.score)
            attn = torch.softmax(logits.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)
            pooled = torch.einsum("bhn,bnd->bhd", attn, h).reshape(b, -1)
            return nn.functional.normalize(self.head(pooled), dim=-1)

    class RNA(nn.Module):
        def __init__(self):
            super().__init__()
            dims = [2 * shapes.n_genes] + [r.hidden] * r.n_layers
            self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(i, o), nn.LayerNorm(o, eps=1e-6),
                                                        nn.GELU(approximate="tanh"), nn.Dropout(r.dropout))
                                          for i, o in zip(dims[:-1], dims[1:])])
            self.head = nn.Linear(dims[-1], mcfg.embed_dim)

        def forward(self, values, mask):
            m = mask.float()
            return nn.functional.normalize(self.head(self.blocks(torch.cat([values * m, m], -1))), dim=-1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.slide, self.rna = ABMIL(), RNA()
            self.log_t = nn.Parameter(torch.tensor(math.log(10.0)))
            self.bias = nn.Parameter(torch.tensor(-10.0))

        def forward(self, batch):
            zs = self.slide(batch["slide/features"], batch["slide/tile_mask"])
            zr = self.rna(batch["rna/values"], batch["rna/gene_mask"])
            logits = self.log_t.exp() * zs @ zr.T + self.bias
            ci = batch["case_index"]
            y = torch.where(ci[:, None] == ci[None, :], 1.0, -1.0)
            return -nn.functional.logsigmoid(y * logits).sum() / zs.shape[0]

    return Model()


def torch_step_fn(model, tcfg):
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tcfg.lr, betas=(tcfg.b1, tcfg.b2))

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip)
        opt.step()
        return loss.item()
    return step


# ----------------------------------------------------------------------------- FLOPs

def analytic_flops(s: BatchShapes, mcfg: ModelConfig) -> float:
    """Matmul FLOPs of one train step (forward ×3 for forward + backward)."""
    a, r, e = mcfg.slide.abmil, mcfg.rna, mcfg.embed_dim
    bn = s.batch_size * s.tiles_per_slide
    slide = bn * (s.feature_dim * a.hidden + 2 * a.hidden * a.n_heads * a.attn_dim + a.n_heads * a.attn_dim
                  + a.n_heads * a.hidden) + s.batch_size * a.hidden * a.n_heads * e
    rna = s.batch_size * (2 * s.n_genes * r.hidden + (r.n_layers - 1) * r.hidden ** 2 + r.hidden * e)
    return 3 * 2 * (slide + rna + s.batch_size ** 2 * e)


def matmul_flops_per_s(n: int, reps: int) -> float:
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(x, x).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(x, x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def step_shape_matmul_flops_per_s(shapes: BatchShapes, mcfg: ModelConfig, reps: int) -> float:
    """FLOP/s of XLA on the slide encoder's own matmul shapes (forward + weight gradients, nothing else).

    The step's big matmuls are [B·N, D]·[D, H] and their transposes with a B·N-long contraction; XLA:CPU
    runs those well below a square matmul, so this is the ceiling the step can reach here.
    """
    a = mcfg.slide.abmil
    bn, d, h, g = shapes.batch_size * shapes.tiles_per_slide, shapes.feature_dim, a.hidden, a.n_heads * a.attn_dim
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (bn, d), jnp.float32)
    ws = (jax.random.normal(k[1], (d, h)) * d ** -0.5, jax.random.normal(k[2], (h, g)) * h ** -0.5,
          jax.random.normal(k[3], (h, g)) * h ** -0.5)

    def f(ws, x):
        hid = x @ ws[0]
        return jnp.sum((hid @ ws[1]) * (hid @ ws[2]))

    grad = jax.jit(jax.grad(f))
    jax.block_until_ready(grad(ws, x))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(grad(ws, x))
        times.append(time.perf_counter() - t)
    return (2 * bn * (d * h + 2 * h * g) * 3 - 2 * bn * d * h) / statistics.median(times)  # no input gradient


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tiles", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per framework (after 2 warm-up steps)")
    ap.add_argument("--matmul", type=int, default=0, help="square matmul size (default 2048 CPU, 8192 GPU)")
    a = ap.parse_args(argv)
    import torch

    shapes = BatchShapes(batch_size=a.batch, tiles_per_slide=a.tiles, feature_dim=a.dim, n_genes=a.genes)
    mcfg = ModelConfig(modalities=("slide", "rna"))
    tcfg = tconfig.TrainConfig(steps=1000, warmup=10, lr=1e-4)
    host = random_batch(shapes, seed=0)
    host = {k: v for k, v in host.items() if k.startswith(("slide/", "rna/", "case_index"))}

    runs = {}  # the default config (threefry dropout RNG) and train.prng_impl=rbg
    for impl in ("threefry2x32", "rbg"):
        ts, step, mesh = jax_step(shapes, mcfg, dataclasses.replace(tcfg, prng_impl=impl))
        batch = sharding.global_batch(host, sharding.batch_sharding(mesh))
        t0 = time.perf_counter()
        compiled = step.lower(ts.state, batch).compile()
        runs[impl] = (ts, compiled, batch, time.perf_counter() - t0)
    cost = runs["threefry2x32"][1].cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0

    dev = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    torch.manual_seed(0)
    tmodel = torch_model(shapes, mcfg).to(dev).train()
    tbatch = {k: torch.from_numpy(np.asarray(v)).to(dev) for k, v in host.items()}
    tstep = torch_step_fn(tmodel, tcfg)

    def jax_runner(impl):
        ts, compiled, batch, _ = runs[impl]

        def run():
            ts.state, m = compiled(ts.state, batch)
            jax.block_until_ready(m["loss"])
        return run

    run_jax, run_rbg = jax_runner("threefry2x32"), jax_runner("rbg")

    def run_torch():
        tstep(tbatch)
        if dev == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        run_jax()
        run_rbg()
        run_torch()
    jt, rt, tt = [], [], []
    for _ in range(a.steps):
        for fn, acc in ((run_jax, jt), (run_rbg, rt), (run_torch, tt)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    jax_s, rbg_s, torch_s = statistics.median(jt), statistics.median(rt), statistics.median(tt)
    mm_n = a.matmul or (8192 if jax.default_backend() == "gpu" else 2048)
    mm = matmul_flops_per_s(mm_n, reps=5)
    flops = xla_flops or analytic_flops(shapes, mcfg)
    shape_mm = step_shape_matmul_flops_per_s(shapes, mcfg, reps=3)
    out = {
        "jax_step_s": jax_s, "torch_step_s": torch_s, "speedup": torch_s / jax_s,
        "matmul_fraction": (flops / jax_s) / mm,
        "achieved_flop_s": flops / jax_s, "matmul_flop_s": mm, "matmul_n": mm_n,
        "step_shape_matmul_flop_s": shape_mm, "step_shape_matmul_fraction": (flops / jax_s) / shape_mm,
        "step_flops_xla": xla_flops, "step_flops_analytic": analytic_flops(shapes, mcfg),
        "jax_rbg_step_s": rbg_s, "speedup_rbg": torch_s / rbg_s, "matmul_fraction_rbg": (flops / rbg_s) / mm,
        "jax_steps_s": jt, "jax_rbg_steps_s": rt, "torch_steps_s": tt, "jax_compile_s": runs["threefry2x32"][3],
        "shapes": {"batch": a.batch, "tiles": a.tiles, "dim": a.dim, "genes": a.genes},
        "backend": jax.default_backend(), "torch_device": dev, "devices": len(jax.devices()),
        "torch_threads": torch.get_num_threads(),
    }
    write_json(a.json, out)
    print(json.dumps({k: out[k] for k in ("jax_step_s", "torch_step_s", "speedup", "matmul_fraction",
                                          "step_shape_matmul_fraction")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
