"""Supervised MIL training for the `mil` probes: tile bags → slide encoder → case → head, one fold at a time.

Settings (every one a key of the task's `train:` mapping, `MilConfig`) come from the literature, not from the test
folds: one case per step (CLAM and Patho-Bench train with batch size 1), AdamW lr 2e-4 and weight decay 1e-5
(CLAM's documented recipe, Lu et al. 2021; Patch-GCN), dropout 0.25 and sizes 512/256 (CLAM), 20 epochs with a
cosine schedule and at most 2048 tiles sampled per slide per step (Patho-Bench's ABMIL-from-scratch fine-tune
config), class-balanced cross-entropy (Patho-Bench). `finetune` starts the encoder from pretrained weights: its
learning rate is `encoder_lr_scale` × lr (2e-5 ≈ Patho-Bench's 2.5e-5 for pretrained slide encoders) after a linear
warm-up of `warmup_epochs` (Patho-Bench: one); the fresh head keeps lr. `frozen` trains the head only. Both start
their fresh head at the linear probe of the pretrained case embeddings (LP-FT, Kumar et al. ICLR 2022; `fit_head`,
`probe_head`): from a random head, AdamW at 2e-4 for ~800 one-case steps barely moved it against the embedding's
small spread around a large mean, and both rows sat at chance (compare_supervised, 160 cases: finetune 0.466,
pretrained linear 0.714); on fold 0 of that cohort, frozen 0.499 → 0.788, finetune 0.515 → 0.793 (linear 0.795).

Model selection (`select`), always inside the training fold — `fit` is never given the test fold, which is predicted
once with the kept parameters:
  inner  train on the inner training split (1 − 1/val_folds of the fold), keep the epoch of lowest loss on the
         inner validation split (CLAM's early-stopping criterion);
  refit  choose the epoch that way, then retrain on the whole training fold (same seed and schedule) and stop there;
  last   train on the whole training fold and keep the last epoch (Patho-Bench's fixed epochs, no validation; the
         issue's PyTorch reference).
Default `last`, measured by scripts/select_mil.py on a cohort no reported table uses (default simulator, seed 7 —
not the demo's seed 0 nor compare_supervised.py's seeds 0-2 —, 120 cases, 128-d, median 200 tiles, 10 epochs, 5
folds; scripts/results/select_mil.md): subtype AUROC last 0.774, refit 0.756, inner 0.750 (mean-pool linear 0.788);
the inner split's epoch swung between 2 and 10 across folds. Earlier, folds 0-1 of a 189-case 1024-d cohort: inner
0.828 / 0.729, last 0.845 / 0.874. `last` is also the cheapest (refit trains twice).

Small cohorts: the room attention has on the default simulator shows in the linear probe on the mean of tumour
tiles only (the subtype's own shift sits on tumour tiles; the plain mean mixes it with composition): +0.086 AUROC
over the plain mean at 64-d / 300 tiles, ≈ +0.10 at 128–256-d / 128 tiles, +0.135 at 1024-d / 600 tiles (seed 7,
~140 cases, 5 folds) — the issue's reference (+0.13) is the 1024-d case. At ~115 training cases the literature
recipe under-trains (training loss still ≥ 0.65 after 10 epochs; 128-d: −0.01 vs mean-pool; cosine or constant lr
alike, −0.02 / −0.04 at 8 cases per step); a larger step and more updates (lr 1e-3·√8, 8 cases per step, 30–40
epochs) gave +0.05 / +0.15 (tests/test_mil.py's learnability test, 256-d); uniform attention there gives +0.03 / +0.09:
much of abmil's gain on this simulator is its nonlinear tile projection. The defaults stay the literature's.

One case per step is the literature's setting; batches of B cases (lr·√B) make B× fewer updates. On folds 0-1 of
5 of a 189-case default simulated cohort (1024-d, ~1000 tiles, 512 sampled) both reached a similar training loss
in about the same wall time; AUROC one case per step 0.828 / 0.729, 8 per step 0.813 / 0.822, mean-pool linear
0.766 / 0.769 (select inner): the batch size is not what separates mmfm from the reference.

Fast path. One case per step with gated ABMIL (`abmil`, and any run whose slide encoder is ABMIL): each case is one
row holding its slides' sampled tiles back to back, `slide` saying whose (`MILModel.packed`), pooled per slide
chunk by chunk — chunks of `chunk_large` tiles while a case has that many left, then halving down to `chunk` — up
to its last tile only (`ABMIL.embed_chunked`), so a step costs the case's own tiles rounded up to a chunk whatever
the padded length: every step of a fold has one shape and one compilation, shared by the folds. `steps_per_call`
steps run as one jitted call (a scan; parameters and optimiser state donated); a step sends only indices into the
epoch's table of sampled tiles, copied to the device once per epoch, and reads a chunk's tiles from it as it visits
the chunk (gathering a whole padded row first copied ~4 MB per step at 4096 × 256-d). Profile of
scripts/bench_mil.py's fold (256-d, 92 training cases, 570 sampled tiles per case on average, 10 cases with 3 slides; 2 shared cores) before this
layout: each slide was a row padded to the fold's longest, rows padded to a power of two (3 slides → 4 rows), a
chunk computed wherever any row had a tile — 1.50× the sampled tiles (packed: 1.12×); host work (zero-filled
[rows, 2048, 256] batches and their copy) ~3.5 of ~35 ms per step under load (now ~1); 47 compilations in the
fold, 3 of them the step (one per row count). In the step itself, dropout masks took ~25% of the CPU time (now 2
random bits per element at rate 0.25, `mmfm.models.layers.Dropout`: ~5× cheaper masks) and the backward pass
recomputes each chunk (~27% of the matrix FLOPs; 29% of the step's thread time in an XLA profile of the bench fold
— its forward products 17.5%, the rest elementwise; see `chunked_attention_pool` for why); products of
128-tile chunks use one core however many there are, 512-tile ones run ~1.5× faster on two — hence large chunks
for the bulk of a case (512, 256, 128: ~20% faster steps than 128 alone on the bench fold under load, for ~1 s
more compilation). Other encoders, steps of several cases, and cases that all fit one chunk take slides as rows in
length buckets (masks on padding; a ladder of 4 sizes per power of two ≥ the longest sampled slide, ≤ 25% padding,
cases of similar lengths together; rows sharded over the local devices, data parallel): one compilation per
bucket; `chunk: 0` puts ABMIL there too. Evaluation reads every tile of every slide through
`mmfm.eval.embed.encode_bags` (length buckets, as `mmfm embed`: a forward pass alone compiles fast). A case with
several slides is the mean of its slide embeddings (late fusion, as the linear probe's embeddings). Same seed, same
batches, same result.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mmfm.data.sampling import sample_tiles
from mmfm.eval.embed import Bag, EmbedConfig, bucket_length, encode_bags
from mmfm.models.mil import MILModel
from mmfm.objectives.supervised import balanced_weights, cox_nll, survival_nll, weighted_ce

log = logging.getLogger(__name__)

Kind = Literal["class", "nll", "cox", "mse"]  # mse: continuous targets (z-scored on the training fold)


@dataclass(frozen=True)
class MilConfig:
    """Training settings of a `mil` task (task-file key `train:`); defaults cited in the module docstring."""

    epochs: int = 20  # Patho-Bench ABMIL from scratch (the schedule's length; `select` says which epoch is kept)
    lr: float = 2e-4  # AdamW (CLAM's documented lr; Patch-GCN)
    weight_decay: float = 1e-5  # CLAM, Patch-GCN
    dropout: float = 0.25  # CLAM: after the tile projection, in the gated attention, and before the head
    hidden: int = 512  # abmil: tile features → hidden (CLAM 'small')
    attn_dim: int = 256  # abmil: gated attention width (CLAM 'small')
    max_tiles: int = 2048  # tiles sampled per slide per training step (Patho-Bench); evaluation uses every tile
    batch_size: int = 1  # cases per step: 1 = CLAM / Patho-Bench (one bag per step); more: data parallel
    lr_scaling: Literal["sqrt", "none"] = "sqrt"  # lr is for one case per step; B cases per step use lr·√B
    val_folds: int = 5  # select inner/refit: 1/val_folds of the training fold (patient-level, stratified) validates
    encoder_lr_scale: float = 0.1  # finetune: encoder lr = lr × this
    warmup_epochs: float = 1.0  # finetune: linear warm-up of every lr, then cosine
    probe_head: bool = True  # frozen / finetune: start the head at the linear probe of the embeddings (LP-FT, fit_head)
    probe_c: float = 1.0  # that probe's inverse L2 strength (sklearn LogisticRegression's default C)
    probe_steps: int = 100  # its L-BFGS iterations
    n_bins: int = 4  # survival 'nll': time bins at the quartiles of uncensored training times (Patch-GCN)
    survival_loss: Literal["nll", "cox"] = "nll"  # discrete-time NLL (the MIL standard) or Cox (batch_size ≥ 2)
    select: Literal["inner", "refit", "last"] = "last"  # model selection inside the training fold (docstring)
    min_bucket: int = 64  # smallest padded bag length
    buckets_per_octave: int = 4  # training bag lengths 1, 1.25, 1.5, 1.75 × 2^k (≤ 25% padding, 4 shapes/octave)
    chunk: int = 128  # encoders that pool chunk by chunk (gated ABMIL): tiles per chunk of packed cases (0: buckets)
    chunk_large: int = 512  # ...and chunk_large while a case has that many left, then halving (faster products; 0: off)
    steps_per_call: int = 16  # packed cases: training steps run as one call (one dispatch, one copy of indices)
    max_tiles_per_call: int = 65536  # evaluation: rows × bucket length per encoder call (memory bound)

    def __post_init__(self):
        for k in ("epochs", "max_tiles", "batch_size", "n_bins", "min_bucket", "buckets_per_octave", "steps_per_call"):
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k}={getattr(self, k)} must be >= 1")
        ratio = self.chunk_large // max(self.chunk, 1)
        if self.chunk < 0 or self.chunk_large < 0 or (self.chunk and self.chunk_large and (
                self.chunk_large % self.chunk or ratio & (ratio - 1))):
            raise ValueError(f"train.chunk={self.chunk}, chunk_large={self.chunk_large}: both >= 0, chunk_large "
                             "chunk × a power of two (or 0)")
        if self.val_folds < 2:
            raise ValueError(f"train.val_folds={self.val_folds} must be >= 2")


@dataclass
class CaseSet:
    """Cases of one side of a split: ids, their slides' bags, and outcomes (class `y`, or `time` + `event`)."""

    ids: list[str]
    bags: list[list[Bag]]
    y: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None

    def take(self, idx) -> CaseSet:
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return CaseSet([self.ids[i] for i in idx], [self.bags[i] for i in idx], pick(self.y), pick(self.time),
                       pick(self.event))


@dataclass
class Fitted:
    """A trained predictor and how it got there."""

    model: MILModel
    epoch: int  # 1-based epoch whose parameters were kept
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_loss
    bins: np.ndarray | None = None  # survival 'nll' inner bin edges
    steps: int = 0
    train_s: float = 0.0
    epoch_s: list[float] = field(default_factory=list)  # training time of each epoch (validation excluded)
    host_s: list[float] = field(default_factory=list)  # of which on the host: building and copying batches (the
    #                                                     next epoch's while this one's steps run)


# ---------------------------------------------------------------- batches


def _n_devices(cfg: MilConfig) -> int:
    """Devices a step shards its rows over: the most that divide the device count and have a case each (one case
    per step runs on one device — no padded rows)."""
    n_dev = jax.device_count()
    return max(d for d in range(1, n_dev + 1) if n_dev % d == 0 and d <= cfg.batch_size)


def epoch_plan(cases: CaseSet, cfg: MilConfig, rng: np.random.Generator,
               length: int | None = None) -> tuple[list[tuple[int, list[int]]], list[list[np.ndarray]]]:
    """One epoch's steps in order, each (padded length, its cases' positions), and the tiles sampled from every
    slide of every case (at most cfg.max_tiles). Cases are shuffled, grouped by the length bucket of their longest
    sampled slide (every case: `length`, if given), `cfg.batch_size` per step; the step order is shuffled."""
    picks, bucket = [], []
    for bags in cases.bags:
        idx = [sample_tiles(len(b.features), min(len(b.features), cfg.max_tiles), rng)[0] for b in bags]
        picks.append(idx)
        bucket.append(length or bucket_length(max(len(i) for i in idx), cfg.min_bucket, cfg.buckets_per_octave))
    groups: dict[int, list[list[int]]] = {}
    perm = rng.permutation(len(cases.ids))
    for c in perm:
        group = groups.setdefault(bucket[c], [[]])
        if len(group[-1]) == cfg.batch_size:
            group.append([])
        group[-1].append(int(c))
    pos = np.argsort(perm)  # steps listed by their first case's draw: the order does not depend on the bucketing
    steps = sorted(((length, members) for length, group in groups.items() for members in group),
                   key=lambda b: pos[b[1][0]])
    return [steps[i] for i in rng.permutation(len(steps))], picks


def epoch_groups(cases: CaseSet, n_dev: int, cfg: MilConfig, rng: np.random.Generator, outcome: dict,
                 layout: Layout | None) -> tuple[np.ndarray | None, list[dict]]:
    """One epoch (`epoch_plan`) as groups of steps to run in one call each (arrays with a leading step axis, and
    `active`: False pads the last group). Slides as rows (`layout` None): one step per group, its rows' tiles padded
    by `_rows`. `layout`: `layout.steps` steps per group, each case one row of indices into the epoch's tile table
    (`tile_table`, returned first: one host-to-device copy per epoch, of sampled tiles only; the step reads a case's
    tiles from it a chunk at a time). `outcome`: per-case arrays placed in case slots."""
    steps, picks = epoch_plan(cases, cfg, rng, layout and layout.length)
    if layout is None:
        return None, [{**jax.tree.map(lambda a: a[None], _pack(cases, picks, length, members,
                                                               _rows(cases, members, n_dev, cfg), outcome)),
                       "active": np.ones(1, bool)} for length, members in steps]
    tiles, where = tile_table(cases, picks)
    k = layout.steps
    return tiles, [_pack_cases(where, [c for _, c in steps[i:i + k]], k, cfg.batch_size, layout, outcome)
                   for i in range(0, len(steps), k)]


@dataclass(frozen=True)
class Layout:
    """Cases packed one per row (`MILModel.packed`): rows of `length` tiles holding at most `n_slides` slides,
    pooled chunk by chunk (sizes `chunks`), `steps` training steps per call."""

    chunks: tuple[int, ...]
    length: int
    n_slides: int
    steps: int


def chunk_sizes(model: MILModel, cfg: MilConfig) -> tuple[int, ...]:
    """The chunk sizes the model's encoder pools packed cases with: chunk_large, halving down to chunk (a case's
    tiles then take as many of the largest as fit and at most one of each smaller); () if it cannot (or chunk 0)."""
    sizes = [cfg.chunk] if cfg.chunk else []
    while sizes and sizes[0] * 2 <= cfg.chunk_large:
        sizes.insert(0, sizes[0] * 2)
    return model.chunk_sizes(tuple(sizes))


def packed_layout(model: MILModel, cases: CaseSet, cfg: MilConfig) -> Layout | None:
    """The packed layout of the training step if the encoder pools chunk by chunk and a step takes one case: every
    step then has one shape (one compilation; cfg.steps_per_call steps per call) and costs its case's own tiles,
    rounded up to a chunk — rows of slides would pad a case's slides to a power-of-two count of its longest. Rows:
    a power of two ≥ the largest sampled case, a multiple of the smallest chunk, up to a power of two of slides
    (other folds mostly land on the same shape: the compilation is shared). None: slides as rows in length buckets
    — other encoders; several cases per step, whose rows would each run to the longest; cases that all fit one
    chunk, where there is nothing to skip and a plain step compiles ~3× faster than the chunk loops."""
    chunks = chunk_sizes(model, cfg) if cfg.batch_size == 1 else ()
    if not chunks:
        return None
    most = max(sum(min(len(b.features), cfg.max_tiles) for b in bags) for bags in cases.bags)
    length = -(-bucket_length(most, chunks[-1]) // chunks[-1]) * chunks[-1]
    if length <= chunks[-1]:
        return None
    return Layout(tuple(c for c in chunks if c <= length), length, bucket_length(max(map(len, cases.bags)), 1),
                  cfg.steps_per_call)


def _rows(cases: CaseSet, members: list[int], n_dev: int, cfg: MilConfig) -> int:
    """A batch's rows: its slides padded to a power of two (at least the batch size's), a multiple of n_dev — a few
    shapes, so the step compiles a few times per task rather than once per slide count."""
    slides = sum(len(cases.bags[c]) for c in members)
    return -(-bucket_length(slides, bucket_length(cfg.batch_size, 1)) // n_dev) * n_dev


def _pack(cases: CaseSet, picks, length: int, members: list[int], rows: int, outcome: dict) -> dict:
    d = cases.bags[members[0]][0].features.shape[1]
    b = {"features": np.zeros((rows, length, d), np.float32), "coords": np.zeros((rows, length, 2), np.int32),
         "mask": np.zeros((rows, length), bool), "fragment": np.zeros((rows, length), np.int32),
         "case_of_row": np.zeros(rows, np.int32), "row_valid": np.zeros(rows, bool),
         "valid": np.zeros(rows, np.float32)}
    b.update({k: np.zeros((rows, *v.shape[1:]), v.dtype) for k, v in outcome.items()})
    r = 0
    for slot, c in enumerate(members):
        b["valid"][slot] = 1.0
        for k, v in outcome.items():
            b[k][slot] = v[c]
        for bag, idx in zip(cases.bags[c], picks[c]):
            n = len(idx)
            b["features"][r, :n], b["coords"][r, :n] = bag.features[idx], bag.coords[idx]
            b["mask"][r, :n], b["fragment"][r, :n] = True, bag.fragment[idx]
            b["case_of_row"][r], b["row_valid"][r] = slot, True
            r += 1
    return b


def tile_table(cases: CaseSet, picks) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """([R, D] float32: the sampled tiles (`picks`) of every slide of every case, then zero rows for padding — at
    least one, R on `bucket_length`'s ladder so that folds share the training step's compilation —; for each case
    and slide the rows of its tiles in that table)."""
    parts, where, n = [], [], 0
    for c, bags in enumerate(cases.bags):
        where.append([])
        for j, bag in enumerate(bags):
            parts.append(bag.features[picks[c][j]])
            where[-1].append(np.arange(n, n + len(parts[-1])))
            n += len(parts[-1])
    # finite: the pool multiplies it by a zero weight
    parts.append(np.zeros((bucket_length(n + 1, 1024, 4) - n, parts[0].shape[1]), np.float32))
    return np.concatenate(parts, dtype=np.float32), where


def _pack_cases(where: list[list[np.ndarray]], steps: list[list[int]], k: int, rows: int, layout: Layout,
                outcome: dict) -> dict:
    """`k` steps of `rows` case slots each ([k, rows, ...]): a case's tiles (`where`: rows of its slides' tiles in
    the tile table, `tile_table`) back to back in its row, then the table's zero row; `slide` says whose a tile is;
    steps past `steps` inactive."""
    pad = sum(len(w) for ws in where for w in ws)
    b = {"tile": np.full((k, rows, layout.length), pad, np.int32), "mask": np.zeros((k, rows, layout.length), bool),
         "slide": np.zeros((k, rows, layout.length), np.int32), "valid": np.zeros((k, rows), np.float32),
         "active": np.arange(k) < len(steps)}
    b.update({key: np.zeros((k, rows, *v.shape[1:]), v.dtype) for key, v in outcome.items()})
    for s, members in enumerate(steps):
        for slot, c in enumerate(members):
            b["valid"][s, slot] = 1.0
            for key, v in outcome.items():
                b[key][s, slot] = v[c]
            start = 0
            for j, w in enumerate(where[c]):
                b["tile"][s, slot, start:start + len(w)] = w
                b["mask"][s, slot, start:start + len(w)] = True
                b["slide"][s, slot, start:start + len(w)] = j
                start += len(w)
    return b


# ---------------------------------------------------------------- losses and optimiser


def outcome_arrays(kind: Kind, cases: CaseSet, bins: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-case targets the loss reads."""
    from mmfm.objectives.supervised import assign_bins

    if kind == "class":
        return {"y": cases.y.astype(np.int32)}
    if kind == "mse":
        return {"y": cases.y.astype(np.float32)}
    out = {"time": cases.time.astype(np.float32), "event": cases.event.astype(np.float32)}
    if kind == "nll":
        out["bin"] = assign_bins(cases.time, bins)
    return out


def loss_fn(kind: Kind) -> Callable[[jax.Array, dict, dict], jax.Array]:
    """`loss(outputs, batch, aux)`; aux['class_w'] = the training fold's balanced class weights."""
    if kind == "class":
        return lambda out, b, aux: weighted_ce(out, b["y"], aux["class_w"], b["valid"])
    if kind == "nll":
        return lambda out, b, aux: survival_nll(out, b["bin"], b["event"], b["valid"])
    if kind == "mse":  # mean over targets and valid cases
        return lambda out, b, aux: (((out - b["y"]) ** 2).mean(-1) * b["valid"]).sum() / jnp.maximum(
            b["valid"].sum(), 1.0)
    return lambda out, b, aux: cox_nll(out[:, 0], b["time"], b["event"], b["valid"])


def lr_steps(cfg: MilConfig, total_steps: int, warmup_steps: int, cases: int) -> np.ndarray:
    """[total_steps + 1] float32 learning rate of each step: linear warm-up from 0 (if any), then cosine to 0 at the
    last step (Patho-Bench's cosine schedule; optax's warmup_cosine_decay_schedule, in NumPy: no device work or
    compilation per fold). The literature's rates are for one case per step; `cases` per step take lr·√cases, the
    square-root scaling rule for Adam (Malladi et al. 2022). That rule does not restore the number of updates: B
    cases per step make B× fewer."""
    lr = cfg.lr * (np.sqrt(cases) if cfg.lr_scaling == "sqrt" else 1.0)
    t = np.arange(total_steps + 1, dtype=np.float64)
    decay = max(total_steps, warmup_steps + 1) - warmup_steps
    cosine = 0.5 * lr * (1 + np.cos(np.pi * np.clip(t - warmup_steps, 0, decay) / decay))
    return np.where(t < warmup_steps, lr * t / max(warmup_steps, 1), cosine).astype(np.float32)


# ---------------------------------------------------------------- training


ENCODER = nnx.All(nnx.Param, nnx.PathContains("encoder"))


def _adamw(weight_decay: float) -> optax.GradientTransformation:
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))  # adamw without its lr


@functools.cache
def _step_fn(graphdef, treedef, kind: Kind, frozen: bool, weight_decay: float,
             packed: tuple[tuple[int, ...], int] | None):
    """The jitted training call of one architecture × loss × layout: a group of steps (arrays with a leading step
    axis; `active` False = no step) as one scan — one dispatch and one host-to-device copy for up to
    `Layout.steps` steps —, AdamW with the learning rates passed in per step (so the schedule never recompiles),
    encoder and head with their own rates, parameters and optimiser state donated. The state travels as the flat
    list of leaves of (enc, head, rest, opt_enc, opt_head) (`treedef`): a call then skips rebuilding NNX
    Variables. `packed` = (chunks, n_slides): rows are cases (`MILModel.packed`); None: rows are slides."""
    tx, loss = _adamw(weight_decay), loss_fn(kind)

    def outputs(m: MILModel, b: dict) -> jax.Array:
        if packed:
            return m.packed(b["tiles"], b["mask"], b["slide"], packed[1], packed[0], index=b["tile"],
                            deterministic=False, frozen=frozen)
        return m(b["features"], b["coords"], b["mask"], b["fragment"], b["case_of_row"], b["row_valid"],
                 deterministic=False, frozen=frozen)

    def step(leaves, b, lr_enc, lr_head, class_w):
        enc, head, rest, opt_enc, opt_head = jax.tree.unflatten(treedef, leaves)

        def f(enc, head, rest):
            m = nnx.merge(graphdef, enc, head, rest, copy=True)  # fresh Variables at this trace level
            return loss(outputs(m, b), b, {"class_w": class_w}), nnx.state(m, nnx.Not(nnx.Param))

        (value, new_rest), (g_enc, g_head) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(enc, head, rest)
        u_enc, opt_enc = tx.update(g_enc, opt_enc, enc)
        u_head, opt_head = tx.update(g_head, opt_head, head)
        enc = jax.tree.map(lambda p, u: p - lr_enc * u, enc, u_enc)
        head = jax.tree.map(lambda p, u: p - lr_head * u, head, u_head)
        return jax.tree.leaves((enc, head, new_rest, opt_enc, opt_head)), value

    @partial(jax.jit, donate_argnums=0)
    def steps(leaves, group, lr_enc, lr_head, class_w, tiles):
        def body(leaves, x):
            b, lr_e, lr_h = x
            b = {**b, "tiles": tiles}
            return jax.lax.cond(b["active"], lambda: step(leaves, b, lr_e, lr_h, class_w),
                                lambda: (leaves, jnp.zeros((), jnp.float32)))

        return jax.lax.scan(body, leaves, (group, lr_enc, lr_head))

    return steps


@functools.cache
def _infer_fns(graphdef):
    """Jitted (slide embeddings, head) of one architecture, compiled once per bucket shape for every fold."""
    embed = jax.jit(lambda state, f, c, m, fr: nnx.merge(graphdef, state).embed(f, c, m, fr))
    head = jax.jit(lambda state, e: nnx.merge(graphdef, state).predict(e))
    return embed, head


def case_embeddings(model: MILModel, cases: CaseSet, cfg: MilConfig) -> np.ndarray:
    """[n_cases, out_dim] case embeddings from every tile of every slide (deterministic; mean over a case's slides;
    slides in length buckets, `encode_bags`, as `mmfm embed`: the forward pass alone compiles fast for each)."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, jax.local_devices()[0])  # inference on one device: no replicated work
    enc, _ = _infer_fns(graphdef)
    flat = [b for bags in cases.bags for b in bags]
    emb = encode_bags(lambda f, c, m, fr: enc(state, f, c, m, fr), flat,
                      EmbedConfig(min_bucket=cfg.min_bucket, max_tiles_per_call=cfg.max_tiles_per_call), desc="mil")
    owner = np.repeat(np.arange(len(cases.bags)), [len(b) for b in cases.bags])
    return np.stack([emb[owner == i].mean(0) for i in range(len(cases.bags))]).astype(np.float32)


def predict(model: MILModel, cases: CaseSet, cfg: MilConfig) -> np.ndarray:
    """[n_cases, n_out] outputs from every tile of every slide (slides → embeddings → case means → head)."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, jax.local_devices()[0])
    _, head = _infer_fns(graphdef)
    case_emb = case_embeddings(model, cases, cfg)
    n = len(case_emb)
    padded = np.zeros((bucket_length(n, 16), case_emb.shape[1]), np.float32)  # a few shapes across folds
    padded[:n] = case_emb
    return np.asarray(head(state, padded))[:n]


def fit_head(model: MILModel, kind: Kind, cases: CaseSet, outcome: dict, class_w: np.ndarray, cfg: MilConfig) -> None:
    """LP-FT (Kumar et al., ICLR 2022): set the fresh head to the L2-regularised linear probe of the encoder's
    deterministic case embeddings of the training cases (the loss of `kind`, sklearn's objective C·Σloss + ½‖W‖²
    with C = cfg.probe_c, L-BFGS on z-scored embeddings, the scaling folded into the head). A pretrained encoder's
    embedding varies little around a large common mean (the demo's: SD ≈ 0.1–0.4 per dimension around means up
    to 1): a random head moved by AdamW at 2e-4 for ~800 one-case steps stays near its random projection — `frozen`
    and `finetune` sat at chance (0.47 AUROC; the linear probe 0.71) — and fine-tuning through a random head distorts
    the features it starts from (Kumar et al.)."""
    e = case_embeddings(model, cases, cfg).astype(np.float64)
    mu, sd = e.mean(0), e.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    rows = bucket_length(len(e), 16)  # padded (valid 0) to a few shapes: one compile serves many folds
    pad = lambda a: np.concatenate([a, np.zeros((rows - len(a), *a.shape[1:]), a.dtype)])  # noqa: E731
    z = jnp.asarray(pad((e - mu) / sd), jnp.float32)
    batch = {**{k: jnp.asarray(pad(v)) for k, v in outcome.items()},
             "valid": jnp.asarray(pad(np.ones(len(e), np.float32)))}
    lam = 1.0 / (cfg.probe_c * len(e))  # mean-loss form of sklearn's objective (balanced weights sum to n)
    params = _lbfgs_probe(kind, cfg.probe_steps, model.head.kernel.shape[1], z, batch, jnp.asarray(class_w), lam)
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    kernel, bias = w / sd[:, None], b - (mu / sd) @ w
    model.head.kernel.set_value(jnp.asarray(kernel, model.head.kernel.get_value().dtype))
    model.head.bias.set_value(jnp.asarray(bias, model.head.bias.get_value().dtype))


@partial(jax.jit, static_argnums=(0, 1, 2))
def _lbfgs_probe(kind: Kind, steps: int, n_out: int, z, batch, class_w, lam) -> dict:
    """{'w', 'b'} minimising mean loss + ½·lam·‖w‖² of the linear map z @ w + b (L-BFGS from zeros)."""
    loss, aux = loss_fn(kind), {"class_w": class_w}

    def objective(p):
        return loss(z @ p["w"] + p["b"], batch, aux) + 0.5 * lam * jnp.sum(p["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(carry, _):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        return (optax.apply_updates(p, updates), state), None

    params = {"w": jnp.zeros((z.shape[1], n_out), jnp.float32), "b": jnp.zeros(n_out, jnp.float32)}
    return jax.lax.scan(body, (params, opt.init(params)), None, length=steps)[0][0]


def fit(make_model: Callable[[], MILModel], kind: Kind, tr: CaseSet, inner: tuple[np.ndarray, np.ndarray],
        cfg: MilConfig, **kw) -> Fitted:
    """Train on the training fold `tr` with the model selection `cfg.select` (module docstring); `inner` = (inner
    training, validation) positions in `tr`. The test fold is not an argument: it cannot enter the selection.
    `make_model()` builds a fresh model (same seed, same weights) each time one is trained."""
    if cfg.select == "last":
        return train(make_model(), kind, tr, None, cfg, **kw)
    chosen = train(make_model(), kind, tr.take(inner[0]), tr.take(inner[1]), cfg, **kw)
    if cfg.select == "inner":
        return chosen
    refit = train(make_model(), kind, tr, None, cfg, stop_epoch=chosen.epoch, **kw)
    return Fitted(refit.model, chosen.epoch, chosen.history, refit.bins, chosen.steps + refit.steps,
                  chosen.train_s + refit.train_s, chosen.epoch_s + refit.epoch_s, chosen.host_s + refit.host_s)


def train(model: MILModel, kind: Kind, tr: CaseSet, va: CaseSet | None, cfg: MilConfig, *, seed: int,
          encoder_lr_scale: float = 1.0, warmup_epochs: float = 0.0, frozen: bool = False, n_classes: int = 0,
          stop_epoch: int | None = None, probe_head: bool = False) -> Fitted:
    """Train on `tr` with the schedule of cfg.epochs epochs; keep the epoch with the lowest loss on `va` (every tile,
    deterministic), or with `va` None the last epoch trained — `stop_epoch` if given (the schedule unchanged)."""
    from mmfm.objectives.supervised import time_bins

    if kind == "cox" and cfg.batch_size < 2:
        raise ValueError("train.survival_loss=cox needs train.batch_size >= 2: its risk set is the step's cases "
                         "(one case per step has no pair to rank; e.g. batch_size: 32)")
    t0 = time.perf_counter()
    bins = time_bins(tr.time, tr.event, cfg.n_bins) if kind == "nll" else None
    out_tr = outcome_arrays(kind, tr, bins)
    n_dev = _n_devices(cfg)
    rng = np.random.default_rng(seed)
    layout = packed_layout(model, tr, cfg)
    n_steps = len(epoch_plan(tr, cfg, np.random.default_rng(seed), layout and layout.length)[0])  # per epoch (≈)
    lrs = lr_steps(cfg, n_steps * cfg.epochs, int(round(warmup_epochs * n_steps)), cfg.batch_size)
    enc_scale = 0.0 if frozen else encoder_lr_scale
    class_w = balanced_weights(tr.y, n_classes) if kind == "class" else np.zeros(1, np.float32)
    if probe_head:
        fit_head(model, kind, tr, out_tr, class_w, cfg)

    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n_dev])
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
    graphdef, enc, head, rest = nnx.split(model, ENCODER, nnx.Param, ...)
    tx = _adamw(cfg.weight_decay)
    leaves, treedef = jax.tree.flatten(jax.device_put((enc, head, rest, tx.init(enc), tx.init(head)), replicated))
    run = _step_fn(graphdef, treedef, kind, frozen, cfg.weight_decay, layout and (layout.chunks, layout.n_slides))
    class_w_dev = jax.device_put(class_w, replicated)
    model_state = lambda: jax.tree.unflatten(treedef, leaves)[:3]  # noqa: E731  (enc, head, rest) now
    loss = loss_fn(kind)
    if va is not None:
        va_batch = {**{k: jnp.asarray(v) for k, v in outcome_arrays(kind, va, bins).items()},
                    "valid": jnp.ones(len(va.ids), jnp.float32)}

    def next_epoch():  # the epoch's sampled tiles and step groups, built on the host, tiles put on the device
        tiles, groups = epoch_groups(tr, n_dev, cfg, rng, out_tr, layout)
        return jax.device_put(tiles, replicated), groups

    best, history, steps, epoch_s, host_s = None, [], 0, [], []
    n_epochs = stop_epoch or cfg.epochs
    t_epoch = time.perf_counter()
    tiles, groups = next_epoch()
    host = time.perf_counter() - t_epoch
    for epoch in range(1, n_epochs + 1):
        if epoch > 1:  # an epoch's time: from the end of the last one's validation to its losses on the host
            t_epoch, host = time.perf_counter(), 0.0
        losses = []
        for group in groups:
            t_host = time.perf_counter()
            k, active = len(group["active"]), int(group["active"].sum())
            lr = np.zeros(k, np.float32)
            lr[:active] = lrs[np.minimum(np.arange(steps, steps + active), len(lrs) - 1)]  # past the end: 0
            lr_dev = jax.device_put((lr * np.float32(enc_scale), lr), replicated)
            group = jax.device_put(group, {k: sharded if v.ndim > 1 else replicated for k, v in group.items()})
            host += time.perf_counter() - t_host
            leaves, values = run(leaves, group, *lr_dev, class_w_dev, tiles)
            losses.append((values, active))
            steps += active
        t_host = time.perf_counter()
        if epoch < n_epochs:  # the next epoch built while this one's steps run (dispatch is asynchronous); the
            tiles, groups = next_epoch()  # generator is drawn in the same order, so the same epochs as built in turn
        host += time.perf_counter() - t_host
        losses = [v[:n] for v, n in jax.device_get(losses)]
        epoch_s.append(time.perf_counter() - t_epoch)
        host_s.append(host)
        history.append({"epoch": epoch, "train_loss": float(np.mean(np.concatenate(losses)))})
        if va is None:
            continue
        current = nnx.merge(graphdef, *model_state())
        val_loss = float(loss(jnp.asarray(predict(current, va, cfg)), va_batch, {"class_w": jnp.asarray(class_w)}))
        history[-1]["val_loss"] = val_loss
        if best is None or val_loss < best[1]:
            best = (epoch, val_loss, jax.device_get(model_state()))
        log.debug("mil epoch %d: train %.4f val %.4f", epoch, history[-1]["train_loss"], val_loss)
    epoch, _, (enc, head, rest) = best or (len(history), None, model_state())
    return Fitted(nnx.merge(graphdef, enc, head, rest), epoch, history, bins, steps, time.perf_counter() - t0,
                  epoch_s, host_s)


def head_size(kind: Kind, n_classes: int, cfg: MilConfig) -> int:
    return {"class": n_classes, "nll": cfg.n_bins, "cox": 1, "mse": n_classes}[kind]  # mse: n_classes = targets

