"""Where the tissue lies on the tile grid: 1–4 fragments (irregular blobs) and the smooth random fields that
cluster tile types in space."""

from __future__ import annotations

import heapq

import numpy as np
from scipy import ndimage

FRAGMENT_COUNT_P = np.array([0.35, 0.35, 0.2, 0.1])


def field(xy: np.ndarray, r: np.random.Generator, length: float, n_waves: int = 16) -> np.ndarray:
    """A smooth unit-variance random field (random Fourier features of a Gaussian kernel) at points xy."""
    w = r.standard_normal((n_waves, 2)) / length
    phase = r.uniform(0.0, 2 * np.pi, n_waves)
    return np.sqrt(2.0 / n_waves) * np.cos(xy @ w.T + phase).sum(axis=1)


def _connected(score: np.ndarray, m: int) -> np.ndarray:
    """Boolean mask of m connected cells of low score: the m lowest, reduced to their largest piece, then
    regrown from its border always taking the lowest-score neighbour (only the few missing cells loop)."""
    mask = np.zeros(score.shape, bool)
    mask.flat[np.argpartition(score.ravel(), m - 1)[:m]] = True
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    missing = m - int(mask.sum())
    if missing:
        w, flat = score.shape[1], score.ravel()
        seen = mask | ndimage.binary_dilation(mask)
        heap = [(flat[i], i) for i in np.flatnonzero(seen & ~mask)]
        heapq.heapify(heap)
        seen, out = seen.ravel(), mask.ravel()
        for _ in range(missing):
            _, i = heapq.heappop(heap)
            out[i] = True
            for j in (i - w, i + w, i - 1 if i % w else -1, i + 1 if (i + 1) % w else -1):
                if 0 <= j < len(flat) and not seen[j]:
                    seen[j] = True
                    heapq.heappush(heap, (flat[j], j))
        mask = out.reshape(score.shape)
    return mask


def _blob(m: int, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """m contiguous grid cells forming an irregular ellipse; returns (xy from 0, depth 0=edge…1=core)."""
    aspect, theta = r.uniform(0.45, 1.0), r.uniform(0.0, np.pi)
    r1 = np.sqrt(m / (np.pi * aspect))
    half = int(np.ceil(1.5 * r1)) + 2
    y, x = np.mgrid[-half:half + 1, -half:half + 1]
    xy = np.stack([x.ravel(), y.ravel()], 1).astype(np.float64)
    u = (xy[:, 0] * np.cos(theta) + xy[:, 1] * np.sin(theta)) / r1
    v = (-xy[:, 0] * np.sin(theta) + xy[:, 1] * np.cos(theta)) / (aspect * r1)
    score = np.hypot(u, v) + 0.3 * field(xy, r, max(r1 / 2, 1.5))
    keep = np.flatnonzero(_connected(score.reshape(x.shape), m))
    s = score[keep]
    depth = (s.max() - s) / max(s.max() - s.min(), 1e-9)
    cells = xy[keep].astype(np.int64)
    return cells - cells.min(axis=0), depth


def tissue_layout(n: int, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1–4 tissue fragments (blobs) side by side on the tile grid: (xy [n,2], fragment [n], depth [n])."""
    n_frag = min(1 + int(r.choice(len(FRAGMENT_COUNT_P), p=FRAGMENT_COUNT_P)), max(1, n // 32))
    share = r.dirichlet(np.full(n_frag, 3.0))
    sizes = 8 + r.multinomial(n - 8 * n_frag, share) if n_frag > 1 else np.array([n])
    xy, frag, depth, x0 = [], [], [], 0
    for f, m in enumerate(sizes):
        cells, d = _blob(int(m), r)
        xy.append(cells + np.array([x0, r.integers(0, 8)]))
        x0 += int(cells[:, 0].max()) + 1 + int(r.integers(2, 12))
        frag.append(np.full(int(m), f, np.int32))
        depth.append(d)
    xy = np.concatenate(xy) + r.integers(4, 40, size=2)  # margin to the slide's top-left corner
    return xy, np.concatenate(frag), np.concatenate(depth)

