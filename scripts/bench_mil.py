"""Benchmark: one fold of the `mil` probe's `abmil` against a PyTorch eager gated ABMIL of the same sizes, same bags.

    python scripts/bench_mil.py --json out/bench/bench_mil.json [--cases 120 --dim 256 --bag 300 --epochs 3 ...]

One process, one simulated default cohort, one outer fold (fold 0 of 5, patient-level, stratified on subtype). Both
sides train `--epochs` epochs on the whole training fold (`select: last`) with at most `--max-tiles` sampled tiles
per slide per step and predict the test fold once with every tile. mmfm: `mmfm.eval.probes.mil.train` (one case per
step: its slides' sampled tiles packed in one row, pooled chunk by chunk, `steps_per_call` steps per jitted call
over indices into the epoch's tile table; `--batch` > 1: length-bucketed rows of slides, data parallel over the
local devices). PyTorch: the CLAM recipe as it is usually run — eager, one bag per step (a case's slides
concatenated), AdamW, the same lr / weight decay / dropout / sizes, balanced class weights. Reported per side:
training bags/s (median over epochs after the first, which holds mmfm's compilation), fold wall time and CPU
seconds, test AUROC, and the fraction of the machine's GEMM rate the training reaches (analytic matmul FLOPs of
forward + backward ÷ the best float32 GEMM rate measured here by JAX and by torch on [4096, D] × [D, 512]). `ratio` = mmfm bags/s ÷ torch bags/s, measured side by side;
`wall_ratio` = torch fold wall ÷ mmfm fold wall (compilation included); `cpu_ratio` = torch fold CPU-seconds ÷
mmfm's (steadier than wall on a loaded machine; torch's idle threads spin). mmfm's XLA compilations during its fold
(count and seconds of tracing, lowering and backend compiling, from JAX's monitoring events) are recorded as
`compiles` / `compile_s`, its per-epoch host time (building and copying batches) as `host_s` / `host_fraction`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from mmfm.data.cohort import Cohort
from mmfm.simulate import SimConfig, simulate_cohort
from mmfm.eval import folds as folds_mod
from mmfm.eval.probes import classification, mil
from mmfm.eval.tasks.base import fold_sides
from mmfm.eval.tasks.classification import encode_labels
from mmfm.eval.tasks.mil import read_bags
from mmfm.models.mil import clam_mil
from mmfm.objectives.supervised import balanced_weights


def gemm_rate(d: int, reps: int = 20) -> dict:
    """Best float32 GEMM FLOP/s of JAX and torch on [4096, d] × [d, 512]."""
    a = np.random.default_rng(0).normal(size=(4096, d)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(d, 512)).astype(np.float32)
    flops = 2 * 4096 * d * 512
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    mm(ja, jb).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        mm(ja, jb).block_until_ready()
    jr = flops * reps / (time.perf_counter() - t)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ta @ tb
    t = time.perf_counter()
    for _ in range(reps):
        ta @ tb
    tr = flops * reps / (time.perf_counter() - t)
    return {"jax": jr, "torch": tr, "best": max(jr, tr)}


def train_flops(n_tiles: float, d: int, hidden: int, attn: int, k: int) -> float:
    """Analytic matmul FLOPs of one bag's forward + backward (backward ≈ 2 × forward)."""
    fwd = 2 * n_tiles * (d * hidden + 2 * hidden * attn + attn) + 2 * n_tiles * hidden + 2 * hidden * k
    return 3 * fwd


class TorchABMIL(torch.nn.Module):
    """CLAM's gated attention MIL (single branch), written from the paper's description."""

    def __init__(self, d: int, hidden: int, attn: int, k: int, dropout: float):
        super().__init__()
        self.fc = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout))
        self.a = torch.nn.Sequential(torch.nn.Linear(hidden, attn), torch.nn.Tanh(), torch.nn.Dropout(dropout))
        self.b = torch.nn.Sequential(torch.nn.Linear(hidden, attn), torch.nn.Sigmoid(), torch.nn.Dropout(dropout))
        self.c = torch.nn.Linear(attn, 1)
        self.head = torch.nn.Linear(hidden, k)

    def forward(self, x):  # x [N, D] → [1, K]
        h = self.fc(x)
        w = torch.softmax(self.c(self.a(h) * self.b(h)).T, dim=1)  # [1, N]
        return self.head(w @ h)


def run_torch(tr, te, cfg: mil.MilConfig, k: int, seed: int) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    bags = lambda cs: [np.concatenate([b.features for b in bs]).astype(np.float32) for bs in cs.bags]  # noqa: E731
    xtr, xte = bags(tr), bags(te)
    model = TorchABMIL(xtr[0].shape[1], cfg.hidden, cfg.attn_dim, k, cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(balanced_weights(tr.y, k)))

    def predict(xs):
        model.eval()
        with torch.no_grad():
            return np.concatenate([model(torch.from_numpy(x)).numpy() for x in xs])

    t0, cpu0, epoch_s = time.perf_counter(), time.process_time(), []
    for _ in range(cfg.epochs):
        model.train()
        t = time.perf_counter()
        for i in rng.permutation(len(xtr)):
            x = xtr[i]
            if len(x) > cfg.max_tiles:
                x = x[np.sort(rng.choice(len(x), cfg.max_tiles, replace=False))]
            opt.zero_grad()
            loss_fn(model(torch.from_numpy(x)), torch.tensor([int(tr.y[i])])).backward()
            opt.step()
        epoch_s.append(time.perf_counter() - t)
    out = predict(xte)
    wall = time.perf_counter() - t0
    p = np.exp(out - out.max(1, keepdims=True))
    return {"epoch_s": epoch_s, "wall_s": wall, "cpu_s": time.process_time() - cpu0,
            "auroc": classification.auroc(te.y, p / p.sum(1, keepdims=True))}


class CompileLog:
    """XLA compilations while active: count (backend compiles) and seconds (trace + lower + compile)."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.active, self.count, self.seconds = False, 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, secs, **kw):
        if self.active and event in self.EVENTS:
            self.seconds += secs
            self.count += event == self.EVENTS[-1]


def run_mmfm(tr, te, cfg: mil.MilConfig, k: int, seed: int, compiles: CompileLog) -> dict:
    compiles.active = True
    t0, cpu0 = time.perf_counter(), time.process_time()
    model = clam_mil(tr.bags[0][0].features.shape[1], k, hidden=cfg.hidden, attn_dim=cfg.attn_dim,
                     dropout=cfg.dropout, seed=seed)
    fitted = mil.train(model, "class", tr, None, cfg, seed=seed, n_classes=k)
    out = mil.predict(fitted.model, te, cfg)
    wall = time.perf_counter() - t0
    compiles.active = False
    p = np.exp(out - out.max(1, keepdims=True))
    return {"epoch_s": fitted.epoch_s, "host_s": fitted.host_s, "wall_s": wall, "cpu_s": time.process_time() - cpu0,
            "steps": fitted.steps, "compiles": compiles.count,
            "compile_s": compiles.seconds,
            "auroc": classification.auroc(te.y, p / p.sum(1, keepdims=True))}


def meanpool_auroc(tr, te, k: int) -> float:
    """The issue's reference baseline on the same fold: standardised mean-pool features, logistic regression (C 0.5,
    balanced classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pool = lambda cs: np.stack([np.mean([b.features.mean(0) for b in bs], 0) for bs in cs.bags])  # noqa: E731
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, class_weight="balanced", max_iter=2000))
    clf.fit(pool(tr), tr.y)
    p = np.zeros((len(te.ids), k))
    p[:, clf.classes_] = clf.predict_proba(pool(te))
    return classification.auroc(te.y, p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--cohort", help="an existing cohort (default: simulate one)")
    ap.add_argument("--cases", type=int, default=120)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--bag", type=int, default=300, help="median tiles per slide of the simulated cohort")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-tiles", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1, help="mmfm: cases per step (torch: always one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, help="mmfm: MilConfig.chunk (default: MilConfig's)")
    ap.add_argument("--chunk-large", type=int, help="mmfm: MilConfig.chunk_large (default: MilConfig's)")
    ap.add_argument("--steps-per-call", type=int, help="mmfm: MilConfig.steps_per_call (default: MilConfig's)")
    a = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    root = Path(a.cohort) if a.cohort else Path(tmp.name) / "cohort"
    if not a.cohort:
        simulate_cohort(root, SimConfig(n_cases=a.cases, feature_dim=a.dim, bag_size_median=a.bag,
                                        bag_size_max=8 * a.bag, n_genes=64, n_proteins=16))
    cohort = Cohort.open(root, scan_features=False, scan_cache=False)
    bags = read_bags(root, cohort.cases.index)
    ids = [c for c in map(str, cohort.cases.index) if c in bags]
    labels = cohort.cases.loc[ids, "subtype"].astype(str)
    y, classes = encode_labels(labels)
    full = mil.CaseSet(ids, [bags[c] for c in ids], y=y.to_numpy())
    folds = folds_mod.generate_folds(labels.index, labels, None, k=5, seed=a.seed, site_preserved=False,
                                     test_size=None)
    tr, te = fold_sides(folds, "fold_0", labels.index)
    given = {"chunk": a.chunk, "chunk_large": a.chunk_large, "steps_per_call": a.steps_per_call}
    cfg = mil.MilConfig(epochs=a.epochs, max_tiles=a.max_tiles, batch_size=a.batch, select="last",
                        **{k: v for k, v in given.items() if v is not None})
    pos = {c: i for i, c in enumerate(ids)}
    take = lambda idx: full.take([pos[c] for c in idx])  # noqa: E731
    sets = take(tr), take(te)

    rate = gemm_rate(a.dim)
    meanpool = meanpool_auroc(*sets, len(classes))
    compiles = CompileLog()
    sides = {"mmfm": run_mmfm(*sets, cfg, len(classes), a.seed, compiles),
             "torch": run_torch(*sets, cfg, len(classes), a.seed)}
    n_train = len(tr)
    tiles = float(np.mean([min(sum(len(b.features) for b in bs), a.max_tiles) for bs in sets[0].bags]))
    flops = train_flops(tiles, a.dim, cfg.hidden, cfg.attn_dim, len(classes))
    for s in sides.values():
        steady = s["epoch_s"][1:] or s["epoch_s"]
        s["bags_per_s"] = n_train / statistics.median(steady)
        s["gemm_fraction"] = s["bags_per_s"] * flops / rate["best"]
    sides["mmfm"]["host_fraction"] = sum(sides["mmfm"]["host_s"][1:]) / sum(sides["mmfm"]["epoch_s"][1:] or [1.0])
    out = {"cpu": platform.processor(), "load": os.getloadavg(), "devices": jax.device_count(),
           "platform": jax.default_backend(), "torch_threads": torch.get_num_threads(), "cases": len(ids),
           "train_cases": n_train, "test_cases": len(te), "feature_dim": a.dim,
           "mean_sampled_tiles": tiles, "epochs": a.epochs, "gemm_flops_per_s": rate, "train_flops_per_bag": flops,
           "meanpool_linear_auroc": meanpool,
           **sides, "ratio": sides["mmfm"]["bags_per_s"] / sides["torch"]["bags_per_s"],
           "wall_ratio": sides["torch"]["wall_s"] / sides["mmfm"]["wall_s"],
           "cpu_ratio": sides["torch"]["cpu_s"] / sides["mmfm"]["cpu_s"]}
    try:
        import subprocess
        out["cpu"] = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("ratio", "wall_ratio", "cpu_ratio", "load", "cpu", "meanpool_linear_auroc")},
                     indent=1))
    for k, s in sides.items():
        print(f"{k}: {s['bags_per_s']:.1f} bags/s, {100 * s['gemm_fraction']:.1f}% of GEMM rate, "
              f"fold {s['wall_s']:.1f}s ({s['cpu_s']:.1f} CPU-s), test AUROC {s['auroc']:.3f}"
              + (f", {s['compiles']} compiles {s['compile_s']:.1f}s, host {100 * s['host_fraction']:.0f}% of an "
                 "epoch" if "compiles" in s else ""))


if __name__ == "__main__":
    main()
