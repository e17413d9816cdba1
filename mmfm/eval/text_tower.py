"""The trained text tower of a run: report-text encoder + projection head, applied to any free text.

`encode_text(run, texts)` gives unit vectors in the run's shared embedding space, directly comparable (cosine)
with the slide, RNA or report embeddings of `mmfm embed`: the same tokenizer, length and weights as training
(a frozen trunk trained on cached features is evaluated here on token ids, which is exact). Used by zero-shot
classification (class prompts) and by heatmaps (a typed prompt as the query).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx


class TextTower:
    """Callable `texts -> [n, E]` float32 unit vectors through a trained `MultimodalModel`'s report branch."""

    def __init__(self, model, max_len: int, batch_size: int = 32):
        if "report" not in model.modalities:
            raise ValueError(f"the run has no report modality (modalities: {', '.join(model.modalities)}); "
                             "zero-shot text needs a run trained with reports")
        self.max_len, self.batch_size = int(max_len), int(batch_size)
        graphdef, self._state = nnx.split(model)
        self._run = _forward(graphdef)

    @classmethod
    def load(cls, run_dir: str | Path, step: int | str | None = None) -> TextTower:
        from mmfm.train.rundir import load_for_inference

        model, cfg, _ = load_for_inference(run_dir, step=step)
        try:
            return cls(model, cfg.loader.report_max_len)
        except ValueError as e:
            raise ValueError(f"{run_dir}: {e}") from None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        from mmfm.data.text import tokenize
        from mmfm.models.text_cache import by_length

        texts = [str(t) for t in texts]
        if not texts:
            raise ValueError("encode_text: no texts given")
        ids, mask = tokenize(texts, self.max_len)
        return by_length(lambda i, m: self._run(self._state, i, m), ids, mask, self.batch_size)


@functools.lru_cache(maxsize=4)
def _forward(graphdef):
    """The jitted report branch of one architecture: towers of the same graph (each seed of a pipeline, heatmaps
    beside zero-shot) share it and compile it once per token-length bucket, not once per tower."""

    @jax.jit
    def run(state, ids, mask):
        return nnx.merge(graphdef, state).encode("report", {"report/input_ids": ids, "report/attention_mask": mask})

    return run


@functools.lru_cache(maxsize=2)
def _load(run_dir: str, step, checkpoints: tuple[str, ...]) -> TextTower:
    return TextTower.load(run_dir, step)


def load_tower(run: str | Path | TextTower, step: int | str | None = None) -> TextTower:
    """A run's text tower; the last two loaded are kept (keyed by run, step and its checkpoint list)."""
    if isinstance(run, TextTower):
        return run
    run = Path(run).absolute()
    ckpts = run / "checkpoints"
    stamp = tuple(sorted(p.name for p in ckpts.iterdir())) if ckpts.is_dir() else ()
    return _load(str(run), step, stamp)


def encode_text(run: str | Path | TextTower, texts: Sequence[str], step: int | str | None = None) -> np.ndarray:
    """[n, E] unit vectors of `texts` in the run's shared space (comparable with `mmfm embed`'s obsm)."""
    return load_tower(run, step)(texts)
