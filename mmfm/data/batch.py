"""The batch contract between the loader, the models, the objective and the trainer.

A batch is a flat dict of NumPy (host) or JAX (device) arrays with fixed shapes, so one jit
compilation serves every step. Row b is one sample of one case; `case_index[b]` is that case's
integer identity in the cohort, which defines positives in the objective (several slides of
one case are all positives for that case's RNA). Padding rows have case_index = -1 and every
`<modality>/present` False.

  key                        shape      dtype          meaning
  case_index                 [B]        int32          case identity (row in Cohort.cases), -1 = padding row
  site_index                 [B]        int32          tissue-source site (index into the loader's site_names), -1 = unknown
  slide/features             [B, K, D]  float16/32     sampled tile features
  slide/coords               [B, K, 2]  int32          grid (col, row) = level-0 (x, y) // patch_size_level0
  slide/tile_mask            [B, K]     bool           True = real tile, False = padding
  slide/fragment             [B, K]     int32          tissue-fragment index per tile (0 when unknown)
  slide/slide_index          [B, K]     int32          which of the case's slides the tile is from (0 unless pooled)
  slide/present              [B]        bool
  rna/values                 [B, G]     float32        preprocessed expression on the run's gene vocabulary
  rna/gene_mask              [B, G]     bool           gene measured in this case's cohort (absent ≠ zero)
  rna/present                [B]        bool
  protein/values             [B, P]     float32
  protein/mask               [B, P]     bool
  protein/present            [B]        bool
  report/input_ids           [B, L]     int32          WordPiece ids (MiniLM vocabulary)
  report/attention_mask      [B, L]     int32
  report/features            [B, H]     float32        frozen text trunk's output (only with loader.report_cache)
  report/present             [B]        bool
  mutation/values            [B, M]     float32        0/1 driver-mutation flags (cases.csv `mut_*` columns)
  mutation/mask              [B, M]     bool           status known
  mutation/present           [B]        bool

A modality that a run does not use is simply absent from the dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRESENT = "present"


def present_key(modality: str) -> str:
    return f"{modality}/{PRESENT}"


def modalities_in(batch: dict) -> tuple[str, ...]:
    """Modalities carried by a batch, in a stable order."""
    from mmfm import MODALITIES

    return tuple(m for m in MODALITIES if present_key(m) in batch)


@dataclass(frozen=True)
class BatchShapes:
    """Static shapes of a batch; 0 means the modality is not used."""

    batch_size: int
    tiles_per_slide: int = 0
    feature_dim: int = 0
    n_genes: int = 0
    n_proteins: int = 0
    report_len: int = 0
    n_mutations: int = 0
    n_sites: int = 0  # distinct known sites among the training cases (`site_index` < n_sites)


def random_batch(shapes: BatchShapes, seed: int = 0, n_cases: int | None = None,
                 missing_rate: float = 0.0) -> dict[str, np.ndarray]:
    """A batch with the contract's keys, shapes and dtypes, filled with random values.

    For model/objective/trainer tests and benchmarks that must not depend on the simulator.
    `n_cases` < batch_size makes several rows share a case (multi-positives).
    """
    rng = np.random.default_rng(seed)
    s = shapes
    b = s.batch_size
    out: dict[str, np.ndarray] = {}
    cases = rng.permutation(b) if n_cases is None else rng.integers(0, n_cases, size=b)
    out["case_index"] = cases.astype(np.int32)

    def present():
        return rng.random(b) >= missing_rate

    if s.tiles_per_slide:
        k, d = s.tiles_per_slide, s.feature_dim
        out["slide/features"] = rng.standard_normal((b, k, d), dtype=np.float32)
        side = int(np.ceil(np.sqrt(k)))
        grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="xy"), -1).reshape(-1, 2)[:k]
        out["slide/coords"] = np.broadcast_to(grid, (b, k, 2)).astype(np.int32).copy()
        n_real = rng.integers(max(1, k // 2), k + 1, size=b)
        out["slide/tile_mask"] = np.arange(k)[None, :] < n_real[:, None]
        out["slide/fragment"] = (out["slide/coords"][..., 0] >= side // 2).astype(np.int32)
        out["slide/slide_index"] = np.zeros((b, k), np.int32)
        out["slide/present"] = present()
    if s.n_genes:
        out["rna/values"] = rng.standard_normal((b, s.n_genes), dtype=np.float32)
        out["rna/gene_mask"] = np.ones((b, s.n_genes), bool)
        out["rna/present"] = present()
    if s.n_proteins:
        out["protein/values"] = rng.standard_normal((b, s.n_proteins), dtype=np.float32)
        out["protein/mask"] = np.ones((b, s.n_proteins), bool)
        out["protein/present"] = present()
    if s.report_len:
        ids = rng.integers(1000, 30000, size=(b, s.report_len)).astype(np.int32)
        lens = rng.integers(3, s.report_len + 1, size=b)
        mask = (np.arange(s.report_len)[None, :] < lens[:, None]).astype(np.int32)
        ids[:, 0] = 101  # [CLS]
        out["report/input_ids"] = np.where(mask > 0, ids, 0).astype(np.int32)
        out["report/attention_mask"] = mask
        out["report/present"] = present()
    if s.n_mutations:
        out["mutation/values"] = (rng.random((b, s.n_mutations)) < 0.2).astype(np.float32)
        out["mutation/mask"] = np.ones((b, s.n_mutations), bool)
        out["mutation/present"] = present()
    out["site_index"] = (rng.integers(0, s.n_sites, size=b) if s.n_sites else np.full(b, -1)).astype(np.int32)
    return out
