"""AdamW with warm-up + cosine decay, global-norm clipping and a weight-decay mask.

No decay on parameters with fewer than 2 dimensions (biases, norm scales, the SigLIP t′ and b)
nor on embedding tables (`embedding` in the path): decaying them shrinks offsets and
temperatures toward zero rather than regularising capacity (the usual CLIP/ViT practice).
"""

from __future__ import annotations

import re

import jax
import optax

from mmfm.train.config import TrainConfig
from mmfm.train.sharding import leaf_path

NO_DECAY = re.compile(r"(^|/)embedding$")


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to lr over `warmup` steps, then cosine to lr * min_lr_ratio at `steps`."""
    warmup = max(0, min(cfg.warmup, cfg.steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
    """True where weight decay applies (matrices and higher, except embedding tables)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and not NO_DECAY.search(leaf_path(path)), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.clip)] if cfg.clip > 0 else []
    parts.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)
