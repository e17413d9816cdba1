"""Loader throughput: sampled-row reads (TileBagLoader) vs the naive path (read the whole bag, then sample).

Both paths build the same batch (features [B, k, D], grid coords, tile mask) from the same cohort of
≥20k-tile bags, in one run, alternating rounds so page cache and machine load affect both alike.
A side table times one slide's k-row read under different HDF5 layouts of the same bag.

  python scripts/bench_loader.py --json bench_loader.json
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from mmfm.data.bags import read_bag, read_rows
from mmfm.data.cohort import Cohort
from mmfm.data.loader import LoaderConfig, TileBagLoader
from mmfm.data.sampling import BagReader, sample_tiles
from mmfm.simulate import SimConfig, simulate_cohort
from mmfm.io import write_json


def make_cohort(root: Path, n_cases: int, tiles: int, dim: int) -> Cohort:
    cfg = SimConfig(name="bench-loader", n_cases=n_cases, feature_dim=dim, bag_size_median=tiles,
                    bag_size_sigma=0.0, bag_size_min=tiles, bag_size_max=tiles, multi_slide_rate=0.0,
                    missing_slide=0.0, n_genes=50, n_proteins=8)
    return Cohort.open(simulate_cohort(root / "cohort", cfg))


def naive_batch(cohort: Cohort, cases: list[str], k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What a loader without row-level reads does: whole bag into memory, then index the sample."""
    dim = cohort.spec.feature_dim
    feats = np.zeros((len(cases), k, dim), np.float16)
    coords = np.zeros((len(cases), k, 2), np.int32)
    mask = np.zeros((len(cases), k), bool)
    for r, case in enumerate(cases):
        slide = cohort.slides_of(case).iloc[0]
        bag = read_bag(slide["path"])
        rows, mask[r] = sample_tiles(len(bag["features"]), k, rng)
        feats[r] = bag["features"][rows]
        coords[r] = bag["coords"][rows] // slide["patch_size_level0"]
    return {"slide/features": feats, "slide/coords": coords, "slide/tile_mask": mask}


def time_loader(loader: TileBagLoader, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        next(loader)
    return time.perf_counter() - t0


def time_naive(cohort: Cohort, case_ids: list[str], batch: int, k: int, steps: int, start: int) -> float:
    rng = np.random.default_rng(start)
    t0 = time.perf_counter()
    for s in range(start, start + steps):
        idx = [(s * batch + i) % len(case_ids) for i in range(batch)]
        naive_batch(cohort, [case_ids[i] for i in idx], k, rng)
    return time.perf_counter() - t0


def layout_table(src: str, tmp: Path, k: int, reps: int) -> dict[str, float]:
    """ms per k-row read of one bag, per on-disk layout (same values) and read path."""
    bag = read_bag(src)
    feats, coords = bag["features"], bag["coords"]
    n, d = feats.shape
    layouts = {"chunks_256_rows": {"chunks": (min(n, 256), d)}, "contiguous": {},
               "chunks_1_row_trident": {"chunks": (1, d), "maxshape": (None, d)},
               "gzip_chunks_256_rows": {"chunks": (min(n, 256), d), "compression": "gzip"}}
    rng = np.random.default_rng(0)
    samples = [sample_tiles(n, k, rng)[0] for _ in range(reps)]
    out = {}
    for name, kw in layouts.items():
        path = tmp / f"layout_{name}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=feats, **kw)
            f.create_dataset("coords", data=coords, **({"chunks": (1, 2), "maxshape": (None, 2)}
                                                       if "trident" in name else {}))
        reader = BagReader()
        reader.read(path, samples[0])
        t0 = time.perf_counter()
        for rows in samples:
            reader.read(path, rows)
        out[f"bag_reader_{name}_ms"] = 1e3 * (time.perf_counter() - t0) / reps
        reader.close()
        with h5py.File(path, "r") as f:
            t0 = time.perf_counter()
            for rows in samples:
                read_rows(path, rows, f)
            out[f"h5py_coalesced_runs_{name}_ms"] = 1e3 * (time.perf_counter() - t0) / reps
            t0 = time.perf_counter()
            for rows in samples:
                f["features"][:][rows]
            out[f"h5py_whole_bag_{name}_ms"] = 1e3 * (time.perf_counter() - t0) / reps
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="OUT", required=True)
    p.add_argument("--cases", type=int, default=16, help="cases (one bag each)")
    p.add_argument("--tiles", type=int, default=20000, help="tiles per bag")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k", type=int, default=2048, help="tiles_per_slide")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="batches per path per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="also time the loader with this many grain workers")
    p.add_argument("--dir", help="work directory (default: a temp dir, removed after)")
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        cohort = make_cohort(tmp, a.cases, a.tiles, a.dim)
        setup_s = time.perf_counter() - t0
        case_ids = list(cohort.cases.index)
        cfg = LoaderConfig(batch_size=a.batch_size, tiles_per_slide=a.k, prefetch=0)
        # every bag stays mapped (cohort ≤ open_bags)
        loader = TileBagLoader(cohort, cfg, case_ids, modalities=("slide",))
        cold = TileBagLoader(cohort, LoaderConfig(**{**cfg.__dict__, "open_bags": 1}), case_ids, modalities=("slide",))
        for _ in range(loader.steps_per_epoch):  # maps every bag; all paths then read a warm page cache
            next(loader)
        next(cold)
        time_naive(cohort, case_ids, a.batch_size, a.k, 1, 0)
        t_loader = t_cold = t_naive = 0.0
        for r in range(a.rounds):
            t_naive += time_naive(cohort, case_ids, a.batch_size, a.k, a.steps, 1 + r * a.steps)
            t_loader += time_loader(loader, a.steps)
            t_cold += time_loader(cold, a.steps)
        loader.close()
        cold.close()
        n = a.rounds * a.steps
        batch_mb = a.batch_size * a.k * a.dim * 2 / 2**20
        res = {
            "loader_batches_per_s": n / t_loader, "naive_batches_per_s": n / t_naive,
            "speedup": t_naive / t_loader,
            "loader_mb_per_s": n * batch_mb / t_loader, "naive_mb_per_s": n * batch_mb / t_naive,
            "naive_read_mb_per_s": n * a.batch_size * a.tiles * a.dim * 2 / 2**20 / t_naive,
            # open_bags=1: each read maps its bag afresh, as in a cohort far larger than the open-bag cache
            "loader_remap_batches_per_s": n / t_cold, "speedup_remap": t_naive / t_cold,
        }
        if a.workers:
            wl = TileBagLoader(cohort, LoaderConfig(**{**cfg.__dict__, "workers": a.workers, "prefetch": 1}),
                               case_ids)
            for _ in range(a.workers):  # every worker started and past its first batch
                next(wl)
            t_w = time_loader(wl, n)
            wl.close()
            res[f"loader_workers{a.workers}_batches_per_s"] = n / t_w
        res.update(layout_table(cohort.slides["path"].iloc[0], tmp, a.k, reps=5))
    res["settings"] = {"cases": a.cases, "tiles_per_bag": a.tiles, "dim": a.dim, "dtype": "float16",
                       "tiles_per_slide": a.k, "batch_size": a.batch_size, "batches_per_path": n,
                       "workers": 0, "prefetch": 0, "bag_chunks": "write_bag default (256 rows)",
                       "naive": "h5py read of the whole bag, then index the same kind of sample",
                       "page_cache": "warm (bags just written)", "cohort_setup_s": round(setup_s, 1),
                       "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    write_json(a.json, res)
    for key, v in res.items():
        print(f"{key}: {v:.3f}" if isinstance(v, float) else f"{key}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
