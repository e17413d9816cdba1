"""`heatmap(cfg)`: per-tile scores of a run (`mmfm.eval.heatmap`) drawn over the whole-slide thumbnail, or on the
tile grid when no slide image is given. Here, beside the other bridges, because it opens slides with OpenSlide.

Placement is exact, with the convention of `mmfm.bridges.tissue`: level-0 pixel (x, y) lies in thumbnail pixel
(x·tw // W, y·th // H). A tile covers level-0 [x, x + patch_size_level0) × [y, y + patch_size_level0); a
thumbnail pixel shows the mean score of the level-0 pixels in it that tiles cover, each weighted by how many
it covers (so a pixel straddling two tiles shows their area-weighted mean), and stays the bare thumbnail where
no tile reaches. Separable per axis, so it costs a few operations per tile, never a level-0 image.

Outputs per score (`render_all`): `<slide>.<score>.png` (overlay or grid with a colour bar and the query in the
title), `<slide>.<score>.overlay.png` (the blended thumbnail, pixel for pixel, for other tools) and
`<slide>.<score>.topk.png` (the k highest-scoring tiles read from the slide; needs the WSI).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from mmfm.eval.heatmap import TileScores, run_tile_scores, write_tile_scores
from mmfm.io import atomic_path

log = logging.getLogger(__name__)


Step = Literal["latest", "best"] | int  # aliases keep the field lines free of quotes (draccus reads their comments)
Scale = Literal["rank", "minmax"]


@dataclass(frozen=True)
class HeatmapConfig:
    run: str                                   # run directory of `mmfm pretrain`
    cohort: str                                # cohort directory holding the slide's tile-feature bag
    slide: str                                 # slide_id (slides.csv)
    out: str                                   # output folder (tile-score h5 + PNGs)
    wsi: str | None = None                     # the whole-slide image: overlay on its thumbnail; None: tile grid
    queries: tuple[str, ...] = ()              # rna | protein | report | mutation (the case's own) or free text
    step: Step = "latest"                      # checkpoint: latest, best (train.best_metric) or a step number
    top_k: int = 8                             # tiles in the top-k strip (needs the WSI)
    scale: Scale = "rank"                      # colours: percentile of the slide's tiles (CLAM) or min–max
    alpha: float = 0.5                         # overlay opacity over the thumbnail
    cmap: str = "jet"                          # matplotlib colour map
    thumb_max_px: int = 2048                   # longest side of the thumbnail
    mpp: float | None = None                   # level-0 µm/px, only for a WSI file that records none


@dataclass
class HeatmapResult:
    scores: TileScores
    h5: Path
    figures: dict[str, list[Path]]             # score name → PNGs written


def heatmap(cfg: HeatmapConfig) -> HeatmapResult:
    """Scores of `cfg.slide` under `cfg.run`, written to `cfg.out` as h5 + overlay / grid PNGs (+ top-k strips)."""
    if cfg.scale not in ("rank", "minmax"):
        raise ValueError(f"heatmap scale={cfg.scale!r}; choose rank or minmax")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"heatmap alpha={cfg.alpha} must lie in [0, 1]")
    import matplotlib

    if cfg.cmap not in matplotlib.colormaps:
        raise ValueError(f"heatmap cmap={cfg.cmap!r} is not a matplotlib colour map (e.g. jet, viridis, RdBu_r)")
    ts = run_tile_scores(cfg.run, cfg.cohort, cfg.slide, cfg.queries, cfg.step)
    out = Path(cfg.out)
    h5 = write_tile_scores(out / f"{cfg.slide}.tile_scores.h5", ts)
    figures = render_all(ts, out, wsi=cfg.wsi, scale=cfg.scale, alpha=cfg.alpha, cmap=cfg.cmap, top_k=cfg.top_k,
                         thumb_max_px=cfg.thumb_max_px, mpp=cfg.mpp)
    log.info("heatmap %s: %d tiles, scores %s → %s", cfg.slide, len(ts.coords), list(ts.scores), out)
    return HeatmapResult(ts, h5, figures)


def _axis(start: np.ndarray, length: int, extent: int, n_pix: int):
    """Per tile: the first thumbnail pixel it touches, how many it touches, and `overlap(j, tiles)`: how many
    level-0 pixels of each of `tiles` lie inside thumbnail pixel j."""
    a = np.clip(start, 0, extent)
    b = np.clip(start + length, 0, extent)
    inside = b > a
    first = a * n_pix // extent
    count = np.where(inside, (np.maximum(b, 1) - 1) * n_pix // extent - first + 1, 0)

    def overlap(j, tiles):
        lo, hi = -(-j * extent // n_pix), -(-(j + 1) * extent // n_pix)  # level-0 span of pixel j
        return np.maximum(0, np.minimum(b[tiles], hi) - np.maximum(a[tiles], lo))

    return first, count, overlap


def score_raster(coords: np.ndarray, patch_size_level0: int, values: np.ndarray, level0_size: tuple[int, int],
                 thumb_size: tuple[int, int]) -> np.ndarray:
    """[th, tw] float64: coverage-weighted mean tile value per thumbnail pixel; NaN where no tile reaches."""
    (W, H), (tw, th) = level0_size, thumb_size
    coords = np.asarray(coords, np.int64)
    values = np.asarray(values, np.float64)
    fx, nx, ox = _axis(coords[:, 0], int(patch_size_level0), int(W), int(tw))
    fy, ny, oy = _axis(coords[:, 1], int(patch_size_level0), int(H), int(th))
    num = np.zeros(th * tw)
    den = np.zeros(th * tw)
    for dy in range(int(ny.max(initial=0))):
        for dx in range(int(nx.max(initial=0))):
            ok = (dy < ny) & (dx < nx)
            i, j = fy[ok] + dy, fx[ok] + dx
            w = (oy(i, ok) * ox(j, ok)).astype(np.float64)
            num += np.bincount(i * tw + j, weights=w * values[ok], minlength=th * tw)
            den += np.bincount(i * tw + j, weights=w, minlength=th * tw)
    out = np.full(th * tw, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out.reshape(th, tw)


def scaled(scores: np.ndarray, scale: str) -> np.ndarray:
    """Colour values in [0, 1]: 'rank' = percentile among the slide's tiles (ties averaged), 'minmax'."""
    s = np.asarray(scores, np.float64)
    if scale == "rank":
        from scipy.stats import rankdata

        return (rankdata(s) - 1) / max(len(s) - 1, 1)
    if scale == "minmax":
        span = s.max() - s.min() if len(s) else 0.0
        return (s - s.min()) / span if span > 0 else np.full_like(s, 0.5)
    raise ValueError(f"scale={scale!r}; choose rank or minmax")


def blend(thumb: np.ndarray, raster: np.ndarray, cmap: str, alpha: float) -> np.ndarray:
    """uint8 [th, tw, 3]: (1 − α)·thumbnail + α·colour(raster) where the raster is finite, the thumbnail elsewhere."""
    import matplotlib

    rgb = matplotlib.colormaps[cmap](np.nan_to_num(raster, nan=0.0))[..., :3] * 255.0
    mixed = np.rint((1.0 - alpha) * thumb.astype(np.float64) + alpha * rgb).astype(np.uint8)
    return np.where(np.isfinite(raster)[..., None], mixed, thumb)


def _save_png(path: Path, image: np.ndarray) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def _save_figure(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _figure(image: np.ndarray, title: str, cmap: str, scale: str, raw: np.ndarray, path: Path,
            interpolation: str = "antialiased") -> Path:
    """The picture with a colour bar (scaled values, the raw range in its label)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    fig = Figure(figsize=(min(12.0, 2.0 + 6.0 * w / max(h, w)), min(10.0, 1.0 + 6.0 * h / max(h, w))))
    ax = fig.add_subplot()
    ax.imshow(image, interpolation=interpolation)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    label = "percentile of the slide's tiles" if scale == "rank" else "min–max scaled"
    cb = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=cmap), ax=ax, fraction=0.04, pad=0.02)
    cb.set_label(f"{label}\n(raw {np.nanmin(raw):.3g} … {np.nanmax(raw):.3g})", fontsize=8)
    return _save_figure(fig, path)


def grid_image(coords: np.ndarray, patch_size_level0: int, values: np.ndarray, cmap: str) -> np.ndarray:
    """RGB uint8 [rows, cols, 3]: one pixel per grid cell (white where there is no tile)."""
    import matplotlib

    g = np.asarray(coords, np.int64) // int(patch_size_level0)
    g -= g.min(0)
    canvas = np.full((g[:, 1].max() + 1, g[:, 0].max() + 1), np.nan)
    canvas[g[:, 1], g[:, 0]] = values
    rgb = (matplotlib.colormaps[cmap](np.nan_to_num(canvas))[..., :3] * 255).round().astype(np.uint8)
    rgb[~np.isfinite(canvas)] = 255
    return rgb


def topk_strip(reader, coords: np.ndarray, patch_size_level0: int, scores: np.ndarray, k: int, path: Path,
               title: str, tile_px: int = 160) -> Path:
    """The k highest-scoring tiles, read at level 0 resolution and resized, side by side with rank and score."""
    from matplotlib.figure import Figure

    top = np.argsort(-np.asarray(scores), kind="stable")[:k]
    fig = Figure(figsize=(1.6 * len(top), 2.0))
    for r, i in enumerate(top):
        ax = fig.add_subplot(1, len(top), r + 1)
        ax.imshow(reader.read_tile(tuple(coords[i]), int(patch_size_level0), tile_px))
        ax.set_axis_off()
        ax.set_title(f"#{r + 1}  {scores[i]:.3g}\n({coords[i][0]}, {coords[i][1]})", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save_figure(fig, path)


def thumbnail(reader, max_px: int) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB thumbnail with its longest side ≤ `max_px` (never finer than level 0) and its (w, h)."""
    W, H = reader.dimensions
    return reader.thumbnail(max(reader.mpp, max(W, H) * reader.mpp / max_px))


def render_all(ts, out: str | Path, *, wsi: str | Path | None = None, scale: str = "rank", alpha: float = 0.5,
               cmap: str = "jet", top_k: int = 8, thumb_max_px: int = 2048, mpp: float | None = None
               ) -> dict[str, list[Path]]:
    """Every score of `ts`: overlay on the WSI thumbnail (+ pixel-exact overlay PNG, top-k strip), or the grid."""
    out = Path(out)
    written: dict[str, list[Path]] = {}
    reader = None
    if wsi is not None:
        from mmfm.bridges.readers import open_slide

        reader = open_slide(wsi, mpp=mpp)
    try:
        if reader is not None:
            thumb, size = thumbnail(reader, thumb_max_px)
            W, H = reader.dimensions
            if (ts.coords[:, 0] >= W).any() or (ts.coords[:, 1] >= H).any():
                raise ValueError(f"{wsi}: tile coordinates of slide {ts.slide_id} reach beyond its {W}×{H} level 0 "
                                 "(is this the slide the bag was extracted from?)")
        for name, raw in ts.scores.items():
            title = f"{ts.slide_id} · {name}" + (f"\n{ts.queries[name]}" if ts.queries.get(name, "attention")
                                                 != "attention" else "")
            v = scaled(raw, scale)
            stem = f"{ts.slide_id}.{name}"
            if reader is not None:
                image = blend(thumb, score_raster(ts.coords, ts.patch_size_level0, v, (W, H), size), cmap, alpha)
                paths = [_figure(image, title, cmap, scale, raw, out / f"{stem}.png"),
                         _save_png(out / f"{stem}.overlay.png", image)]
                if top_k > 0:
                    paths.append(topk_strip(reader, ts.coords, ts.patch_size_level0, raw, top_k,
                                            out / f"{stem}.topk.png", f"top {top_k} tiles · {name}"))
            else:
                paths = [_figure(grid_image(ts.coords, ts.patch_size_level0, v, cmap), title, cmap, scale, raw,
                                 out / f"{stem}.png", interpolation="nearest")]
            written[name] = paths
    finally:
        if reader is not None:
            reader.close()
    return written
