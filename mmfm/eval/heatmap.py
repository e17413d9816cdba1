"""Per-tile scores of a trained run on one slide — what drew the model's attention, and where the slide looks like
another modality — written as an HDF5 of level-0 tile coordinates + scores. `mmfm heatmap` draws them
(`mmfm.bridges.heatmap_render.heatmap(cfg)`, with OpenSlide).

Scores, for every tile of the bag (all tiles, no sampling):
  attention_head{h}   the slide encoder's pooling weights per head (gated ABMIL; the transformer's attention
                      readout), exactly the weights that formed the slide embedding (sum 1 over tiles)
  similarity_<query>  cosine similarity, in the shared space, between the query's embedding and the tile's own
                      embedding: the encoder's readout applied to that tile alone (its pooled representation if
                      the bag were just this tile, with the tile's contextual token for the transformer), through
                      the slide projection head. With a linear head and one attention head the slide's projection
                      is the attention-weighted mean of these tile projections (tested), so the map decomposes the
                      slide↔query alignment over the tissue. Queries: a modality of the run (`rna`, `protein`,
                      `report`, `mutation`: the slide's own case's embedding) or any free text (the text tower).

Tile-score file `<slide>.tile_scores.h5` (TRIDENT coordinate convention, so TRIDENT/CLAM tooling reads it):
  coords  [N, 2] int64 level-0 top-left (x, y), attrs patch_size_level0 (+ the bag's other coord attrs)
  scores/<name>  [N] float32, attrs query (the text or modality), kind (attention | similarity)
  root attrs: slide_id, case_id, run_dir, step
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm.io import atomic_path


class HeatmapError(ValueError):
    """Bad heatmap input (unknown slide, query or run); the message names it."""


@dataclass
class TileScores:
    slide_id: str
    case_id: str
    coords: np.ndarray                         # [N, 2] int64 level-0 top-left (x, y)
    patch_size_level0: int
    scores: dict[str, np.ndarray]              # name → [N] float32
    queries: dict[str, str] = field(default_factory=dict)   # score name → query (text or modality)
    coord_attrs: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)   # run_dir, step


# ---------------------------------------------------------------- model side


def tile_readout(encoder, features: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B, N, D_out] the encoder's readout of each tile alone, in the space its slide embedding lives in."""
    from mmfm.models.abmil import ABMIL
    from mmfm.models.transformer import TransformerSlideEncoder

    if isinstance(encoder, ABMIL):  # one-tile bag: every head's weight is 1 → pooled = h_i per head
        return jnp.tile(tokens, (1, 1, encoder.pool.n_heads)) if encoder.merge == "concat" else tokens
    if isinstance(encoder, TransformerSlideEncoder):
        if encoder.cfg.readout == "attention":
            return tokens
        return jnp.concatenate([features.astype(tokens.dtype), tokens], -1)  # mean_concat of one tile
    raise HeatmapError(f"no tile readout for slide encoder {type(encoder).__name__}")


def tile_embeddings(model, features, coords, mask, fragment, *, normalize: bool = True):
    """(the slide encoder's `SlideOutput`, [B, N, E] each tile's readout through the slide projection head)."""
    out = model.encoders["slide"](features, coords, mask, fragment, deterministic=True)
    readout = tile_readout(model.encoders["slide"], features, out.tokens)
    return out, model.heads["slide"](readout.astype(model.dtype), normalize=normalize)


def slide_maps(model, features: np.ndarray, grid: np.ndarray, fragment: np.ndarray,
               queries: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{score name: [N]} for one bag (all tiles): attention per head and cosine similarity to each query [E]."""
    from mmfm.eval.embed import bucket_length

    n = len(features)
    if n == 0:
        raise HeatmapError("the bag has no tiles")
    length = bucket_length(n, 256)  # padding is invisible to the encoders; few compiled shapes
    f = np.zeros((1, length, features.shape[1]), np.float32)
    c = np.zeros((1, length, 2), np.int32)
    m = np.zeros((1, length), bool)
    fr = np.zeros((1, length), np.int32)
    f[0, :n], c[0, :n], m[0, :n], fr[0, :n] = features, grid, True, fragment
    names = list(queries)
    q = np.stack([queries[k] for k in names]) if names else np.zeros((0, 1))
    q = (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)).astype(np.float32)  # cosine
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, f, c, m, fr, q):
        out, tiles = tile_embeddings(nnx.merge(graphdef, state), f, c, m, fr)
        sim = jnp.einsum("bne,qe->bqn", tiles, q) if names else None
        return out.attention, sim

    attn, sim = run(state, f, c, m, fr, q)
    out = {}
    if attn is not None:
        out.update({f"attention_head{h}": np.asarray(attn[0, h, :n], np.float32) for h in range(attn.shape[1])})
    for i, name in enumerate(names):
        out[name] = np.asarray(sim[0, i, :n], np.float32)
    return out


def case_query(model, run_cfg, transforms, cohort, case_id: str, modality: str) -> np.ndarray:
    """[E] the case's own embedding of `modality` (as `mmfm embed` computes it)."""
    from mmfm.data.loader import case_presence, case_tensors

    present = case_presence(cohort, [case_id], [modality])
    if not present[modality][0]:
        raise HeatmapError(f"{cohort.root}: case {case_id!r} has no {modality} data to use as the query")
    dense = case_tensors(cohort, [case_id], run_cfg.loader, transforms=transforms, present=present).dense
    batch = {k: v for k, v in dense.items() if k.startswith(f"{modality}/")}
    graphdef, state = nnx.split(model)  # one compiled program (cached across commands), not op-by-op dispatch
    encode = jax.jit(lambda state, batch: nnx.merge(graphdef, state).encode(modality, batch, deterministic=True))
    return np.asarray(encode(state, batch), np.float32)[0]


def query_kinds(queries, modalities) -> list[str]:
    """'modality' (the case's own embedding) or 'text' per query; a modality the run lacks, or text without a
    text tower, is an error."""
    from mmfm import MODALITIES

    kinds = []
    for q in queries:
        if q in MODALITIES:
            if q == "slide":
                raise HeatmapError("query 'slide': tiles are compared with another modality or a text prompt")
            if q not in modalities:
                raise HeatmapError(f"query {q!r}: the run has no {q} modality to compare the tiles with "
                                   f"(it has {', '.join(m for m in modalities if m != 'slide')})")
            kinds.append("modality")
        elif not str(q).strip():
            raise HeatmapError("an empty query")
        elif "report" not in modalities:
            raise HeatmapError(f"query {q!r}: a text prompt needs a run trained with reports")
        else:
            kinds.append("text")
    return kinds


def tile_scores(model, run_cfg, transforms, cohort, slide_id: str, queries=(), *, meta: dict | None = None
                ) -> TileScores:
    """Every score of `slide_id`'s bag for a loaded run (`load_for_inference`)."""
    from mmfm.data.bags import grid_indices, read_bag, read_header

    if slide_id not in cohort.slides.index:
        raise HeatmapError(f"{cohort.root}/slides.csv: no slide {slide_id!r}")
    if "slide" not in model.modalities:
        raise HeatmapError("the run has no slide encoder")
    row = cohort.slides.loc[slide_id]
    case_id, ps = str(row["case_id"]), int(row["patch_size_level0"])
    bag = read_bag(row["path"])
    header = read_header(row["path"])
    n = len(bag["features"])
    fragment = bag.get("fragment", np.zeros(n, np.int32)).astype(np.int32)
    vectors, described = {}, {}
    tower = None
    for i, (q, kind) in enumerate(zip(queries, query_kinds(queries, model.modalities))):
        if kind == "modality":
            name = f"similarity_{q}"
            vectors[name] = case_query(model, run_cfg, transforms, cohort, case_id, q)
        else:
            from mmfm.eval.text_tower import TextTower

            tower = tower or TextTower(model, run_cfg.loader.report_max_len)
            name = f"similarity_prompt{i}"
            vectors[name] = tower([q])[0]
        described[name] = q
    scores = slide_maps(model, np.asarray(bag["features"], np.float32), grid_indices(bag["coords"], ps), fragment,
                        vectors)
    return TileScores(slide_id, case_id, np.asarray(bag["coords"], np.int64), ps, scores,
                      {**{k: "attention" for k in scores if k.startswith("attention")}, **described},
                      coord_attrs=header.coord_attrs, meta=dict(meta or {}))


# ---------------------------------------------------------------- file


def write_tile_scores(path: str | Path, ts: TileScores) -> Path:
    with atomic_path(path, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as f:
        c = f.create_dataset("coords", data=ts.coords.astype(np.int64))
        for k, v in ts.coord_attrs.items():
            c.attrs[k] = v
        c.attrs["patch_size_level0"] = int(ts.patch_size_level0)
        g = f.create_group("scores")
        for name, v in ts.scores.items():
            d = g.create_dataset(name, data=np.asarray(v, np.float32))
            d.attrs["query"] = ts.queries.get(name, "")
            d.attrs["kind"] = name.split("_")[0]
        f.attrs["slide_id"], f.attrs["case_id"] = ts.slide_id, ts.case_id
        for k, v in ts.meta.items():
            f.attrs[k] = json.dumps(v) if not isinstance(v, (str, int, float)) else v
    return Path(path)


def read_tile_scores(path: str | Path) -> TileScores:
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f["coords"].attrs.items()}
        scores = {k: d[:] for k, d in f["scores"].items()}
        queries = {k: str(d.attrs.get("query", "")) for k, d in f["scores"].items()}
        root = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        return TileScores(str(root.pop("slide_id")), str(root.pop("case_id")), f["coords"][:],
                          int(attrs["patch_size_level0"]), scores, queries, attrs, root)


# ---------------------------------------------------------------- from a run directory


def run_tile_scores(run: str | Path, cohort: str | Path, slide: str, queries=(), step: int | str | None = None
                    ) -> TileScores:
    """`tile_scores` for a run directory and a cohort directory; bad slide ids and queries fail before the run's
    checkpoint is loaded (seconds)."""
    from mmfm.data.cohort import Cohort
    from mmfm.train.rundir import load_for_inference, read_config

    run_cfg = read_config(run)  # names the run directory when it is not one
    cohort = Cohort.open(cohort, scan_features=False)
    if slide not in cohort.slides.index:
        raise HeatmapError(f"{cohort.root}/slides.csv: no slide {slide!r}")
    query_kinds(queries, run_cfg.data.modalities)
    model, run_cfg, transforms = load_for_inference(run, step=step)
    return tile_scores(model, run_cfg, transforms, cohort, slide, queries,
                       meta={"run_dir": str(Path(run).absolute()), "step": str(step or "latest")})
