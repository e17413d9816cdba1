"""`spots`: spot-level expression from tile embeddings on cohorts with spot tables (spatial transcriptomics),
HEST-Benchmark's protocol on patient-level folds.

Each spot of a slide's spot table (mmfm.data.spots) is paired with the tile containing its centre; the embedding
of a spot is that tile's feature vector (`tiles`: the cohort's tile features). Per fold, fitted on the training
patients' spots only: the top-`hvg` highly variable genes (HEST: 50; it ships fixed gene lists), PCA-`pca` of the
features (HEST: 256) and a ridge per gene (α by leave-one-out; HEST fixes α = 100 / (n_features · n_targets):
`alphas: [0.0078]` for 256 × 50); scored by Pearson r per gene over the test patients' spots. Spots of one slide
are not independent, so the per-gene p-values (and `n_significant`) are optimistic; the permutation null on the
same spots shows by how much. Facts and sources: data_cards/hest.md.
References on the same spots: `chance_*` = permutation null, `baseline:mean` = the training mean of each gene (R²
only: a constant prediction has no correlation), and on simulated cohorts `oracle` = the true type of the tile
under the spot (one-hot) and the case's programmes (truth/). Targets: log1p of the counts (HEST-Benchmark's
transform) unless `transform: normalize_log1p`. Rows: as `regression` (mmfm.eval.tasks.regression).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from mmfm.data.bags import read_bag
from mmfm.data.omics import counts_of, log_normalize
from mmfm.data.spots import match_spots, read_spots
from mmfm.eval.probes import regression
from mmfm.eval.tasks.base import Collector, FoldSpec, Target, TaskError, fold_sides, result_key, row_groups
from mmfm.eval.tasks.regression import score_fold

KINDS = ("tiles", "oracle")


@dataclass(frozen=True, kw_only=True)
class SpotsSpec(FoldSpec):
    embeddings: tuple[str, ...] = ("tiles",)  # 'tiles' (tile features under each spot), 'oracle' (simulated truth)
    hvg: int = 50  # top-k highly variable genes of each fold's training spots (HEST-Benchmark: 50)
    names: tuple[str, ...] = ()  # or these genes
    transform: Literal["log1p", "normalize_log1p"] = "log1p"
    model: Literal["ridge", "mlp"] = "ridge"
    alphas: tuple[float, ...] = regression.ALPHAS
    pca: int | None = 256  # PCA-k of the tile features, fitted on the training spots (HEST-Benchmark)
    standardize: bool = False
    hidden: int = 256
    permutations: int = 1
    fdr: float = 0.05
    max_spots: int = 2000  # spots drawn per slide (seeded), bounding the cost of a large Visium HD slide
    cohort: str | None = None  # cohort with the spot tables (default: the embeddings' cohort)

    def __post_init__(self):
        bad = [e for e in self.embeddings if e not in KINDS]
        if bad:
            raise ValueError(f"'embeddings' of a spots task are {KINDS}, got {bad}")

    def obsm_keys(self) -> tuple[str, ...]:
        return ()  # spot embeddings come from the cohort's tiles, not from the AnnData

    def root(self, adata) -> Path:
        root = self.cohort or adata.uns.get("cohort")
        if not root:
            raise TaskError(f"task {self.name!r}: the embeddings record no cohort; give key 'cohort'")
        return Path(str(root))

    def slides(self, adata) -> pd.DataFrame:
        """The cohort's slides with matched spots, of cases in the embeddings."""
        root = self.root(adata)
        s = _cohort_slides(str(root.resolve()), (root / "slides.csv").stat().st_mtime_ns)
        s = s[(s["n_spots"] > 0) & s["case_id"].astype(str).isin(set(row_groups(adata, self)))]
        if s["case_id"].nunique() < 4:
            raise TaskError(f"task {self.name!r}: {s['case_id'].nunique()} case(s) of the embeddings have slides "
                            f"with spot tables in {self.root(adata)}; a spots probe needs at least 4")
        return s

    def targets(self, adata, notes):
        s = self.slides(adata)
        notes.append(f"{self.name}: {len(s)} slide(s) with spot tables; top-{self.hvg} HVGs of each fold's "
                     f"training spots, transform {self.transform}, PCA-{self.pca} + {self.model}; chance = "
                     f"permutation null, baseline:mean = training mean per gene")
        return {"": (pd.Index(sorted(s["case_id"].astype(str).unique())), None)}


@functools.lru_cache(maxsize=4)
def _cohort_slides(root: str, _mtime: int) -> pd.DataFrame:
    """Cohort.slides of a validated cohort (its spot tables matched to the tiles), once per probe run (planning and
    running both need it; a rewritten slides.csv is read again)."""
    from mmfm.data.cohort import Cohort

    return Cohort.open(root, scan_features=False, scan_cache=False).slides


def spot_data(spec: SpotsSpec, adata) -> tuple[pd.DataFrame, dict[str, np.ndarray], np.ndarray]:
    """(targets: spots × genes, transformed; embedding name → [spots, D]; case per spot)."""
    root = spec.root(adata)
    truth = (root / "truth" / "cases.csv").is_file()
    if "oracle" in spec.embeddings and not truth:
        raise TaskError(f"task {spec.name!r}: embedding 'oracle' needs a simulated cohort (truth/ in {root})")
    ys, feats, cases = [], {k: [] for k in spec.embeddings}, []
    oracle = _oracle_parts(root) if "oracle" in spec.embeddings else None
    for k, (sid, s) in enumerate(spec.slides(adata).iterrows()):
        spots = read_spots(s["spots"])
        bag = read_bag(s["path"])
        tile = match_spots(spots.obsm["spatial"], bag["coords"], int(s["patch_size_level0"]))
        keep = np.flatnonzero(tile >= 0)
        if len(keep) > spec.max_spots:
            keep = np.sort(np.random.default_rng([spec.seed, k]).choice(keep, spec.max_spots, replace=False))
        spots = spots[keep]
        y = (log_normalize(spots) if spec.transform == "normalize_log1p" else counts_of(spots)).to_df()
        ys.append(np.log1p(y) if spec.transform == "log1p" else y)
        if "tiles" in feats:
            feats["tiles"].append(np.asarray(bag["features"][tile[keep]], np.float64))
        if oracle is not None:
            types = np.load(root / "truth" / "tiles" / f"{sid}.npy")[tile[keep]]
            onehot = np.eye(oracle[1])[types]
            prog = np.broadcast_to(oracle[0].loc[str(s["case_id"])].to_numpy(), (len(keep), oracle[0].shape[1]))
            feats["oracle"].append(np.hstack([onehot, prog]))
        cases += [str(s["case_id"])] * len(keep)
    genes = [set(y.columns) for y in ys]
    if any(g != genes[0] for g in genes):
        raise TaskError(f"task {spec.name!r}: the spot tables measure different genes; align their var_names")
    return (pd.concat(ys, ignore_index=True), {k: np.vstack(v) for k, v in feats.items()}, np.asarray(cases))


def _oracle_parts(root: Path) -> tuple[pd.DataFrame, int]:
    from mmfm.simulate.truth import read_truth

    truth = read_truth(root)
    n_types = len(json.loads((root / "truth" / "model.json").read_text())["tile_types"])
    return truth[[c for c in truth.columns if c.startswith("prog_")]].astype(np.float64), n_types


def run(adata, spec: SpotsSpec, targets: list[Target], col: Collector) -> None:
    (target,) = targets
    y_all, feats, cases = spot_data(spec, adata)
    missing = [g for g in spec.names if g not in y_all.columns]
    if missing:
        raise TaskError(f"task {spec.name!r}: key 'names' genes {missing} are not in the spot tables")
    folds = target.folds
    single = folds.shape[1] == 1
    for i, fc in enumerate(folds.columns):
        tr_cases, te_cases = fold_sides(folds, fc, pd.Index(np.unique(cases)))
        tr, te = np.isin(cases, tr_cases), np.isin(cases, te_cases)
        if tr.sum() < 10 or te.sum() < 3:
            col.notes.append(f"{spec.name} {fc}: skipped ({int(tr.sum())} training / {int(te.sum())} test spots)")
            continue
        genes = list(spec.names) or regression.top_genes(y_all[tr], spec.hvg)
        y = y_all[genes].to_numpy()
        for emb, x in feats.items():
            score_fold(spec, col, emb, i, x[tr], y[tr], x[te], y[te], genes, single)
        mean = np.broadcast_to(y[tr].mean(0), y[te].shape)  # the mean predictor: R² only (no correlation)
        key = result_key(spec, "baseline:mean", model="" if spec.model == "ridge" else spec.model)
        col.evaluate(key, i, int(te.sum()), lambda idx: {"r2_mean": float(np.nanmean(
            regression.per_target(y[te][idx], mean[idx])["r2"]))}, single, spec.seed)
        col.add(key, i, {"n_test": int(te.sum()), "n_train": int(tr.sum())})
