"""Whole-slide readers: one small interface over OpenSlide, tiffslide and plain images.

Magnification is derived from microns per pixel exactly (no 20×/40× bucketing): a tile of `patch_size` px at
`target_mag` covers `round(patch_size × (10 / target_mag) / mpp)` level-0 pixels, read from the coarsest pyramid
level that is still at least as fine as needed and resized to `patch_size`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmfm.data.bags import mag_to_mpp

# one file per slide (a DICOM WSI is a folder of files and is not listed)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class SlideError(RuntimeError):
    """A slide that cannot be used; the message names the file and the reason."""


def upsampling(level0_mpp: float, target_mag: float) -> float:
    """How many times finer the target magnification is than the scan (≤ 1: tiles are downsampled or read as is)."""
    return float(level0_mpp) / mag_to_mpp(target_mag)


@contextlib.contextmanager
def captured_log(name: str = "tifffile"):
    """Collect a library logger's messages instead of letting them reach stderr unannounced (tifffile logs
    "invalid offset to first page" for a truncated TIFF before raising); the caller puts them into its error."""
    notes: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: notes.append(re.sub(r"^<[^>]*> ", "", record.getMessage()))
    log = logging.getLogger(name)
    saved = log.handlers, log.propagate
    log.handlers, log.propagate = [handler], False
    try:
        yield notes
    finally:
        log.handlers, log.propagate = saved


def best_level(downsamples: tuple[float, ...], needed: float, rtol: float = 1e-3) -> int:
    """The coarsest level whose downsample ≤ `needed` (reading coarser than needed would lose detail)."""
    ok = [i for i, d in enumerate(downsamples) if d <= needed * (1 + rtol)]
    return max(ok, key=lambda i: downsamples[i]) if ok else 0


@dataclass
class SlideReader:
    """Backend-neutral slide handle. `mpp` is level-0 µm/px or None when the file does not say."""

    path: Path
    backend: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    _handle: object = None
    mpp_from: str = "file"  # "file" or "--mpp": where `mpp` came from, for messages

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def read_region(self, xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [h, w, 3]; `xy` is the level-0 top-left, `size` is at `level`. Outside the slide is white."""
        x, y = int(xy[0]), int(xy[1])
        w, h = int(size[0]), int(size[1])
        if self.backend == "image":
            img = self._handle
            out = np.full((h, w, 3), 255, np.uint8)
            W, H = self.dimensions
            x1, y1 = min(x + w, W), min(y + h, H)
            if x1 > x and y1 > y:
                out[: y1 - y, : x1 - x] = img[y:y1, x:x1]
            return out
        with captured_log("tifffile"):  # its log lines would interleave with progress; the exception says enough
            region = self._handle.read_region((x, y), level, (w, h))
        rgba = np.asarray(region)
        if rgba.shape[-1] == 4:  # transparent = outside the scanned area: composite onto white
            alpha = rgba[..., 3:4].astype(np.uint16)
            rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha)) // 255
            return rgb.astype(np.uint8)
        return np.ascontiguousarray(rgba[..., :3])

    def read_tile(self, xy: tuple[int, int], size_level0: int, out_size: int) -> np.ndarray:
        """A square tile of `size_level0` level-0 px from the best level, resized to `out_size`."""
        level = best_level(self.level_downsamples, size_level0 / out_size)
        ds = self.level_downsamples[level]
        n = max(1, int(round(size_level0 / ds)))
        tile = self.read_region(xy, level, (n, n))
        if n != out_size:
            tile = np.asarray(Image.fromarray(tile).resize((out_size, out_size), Image.BILINEAR))
        return tile

    def thumbnail(self, mpp: float, strip_bytes: int = 64 << 20) -> tuple[np.ndarray, tuple[int, int]]:
        """RGB image of the whole slide at about `mpp` µm/px and its (w, h), read from the best level in
        horizontal strips of about `strip_bytes` (a slide without coarse levels never sits whole in memory)."""
        W, H = self.dimensions
        scale = self.mpp / mpp
        tw, th = max(1, int(round(W * scale))), max(1, int(round(H * scale)))
        level = best_level(self.level_downsamples, W / tw)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        step = max(1, strip_bytes // (4 * lw))
        parts = []
        for y0 in range(0, lh, step):
            y1 = min(lh, y0 + step)
            o0, o1 = (y0 * th) // lh, (y1 * th) // lh
            if o1 > o0:
                strip = self.read_region((0, int(round(y0 * ds))), level, (lw, y1 - y0))
                parts.append(np.asarray(Image.fromarray(strip).resize((tw, o1 - o0), Image.BOX)))
        return np.concatenate(parts, axis=0), (tw, th)

    def close(self) -> None:
        if self.backend != "image" and self._handle is not None:
            self._handle.close()
        self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _float_or_none(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _mpp(props, prefix: str) -> float | None:
    """Level-0 µm/px: the mean of x and y when both are given, else whichever is."""
    mx, my = _float_or_none(props.get(f"{prefix}.mpp-x")), _float_or_none(props.get(f"{prefix}.mpp-y"))
    return (mx + my) / 2 if mx and my else (mx or my)


def _open_openslide(path: Path) -> SlideReader:
    import openslide

    s = openslide.OpenSlide(str(path))
    return SlideReader(path, "openslide", tuple(s.level_dimensions), tuple(float(d) for d in s.level_downsamples),
                       _mpp(s.properties, "openslide"), s)


def _open_tiffslide(path: Path) -> SlideReader:
    import tiffslide

    s = tiffslide.TiffSlide(str(path))
    return SlideReader(path, "tiffslide", tuple(s.level_dimensions), tuple(float(d) for d in s.level_downsamples),
                       _mpp(s.properties, "tiffslide"), _TiffSlideHandle(s))


class _TiffSlideHandle:
    """tiffslide returns arrays when asked; keep the OpenSlide call shape in `SlideReader`."""

    def __init__(self, s):
        self._s = s

    def read_region(self, xy, level, size):
        return self._s.read_region(xy, level, size, as_array=True)

    def close(self):
        self._s.close()


def _open_image(path: Path) -> SlideReader:
    with Image.open(path) as im:
        img = np.asarray(im.convert("RGB"))
    h, w = img.shape[:2]
    return SlideReader(path, "image", ((w, h),), (1.0,), None, img)


def open_slide(path: str | Path, mpp: float | None = None) -> SlideReader:
    """Open a slide with OpenSlide, falling back to tiffslide; PNG/JPEG as single-level images.

    `mpp` is used only when the file carries none; a slide with neither is a `SlideError`.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: file not found")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            reader = _open_image(path)
        except Exception as e:  # PIL raises several unrelated types for bad files
            raise SlideError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    else:
        errors = []
        reader = None
        for opener in (_open_openslide, _open_tiffslide):
            with captured_log("tifffile") as notes:
                try:
                    reader = opener(path)
                    break
                except Exception as e:  # each backend has its own error types; report both
                    why = f" [tifffile: {'; '.join(dict.fromkeys(notes))}]" if notes else ""
                    errors.append(f"{opener.__name__[6:]}: {type(e).__name__}: {e}{why}")
        if reader is None:
            raise SlideError(f"{path}: unsupported or corrupt slide ({'; '.join(errors)})")
    if reader.mpp is None:
        if mpp is None:
            reader.close()
            raise SlideError(f"{path}: no microns-per-pixel in the file; pass --mpp (µm/px at level 0)")
        reader.mpp, reader.mpp_from = float(mpp), "--mpp"
    return reader
