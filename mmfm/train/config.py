"""The run configuration: the owners' typed configs (data, model, objective, loader) plus the trainer's own.

Decoded by `mmfm.config` (draccus) from a YAML recipe, `--a.b=c` flags or `--set a.b=c` overrides; an unknown
or mistyped key is a `ConfigError` naming the dotted key. `check` adds the cross-field rules types cannot say.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from mmfm import MODALITIES
from mmfm.config import ConfigError, decode, dump, load, to_dict  # noqa: F401  (re-exported for the trainer)
from mmfm.data.loader import LoaderConfig
from mmfm.models import DEFAULT_AXIS_RULES, ModelConfig
from mmfm.models.axes import complete_rules
from mmfm.objectives import ObjectiveConfig
from mmfm.train.sharding import MeshConfig

Modality = Literal["slide", "rna", "protein", "report", "mutation"]


@dataclass
class TrainConfig:
    steps: int = 200
    seed: int = 0
    lr: float = 1e-4
    warmup: int = 10                   # linear warm-up steps, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.01         # AdamW, masked: no decay on biases, norms, embeddings tables, t', b
    b1: float = 0.9
    b2: float = 0.999
    clip: float = 1.0                  # global-norm clipping; 0 disables
    grad_accum: int = 1                # micro-batches per optimizer step (scan inside the jitted step)
    log_every: int = 10
    eval_every: int = 100              # 0 disables held-out evaluation during training
    ckpt_every: int = 100
    keep_last: int = 3
    best_metric: str = ""              # eval.jsonl key (e.g. "recall@5/slide->rna") whose best ckpt is kept
    best_mode: Literal["max", "min"] = "max"
    async_checkpoint: bool = True
    axis_rules: list[tuple[str, str | None]] = field(default_factory=lambda: [tuple(r) for r in DEFAULT_AXIS_RULES])
    shard_min_size: int = 2 ** 16      # arrays with fewer elements stay replicated (cheaper than gathering)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    prng_impl: Literal["threefry2x32", "rbg"] = "threefry2x32"  # dropout RNG: threefry gives the same curve on
    #                                    any mesh; rbg can be cheaper (backend-dependent) but its bits depend on it
    progress: bool = True              # tqdm bar with ETA on process 0
    inject_nan_step: int = -1          # fault injection for tests: feed NaN tile features at this step
    init_slide_encoder: str = ""       # export dir (mmfm export / import-encoder) whose slide encoder starts the run


@dataclass
class DataConfig:
    cohort: str = ""                   # cohort directory (see mmfm.data.cohort)
    modalities: tuple[Modality, ...] = ("slide", "rna")  # what the run trains on: the loader emits them, the model encodes them
    heldout_fraction: float = 0.2      # probe-test cases (patient-level): never trained on nor used to pick a checkpoint
    val_fraction: float = 0.1          # validation cases: evaluation during training and --step best (never probed)
    split_by_site: bool = False        # whole sites (cases.csv `site`) per partition: held-out centres unseen
    split_seed: int = 0
    eval_max_cases: int = 256          # cap on validation cases evaluated (fixed subset, same every eval)
    eval_robustness_label: str = ""    # cases.csv column of the biology: validation RI@k against cases.csv `site`
    #                                    logged beside retrieval (a train.best_metric choice); "" = not computed


@dataclass
class RunConfig:
    """Everything that determines a pretraining run; written resolved to RUN/config.yaml."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)


def check(cfg: RunConfig) -> RunConfig:
    """Cross-field checks the types cannot express; each error names the dotted key."""
    t = cfg.train
    if t.steps < 1:
        raise ConfigError("train.steps: must be >= 1")
    if t.grad_accum < 1 or cfg.loader.batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum: {t.grad_accum} must divide loader.batch_size={cfg.loader.batch_size}")
    try:
        complete_rules(t.axis_rules)
    except ValueError as e:
        raise ConfigError(f"train.{e}") from e
    if not 0.0 <= cfg.data.heldout_fraction < 1.0:
        raise ConfigError("data.heldout_fraction: must be in [0, 1)")
    if not 0.0 <= cfg.data.val_fraction < 1.0 - cfg.data.heldout_fraction:
        raise ConfigError(f"data.val_fraction: must be in [0, 1 - data.heldout_fraction = "
                          f"{1.0 - cfg.data.heldout_fraction:g}) so that cases remain for training")
    if not cfg.data.modalities or len(set(cfg.data.modalities)) != len(cfg.data.modalities):
        raise ConfigError(f"data.modalities: needs distinct entries from {MODALITIES}, got {cfg.data.modalities}")
    if (t.mesh.data == -1) and (t.mesh.fsdp == -1):
        raise ConfigError("train.mesh: at most one axis may be -1")
    for key, on in (("loader.site_augment", cfg.loader.site_augment > 0),
                    ("objective.site_adversary", cfg.objective.site_adversary > 0)):
        if on and "slide" not in cfg.data.modalities:
            raise ConfigError(f"{key} acts on tile features / the slide embedding: data.modalities needs 'slide', "
                              f"got {list(cfg.data.modalities)}")
    if t.init_slide_encoder and "slide" not in cfg.data.modalities:
        raise ConfigError(f"train.init_slide_encoder initialises the slide encoder: data.modalities needs 'slide', "
                          f"got {list(cfg.data.modalities)}")
    if cfg.model.case.kind == "transformer":  # a case encoder learns from rows that hold several slides
        if "slide" not in cfg.data.modalities:
            raise ConfigError(f"model.case.kind=transformer aggregates slides: data.modalities needs 'slide', "
                              f"got {list(cfg.data.modalities)}")
        if cfg.loader.multi_slide != "pool":
            raise ConfigError(f"model.case.kind=transformer needs loader.multi_slide=pool (got "
                              f"{cfg.loader.multi_slide!r}: each row would hold one slide and the case encoder "
                              f"would never see a multi-slide case)")
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """YAML recipe (optional) + `a.b=value` overrides → checked RunConfig."""
    cfg = load(RunConfig, path, overrides)
    try:
        return check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from e


def dump_config(cfg: RunConfig) -> str:
    return dump(cfg)
