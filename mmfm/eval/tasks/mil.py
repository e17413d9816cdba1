"""`mil`: supervised attention-MIL and fine-tuning on the tile bags, beside the linear probes of the same target.

A `mil` task names its target as the linear tasks do — `label` (as `classification`), `labels` (as `mutation`,
one target per gene), `time` + `event` (as `survival`) or `source` (+ `names` / `hvg`, as `regression`: an MSE head
on the fold's targets z-scored with its training cases, the same genes per fold as the linear twin) — and gets its
folds from that linear twin (`linear()`): the same patient-level folds for the same seed, from the one fold
implementation (`mmfm.eval.folds`). `beside: <task>` files its rows under that linear task (same table, paired per-fold
differences against its pretrained embedding); the probe checks both tasks have identical folds. Each `inits`
entry is a row, its embedding named `mil:<init>`:

    abmil     gated ABMIL from scratch at CLAM's sizes (mmfm.models.mil.clam_abmil)
    scratch   the slide-encoder architecture of `run`, randomly initialised
    finetune  `run`'s slide encoder (a run directory or an `mmfm export` / `mmfm import-encoder` directory),
              trained end to end with a fresh head (encoder lr × encoder_lr_scale, warm-up)
    frozen    that encoder frozen, only the head trained (the bridge to the linear probe)
  (finetune and frozen start their head at the linear probe of the encoder's case embeddings: LP-FT, `train.probe_head`)

Per outer fold: an inner validation split of the training fold (fold 0 of `train.val_folds` patient-level folds
of the training cases, stratified like the outer ones) chooses the epoch; the test fold is predicted once, with
every tile, and scored by the linear probes' metric code. Tile bags come from the cohort the embeddings were made
from (`uns['cohort']`), `mmfm probe --cohort`, or the task's `cohort` key. Training settings: `train:`
(mmfm.eval.probes.mil.MilConfig, sources in mmfm/eval/probes/mil.py). Bookkeeping per fold: `wall_s` (train + predict),
`epoch` (the kept one), `n_train`, `n_test`.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from mmfm.eval import folds as folds_mod
from mmfm.eval.probes import classification, mil, regression, survival
from mmfm.eval.references import SUPERVISED_PREFIX
from mmfm.eval.tasks.base import Collector, FoldSpec, Target, TaskError, fold_sides, result_key
from mmfm.eval.tasks.classification import ClassificationSpec, MutationSpec, encode_labels
from mmfm.eval.tasks.regression import RegressionSpec, chosen
from mmfm.eval.tasks.survival import SurvivalSpec

INITS = ("abmil", "scratch", "finetune", "frozen")
SELECTED = {"inner": "kept (lowest inner validation loss)", "refit": "chosen on the inner validation split, "
            "retrained on the whole training fold", "last": "kept (whole training fold, last epoch)"}


@dataclass(frozen=True, kw_only=True)
class MilSpec(FoldSpec):
    embeddings: tuple[str, ...] = ()  # unused: MIL reads tile bags
    label: str | None = None  # obs column of a class label (as `classification`)
    labels: tuple[str, ...] = ()  # 0/1 obs columns, globs allowed (as `mutation`)
    min_positives: int = 2  # as `mutation`
    time: str | None = None  # survival time column (as `survival`, with `event`)
    event: str | None = None
    source: Literal["rna", "protein", "obs"] | None = None  # continuous targets (as `regression`): MSE head
    names: tuple[str, ...] = ()  # as `regression`
    hvg: int = 50  # as `regression`: top-k highly variable genes of each training fold
    inits: tuple[Literal["abmil", "scratch", "finetune", "frozen"], ...] = ("abmil",)
    beside: str | None = None  # linear task whose table and paired tests these rows join (same folds: checked)
    run: str | None = None  # run or export directory for scratch / finetune / frozen (default: the embeddings' run)
    cohort: str | None = None  # cohort with the tile bags (default: --cohort, then the embeddings' cohort)
    train: mil.MilConfig = field(default_factory=mil.MilConfig)

    def __post_init__(self):
        given = [k for k, v in (("label", self.label), ("labels", self.labels), ("time", self.time),
                                ("source", self.source)) if v]
        if len(given) != 1:
            raise ValueError(f"a mil task needs exactly one target: 'label', 'labels', 'time' + 'event' or 'source' "
                             f"(got {given or 'none'})")
        if bool(self.time) != bool(self.event):
            raise ValueError("'time' and 'event' go together")

    @property
    def kind(self) -> str:
        """The linear task type whose target, folds and metrics these rows share."""
        return ("classification" if self.label else "mutation" if self.labels else "regression" if self.source
                else "survival")

    def linear(self) -> FoldSpec:
        """The linear probe of the same target with the same fold keys (its targets and folds are ours)."""
        keys = {k: getattr(self, k) for k in ("name", "group", "seed", "site", "folds", "test_size",
                                              "site_preserved", "splits")}
        if self.label:
            return ClassificationSpec(**keys, type="classification", label=self.label)
        if self.labels:
            return MutationSpec(**keys, type="mutation", labels=self.labels, min_positives=self.min_positives)
        if self.source:
            return RegressionSpec(**keys, type="regression", source=self.source, names=self.names, hvg=self.hvg,
                                  cohort=self.cohort)
        return SurvivalSpec(**keys, type="survival", time=self.time, event=self.event)

    def targets(self, adata, notes):
        return self.linear().targets(adata, notes)


def check_beside(plans: list[tuple]) -> None:
    """Every `beside` names a task of the same target with identical folds (so rows pair case for case)."""
    by_name = {spec.name: (spec, targets) for spec, targets, _ in plans}
    for spec, targets, _ in plans:
        if not isinstance(spec, MilSpec) or spec.beside is None:
            continue
        if spec.beside not in by_name:
            raise TaskError(f"task {spec.name!r}: key 'beside' names {spec.beside!r}, which is not a task here")
        other, theirs = by_name[spec.beside]
        if other.type != spec.kind:
            raise TaskError(f"task {spec.name!r}: key 'beside' names a {other.type!r} task; its target is "
                            f"{spec.kind!r}")
        mine = {t.name: t.folds for t in targets}
        for t in theirs:
            f = mine.get(t.name)
            if f is None or not f.sort_index().equals(t.folds.sort_index()):
                raise TaskError(f"task {spec.name!r}: folds of target {t.name or spec.beside!r} differ from task "
                                f"{spec.beside!r} (give both the same seed, folds, splits and target)")


def file_beside(rows: list[dict]) -> list[dict]:
    """A supervised survival row has no Cox model (model ''): file it under each model of the linear rows of its
    task and target (coxnet, coxph), so the tables put it beside each and pair it with each on the same folds."""
    models: dict[tuple, list[str]] = {}
    for r in rows:
        if r["type"] == "survival" and r["model"] and not r["embedding"].startswith(SUPERVISED_PREFIX):
            models.setdefault((r["task"], r["target"]), []).append(r["model"])
    out = []
    for r in rows:
        supervised = r["type"] == "survival" and not r["model"] and r["embedding"].startswith(SUPERVISED_PREFIX)
        spread = models.get((r["task"], r["target"])) if supervised else None
        out += [{**r, "model": m} for m in dict.fromkeys(spread)] if spread else [r]
    return out


# ---------------------------------------------------------------- encoders


def _run_source(spec: MilSpec, adata) -> str:
    src = spec.run or adata.uns.get("run_dir")
    if not src:
        raise TaskError(f"task {spec.name!r}: inits {list(spec.inits)} need key 'run' (a run or export directory); "
                        "the embeddings record none")
    return str(src)


@dataclass
class _Encoders:
    """Builds a fresh encoder per fold for each init (pretrained weights are read once, kept on the host)."""

    spec: MilSpec
    feature_dim: int
    source: str | None = None
    _pretrained: tuple | None = None
    _slide_cfg: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)  # a task's pieces may build in threads

    def _load(self):
        with self._lock:
            if self._pretrained is None:
                self._read_pretrained()

    def _read_pretrained(self):
        import jax
        from flax import nnx

        from mmfm.models.export_format import load_slide_encoder
        from mmfm.train import rundir

        path = Path(self.source)
        if (path / "config.json").is_file() and not (path / "config.yaml").is_file():  # an export directory
            enc, self._slide_cfg, dim = load_slide_encoder(path)
        else:
            model, cfg, _ = rundir.load_for_inference(path)
            enc, self._slide_cfg, dim = model.encoders["slide"], cfg.model.slide, rundir.read_shapes(path).feature_dim
        if dim != self.feature_dim:
            raise TaskError(f"task {self.spec.name!r}: {self.source} encodes {dim}-d tile features, the cohort's bags "
                            f"are {self.feature_dim}-d")
        graphdef, state = nnx.split(enc)
        self._pretrained = (graphdef, jax.device_get(state))

    def build(self, init: str, seed: int):
        """A fresh encoder for `init` (pretrained weights copied: training donates its buffers)."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from mmfm.models import build_slide_encoder
        from mmfm.models.mil import clam_abmil

        cfg = self.spec.train
        if init == "abmil":
            return clam_abmil(self.feature_dim, hidden=cfg.hidden, attn_dim=cfg.attn_dim, dropout=cfg.dropout,
                              rngs=nnx.Rngs(seed))
        self._load()
        if init == "scratch":
            return build_slide_encoder(self._slide_cfg, self.feature_dim, dtype=jnp.float32, rngs=nnx.Rngs(seed))
        graphdef, state = self._pretrained
        return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))


def init_settings(init: str, cfg: mil.MilConfig) -> dict:
    """How `init` trains its encoder: lr scale, warm-up epochs, frozen, and whether its fresh head starts at the
    linear probe of the pretrained embedding (LP-FT, `mil.fit_head`)."""
    probe_head = cfg.probe_head and init in ("finetune", "frozen")
    if init == "finetune":
        return {"encoder_lr_scale": cfg.encoder_lr_scale, "warmup_epochs": cfg.warmup_epochs, "frozen": False,
                "probe_head": probe_head}
    return {"encoder_lr_scale": 0.0 if init == "frozen" else 1.0, "warmup_epochs": 0.0, "frozen": init == "frozen",
            "probe_head": probe_head}


# ---------------------------------------------------------------- data


def _cohort_root(spec: MilSpec, adata, col: Collector) -> Path:
    root = spec.cohort or col.cohort or adata.uns.get("cohort")
    if not root:
        raise TaskError(f"task {spec.name!r}: no tile bags: the embeddings record no cohort; pass --cohort or "
                        "key 'cohort'")
    return Path(str(root))


def read_bags(root: Path, cases) -> dict[str, list]:
    """case → its slides' bags (every tile), for the given cases that have a slide with tiles."""
    from mmfm.data.cohort import Cohort
    from mmfm.data.sampling import BagReader
    from mmfm.eval.embed import load_bag

    cohort = Cohort.open(root, scan_features=False, scan_cache=False)
    slides = cohort.slides[cohort.slides["case_id"].astype(str).isin(set(map(str, cases)))
                           & (cohort.slides["n_tiles"] > 0)]
    reader = BagReader(max_open=8)
    out: dict[str, list] = {}
    for _, r in slides.iterrows():
        out.setdefault(str(r.case_id), []).append(load_bag(r.path, int(r.patch_size_level0), int(r.n_tiles), reader))
    reader.close()
    return out


# ---------------------------------------------------------------- the runner


def run(adata, spec: MilSpec, targets: list[Target], col: Collector) -> None:
    for unit in units(adata, spec, targets, col):
        unit(col)


def units(adata, spec: MilSpec, targets: list[Target], col: Collector) -> list:
    """The task as one piece per target × init, in `run`'s order: each trains and seeds its own folds, so the
    probe may run them side by side (`mmfm.eval.probe`); the tile bags are read once, by the first piece."""
    data = _TaskData(adata, spec, targets, col)
    return [functools.partial(data.run_init, t, init) for t in targets for init in spec.inits]


def early(spec: MilSpec, targets: list[Target], run: bool) -> list[int]:
    """The pieces (of `units`) of a class-label target that read only labels and tile bags — abmil — and, once
    the run exists (`run`), every other init's."""
    pieces = [init for _ in targets for init in spec.inits]
    return [j for j, init in enumerate(pieces)
            if (init == "abmil" or run) and spec.kind in ("classification", "mutation")]


class _TaskData:
    """What every piece of a task shares, read on first use (pieces may run in threads): the tile bags, the
    encoders (pretrained weights read once) and the targets' outcomes."""

    def __init__(self, adata, spec: MilSpec, targets: list[Target], col: Collector):
        self.adata, self.spec, self.targets, self.root = adata, spec, targets, _cohort_root(spec, adata, col)
        self._lock, self._read = threading.Lock(), None

    def read(self) -> tuple:
        with self._lock:
            if self._read is None:
                spec, adata = self.spec, self.adata
                cases = sorted(set().union(*(t.folds.index for t in self.targets)))
                bags = read_bags(self.root, cases)
                if not bags:
                    raise TaskError(f"task {spec.name!r}: none of the {len(cases)} cases has a slide with tiles in "
                                    "the cohort")
                feature_dim = next(iter(bags.values()))[0].features.shape[1]
                encoders = _Encoders(spec, feature_dim)
                outcomes = spec.linear().outcomes(adata) if spec.kind == "survival" else None
                values = spec.linear().values(adata) if spec.kind == "regression" else None
                self._read = bags, encoders, outcomes, values
            return self._read

    def run_init(self, t: Target, init: str, col: Collector) -> None:
        spec = self.spec
        bags, encoders, outcomes, values = self.read()
        if init != "abmil":  # an abmil piece may run on labels alone, before the run exists (`early`)
            encoders.source = _run_source(spec, self.adata)
        if spec.kind == "survival":
            y, n_classes, kind = None, 0, spec.train.survival_loss
            case_ids = t.folds.index.intersection(outcomes.index)
        elif spec.kind == "regression":  # targets and their scaling are chosen per fold (_fold_targets)
            y, n_classes, kind = None, 0, "mse"
            case_ids = t.folds.index.intersection(values.index.astype(str))
        else:
            y, classes = encode_labels(t.labels)
            n_classes, kind = len(classes), "class"
            case_ids = t.folds.index.intersection(y.index)
        case_ids = pd.Index([c for c in case_ids if c in bags])
        full = mil.CaseSet(list(case_ids), [bags[c] for c in case_ids],
                           y=None if y is None else y[case_ids].to_numpy(),
                           time=None if outcomes is None else outcomes.time[case_ids].to_numpy(float),
                           event=None if outcomes is None else outcomes.event[case_ids].to_numpy(float))
        _run_init(spec, t, init, kind, n_classes, full, encoders, col, values)


def _fold_targets(spec: MilSpec, values: pd.DataFrame, full: mil.CaseSet, train: pd.Index):
    """(the case set with z-scored targets, target names, mean, SD): the fold's targets (as `regression`: the
    training cases' top genes) scaled with the training cases' mean and SD — nothing from the test cases."""
    v = values.set_axis(values.index.astype(str))
    names = chosen(spec.linear(), v.loc[train])
    y = v.loc[full.ids, names].to_numpy(np.float64)
    mean, sd = v.loc[train, names].mean().to_numpy(), v.loc[train, names].std().to_numpy()
    sd = np.where(sd > 0, sd, 1.0)
    return mil.CaseSet(full.ids, full.bags, y=(y - mean) / sd), names, mean, sd


def _run_init(spec: MilSpec, t: Target, init: str, kind: str, n_classes: int, full: mil.CaseSet,
              encoders: _Encoders, col: Collector, values: pd.DataFrame | None = None) -> None:
    from flax import nnx

    from mmfm.models.mil import MILModel, clam_mil

    pos = pd.Series(np.arange(len(full.ids)), index=full.ids)
    emb = SUPERVISED_PREFIX + init
    key = {**result_key(spec, emb, t.name or (spec.label or "")), "task": spec.beside or spec.name, "type": spec.kind}
    single = t.folds.shape[1] == 1
    for i, fc in enumerate(t.folds.columns):
        tr, te = fold_sides(t.folds, fc, pd.Index(full.ids))
        where = f"{spec.name}/{t.name or init} {emb} {fc}"
        if len(te) == 0 or (kind == "class" and len(np.unique(full.y[pos[tr]])) < 2):
            col.notes.append(f"{where}: skipped (one class in train or empty test)")
            continue
        t0 = time.perf_counter()
        cases = full
        if kind == "mse":  # this fold's targets, scaled on its training cases
            cases, names, mean, sd = _fold_targets(spec, values, full, tr)
            n_classes = len(names)
        itr, iva = inner_split(spec, t, tr, i)
        seed = spec.seed + i
        trn = cases.take(pos[tr].to_numpy())
        where_in = pd.Series(np.arange(len(tr)), index=tr)

        def make_model():
            n_out, cfg = mil.head_size(kind, n_classes, spec.train), spec.train
            if init == "abmil":  # the same model as the general path, initialised by one compiled call
                return clam_mil(encoders.feature_dim, n_out, hidden=cfg.hidden, attn_dim=cfg.attn_dim,
                                dropout=cfg.dropout, seed=seed)
            return MILModel(encoders.build(init, seed), n_out, dropout=cfg.dropout, rngs=nnx.Rngs(seed + 1))

        fitted = mil.fit(make_model, kind, trn, (where_in[itr].to_numpy(), where_in[iva].to_numpy()), spec.train,
                         seed=seed, n_classes=n_classes, **init_settings(init, spec.train))
        test = cases.take(pos[te].to_numpy())
        out = mil.predict(fitted.model, test, spec.train)
        wall = time.perf_counter() - t0
        if kind == "class":
            e = np.exp(out - out.max(1, keepdims=True))
            proba = e / e.sum(1, keepdims=True)
            col.evaluate(key, i, len(te), lambda idx: classification.metrics(test.y[idx], proba[idx]), single,
                         spec.seed)
            col.add(key, i, {"n_classes": n_classes})
        elif kind == "mse":
            pred, yte = out * sd + mean, test.y * sd + mean
            col.evaluate(key, i, len(te), lambda idx: regression.summary(
                regression.per_target(yte[idx], pred[idx]), spec.linear().fdr), single, spec.seed)
            s = regression.per_target(yte, pred)
            col.per_target.append(pd.DataFrame({"task": key["task"], "embedding": emb, "model": "mil", "fold": i,
                                                "target": names, **s, "q": regression.bh(s["p"])}))
        else:
            from mmfm.objectives.supervised import survival_risk

            risk = survival_risk(out) if kind == "nll" else out[:, 0]
            ytr, yte = survival.surv(trn.event, trn.time), survival.surv(test.event, test.time)
            col.evaluate(key, i, len(te), lambda idx: survival.metrics(ytr, yte[idx], risk[idx], tau=None),
                         single, spec.seed)
        col.add(key, i, {"wall_s": wall, "epoch": fitted.epoch, "n_test": len(te), "n_train": len(tr)})
        col.notes.append(f"{where}: select {spec.train.select}, epoch {fitted.epoch}/{spec.train.epochs} "
                         f"{SELECTED[spec.train.select]}, {fitted.steps} steps, {wall:.1f}s")


def inner_split(spec: MilSpec, t: Target, train_cases: pd.Index, fold: int) -> tuple[pd.Index, pd.Index]:
    """(inner training, validation) cases: fold 0 of `train.val_folds` patient-level folds of the TRAINING cases,
    stratified like the outer folds — the test fold never enters model selection."""
    strata = None if t.labels is None else t.labels.reindex(train_cases)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class smaller than val_folds
        inner = folds_mod.generate_folds(train_cases, strata, None, k=spec.train.val_folds, seed=spec.seed + fold,
                                         site_preserved=False, test_size=None)
    return fold_sides(inner, "fold_0", train_cases)
