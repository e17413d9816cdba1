"""Tile-feature extraction throughput: mmfm's pipeline vs a naive read-and-encode loop, side by side in one run.

Both encode the same tiles of the real CMU-1-Small-Region slide (repeated `--copies` times so worker start-up
does not dominate) with the same random-init encoder; segmentation is excluded from both timings. The naive loop
is what a first script does: open the slide, read one tile, encode it (batch of 1), repeat. Also measures
whether bf16 autocast pays on this CPU (mmfm uses it on CPU only when it is faster).

  python scripts/bench_extract.py --json out/bench/bench_extract.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import openslide
import torch
from PIL import Image

from mmfm.bridges.encoders import encode, load_encoder
from mmfm.bridges.extract import ExtractConfig, extract

SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def naive_loop(paths: list[Path], coords: np.ndarray, size0: int, patch: int, encoder) -> tuple[float, np.ndarray]:
    white = Image.new("RGBA", (size0, size0), (255, 255, 255, 255))
    t0 = time.perf_counter()
    feats = []
    for path in paths:
        slide = openslide.OpenSlide(str(path))
        for x, y in coords:
            region = Image.alpha_composite(white, slide.read_region((int(x), int(y)), 0, (size0, size0)))
            tile = np.asarray(region.convert("RGB").resize((patch, patch), Image.BILINEAR))
            feats.append(encode(encoder, torch.from_numpy(tile.copy())[None], torch.float32))
        slide.close()
    return time.perf_counter() - t0, torch.cat(feats).numpy()


def autocast_ratio(encoder, n: int = 32, reps: int = 3) -> float:
    """Time of bf16 autocast / time of fp32 on this CPU for one batch (best of `reps`)."""
    tiles = torch.randint(0, 256, (n, 256, 256, 3), dtype=torch.uint8)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        encode(encoder, tiles, dtype)  # warm-up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            encode(encoder, tiles, dtype)
            ts.append(time.perf_counter() - t0)
        best[dtype] = min(ts)
    return best[torch.bfloat16] / best[torch.float32]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--encoder", default="vit-test")
    ap.add_argument("--copies", type=int, default=4, help="the slide is processed this many times")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=256)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    encoder = load_encoder(args.encoder, random_init=True)
    with tempfile.TemporaryDirectory() as tmp:
        wsi, out = Path(tmp) / "wsi", Path(tmp) / "cohort"
        wsi.mkdir()
        paths = []
        for i in range(args.copies):
            paths.append(wsi / f"copy{i}.svs")
            paths[-1].symlink_to(SLIDE)
        cfg = ExtractConfig(wsi_dir=wsi, out=out, encoder=args.encoder, random_init=True, mag=20.0,
                            patch_size=args.patch_size, workers=args.workers, batch_size=args.batch_size,
                            device="cpu", precision="fp32", progress=False)
        summary = extract(cfg, encoder=encoder)
        if summary["n_failed"]:
            print(json.dumps(summary["slides"], indent=1), file=sys.stderr)
            return 1
        with h5py.File(out / "bags" / "copy0.h5", "r") as f:
            coords, ours = f["coords"][:], f["features"][:]
            size0 = int(f["coords"].attrs["patch_size_level0"])
        naive_s, naive_feats = naive_loop(paths, coords, size0, args.patch_size, encoder)
    n_tiles = summary["tiles_encoded"]
    same = bool(np.allclose(ours, naive_feats[: len(coords)], rtol=1e-3, atol=1e-3))
    result = {
        "slide": SLIDE.name, "encoder": args.encoder, "tiles": n_tiles, "workers": args.workers,
        "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
        "tiles_per_s": summary["tiles_per_s"], "naive_tiles_per_s": n_tiles / naive_s,
        "speedup": summary["tiles_per_s"] / (n_tiles / naive_s), "features_match_naive": same,
        "cpu_bf16_time_over_fp32": autocast_ratio(encoder),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
