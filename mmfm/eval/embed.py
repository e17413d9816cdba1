"""`mmfm embed`: slide- and case-level embeddings of every modality, as AnnData.

Inference reads **all tiles** of every bag (no sampling). Bags are sorted by length and padded to
power-of-two buckets (tile mask False on padding; the slide encoders are padding-invariant), and the
rows of a call to a power of two, so a cohort of bags from 100 to 100k tiles compiles a handful of
shapes, the same ones for another cohort or command (the persistent compilation cache then hits). A case with several slides
gets the mean of its slide embeddings (late fusion, Patho-Bench's default) or one embedding of
its pooled tiles (`multi_slide='pool'`; each further slide's grid is shifted right of the
previous one so positions never collide). A run trained with a case encoder (`model.case.kind:
transformer`) gets its case-level 'slide' embedding from that encoder over the case's slide-encoder
embeddings (every slide, whole bags); its per-slide 'slide' embedding is that of a one-slide case.

Written files:
  OUT.h5ad         obs = cases (site, clinical, mutation flags, has_<modality>, split: 'pretrain' / 'validation' /
                   'heldout' / 'unseen' = the run's training, validation, probe-test or other cases);
                   obsm[<modality>] = projected embeddings in the shared space (NaN rows where absent),
                   obsm['slide_backbone'] = slide encoder output before the projection head,
                   obsm['slide_meanpool'] = mean of raw tile features (baseline),
                   obsm['slide_random'] = the same architecture, randomly initialised (baseline),
                   obsm['slide_<name>'] = each `extra_encoders` export (e.g. a public slide encoder imported by
                   `mmfm import-encoder`) on the same whole bags;
                   obsm['<col>_combat'] = each `combat` column corrected for cases.csv `site` by ComBat fitted on
                   the run's pretraining cases only (mmfm.eval.combat; uns['combat'] records the fit);
                   uns['pretrain_cases'], uns['validation_cases'] = the run's training and validation cases
                   (the probe's leakage guards read them).
  OUT.slides.h5ad  the same slide embeddings per slide (obs = slides with their case's metadata).
Each file is written atomically, the slide file first; both carry the run's uns['embed_id'], so a pair from one
`embed` is recognisable even if a run was killed between the two writes.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx
from tqdm.auto import tqdm

from mmfm import memo
from mmfm.data.bags import grid_indices
from mmfm.data.sampling import BagReader
from mmfm.io import write_h5ad

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    multi_slide: Literal["mean", "pool"] = "mean"  # case = mean of slide embeddings (late fusion) or one pooled bag
    max_tiles_per_call: int = 32768    # B × bucket length per encoder call (memory bound)
    min_bucket: int = 256              # smallest padded bag length
    min_rows: int = 16                 # smallest padded row count per call (fewer shapes: a compile per shape)
    batch_size: int = 64               # rows per call for non-slide modalities
    baselines: tuple[Literal["meanpool", "random"], ...] = ("meanpool", "random")  # [] skips them
    random_seed: int = 12345           # seed of the random-init baseline encoder
    extra_encoders: tuple[str, ...] = ()  # export dirs (mmfm import-encoder / export): obsm['slide_<dir name>']
    combat: tuple[str, ...] = ()       # columns ComBat-corrected → obsm['<col>_combat'], fitted on the run's
    #                                    pretraining cases only (embedded for the fit, not written; mmfm.eval.combat)
    combat_site: str = "site"          # cases.csv column of the site effect ComBat removes


def bucket_length(n: int, min_bucket: int, per_octave: int = 1) -> int:
    """Smallest padded length ≥ n (≥ min_bucket) on a fixed ladder of `per_octave` evenly spaced sizes per power of
    two: 1 = the powers of two (fewest shapes, ≤ 2× padding), 4 = 1, 1.25, 1.5, 1.75 × 2^k (≤ 1.25× padding)."""
    n = max(int(n), min_bucket, 1)
    base = 1 << (n.bit_length() - 1)  # largest power of two ≤ n
    step = max(base // per_octave, 1)
    return base + -(-(n - base) // step) * step


@dataclass
class Bag:
    features: np.ndarray   # [N, D]
    coords: np.ndarray     # [N, 2] grid (col, row)
    fragment: np.ndarray   # [N]


def load_bag(path: str | Path, patch_size_level0: int, n_tiles: int, reader: BagReader) -> Bag:
    """Every tile of a bag. Through the loader's reader: TRIDENT's one-row HDF5 chunks make a plain
    h5py whole-bag read ~25× slower (scripts/bench_loader.py), the memory-mapped runs do not care. Read once per
    pipeline run (`mmfm.memo`): the embed step's held-out bags are the MIL probe's; callers never write into them."""
    key = ("bag", os.path.realpath(path), int(patch_size_level0), int(n_tiles))
    return memo.once(key, lambda: _read_bag(path, patch_size_level0, n_tiles, reader))


def _read_bag(path: str | Path, patch_size_level0: int, n_tiles: int, reader: BagReader) -> Bag:
    raw = reader.read(path, np.arange(n_tiles))
    n = len(raw["features"])
    frag = raw.get("fragment")
    return Bag(raw["features"], grid_indices(raw["coords"], patch_size_level0),
               np.zeros(n, np.int32) if frag is None else frag.astype(np.int32))


def pool_bags(bags: list[Bag]) -> Bag:
    """One bag from several slides: grids placed side by side (2-tile gap), fragments renumbered."""
    feats, coords, frags, x0, f0 = [], [], [], 0, 0
    for b in bags:
        c = b.coords.copy()
        c[:, 0] += x0
        feats.append(b.features), coords.append(c), frags.append(b.fragment + f0)
        x0 = int(c[:, 0].max()) + 3 if len(c) else x0
        f0 = int(frags[-1].max()) + 1 if len(b.fragment) else f0
    return Bag(np.concatenate(feats), np.concatenate(coords), np.concatenate(frags))


def encode_bags(encode: Callable, bags: list[Bag], cfg: EmbedConfig, desc: str = "bags") -> np.ndarray:
    """Run `encode(features, coords, mask, fragment) -> [B, E]` over bags of any lengths, in length buckets."""
    return encode_bags_with({desc: encode}, bags, cfg)[desc]


def encode_bags_with(encoders: dict[str, Callable], bags: list[Bag], cfg: EmbedConfig) -> dict[str, np.ndarray]:
    """name → `encode_bags(fn, bags, cfg)` for every encoder, each padded batch built and put on the device once
    for all of them: the padding and the host-to-device copy of every tile, not the encoders, are most of a
    cheap encoder's time (the mean-pool baseline's). The same batches, so the same values, as one call each."""
    if not bags:
        return {name: np.zeros((0, 0), np.float32) for name in encoders}
    order = np.argsort([len(b.features) for b in bags], kind="stable")
    out: dict[str, list] = {name: [None] * len(bags) for name in encoders}
    d = bags[0].features.shape[1]
    bar = tqdm(total=len(bags), desc=" + ".join(encoders), leave=False, disable=len(bags) < 8)
    i = 0
    while i < len(order):
        length = bucket_length(len(bags[order[i]].features), cfg.min_bucket)
        rows = max(1, cfg.max_tiles_per_call // length)
        group = [j for j in order[i:i + rows] if len(bags[j].features) <= length]
        b = min(rows, bucket_length(len(group), cfg.min_rows))  # rows padded too (all-masked, dropped): shapes
        f = np.zeros((b, length, d), np.float32)  # shared across cohorts and commands, so the compilation cache hits
        c = np.zeros((b, length, 2), np.int32)
        m = np.zeros((b, length), bool)
        fr = np.zeros((b, length), np.int32)
        for r, j in enumerate(group):
            n = len(bags[j].features)
            f[r, :n], c[r, :n], m[r, :n], fr[r, :n] = bags[j].features, bags[j].coords, True, bags[j].fragment
        batch = jax.device_put((f, c, m, fr)) if len(encoders) > 1 else (f, c, m, fr)
        for name, encode in encoders.items():
            emb = np.asarray(encode(*batch), np.float32)
            for r, j in enumerate(group):
                out[name][j] = emb[r]
        i += len(group)
        bar.update(len(group))
    bar.close()
    return {name: np.stack(e) for name, e in out.items()}


def _jit_slide_encoder(module: nnx.Module, call: Callable) -> Callable:
    """jit `call(module, f, c, m, fr)` functionally (split once; NNX state passed explicitly)."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, f, c, m, fr):
        return call(nnx.merge(graphdef, state), f, c, m, fr)

    return lambda f, c, m, fr: run(state, f, c, m, fr)


def _slide_encoders(model, run_cfg, shapes, cfg: EmbedConfig) -> dict[str, Callable]:
    """name → encode function over padded bags, for the trained model and the baselines."""
    from mmfm.models import build_slide_encoder
    from mmfm.models.layers import compute_dtype

    def both(mdl, f, c, m, fr):  # one compiled program (XLA shares the encoder pass), not two
        return jnp.concatenate([mdl.encode_slide(f, c, m, fr).embedding,
                                mdl.encode_slide(f, c, m, fr, project=False).embedding], axis=-1)

    fns = {"slide|slide_backbone": _jit_slide_encoder(model, both)}
    if "meanpool" in cfg.baselines:
        fns["slide_meanpool"] = jax.jit(
            lambda f, c, m, fr: (f * m[..., None]).sum(1) / jnp.maximum(m.sum(1, keepdims=True), 1))
    if "random" in cfg.baselines:
        rand = nnx.jit(lambda: build_slide_encoder(  # initialised in one program, not a compile per eager op
            run_cfg.model.slide, shapes.feature_dim, dtype=compute_dtype(run_cfg.model.compute_dtype),
            rngs=nnx.Rngs(cfg.random_seed)))()
        fns["slide_random"] = _jit_slide_encoder(rand, lambda enc, f, c, m, fr: enc(f, c, m, fr).embedding)
    fns.update(_extra_encoders(cfg.extra_encoders, shapes.feature_dim, taken=set("|".join(fns).split("|"))))
    return fns


def _extra_encoders(dirs: tuple[str, ...], feature_dim: int, taken: set[str]) -> dict[str, Callable]:
    """'slide_<dir name>' → encode function of each exported slide encoder (an imported public checkpoint, say),
    embedded on the same whole bags as the run's own, so a probe table compares them side by side."""
    from mmfm.models.export_format import load_slide_encoder

    fns: dict[str, Callable] = {}
    for d in dirs:
        name = f"slide_{Path(d).name}"
        if name in taken or name in fns:
            raise ValueError(f"--extra_encoders {d}: its column {name!r} is already taken; rename the directory")
        enc, _, dim = load_slide_encoder(d)
        if dim != feature_dim:
            raise ValueError(f"--extra_encoders {d}: encodes {dim}-d tile features, the cohort's bags hold "
                             f"{feature_dim}-d ones (another tile encoder)")
        fns[name] = _jit_slide_encoder(enc, lambda enc, f, c, m, fr: enc(f, c, m, fr).embedding)
    return fns


def _split_paired(embs: dict[str, np.ndarray], embed_dim: int) -> dict[str, np.ndarray]:
    """'slide|slide_backbone' [N, E + D] → 'slide' [N, E] and 'slide_backbone' [N, D]."""
    out = {}
    for name, e in embs.items():
        if "|" in name:
            proj, backbone = name.split("|")
            out[proj], out[backbone] = e[:, :embed_dim], e[:, embed_dim:]
        else:
            out[name] = e
    return out


def _other_modalities(model, cohort, run_cfg, transforms, case_ids: list[str], cfg: EmbedConfig) -> dict[str, np.ndarray]:
    """Projected embeddings of rna / protein / report / mutation per case (NaN where absent)."""
    from mmfm.data.loader import case_presence, case_tensors

    mods = [m for m in model.modalities if m != "slide"]
    if not mods:
        return {}
    present = case_presence(cohort, case_ids, mods)
    tensors = case_tensors(cohort, case_ids, run_cfg.loader, present, transforms).dense
    graphdef, state = nnx.split(model)

    @jax.jit(static_argnums=2)
    def enc(state, batch, modality):
        return nnx.merge(graphdef, state).encode(modality, batch)

    out = {}
    for m in mods:
        keys = [k for k in tensors if k.startswith(f"{m}/")]
        embs = []
        for s in range(0, len(case_ids), cfg.batch_size):
            chunk = {k: tensors[k][s:s + cfg.batch_size] for k in keys}
            n = len(next(iter(chunk.values())))
            pad = cfg.batch_size - n  # fixed shape: one compile per modality
            chunk = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
            embs.append(np.asarray(enc(state, chunk, m))[:n])
        e = np.concatenate(embs) if embs else np.zeros((0, run_cfg.model.embed_dim), np.float32)
        e[~present[m]] = np.nan
        out[m] = e.astype(np.float32)
    return out


def embed(run_dir: str | Path, cohort_path: str | Path, out: str | Path, *, cfg: EmbedConfig = EmbedConfig(),
          case_ids: list[str] | None = None, step=None) -> tuple[ad.AnnData, ad.AnnData]:
    """Embed `case_ids` (default: every case) of a cohort with a trained run; write OUT.h5ad and OUT.slides.h5ad."""
    from mmfm.data.cohort import Cohort
    from mmfm.train.paths import run_path
    from mmfm.train.rundir import load_for_inference, read_shapes, read_splits

    run_dir, out = run_path(run_dir), Path(out)  # the run may be remote (gs://…); the cohort and OUT are files
    cohort = Cohort.open(cohort_path)
    if cfg.combat and cfg.combat_site not in cohort.cases.columns:
        raise ValueError(f"--combat_site {cfg.combat_site!r}: not a column of {cohort.root}/cases.csv")
    shapes, splits = read_shapes(run_dir), read_splits(run_dir)
    model, run_cfg, transforms = load_for_inference(run_dir, step=step)
    case_ids = [str(c) for c in (case_ids if case_ids is not None else cohort.cases.index)]
    requested = case_ids  # the cases written; ComBat's fit cases are embedded too, then dropped
    if cfg.combat:
        case_ids = requested + sorted(set(map(str, splits["train"])) - set(requested))
    unknown = [c for c in case_ids if c not in cohort.case_index]
    if unknown:
        raise ValueError(f"{cohort.root}: cases not in cases.csv: {unknown[:10]}")
    if "slide" in model.modalities and cohort.spec.feature_dim != shapes.feature_dim:
        raise ValueError(f"{cohort.root}/cohort.yaml: tile_encoder.feature_dim={cohort.spec.feature_dim} but run "
                         f"{run_dir} was trained on {shapes.feature_dim}-d features")

    slides = cohort.slides[cohort.slides["case_id"].astype(str).isin(case_ids) & (cohort.slides["n_tiles"] > 0)]
    slide_embs: dict[str, np.ndarray] = {}
    case_embs: dict[str, np.ndarray] = {}
    if model.case_encoder is not None and cfg.multi_slide != "mean":
        raise ValueError(f"{run_dir}: the run aggregates slides with its case encoder (model.case.kind=transformer); "
                         f"multi_slide={cfg.multi_slide!r} would bypass it, use 'mean' (slides encoded one by one)")
    if "slide" in model.modalities and len(slides):
        encoders = _slide_encoders(model, run_cfg, shapes, cfg)
        reader = BagReader(max_open=8)
        bags = {sid: load_bag(r.path, int(r.patch_size_level0), int(r.n_tiles), reader)
                for sid, r in slides.iterrows()}
        if cfg.multi_slide == "mean":
            slide_embs = _split_paired(encode_bags_with(encoders, list(bags.values()), cfg),
                                       run_cfg.model.embed_dim)
            by_case = pd.Series(np.arange(len(slides)), index=slides["case_id"].astype(str).to_numpy())
            for name, e in slide_embs.items():
                case_embs[name] = _case_mean(e, by_case, case_ids)
            if model.case_encoder is not None:
                case_embs["slide"] = _case_encoded(model, slide_embs["slide_backbone"], by_case, case_ids, cfg)
        else:
            groups = slides.groupby(slides["case_id"].astype(str)).groups
            pooled_ids = [c for c in case_ids if c in groups]
            pooled = [pool_bags([bags[s] for s in groups[c]]) for c in pooled_ids]
            pooled_embs = _split_paired(encode_bags_with(encoders, pooled, cfg), run_cfg.model.embed_dim)
            for name, e in pooled_embs.items():
                full = np.full((len(case_ids), e.shape[1]), np.nan, np.float32)
                full[[case_ids.index(c) for c in pooled_ids]] = e
                case_embs[name] = full
    case_embs.update(_other_modalities(model, cohort, run_cfg, transforms, case_ids, cfg))
    combat_record = {}
    if cfg.combat:
        case_embs, combat_record = _combat_columns(case_embs, cohort.cases.loc[case_ids, cfg.combat_site],
                                                   np.isin(case_ids, list(map(str, splits["train"]))), cfg)
        kept = slides["case_id"].astype(str).isin(requested).to_numpy()
        slides, slide_embs = slides[kept], {k: v[kept] for k, v in slide_embs.items()}
        case_ids, case_embs = requested, {k: v[:len(requested)] for k, v in case_embs.items()}

    obs = cohort.cases.loc[case_ids].copy()
    obs.index = obs.index.astype(str)
    obs["split"] = np.select([obs.index.isin(splits[k]) for k in ("train", "val", "heldout")],
                             ["pretrain", "validation", "heldout"], "unseen")
    obs["n_slides"] = slides.groupby(slides["case_id"].astype(str)).size().reindex(obs.index, fill_value=0).to_numpy()
    for name, e in case_embs.items():
        obs[f"has_{name}"] = np.isfinite(e).all(1)
    meta = {"run_dir": str(run_dir.absolute()), "cohort": str(cohort.root), "step": str(step or "latest"),
            "embed_config": json.dumps(asdict(cfg)), "pretrain_cases": list(map(str, splits["train"])),
            "validation_cases": list(map(str, splits["val"])), "embed_id": uuid.uuid4().hex,
            **({"combat": json.dumps(combat_record)} if combat_record else {})}
    cases = ad.AnnData(obs=_h5ad_safe(obs), obsm=case_embs, uns=meta)
    slide_obs = slides[["case_id"]].join(cohort.cases, on="case_id")
    slide_obs.index = slide_obs.index.astype(str)
    slide_ad = ad.AnnData(obs=_h5ad_safe(slide_obs), obsm=slide_embs if cfg.multi_slide == "mean" else {}, uns=meta)
    write_h5ad(out.with_suffix(".slides.h5ad"), slide_ad)  # first: a new OUT.h5ad always has its slides beside it
    write_h5ad(out, cases)
    return cases, slide_ad


def _combat_columns(case_embs: dict[str, np.ndarray], site: pd.Series, fit_rows: np.ndarray,
                    cfg: EmbedConfig) -> tuple[dict[str, np.ndarray], dict]:
    """'<col>_combat' for each `cfg.combat` column: ComBat fitted on `fit_rows` (the pretraining cases), applied
    to every row; and the record written to uns['combat'] (fit counts, sites passed through uncorrected)."""
    from mmfm.eval import combat

    missing = [c for c in cfg.combat if c not in case_embs]
    if missing:
        raise ValueError(f"--combat {missing}: not an embedded column (have {sorted(case_embs)})")
    site = site.astype(str).where(site.notna(), "").to_numpy()
    out, record = dict(case_embs), {"site_column": cfg.combat_site, "fit": "the run's pretraining cases"}
    for col in cfg.combat:
        fitted = combat.fit(case_embs[col][fit_rows & (site != "")], site[fit_rows & (site != "")])
        out[f"{col}_combat"] = fitted.apply(case_embs[col], site).astype(np.float32)
        record[col] = {"fit_cases_per_site": fitted.n_fit, "uncorrected_sites": fitted.unfitted(site[~fit_rows])}
    return out, record


def _case_mean(slide_emb: np.ndarray, by_case: pd.Series, case_ids: list[str]) -> np.ndarray:
    out = np.full((len(case_ids), slide_emb.shape[1]), np.nan, np.float32)
    for i, c in enumerate(case_ids):
        if c in by_case.index:
            out[i] = slide_emb[np.atleast_1d(by_case.loc[c])].mean(0)
    return out


def _case_encoded(model, backbone: np.ndarray, by_case: pd.Series, case_ids: list[str],
                  cfg: EmbedConfig) -> np.ndarray:
    """The run's case encoder over the slide-encoder embeddings of each case's slides (NaN rows: no slide)."""
    groups = [np.atleast_1d(by_case.loc[c]) if c in by_case.index else np.zeros(0, int) for c in case_ids]
    s = bucket_length(max([1, *map(len, groups)]), 1)  # slides per case, padded (masked) to a power of two
    x = np.zeros((len(case_ids), s, backbone.shape[1]), np.float32)
    m = np.zeros((len(case_ids), s), bool)
    for i, g in enumerate(groups):
        x[i, :len(g)], m[i, :len(g)] = backbone[g], True
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, x, m: nnx.merge(graphdef, state).aggregate_slides(x, m))
    out = []
    for start in range(0, len(case_ids), cfg.batch_size):
        xb, mb = x[start:start + cfg.batch_size], m[start:start + cfg.batch_size]
        pad = cfg.batch_size - len(xb)  # fixed shape: one compile
        got = run(state, np.pad(xb, ((0, pad), (0, 0), (0, 0))), np.pad(mb, ((0, pad), (0, 0))))
        out.append(np.asarray(got)[:len(xb)])
    e = np.concatenate(out).astype(np.float32)
    e[~m.any(1)] = np.nan
    return e


def _h5ad_safe(df: pd.DataFrame) -> pd.DataFrame:
    """h5ad stores object columns as strings; mixed ones are made explicit. Plain str objects, not pandas'
    nullable StringArray, which anndata refuses to write for high-cardinality columns (e.g. an `age` column)."""
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].astype("string").fillna("").astype(object)
    return df
