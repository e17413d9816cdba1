"""Feature-store throughput: the loader's sampled row reads against the disk's own sequential bandwidth, for both
layouts side by side: the TRIDENT h5 bags and the packed store `mmfm pack` writes (`mmfm.data.packed`).

Writes a synthetic store in the cohort layout (cohort.yaml, cases.csv, slides.csv, bags/*.h5 via
`write_bag`: random fp16, one slide per case), packs it, then measures in one run
  (a) raw bandwidth: every bag read whole, sequentially (8 MiB reads), page cache dropped per file first
      (the disk's rate; the shards' sequential read is reported beside it as a check),
  (b) the loader (`TileBagLoader`, slide modality only) over one epoch's steps, for each layout: delivered
      feature bytes/s and batches/s, cold (cache dropped before the round) and warm (the same steps again), for
      each grain worker count (in-process: for each `--read-threads`, the loader's concurrent row reads; 1 reads
      the rows one after another), plus two OS processes each reading its half of every global batch; in-process
      rounds also count the bytes the kernel read from the disk (/proc/self/io read_bytes),
  (c) (b) / (a), both for delivered bytes and for bag bytes swept (k of n rows sampled: the disk reads
      pages, not rows, so from h5 bags delivered bytes ≤ k/n of what a sweep moves; a packed window reads
      only the rows it delivers),
  (d) memory: per round, the peak RSS of this process and its grain workers together, anonymous (what the
      loader holds) apart from file-mapped (memory-mapped bags: page cache, reclaimable, bounded by
      `open_bags` × bag size per process), and RSS after every round, to see whether it stays flat,
plus a profile of one cold in-process round per layout (where the time goes), and (e) the container choice for
the packed store: the same windows read cold from the .npy shard with pread (what mmfm uses) and with memmap,
from zarr v3 (zarr-python and tensorstore, one array, 256-row uncompressed chunks) and from array-record (one
record per tile, 256-record groups, uncompressed): MB/s, CPU seconds, bytes read from disk per byte delivered.

The page cache is dropped with posix_fadvise(DONTNEED) (no root); `fincore` checks that it worked. On a VM
the host may still cache the virtual disk: "cold" means cold in this kernel. Default size is the issue's
(2,000 slides × 4,096 tiles × 1,536 ≈ 25 GB); the script refuses to fill the disk.

  python scripts/bench_feature_store.py --json out/bench_feature_store.json --slides 256 --tiles 4096 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing as mp
import os
import platform
import pstats
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mmfm.data.bags import write_bag
from mmfm.data.cohort import Cohort
from mmfm.data.loader import LoaderConfig, TileBagLoader
from mmfm.data.packed import PackedReader, pack_cohort
from mmfm.data.sampling import READAHEAD
from mmfm.io import write_json

MiB = 2**20
PATCH = 512  # level-0 pixels per tile


def write_store(root: Path, slides: int, tiles: int, dim: int, seed: int = 0) -> list[Path]:
    """The cohort layout with one `tiles`-row random fp16 bag per case; bags fsynced so the cache can drop them."""
    (root / "bags").mkdir(parents=True)
    (root / "cohort.yaml").write_text(
        "name: bench-feature-store\nversion: '1'\ndescription: synthetic random fp16 bags\n"
        f"tile_encoder: {{name: random, feature_dim: {dim}}}\ntarget_magnification: 20.0\npatch_size: 256\n")
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(tiles)))
    coords = np.stack(np.divmod(np.arange(tiles), side), 1)[:, ::-1] * PATCH  # raster order, as extraction writes
    paths = []
    for i in range(slides):
        feats = rng.integers(0, 0x3C00, (tiles, dim), dtype=np.uint16).view(np.float16)  # finite, in [0, 1)
        path = write_bag(root / "bags" / f"s{i:05d}.h5", feats, coords, patch_size_level0=PATCH, encoder="random")
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        paths.append(path)
    pd.DataFrame({"case_id": [f"c{i:05d}" for i in range(slides)], "site": "s0"}).to_csv(root / "cases.csv", index=False)
    pd.DataFrame({"slide_id": [f"s{i:05d}" for i in range(slides)], "case_id": [f"c{i:05d}" for i in range(slides)],
                  "path": [f"bags/{p.name}" for p in paths]}).to_csv(root / "slides.csv", index=False)
    return paths


def drop_cache(paths, sync: bool = False) -> None:
    """Evict the files' clean pages from the page cache (no root needed; dirty pages must be fsynced first, `sync`;
    pages mapped by a live memory map stay)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            if sync:
                os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths) -> float | None:
    """Fraction of the files' bytes in the page cache (util-linux `fincore`), None if it is not installed."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout.split()
    res, size = np.array(out, np.int64).reshape(-1, 2).sum(0)
    return float(res / max(size, 1))


def disk_read_bytes() -> int:
    """Bytes this process has caused to be read from storage (page-cache hits excluded)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def raw_bandwidth(paths, block: int = 8 * MiB) -> dict:
    """Sequential whole-file reads, each file dropped from the cache just before it is read."""
    buf = bytearray(block)
    view = memoryview(buf)
    total = seconds = 0.0
    for p in paths:
        drop_cache([p])
        t0 = time.perf_counter()
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
        seconds += time.perf_counter() - t0
    return {"raw_mb_per_s": total / MiB / seconds, "raw_bytes": int(total), "raw_seconds": seconds}


def memory() -> dict:
    """Current RSS split (file-mapped pages of memory-mapped bags count in RSS but are page cache) and peaks."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    mb = lambda key: int(status[key].split()[0]) / 1024 if key in status else None  # noqa: E731
    return {"rss_anon_mb": mb("RssAnon"), "rss_file_mb": mb("RssFile"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _rss_kb(pid: int | str) -> tuple[int, int]:
    """(RssAnon, RssFile) of a process in kB; (0, 0) once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0, 0
    got = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if k in ("RssAnon", "RssFile")}
    return got.get("RssAnon", 0), got.get("RssFile", 0)


class PeakMemory:
    """Samples RSS of this process plus its children (grain workers) every `every` s: peak anonymous memory
    (what the loader holds) apart from peak file-mapped pages (memory-mapped bags: page cache, reclaimable)."""

    def __init__(self, every: float = 0.1):
        self.every, self.anon_kb, self.file_kb = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pids(self):
        kids = []
        for task in Path("/proc/self/task").iterdir():
            try:
                kids += (task / "children").read_text().split()
            except OSError:
                pass
        return ["self", *kids]

    def _run(self):
        while not self._stop.wait(self.every):
            anon, file = np.sum([_rss_kb(p) for p in self._pids()], axis=0)
            self.anon_kb, self.file_kb = max(self.anon_kb, int(anon)), max(self.file_kb, int(file))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def mb(self) -> dict:
        return {"peak_anon_mb": self.anon_kb / 1024, "peak_file_mapped_mb": self.file_kb / 1024}


def loader_round(cohort, cfg: LoaderConfig, steps: int, process_index: int = 0, process_count: int = 1,
                 barrier=None) -> dict:
    """Time `steps` batches from step 0. With workers, the first `workers` batches (worker start-up) are not
    timed: the rate is steady state. `barrier`: waited on before the clock starts (processes in step)."""
    loader = TileBagLoader(cohort, cfg, list(cohort.cases.index), modalities=("slide",),
                           process_index=process_index, process_count=process_count)
    if barrier is not None:
        barrier.wait()
    disk0, cpu0 = disk_read_bytes(), time.process_time()
    t0 = time.monotonic()
    stamps, real_tiles = [], 0
    for _ in range(steps):
        real_tiles += int(next(loader)["slide/tile_mask"].sum())
        stamps.append(time.monotonic())
    disk, cpu = disk_read_bytes() - disk0, time.process_time() - cpu0
    loader.close()
    skip = cfg.workers
    timed = steps - skip
    seconds = stamps[-1] - (stamps[skip - 1] if skip else t0)
    feature_bytes = real_tiles * cohort.spec.feature_dim * np.dtype(cfg.feature_dtype).itemsize * timed / steps
    out = {"batches_per_s": timed / seconds, "mb_per_s": feature_bytes / MiB / seconds, "seconds": seconds,
           "timed_batches": timed, "t0": t0, "t_end": stamps[-1], "bytes": feature_bytes}
    if not cfg.workers:  # grain workers read in their own processes: not counted here
        all_bytes = real_tiles * cohort.spec.feature_dim * np.dtype(cfg.feature_dtype).itemsize
        # CPU seconds (user + system, all threads) per delivered MB: the rate with a core to itself, whatever the load
        out.update(disk_read_mb=disk / MiB, disk_per_delivered=disk / max(all_bytes, 1), cpu_s=cpu,
                   mb_per_cpu_s=all_bytes / MiB / max(cpu, 1e-9))
    return out


def _process_main(root: str, cfg: LoaderConfig, steps: int, index: int, count: int, barrier, queue):
    cohort = Cohort.open(root, scan_features=False)
    queue.put((index, loader_round(cohort, cfg, steps, index, count, barrier), memory()))


def processes_round(root: Path, cfg: LoaderConfig, steps: int, count: int) -> dict:
    """`count` OS processes, each its rows of every global batch, started together; aggregate rate."""
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(count)
    procs = [ctx.Process(target=_process_main, args=(str(root), cfg, steps, i, count, barrier, queue))
             for i in range(count)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    rounds = [r for _, r, _ in sorted(got, key=lambda g: g[0])]
    start = min(r["t0"] for r in rounds)  # CLOCK_MONOTONIC: one clock for all processes
    late = max(r["t0"] for r in rounds) - start
    seconds = max(r["t_end"] for r in rounds) - start
    total = sum(r["bytes"] for r in rounds)
    return {"processes": count, "mb_per_s": total / MiB / seconds, "batches_per_s": steps / seconds,
            "seconds": seconds, "late_start_s": late, "disk_per_delivered": [r.get("disk_per_delivered") for r in rounds],
            "mb_per_cpu_s": [r.get("mb_per_cpu_s") for r in rounds],
            "per_process_mb_per_s": [r["mb_per_s"] for r in rounds],
            "peak_rss_mb": [m["peak_rss_mb"] for _, _, m in sorted(got, key=lambda g: g[0])]}


def profile_round(cohort, cfg: LoaderConfig, steps: int, paths, top: int = 12) -> dict:
    """cProfile of one cold in-process round: the functions with the most own time. Rows are read one after another
    (read_threads 1): cProfile sees only its own thread, and the threads overlap waits, not work."""
    drop_cache(paths)
    cfg = LoaderConfig(**{**cfg.__dict__, "read_threads": 1})
    loader = TileBagLoader(cohort, cfg, list(cohort.cases.index), modalities=("slide",))
    prof = cProfile.Profile()
    prof.enable()
    for s in range(steps):
        loader.batch(s)
    prof.disable()
    loader.close()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    total = sum(v[2] for v in stats.stats.values())
    return {"total_s": total, "top_own_time": [
        {"function": f"{Path(f).name}:{line}({name})", "own_s": round(v[2], 3), "calls": v[1]}
        for (f, line, name), v in rows]}


def _windows(n_slides: int, n: int, k: int, seed: int = 1) -> list[tuple[int, int]]:
    """(first stored row, rows) runs of one k-row window per slide (random start, wrapped into ≤ 2 runs)."""
    rng, runs = np.random.default_rng(seed), []
    for i in range(n_slides):
        start = int(rng.integers(n))
        head = min(k, n - start)
        runs += [(i * n + start, head)] + ([(i * n, k - head)] if k > head else [])
    return runs


def containers_round(shard: Path, work: Path, n_slides: int, n: int, k: int, dim: int) -> list[dict]:
    """The same windows (the first `n_slides` slides of a packed shard, one k-row window each) read cold from each
    candidate container; zarr, tensorstore and array-record come with the project's dependencies (anndata,
    orbax, grain), none is a new one."""
    import tensorstore as ts
    import zarr
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    from mmfm.data.packed import PackedStore

    store = PackedStore.open(shard.parent)
    src = np.array(np.load(shard, mmap_mode="r")[: n_slides * n])  # a copy: a live map would pin the pages
    runs = _windows(n_slides, n, k)
    zdir, adir = work / "windows.zarr", work / "windows.array_record"
    t0 = time.perf_counter()
    z = zarr.create_array(store=str(zdir), shape=src.shape, chunks=(256, dim), dtype=src.dtype, compressors=None,
                          fill_value=0)
    for lo in range(0, len(src), 4096):
        z[lo: lo + 4096] = src[lo: lo + 4096]
    zarr_write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    w = ArrayRecordWriter(str(adir), "group_size:256,uncompressed")
    for row in src:
        w.write(row.tobytes())
    w.close()
    ar_write_s = time.perf_counter() - t0
    del src
    reader = PackedReader(store.shards, store.dim, store.dtype.str)
    mm = np.load(shard, mmap_mode="r")
    zr = zarr.open_array(str(zdir), mode="r")
    tsa = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(zdir)}}).result()
    ar = ArrayRecordReader(str(adir), "readahead_buffer_size:0")

    def frombytes(records):
        return np.frombuffer(b"".join(records), store.dtype).reshape(-1, dim)

    readers = {  # name: (read one run (first, rows), files to drop)
        "npy_pread (mmfm)": (lambda a, m: reader.read(0, a, np.arange(m))["features"], [shard]),
        "npy_memmap": (lambda a, m: np.array(mm[a: a + m]), [shard]),
        "zarr_v3 (zarr-python)": (lambda a, m: zr[a: a + m], sorted(p for p in zdir.rglob("*") if p.is_file())),
        "zarr_v3 (tensorstore)": (lambda a, m: tsa[a: a + m].read().result(),
                                  sorted(p for p in zdir.rglob("*") if p.is_file())),
        "array_record": (lambda a, m: frombytes(ar.read(a, a + m)), [adir]),
    }
    out = []
    for name, (read, files) in readers.items():
        drop_cache(files, sync=True)
        disk0, cpu0, t0 = disk_read_bytes(), time.process_time(), time.perf_counter()
        delivered = 0
        for a, m in runs:
            got = read(a, m)
            assert got.shape == (m, dim)
            delivered += got.nbytes
        seconds = time.perf_counter() - t0
        disk = disk_read_bytes() - disk0
        out.append({"container": name, "mb_per_s": delivered / MiB / seconds, "cpu_s": time.process_time() - cpu0,
                    "seconds": seconds, "disk_per_delivered": disk / delivered, "windows": n_slides})
        print(f"container {name}: {out[-1]['mb_per_s']:.0f} MB/s cold, cpu {out[-1]['cpu_s']:.2f} s, "
              f"disk/delivered {out[-1]['disk_per_delivered']:.2f}", flush=True)
    check = [read(*runs[0]) for read, _ in readers.values()]
    assert all(np.array_equal(check[0], c) for c in check[1:]), "containers disagree"
    reader.close()
    ar.close()
    out.append({"write_s": {"zarr_v3": zarr_write_s, "array_record": ar_write_s}})
    shutil.rmtree(zdir)
    adir.unlink()
    return out


def _run(*cmd) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    lscpu = _run("lscpu") or ""
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), None)
    return {"cpu_model": model or platform.processor(), "cpus": os.cpu_count(), "uptime": _run("uptime"),
            "loadavg": os.getloadavg()}


def disk(path: Path) -> dict:
    return {"df": _run("df", "-h", str(path)), "lsblk": _run("lsblk", "-o", "NAME,SIZE,ROTA,TYPE,MODEL,MOUNTPOINTS")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="OUT", required=True)
    p.add_argument("--slides", type=int, default=2000, help="bags (one case each)")
    p.add_argument("--tiles", type=int, default=4096, help="tiles per bag")
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--k", type=int, default=2048, help="tiles_per_slide sampled per case per step")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=0, help="batches per round (default: one epoch)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--read-threads", type=int, nargs="+", default=[LoaderConfig.read_threads],
                   help="LoaderConfig.read_threads: in-process rounds run once per value (1: rows read one after "
                        "another), rounds with grain workers use the first")
    p.add_argument("--readahead", nargs="+", default=["willneed"], choices=READAHEAD,
                   help="LoaderConfig.readahead modes timed cold on the h5 bags, side by side")
    p.add_argument("--processes", type=int, default=2, help="OS processes for the aggregate round (0: skip)")
    p.add_argument("--shard-gb", type=float, default=1.0, help="`mmfm pack --shard-gb`")
    p.add_argument("--container-slides", type=int, default=32, help="slides whose windows each container reads "
                   "(0: skip the container comparison)")
    p.add_argument("--dir", help="where the store goes (default: a temp dir); it is removed after")
    a = p.parse_args(argv)

    size = a.slides * a.tiles * a.dim * 2 * 2 + 2 * a.container_slides * a.tiles * a.dim * 2  # bags, shards, containers
    work = Path(tempfile.mkdtemp(prefix="bench_feature_store_", dir=a.dir))
    free = shutil.disk_usage(work).free
    if size * 1.1 + 4 * 2**30 > free:
        work.rmdir()
        raise SystemExit(f"stores of {size / 2**30:.1f} GiB would leave under 4 GiB of {free / 2**30:.1f} GiB "
                         f"free at {work.parent}: pass fewer --slides/--tiles or another --dir")
    res: dict = {"machine": machine(), "disk": disk(work)}
    try:
        root = work / "store"
        t0 = time.perf_counter()
        paths = write_store(root, a.slides, a.tiles, a.dim)
        res["write_s"] = time.perf_counter() - t0
        res["store_gb"] = sum(p.stat().st_size for p in paths) / 2**30
        cohort = Cohort.open(root, scan_features=False)
        steps_per_epoch = a.slides // a.batch_size
        steps = min(a.steps or steps_per_epoch, steps_per_epoch)  # one epoch: no bag read twice in a round
        if steps <= max(a.workers):
            raise SystemExit(f"{steps} steps per round ≤ {max(a.workers)} workers: more --slides or smaller --batch-size")
        drop_cache(paths)
        res["resident_after_drop"] = resident_fraction(paths)
        res.update(raw_bandwidth(paths))
        res["memory_after_raw"] = memory()

        t0 = time.perf_counter()
        packed_dir = pack_cohort(Cohort.open(root, scan_features=False, packed=False), shard_gb=a.shard_gb,
                                 log=lambda _: None)
        res["pack_s"] = time.perf_counter() - t0
        shards = sorted(packed_dir.glob("shard-*.npy"))
        res["packed_gb"] = sum(p.stat().st_size for p in shards) / 2**30
        res["raw_packed"] = raw_bandwidth(shards)
        cohort = Cohort.open(root, scan_features=False)

        sampled = min(a.k, a.tiles) / a.tiles  # fraction of each bag's rows a step delivers
        cfg = LoaderConfig(batch_size=a.batch_size, tiles_per_slide=a.k, prefetch=2)
        rounds = []
        combos = [(0, t) for t in a.read_threads if 0 in a.workers] + [(w, a.read_threads[0]) for w in a.workers if w]
        for layout in ("h5", "packed"):
            modes = a.readahead if layout == "h5" else ["willneed"]  # readahead is a bag-reader setting
            for workers, threads in combos:  # cold (each readahead mode), then warm (the same steps again)
                for cache, readahead in [("cold", m) for m in modes] + [("warm", "kernel" if layout == "h5" else "willneed")]:
                    if cache == "cold":
                        drop_cache(paths + shards)
                    run = LoaderConfig(**{**cfg.__dict__, "workers": workers, "tile_store": layout,
                                          "readahead": readahead, "read_threads": threads})
                    with PeakMemory() as peak:
                        r = loader_round(cohort, run, steps)
                    r = {"layout": layout, "workers": workers, "read_threads": threads, "cache": cache,
                         "readahead": readahead, **{k: v for k, v in r.items() if k not in ("t0", "t_end")},
                         "ratio_delivered": r["mb_per_s"] / res["raw_mb_per_s"],
                         "ratio_swept": r["mb_per_s"] / sampled / res["raw_mb_per_s"],
                         "memory": {**memory(), **peak.mb()}}
                    rounds.append(r)
                    print(f"{layout} workers={workers} read_threads={threads} {cache} readahead={readahead}: "
                          f"{r['mb_per_s']:.0f} MB/s delivered, {r['batches_per_s']:.2f} batches/s, ratio "
                          f"{r['ratio_delivered']:.2f} (swept {r['ratio_swept']:.2f}), disk/delivered "
                          f"{r.get('disk_per_delivered', float('nan')):.2f}, MB per CPU s "
                          f"{r.get('mb_per_cpu_s', float('nan')):.0f}, peak anon {peak.mb()['peak_anon_mb']:.0f} MB, "
                          f"RSS anon after {r['memory']['rss_anon_mb']:.0f} MB", flush=True)
        res["rounds"] = rounds
        if a.processes > 1:
            res["processes_rounds"] = []
            for layout in ("h5", "packed"):
                drop_cache(paths + shards)
                pr = processes_round(root, LoaderConfig(**{**cfg.__dict__, "tile_store": layout}), steps, a.processes)
                pr.update(layout=layout, ratio_delivered=pr["mb_per_s"] / res["raw_mb_per_s"],
                          ratio_swept=pr["mb_per_s"] / sampled / res["raw_mb_per_s"])
                res["processes_rounds"].append(pr)
                print(f"{layout}: {a.processes} processes cold: {pr['mb_per_s']:.0f} MB/s together, "
                      f"ratio {pr['ratio_delivered']:.2f}", flush=True)
        res["profile_cold_in_process"] = {
            layout: profile_round(cohort, LoaderConfig(**{**cfg.__dict__, "tile_store": layout}), min(steps, 4),
                                  paths + shards) for layout in ("h5", "packed")}
        if a.container_slides:
            n_slides = min(a.container_slides, int(cohort.packed.index["shards"][0]["rows"]) // a.tiles)
            res["containers"] = containers_round(packed_dir / "shard-00000.features.npy", work, n_slides, a.tiles,
                                                 min(a.k, a.tiles), a.dim)
        res["memory_end"] = memory()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["settings"] = {"slides": a.slides, "tiles_per_bag": a.tiles, "dim": a.dim, "dtype": "float16",
                       "tiles_per_slide": a.k, "sampled_fraction": sampled, "batch_size": a.batch_size,
                       "steps_per_round": steps, "prefetch": cfg.prefetch, "read_threads": a.read_threads,
                       "bag_chunks": "write_bag default (256-row chunks, uncompressed)", "shard_gb": a.shard_gb,
                       "raw": "sequential 8 MiB reads of every bag, each dropped from the page cache first",
                       "workers_timing": "rates skip the first `workers` batches (worker start-up)"}
    res["machine"]["uptime_end"] = machine()["uptime"]
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
