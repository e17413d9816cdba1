"""The pretraining loader: fixed-shape multimodal batches (`mmfm/data/batch.py`) as a pure function of the step.

Rows are cases. Global batch `s` belongs to epoch e = s // steps_per_epoch and holds the cases at
positions [(s mod steps_per_epoch)·B, +B) of epoch e's case permutation (seeded by (seed, e); the
epoch's last partial batch is dropped, so a batch never repeats a case). Row r draws its slide and
tiles from an RNG seeded by (seed, e, case_index). With `site_balance` the rows come instead from per-site
streams (`mmfm.data.site`), e being the row's pass through its site. Hence a batch depends only on (seed, step):
  * resume is exact and the state is just the step (JSON; orbax: `ocp.args.JsonSave(state)`),
  * process i of P computes only rows [i·B/P, (i+1)·B/P) of every global batch, every process
    runs the same steps, and a run may resume on a different process count,
  * grain workers (`workers > 0`, spawned processes) are a pure speed-up: same batches for any count; so are the
    read threads that fill a batch's rows concurrently (`read_threads`; each row has its own RNG and slots).
Only the sampled tile rows are read (`mmfm.data.sampling`); from a packed store (`mmfm pack`, `mmfm.data.packed`,
used when present unless `tile_store: h5`) each slide's sample is one contiguous window of its stored permutation,
still a pure function of (seed, step) and of the pack (its digest is part of the resume state). Omics are transformed once, at
construction, with transforms fitted on this loader's cases unless given (e.g. restored from a run).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grain
import numpy as np

from mmfm import MODALITIES
from mmfm.data.batch import BatchShapes
from mmfm.data.packed import PackedReader
from mmfm.data.sampling import READAHEAD, BagReader, sample_tiles, window_positions
from mmfm.data.site import BalancedOrder, SiteStyle, site_codes

log = logging.getLogger(__name__)

TILE_STORES = ("auto", "h5", "packed")
_ORDER_STREAM = 0x5EED  # keeps the case-permutation RNG stream apart from the per-case streams


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 32  # global rows per step, split contiguously over processes
    tiles_per_slide: int = 2048
    multi_slide: str = "sample"  # 'sample': one slide per case per epoch; 'pool': tiles of all its slides
    n_genes: int = 2000
    report_max_len: int = 128
    report_cache: str | None = None  # folder of cached frozen-trunk report features (relative: in the cohort)
    workers: int = 0  # grain worker processes (spawned; each batch crosses via shared memory); 0 = in-process
    seed: int = 0
    shuffle: bool = True
    feature_dtype: str = "float16"
    prefetch: int = 2  # batches computed ahead (per worker when workers > 0)
    read_threads: int = 8  # a batch's rows read concurrently (per worker): the disk gets many requests at once
    open_bags: int = 128  # bags kept memory-mapped per worker (file descriptors); reopening is cheap
    readahead: str = "willneed"  # willneed | kernel | random: how cold bag pages are read (sampling.BagReader)
    tile_store: str = "auto"  # auto: <cohort>/packed/ when `mmfm pack` wrote it (window samples), else the h5 bags
    # Site-robustness switches (mathematics in mmfm.data.site; all off by default; training loader only):
    site_balance: bool = False  # every batch takes ~B/S rows from each training site (per-site streams)
    site_augment: float = 0.0  # per-slide probability of moving its tile features to another training site's style
    site_augment_scale: bool = False  # the transfer also rescales per dimension (σ_t/σ_s), not only shifts the mean
    site_augment_fit_tiles: int = 256  # tiles sampled per training slide to fit the per-site mean/std

    def __post_init__(self):
        if not 0.0 <= self.site_augment <= 1.0:
            raise ValueError(f"LoaderConfig.site_augment is a probability in [0, 1], got {self.site_augment}")
        if self.site_augment_fit_tiles < 1:
            raise ValueError(f"LoaderConfig.site_augment_fit_tiles must be ≥ 1, got {self.site_augment_fit_tiles}")
        if self.readahead not in READAHEAD:
            raise ValueError(f"LoaderConfig.readahead must be one of {READAHEAD}, got {self.readahead!r}")
        if self.tile_store not in TILE_STORES:
            raise ValueError(f"LoaderConfig.tile_store must be one of {TILE_STORES}, got {self.tile_store!r}")
        if self.multi_slide not in ("sample", "pool"):
            raise ValueError(f"LoaderConfig.multi_slide must be 'sample' or 'pool', got {self.multi_slide!r}")
        for key in ("batch_size", "tiles_per_slide", "read_threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"LoaderConfig.{key} must be ≥ 1, got {getattr(self, key)}")


@dataclass
class _Tables:
    """Everything a batch needs, indexed by the loader's case number; plain arrays so it pickles cheaply."""

    case_index: np.ndarray  # [n] int32, row of Cohort.cases
    slide_start: np.ndarray  # [n + 1] CSR into the slide arrays (slides with ≥ 1 tile only)
    slide_path: list[str]
    slide_tiles: np.ndarray  # [n_slides] int64
    slide_patch: np.ndarray  # [n_slides] int64, patch_size_level0
    slide_packed: np.ndarray  # [n_slides, 2] int64 (shard, offset) in the packed store; shard -1: read the h5 bag
    site: np.ndarray  # [n] int32 site code (index into the loader's site_names), -1 = unknown
    dense: dict[str, np.ndarray]  # batch key -> [n, ...] per-case array (omics, report, mutation, presence)


class _MakeBatch:
    """step -> this process's rows of global batch `step`. Pure: runs identically in any worker."""

    def __init__(self, tables: _Tables, cfg: LoaderConfig, feature_dim: int, emit_slide: bool,
                 process_index: int, process_count: int, packed: PackedReader | None = None,
                 style: SiteStyle | None = None):
        self.t, self.cfg, self.dim, self.emit_slide, self.style = tables, cfg, feature_dim, emit_slide, style
        self.rows = cfg.batch_size // process_count
        self.first_row = process_index * self.rows
        self.steps_per_epoch = len(tables.case_index) // cfg.batch_size
        self.reader = BagReader(cfg.open_bags, cfg.readahead)
        self.packed = packed  # PackedReader or None
        self._threads: ThreadPoolExecutor | None = None  # read threads, started on the first batch
        self._pool_lock = threading.Lock()
        self._order = (-1, None)
        self.balanced = None
        if cfg.site_balance:
            strata = [np.flatnonzero(tables.site == s) for s in range(int(tables.site.max()) + 1)]
            self.balanced = BalancedOrder(strata + [np.flatnonzero(tables.site < 0)], cfg.batch_size, cfg.seed)

    def cases(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(epoch of each row, loader case numbers of this process's rows) for global step `step`; with
        `site_balance`, a row's epoch is its pass through its site's stream."""
        rows = slice(self.first_row, self.first_row + self.rows)
        if self.balanced is not None:
            cases, passes = self.balanced(step)
            return passes[rows], cases[rows]
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            n = len(self.t.case_index)
            perm = (np.random.default_rng([self.cfg.seed, epoch, _ORDER_STREAM]).permutation(n)
                    if self.cfg.shuffle else np.arange(n))
            self._order = (epoch, perm)
        start = i * self.cfg.batch_size + self.first_row
        return np.full(self.rows, epoch), self._order[1][start: start + self.rows]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epochs, cases = self.cases(int(step))
        out = {"case_index": self.t.case_index[cases], "site_index": self.t.site[cases]}
        if self.emit_slide:
            out.update(self._slides(int(step), epochs, cases))
        out.update({k: v[cases] for k, v in self.t.dense.items()})
        return out

    def _slides(self, step: int, epochs: np.ndarray, cases: np.ndarray) -> dict[str, np.ndarray]:
        b, k = len(cases), self.cfg.tiles_per_slide
        out = {"slide/features": np.zeros((b, k, self.dim), self.cfg.feature_dtype),  # calloc: rows without slides
               "slide/coords": np.zeros((b, k, 2), np.int32),                         # stay 0
               "slide/tile_mask": np.zeros((b, k), bool),
               "slide/fragment": np.zeros((b, k), np.int32),
               "slide/slide_index": np.zeros((b, k), np.int32),  # which of the case's slides a tile comes from
               "slide/present": np.zeros(b, bool)}
        fill = lambda r: self._fill_row(out, r, int(cases[r]), int(epochs[r]), step)  # noqa: E731
        if self.cfg.read_threads > 1 and b > 1:  # rows write disjoint slices: any completion order, same batch
            list(self._pool().map(fill, range(b)))
        else:
            for r in range(b):
                fill(r)
        return out

    def _pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(self.cfg.read_threads, thread_name_prefix="mmfm-read")
            return self._threads

    def _fill_row(self, out: dict[str, np.ndarray], r: int, c: int, epoch: int, step: int) -> None:
        """Row `r` (loader case `c`) of the batch's slide arrays, in place: its RNG is its own, so rows are
        independent of each other and of the thread that fills them."""
        k, t = self.cfg.tiles_per_slide, self.t
        slides = np.arange(t.slide_start[c], t.slide_start[c + 1])
        if not len(slides):
            return
        feats, tile_mask = out["slide/features"], out["slide/tile_mask"]
        rng = np.random.default_rng([self.cfg.seed, epoch, int(t.case_index[c])])
        if self.cfg.multi_slide == "sample":
            slides = slides[[rng.integers(len(slides))]]
        ends = np.cumsum(t.slide_tiles[slides])
        rows, tile_mask[r] = sample_tiles(int(ends[-1]), k, rng)
        which = np.searchsorted(ends, rows, side="right")
        local = rows - (ends - t.slide_tiles[slides])[which]
        frag_base = 0  # pooled slides never share a fragment id
        for q, s in enumerate(slides):
            pos = np.flatnonzero(which == q) if len(slides) > 1 else slice(None)
            if len(slides) > 1 and not len(pos):
                continue  # a pooled slide none of whose tiles was drawn: its bag is not even opened
            if t.slide_packed[s, 0] >= 0:
                into = (None if not tile_mask[r].all()  # padded: the whole slide is read
                        else feats[r, pos if len(slides) == 1 else slice(pos[0], pos[-1] + 1)])
                got = self._packed(s, local[pos], rng, into)
            else:
                got = self.reader.read(t.slide_path[s], local[pos])
            if not len(got["coords"]):
                continue
            if "features" in got:  # else already in place
                feats[r, pos] = got["features"]
            if self.style is not None:
                feats[r, pos] = self.style(feats[r, pos], int(t.site[c]), self.cfg.seed, step,
                                           int(t.case_index[c]), int(s))
            out["slide/coords"][r, pos] = got["coords"] // t.slide_patch[s]
            out["slide/slide_index"][r, pos] = q
            frag = got.get("fragment")
            if frag is not None:
                out["slide/fragment"][r, pos] = frag + frag_base
                frag_base += int(frag.max()) + 1
            else:
                out["slide/fragment"][r, pos] = frag_base
                frag_base += 1
        out["slide/present"][r] = True

    def _packed(self, s: int, rows: np.ndarray, rng: np.random.Generator,
                into: np.ndarray | None) -> dict[str, np.ndarray]:
        """Slide `s`'s share of a sample from the packed store. The uniform sample fixes how many tiles each slide
        gives; those are one window of the stored permutation (`window_positions`), emitted in bag-row order like
        `sample_tiles`' rows, their features read by the kernel straight into `into` (the batch's slots; no copy
        after). A padded sample (`into` None: fewer tiles than k, so every tile plus masked repeats) reads the
        whole slide and takes exactly `rows`, as the h5 path does."""
        n = int(self.t.slide_tiles[s])
        shard, offset = (int(v) for v in self.t.slide_packed[s])
        if into is None:
            got = self.packed.read(shard, offset, np.arange(n))
            at = np.empty(n, np.int64)
            at[got["row"]] = np.arange(n)  # bag row -> stored position
            return {k: v[at[rows]] for k, v in got.items() if k != "row"}
        window = window_positions(n, len(rows), rng)
        if into.dtype == self.packed.dtype:
            return self.packed.read_by_row(shard, offset, window, into)
        buf = np.empty(into.shape, self.packed.dtype)  # e.g. a float32 store into a float16 batch: cast once
        got = self.packed.read_by_row(shard, offset, window, buf)
        into[...] = buf
        return got

    def close(self) -> None:
        """Close files and stop the read threads; a later batch reopens and restarts them."""
        self.reader.close()
        if self.packed is not None:
            self.packed.close()
        with self._pool_lock:
            threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown()

    def __getstate__(self):  # what grain ships to a spawned worker: no threads, no lock
        return {k: v for k, v in self.__dict__.items() if k not in ("_threads", "_pool_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _threads=None, _pool_lock=threading.Lock())


def _omics(name: str, adata, case_ids: list[str], transform, fit_kwargs: dict):
    """(fitted transform, values [n, G], mask [n, G]) for the loader's cases; absent cases all-masked."""
    from mmfm.data.omics import OmicsTransform

    obs = {c: i for i, c in enumerate(adata.obs_names)}
    have = [c for c in case_ids if c in obs]
    if transform is None:
        if not have:
            raise ValueError(f"none of the loader's cases has {name} data to fit its transform on: drop "
                             f"'{name}' from data.modalities or pass a fitted transform")
        transform = OmicsTransform.fit(adata, have, **fit_kwargs)
    values, mask = transform.transform(adata)
    n, g = len(case_ids), values.shape[1]
    out_v, out_m = np.zeros((n, g), np.float32), np.zeros((n, g), bool)
    present = np.array([c in obs for c in case_ids])
    rows = [obs[c] for c in have]
    out_v[present], out_m[present] = np.asarray(values, np.float32)[rows], np.asarray(mask, bool)[rows]
    return transform, out_v, out_m


@dataclass
class CaseTensors:
    """Per-case arrays of the non-slide modalities, in batch-contract keys, for a list of cases."""

    dense: dict[str, np.ndarray]       # batch key -> [n, ...] (values, masks, ids, `<m>/present`)
    transforms: dict                    # fitted (or given) OmicsTransforms: 'rna', 'protein'
    names: dict[str, list[str]]        # 'rna' genes, 'protein' markers, 'mutation' genes (columns)


def case_presence(cohort, case_ids: list[str], modalities) -> dict[str, np.ndarray]:
    """modality -> [n] bool for `case_ids`: what the loader, held-out evaluation and `mmfm embed` agree a case
    has (a slide counts only if its bag has ≥ 1 tile)."""
    presence = cohort.presence()
    out = {m: presence[m].reindex(case_ids, fill_value=False).to_numpy(bool) for m in modalities}
    if "slide" in out:
        tiled = cohort.slides.loc[cohort.slides["n_tiles"] > 0, "case_id"].astype(str).to_numpy()
        out["slide"] &= np.isin(case_ids, tiled)
    return out


def case_tensors(cohort, case_ids: list[str], cfg: LoaderConfig, present: dict[str, np.ndarray],
                 transforms: dict | None = None) -> CaseTensors:
    """Omics / report / mutation tensors of `case_ids`, computed once (the loader and `mmfm embed` share it).

    Omics transforms are fitted on `case_ids` unless given (inference passes the run's). `present`
    (modality -> [n] bool, from `case_presence`) names the modalities to build; the others are skipped.
    """
    dense: dict[str, np.ndarray] = {}
    transforms = dict(transforms or {})
    names: dict[str, list[str]] = {}
    if "rna" in present and cohort.rna is not None:
        transforms["rna"], v, m = _omics("rna", cohort.rna, case_ids, transforms.get("rna"),
                                           {"n_top_genes": cfg.n_genes})
        dense.update({"rna/values": v, "rna/gene_mask": m})
        names["rna"] = [str(g) for g in transforms["rna"].genes]
    if "protein" in present and cohort.protein is not None:
        transforms["protein"], v, m = _omics("protein", cohort.protein, case_ids, transforms.get("protein"), {})
        dense.update({"protein/values": v, "protein/mask": m})
        names["protein"] = [str(g) for g in transforms["protein"].genes]
    if "report" in present and cohort.reports is not None:
        from mmfm.data.text import tokenize

        texts = cohort.reports.reindex(case_ids)
        ids, mask = tokenize(texts.fillna("").astype(str).tolist(), cfg.report_max_len)
        ids[~present["report"]], mask[~present["report"]] = 0, 0
        dense.update({"report/input_ids": ids.astype(np.int32), "report/attention_mask": mask.astype(np.int32)})
        if cfg.report_cache:
            dense.update(_cached_report_features(cohort, texts, present["report"], cfg))
    if "mutation" in present and cohort.mutation_columns:
        cols = list(cohort.mutation_columns)
        flags = cohort.cases.loc[case_ids, cols].apply(lambda s: s.astype(float)).to_numpy(np.float64)
        known = ~np.isnan(flags)
        dense.update({"mutation/values": np.where(known, flags, 0.0).astype(np.float32), "mutation/mask": known})
        names["mutation"] = [c.removeprefix("mut_") for c in cols]
    for m, p in present.items():
        if m != "slide":
            dense[f"{m}/present"] = p
    return CaseTensors(dense, transforms, names)


def _cached_report_features(cohort, texts, present: np.ndarray, cfg: LoaderConfig) -> dict[str, np.ndarray]:
    """{'report/features': [n, H]} when every present report is in the cache, else {} (the trunk then runs)."""
    from mmfm.data import report_cache
    from mmfm.data.text import minilm_dir

    folder = report_cache.resolve_folder(cohort.root, cfg.report_cache)
    wanted = texts[present].astype(str).tolist()
    if not wanted:
        return {}
    feats, found = report_cache.lookup(folder, report_cache.cache_key(minilm_dir(), cfg.report_max_len), wanted)
    if not found.all():
        log.warning("%s: %d of %d reports are not in the report cache %s; the text trunk runs every step "
                    "(mmfm.models.text_cache.fill_report_cache fills it)", cohort.root, int((~found).sum()),
                    len(found), folder)
        return {}
    out = np.zeros((len(texts), feats.shape[1]), np.float32)
    out[present] = feats
    return {"report/features": out}


class TileBagLoader:
    """Iterator of fixed-shape batch dicts (`mmfm/data/batch.py`) over `case_ids` of a `Cohort`.

    Infinite (epochs follow one another); `steps_per_epoch` tells where they turn. Emits the
    `modalities` (the run's `data.modalities`) that the cohort has; cases with none of them present are
    skipped (listed in `.skipped_cases`). `shapes.batch_size` is the global batch size; each
    batch holds `local_batch_size` rows.
    """

    def __init__(self, cohort, cfg: LoaderConfig, case_ids, modalities=MODALITIES, transforms: dict | None = None,
                 process_index: int = 0, process_count: int = 1):
        if cfg.batch_size % process_count:
            raise ValueError(f"LoaderConfig.batch_size={cfg.batch_size} is not divisible by "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} outside [0, {process_count})")
        self.cfg, self.process_index, self.process_count = cfg, process_index, process_count
        case_ids = [str(c) for c in case_ids]
        unknown = [c for c in case_ids if c not in cohort.case_index]
        if unknown:
            raise ValueError(f"{cohort.root}: case_ids not in cases.csv: {unknown[:10]}"
                             + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""))
        if len(set(case_ids)) != len(case_ids):
            raise ValueError(f"{cohort.root}: case_ids contain duplicates")

        slides = cohort.slides[cohort.slides["n_tiles"] > 0]
        available = {"slide": len(slides) > 0, "rna": cohort.rna is not None,
                     "protein": cohort.protein is not None, "report": cohort.reports is not None,
                     "mutation": len(cohort.mutation_columns) > 0}
        unknown = sorted(set(modalities) - set(MODALITIES))
        if unknown:
            raise ValueError(f"data.modalities: unknown {unknown}; known {list(MODALITIES)}")
        self.modalities = tuple(m for m in MODALITIES if m in modalities and available[m])
        missing = [m for m in modalities if not available[m]]
        if missing:
            log.warning("%s: cohort has no %s; not emitted", cohort.root, ", ".join(missing))
        present = case_presence(cohort, case_ids, self.modalities)
        keep = np.logical_or.reduce([present[m] for m in self.modalities]) if self.modalities \
            else np.zeros(len(case_ids), bool)
        self.skipped_cases = [c for c, k in zip(case_ids, keep) if not k]
        if self.skipped_cases:
            log.warning("%s: %d cases have none of %s; skipped", cohort.root, len(self.skipped_cases),
                        self.modalities)
        self.case_ids = [c for c, k in zip(case_ids, keep) if k]
        present = {m: p[keep] for m, p in present.items()}
        if len(self.case_ids) < cfg.batch_size:
            raise ValueError(f"LoaderConfig.batch_size={cfg.batch_size} exceeds the {len(self.case_ids)} "
                             f"usable cases of {cohort.root}")

        tensors = case_tensors(cohort, self.case_ids, cfg, present, transforms)
        dense = tensors.dense
        self.transforms = tensors.transforms
        self.gene_names = tensors.names.get("rna", [])
        self.protein_names = tensors.names.get("protein", [])
        self.mutation_names = tensors.names.get("mutation", [])

        by_case = slides.groupby(slides["case_id"].astype(str)).groups if "slide" in self.modalities else {}
        has = present.get("slide", np.zeros(len(self.case_ids), bool))
        per_case = [list(by_case.get(c, [])) if h else [] for c, h in zip(self.case_ids, has)]
        order = [s for ids in per_case for s in ids]
        store = self._tile_store(cohort, cfg) if order else None
        packed = np.full((len(order), 2), -1, np.int64)
        if store is not None:
            where, _ = store.usable(slides.loc[order])
            packed[:] = [where.get(str(s), (-1, -1)) for s in order]
        self.tile_store = "h5" if store is None else f"packed {store.digest}"
        site, self.site_names = site_codes(cohort.cases.loc[self.case_ids, "site"].tolist())
        self._tables = _Tables(
            case_index=np.array([cohort.case_index[c] for c in self.case_ids], np.int32),
            slide_start=np.concatenate([[0], np.cumsum([len(ids) for ids in per_case])]).astype(np.int64),
            slide_path=[str(p) for p in slides.loc[order, "path"]],
            slide_tiles=slides.loc[order, "n_tiles"].to_numpy(np.int64),
            slide_patch=slides.loc[order, "patch_size_level0"].to_numpy(np.int64),
            slide_packed=packed, site=site, dense=dense)
        feature_dim = int(cohort.spec.feature_dim)
        self._make = _MakeBatch(self._tables, cfg, feature_dim, "slide" in self.modalities,
                                process_index, process_count,
                                None if store is None else PackedReader(store.shards, store.dim, store.dtype.str),
                                self._site_style(feature_dim))
        self.steps_per_epoch = self._make.steps_per_epoch
        self.local_batch_size = self._make.rows
        self.shapes = BatchShapes(
            batch_size=cfg.batch_size,
            tiles_per_slide=cfg.tiles_per_slide if "slide" in self.modalities else 0,
            feature_dim=feature_dim if "slide" in self.modalities else 0,
            n_genes=len(self.gene_names), n_proteins=len(self.protein_names),
            report_len=cfg.report_max_len if "report" in self.modalities else 0,
            n_mutations=len(self.mutation_names), n_sites=len(self.site_names))
        self._step = 0
        self._it = None

    @staticmethod
    def _tile_store(cohort, cfg: LoaderConfig):
        """The cohort's packed store when the config allows it (`Cohort.packed`, checked at open), else None."""
        store = getattr(cohort, "packed", None)
        if cfg.tile_store == "packed" and store is None:
            raise ValueError(f"{cohort.root}: LoaderConfig.tile_store='packed' but the cohort has no usable packed "
                             f"store (run `mmfm pack {cohort.root}`; `mmfm validate` says why one is not used)")
        return None if cfg.tile_store == "h5" else store

    def _site_style(self, feature_dim: int) -> SiteStyle | None:
        """`loader.site_augment`'s per-site statistics, fitted on this loader's (the training) cases only."""
        cfg, t = self.cfg, self._tables
        if cfg.site_augment == 0.0:
            return None
        if "slide" not in self.modalities:
            raise ValueError("LoaderConfig.site_augment transfers tile features: data.modalities needs 'slide'")
        reader = BagReader(cfg.open_bags, cfg.readahead)
        try:
            return SiteStyle.fit(lambda s, rows: reader.read(t.slide_path[s], rows)["features"],
                                 [np.arange(t.slide_start[c], t.slide_start[c + 1]) for c in range(len(t.site))],
                                 t.slide_tiles, t.site, t.case_index, len(self.site_names), feature_dim,
                                 cfg.site_augment_fit_tiles, cfg.site_augment, cfg.site_augment_scale)
        finally:
            reader.close()

    # -- iteration ---------------------------------------------------------------------------
    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`, computed directly (no prefetch, no workers)."""
        return self._make(step)

    def _pipeline(self, start: int):
        ds = grain.MapDataset.range(start, sys.maxsize).map(self._make)
        # One prefetch thread in-process; with workers their output buffers are the prefetch (memory:
        # workers × prefetch batches), so workers compute synchronously.
        threads = 1 if self.cfg.prefetch > 0 and self.cfg.workers == 0 else 0
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self.cfg.prefetch))
        if self.cfg.workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag unparsed (google/grain#1355)
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.cfg.workers, per_worker_buffer_size=max(1, self.cfg.prefetch)))
        return iter(it)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._pipeline(self._step)
        batch = next(self._it)
        self._step += 1
        return batch

    def close(self):
        """Stop prefetch threads / worker processes and close bag files."""
        if self._it is not None:
            self._it.close()
            self._it = None
        self._make.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- state -------------------------------------------------------------------------------
    def _identity(self) -> dict:
        c = self.cfg
        cases = hashlib.sha1("\n".join(self.case_ids).encode()).hexdigest()[:16]
        out = {"seed": c.seed, "batch_size": c.batch_size, "tiles_per_slide": c.tiles_per_slide,
               "multi_slide": c.multi_slide, "shuffle": c.shuffle, "n_cases": len(self.case_ids),
               "cases_sha1": cases, "tile_store": self.tile_store}
        if c.site_balance:  # only when on: states saved before these switches existed still match
            out["site_balance"] = True
        if c.site_augment:
            out["site_augment"] = [c.site_augment, c.site_augment_scale, c.site_augment_fit_tiles]
        return out

    def get_state(self) -> dict:
        """JSON-able; `set_state` on a loader built with the same config and cases resumes exactly."""
        return {"step": self._step, **self._identity()}

    def set_state(self, state: dict) -> None:
        ours = self._identity()
        saved = {"tile_store": "h5", **state}  # states written before the packed store read the h5 bags
        keys = set(ours) | ({"site_balance", "site_augment"} & set(saved))  # switched on in one of them only
        bad = {k: (saved.get(k), ours.get(k)) for k in sorted(keys) if saved.get(k) != ours.get(k)}
        if bad:
            raise ValueError("loader state does not match this loader (key: saved, current): "
                             + ", ".join(f"{k}: {a!r}, {b!r}" for k, (a, b) in bad.items())
                             + (" — the tiles would be sampled from another store; set loader.tile_store (h5 | "
                                "packed) to the saved one, or re-pack with the same seed" if "tile_store" in bad else ""))
        if self._it is not None:
            self.close()
        self._step = int(state["step"])
