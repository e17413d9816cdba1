"""Fill the report-feature cache (`mmfm.data.report_cache`) with the frozen text trunk's sentence outputs.

`sentence_features` runs the BERT trunk in eval mode (no dropout, fp32) on fixed-size batches, so one
compile serves a cohort; `fill_report_cache` computes only the reports the cache does not hold yet.
Training on cached features is exact for a frozen trunk in eval mode: `MultimodalModel.encode('report')`
on the features equals the trunk + head on the token ids (tested), which is what inference runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from mmfm import memo
from mmfm.data import report_cache
from mmfm.models.text import TextConfig, TextEncoder, load_pretrained, pretrained_weights, tokenize

log = logging.getLogger(__name__)
# The BERT forward over every report is compute-bound: compiled with XLA's optimisations and XLA:CPU's fusion emitters
# (XLA's defaults) whatever a short run set for the process (`fast_compile`: jax_disable_most_optimizations, the
# classic emitters of `mmfm.cli.jit_cache.start_backend`), which would make it slower than compiling it well costs.
# Per function, not a process setting switched for the while: other threads compile beside it.
OPTIMISED = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False,
             "xla_cpu_use_fusion_emitters": True}


def sentence_features(texts: Sequence[str], cfg: TextConfig, max_len: int, batch_size: int = 32,
                      length_step: int = 32) -> np.ndarray:
    """[n, hidden] float32 mean-pooled last hidden states of the pretrained trunk (eval mode), batched by length."""
    run, state = _trunk_forward(dataclasses.replace(cfg, compute_dtype="float32"))
    ids, mask = tokenize(list(texts), max_len, cfg.weights_dir)
    return by_length(lambda i, m: run(state, i, m), ids, mask, batch_size, length_step)


def _trunk_forward(cfg: TextConfig):
    """(the jitted eval-mode forward, the pretrained trunk's state): the trunk split, built inside one jit with the
    weights as arguments (the constructor's random initialisation is dead code there and XLA drops it; eagerly, each
    weight shape compiled and ran an initializer, ~3 CPU-s per process with the 30522 × 384 token table). Once per
    pipeline run (`mmfm.memo`), so the shapes `warm` compiled are not compiled again."""
    def build():
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: TextEncoder(cfg, rngs=nnx.Rngs(0))))
        state = jax.jit(lambda w: nnx.state(load_pretrained(cfg, weights=w)))(pretrained_weights(cfg))

        @partial(jax.jit, compiler_options=OPTIMISED)
        def run(state, ids, mask):
            return nnx.merge(graphdef, state)(ids, mask, deterministic=True)

        return run, state

    return memo.once(("pretrained text trunk", cfg), build)


def warm(text_cfg: TextConfig | None, max_len: int, batch_size: int = 32) -> None:
    """What `fill_report_cache` needs before it reads a report: the cache key's digest of the weights, the trunk in
    the model's layout (~1 s: reading, hashing and transposing 90 MB, a compile) and its forward compiled for the
    longest length bucket (`max_len`, which reports of real length fill; ~0.7 s, wasted on a cohort of short reports
    only). A pipeline runs this in a thread from its start; the fill then finds them (`mmfm.memo`, the digest's own
    cache, the jit's)."""
    text_cfg = text_cfg or TextConfig()
    report_cache.cache_key(text_cfg.weights_dir, max_len)
    run, state = _trunk_forward(dataclasses.replace(text_cfg, compute_dtype="float32"))
    ids, mask = np.zeros((batch_size, max_len), np.int32), np.ones((batch_size, max_len), np.int32)
    run(state, ids, mask).block_until_ready()


def by_length(fn, ids: np.ndarray, mask: np.ndarray, batch_size: int = 32, length_step: int = 32) -> np.ndarray:
    """`fn(ids, mask) -> [b, D]` over token rows [n, L] in fixed-size batches, float32 [n, D] in input order.

    Rows run sorted by token count, each batch cut to its longest row rounded up to `length_step` (exact:
    attention and pooling ignore padding), so short texts do not pay for `L` and few shapes compile. Every batch is
    dispatched before any result is read: JAX runs them asynchronously, so the next length's compile overlaps the
    batches already queued (the same numbers, ~1 s less for the quick demo's 174 reports)."""
    order = np.argsort(mask.sum(1), kind="stable")
    parts = []
    for s in range(0, len(ids), batch_size):
        rows = order[s:s + batch_size]
        length = min(ids.shape[1], -(-max(1, int(mask[rows].sum(1).max())) // length_step) * length_step)
        pad = ((0, batch_size - len(rows)), (0, 0))  # fixed batch: one compile per length step
        parts.append((rows, fn(np.pad(ids[rows, :length], pad), np.pad(mask[rows, :length], pad))))
    if not parts:
        return np.zeros((0, 0), np.float32)
    got = [np.asarray(y, np.float32) for _, y in parts]
    out = np.zeros((len(ids), got[0].shape[1]), np.float32)
    for (rows, _), y in zip(parts, got):
        out[rows] = y[:len(rows)]
    return out


@dataclass(frozen=True)
class CacheFill:
    table: Path        # the cache table holding the cohort's reports
    key: str
    n_reports: int     # reports of the cohort
    n_computed: int    # of which computed now (the rest were cached)
    seconds: float     # wall time of this call (hashing, lookup, trunk, write)


def fill_report_cache(cohort, text_cfg: TextConfig | None, folder: str | Path, max_len: int,
                      batch_size: int = 32) -> CacheFill:
    """Cache the frozen trunk's features of every report of `cohort` under `folder` (missing ones only)."""
    t0 = time.perf_counter()
    text_cfg = text_cfg or TextConfig()
    if text_cfg.trainable != "frozen":
        raise ValueError(f"loader.report_cache needs model.report.trainable='frozen' (got {text_cfg.trainable!r}): "
                         "cached features of a trained trunk would be stale after the first step")
    texts = [] if cohort.reports is None else cohort.reports.astype(str).tolist()
    key = report_cache.cache_key(text_cfg.weights_dir, max_len)
    _, found = report_cache.lookup(folder, key, texts)
    todo = [t for t, f in zip(texts, found) if not f]
    if todo:
        feats = sentence_features(todo, text_cfg, max_len, batch_size)
        report_cache.store(folder, key, todo, feats, meta={"weights_dir": text_cfg.weights_dir, "max_len": max_len})
    fill = CacheFill(report_cache.table_path(folder, key), key, len(texts), len(todo), time.perf_counter() - t0)
    log.info("report cache %s: %d reports, %d computed in %.1fs", fill.table, fill.n_reports, fill.n_computed,
             fill.seconds)
    return fill
