"""`mmfm extract`: whole-slide images → tile-feature bags with a PyTorch tile encoder."""

from __future__ import annotations

import json
import sys

from mmfm.bridges.extract import ExtractConfig as Config, extract

DESCRIPTION = """\
Segment tissue, tile every slide of --wsi_dir at --mag / --patch_size, encode the tiles with a timm tile
encoder (UNI, Virchow2, H-optimus, CONCH, …; weights from a local file, never downloaded) and write one
TRIDENT h5 bag per slide into the cohort directory --out. Resumable: finished bags are kept. Shard a large
folder over jobs with --shard i/n. Needs the PyTorch extra: pip install 'mmfm[bridges]'.

example: mmfm extract --wsi_dir slides/ --out cohort --encoder uni --weights uni.safetensors --mag 20 --patch_size 256"""

ALIASES = {"min_tissue": "tissue.min_tissue_fraction", "fill_holes": "tissue.fill_holes"}


def run(cfg: Config) -> int:
    summary = extract(cfg)
    for r in summary["slides"]:
        if r["status"] == "failed":
            print(f"FAILED {r['slide_id']}: {r['reason']}", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("shard", "n_ok", "n_skipped", "n_failed", "tiles_per_s")}))
    return 1 if summary["n_failed"] else 0
