"""CLAM `.pt` tile-feature files: `pt_files/<slide>.pt`, one float tensor [N, D] written by `torch.save`.

Loaded with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers, so a user file
can never run code. The rows are in the order of the coordinates in CLAM's `patches/<slide>.h5` / `h5_files/`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch


def read_pt_features(path: str | Path) -> np.ndarray:
    """[N, D] float32 features of one CLAM .pt file; ValueError naming the file for anything else."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a tensor file torch.load(weights_only=True) accepts ({e})") from e
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2 or not obj.is_floating_point():
        what = (f"a {obj.dtype} tensor of shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor)
                else type(obj).__name__)
        raise ValueError(f"{path}: expected a float tensor [N, D] (CLAM pt_files), got {what}")
    return obj.detach().to(torch.float32).numpy()
