"""Tile-encoder names across tools: TRIDENT's encoder names → mmfm's registry names (torch-free, so the importers
and the cohort check can use it; the architectures live in `mmfm.bridges.encoders`).

TRIDENT writes its name in each bag (`features.attrs['encoder']`) and in the folder (`features_<name>/`;
TRIDENT a91fa84 `trident/wsi_objects/WSI.py`, `patch_encoder_models/load.py`). Two names of one encoder are one
encoder: a cohort of TRIDENT `conch_v15` bags and mmfm `conch-v1.5` bags is not a mix.
"""

from __future__ import annotations

TRIDENT_NAMES = {
    "uni_v1": "uni", "uni_v2": "uni2-h", "virchow": "virchow", "virchow2": "virchow2",
    "hoptimus0": "h-optimus-0", "hoptimus1": "h-optimus-1", "gigapath": "gigapath", "conch_v15": "conch-v1.5",
    "phikon_v2": "phikon-v2", "hibou_l": "hibou-l",
    **{f"kaiko-{v}": f"kaiko-{v}" for v in ("vits16", "vits8", "vitb16", "vitb8", "vitl14")},
}


def canonical(name: str) -> str:
    """mmfm's name for an encoder named by mmfm or TRIDENT; any other name unchanged."""
    return TRIDENT_NAMES.get(name, name)
