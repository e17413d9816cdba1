"""Tissue-source sites in pretraining: site ids, site-balanced batches, feature-level site-style transfer.

A slide encoder trained on TCGA-like data can learn the hospital (stain, scanner, protocol) instead of the tumour
(Howard et al., Nat. Commun. 2021). Two remedies live on the data side, both pure functions of (seed, step) so a
resumed run sees the same batches:

* Site-balanced batches (`loader.site_balance`, `balanced_rows`). The loader's cases are split into strata, one
  per training site (cases.csv `site`; cases without a site form one extra stratum). Each global batch of B rows
  takes a fixed quota q_s from every stratum, found by water-filling: equal shares B/S, a stratum with fewer
  cases than its share gives all of them (q_s = n_s) and its unused rows are shared by the others; the
  B mod S rows left after an equal split go one each to the largest strata. So every batch holds B/S rows of each
  site (±1) as far as counts allow. Stratum s is read as a sequence of passes; pass p is a permutation of its
  cases seeded by (seed, s, p) cut into ⌊n_s/q_s⌋ blocks of q_s (the n_s mod q_s left over are dropped from that
  pass, different ones each pass), and batch t takes block t mod ⌊n_s/q_s⌋ of pass t div ⌊n_s/q_s⌋. A site
  that runs out simply starts its next pass: small sites are revisited more often than large ones (oversampled),
  and no case appears twice in one batch. The batch's rows are then shuffled (seed, t) so sites mix over devices.
* Site-style transfer (`loader.site_augment`, `SiteStyle`). Per training site s, the mean μ_s and per-dimension
  standard deviation σ_s of tile features are fitted on the training loader's cases only (a fixed sample of
  `site_augment_fit_tiles` tiles per slide). With probability p per slide and step, a slide of site s is moved
  to another training site t drawn uniformly: x ↦ x − μ_s + μ_t, or with `site_augment_scale`
  x ↦ μ_t + (x − μ_s)·σ_t/σ_s — the first- and second-order part of the additive stain/scanner shift that
  separates sites in tile-feature space. Drawn from an RNG seeded by (seed, step, case, slide). Slides with
  no known training site are left as they are.

Site ids: `site_codes` numbers the sites of a case list 0..S−1 (sorted names); −1 = unknown, which the
objective never counts as "same site".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BALANCE_STREAM = 0xBA1A  # RNG streams of this module, apart from the loader's own
_AUGMENT_STREAM = 0x57A1
_FIT_STREAM = 0xF175


def site_codes(sites) -> tuple[np.ndarray, list[str]]:
    """([n] int32 codes, sorted site names): code i = index of the case's site in the names; −1 = no site."""
    sites = [None if s is None or (isinstance(s, float) and np.isnan(s)) or str(s) == "" else str(s) for s in sites]
    names = sorted({s for s in sites if s is not None})
    index = {s: i for i, s in enumerate(names)}
    return np.array([index.get(s, -1) if s is not None else -1 for s in sites], np.int32), names


def site_quotas(sizes: list[int], batch_size: int) -> np.ndarray:
    """Rows per batch of each stratum (water-filling, see module docstring); sums to `batch_size`."""
    sizes = np.asarray(sizes, np.int64)
    if sizes.sum() < batch_size:
        raise ValueError(f"site-balanced batches of {batch_size} rows need at least as many cases, got {sizes.sum()}")
    quota = np.zeros(len(sizes), np.int64)
    left, open_ = batch_size, list(np.argsort(sizes, kind="stable"))
    while open_ and sizes[open_[0]] <= left // len(open_):  # smallest strata first: too small for a full share
        s = open_.pop(0)
        quota[s], left = sizes[s], left - sizes[s]
    if open_:
        share, extra = divmod(left, len(open_))
        quota[open_] = share
        quota[open_[len(open_) - extra:]] += 1  # the largest strata take the remainder (n_s > share: no repeat)
    return quota


class BalancedOrder:
    """Global batch t → (loader case numbers [B], pass number of each row), site-balanced (module docstring)."""

    def __init__(self, strata: list[np.ndarray], batch_size: int, seed: int):
        self.strata = [np.asarray(s, np.int64) for s in strata if len(s)]
        self.quota = site_quotas([len(s) for s in self.strata], batch_size)
        self.blocks = [len(s) // q for s, q in zip(self.strata, self.quota)]  # blocks per pass
        self.seed = seed

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        cases, passes = [], []
        for s, (members, q, nb) in enumerate(zip(self.strata, self.quota, self.blocks)):
            p, block = divmod(step, nb)
            perm = np.random.default_rng([self.seed, _BALANCE_STREAM, s, p]).permutation(len(members))
            cases.append(members[perm[block * q: (block + 1) * q]])
            passes.append(np.full(q, p, np.int64))
        mix = np.random.default_rng([self.seed, _BALANCE_STREAM, step]).permutation(int(self.quota.sum()))
        return np.concatenate(cases)[mix], np.concatenate(passes)[mix]


@dataclass
class SiteStyle:
    """Per-site tile-feature mean and std [S, D] (float32) fitted on training slides; applies the transfer."""

    mean: np.ndarray
    std: np.ndarray
    p: float
    scale: bool

    @classmethod
    def fit(cls, read, slides_of_case: list[np.ndarray], slide_tiles: np.ndarray, case_site: np.ndarray,
            case_index: np.ndarray, n_sites: int, dim: int, fit_tiles: int, p: float, scale: bool) -> SiteStyle:
        """`read(slide, rows) -> [n, D]` features; `slides_of_case[c]`: the loader case c's slide numbers;
        `case_site[c]`: its site code. Only these (the training loader's) cases enter the fit."""
        total = np.zeros((n_sites, dim))
        squares = np.zeros((n_sites, dim))
        count = np.zeros(n_sites)
        for c, slides in enumerate(slides_of_case):
            s = case_site[c]
            if s < 0:
                continue
            for q, slide in enumerate(slides):
                n = int(slide_tiles[slide])
                rng = np.random.default_rng([_FIT_STREAM, int(case_index[c]), q])
                rows = np.sort(rng.choice(n, size=min(n, fit_tiles), replace=False))
                x = np.asarray(read(slide, rows), np.float64)
                total[s] += x.sum(0)
                squares[s] += (x * x).sum(0)
                count[s] += len(x)
        missing = np.flatnonzero(count == 0)
        if len(missing):
            raise ValueError(f"loader.site_augment: training sites {missing.tolist()} have no tiles to fit on")
        mean = total / count[:, None]
        std = np.sqrt(np.maximum(squares / count[:, None] - mean**2, 0.0)) + 1e-6
        return cls(mean.astype(np.float32), std.astype(np.float32), p, scale)

    def __call__(self, x: np.ndarray, site: int, seed: int, step: int, case: int, slide: int) -> np.ndarray:
        """`x` [n, D] of one slide of a case at `site`, transferred to another site or returned unchanged."""
        n_sites = len(self.mean)
        if site < 0 or n_sites < 2:
            return x
        rng = np.random.default_rng([seed, _AUGMENT_STREAM, step, case, slide])
        if rng.random() >= self.p:
            return x
        t = int(rng.integers(n_sites - 1))
        t += t >= site  # uniform over the other sites
        y = x.astype(np.float32) - self.mean[site]
        if self.scale:
            y *= self.std[t] / self.std[site]
        return (y + self.mean[t]).astype(x.dtype)
