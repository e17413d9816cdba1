"""The report-text encoder reproduces the real pretrained MiniLM-L6 (PyTorch/transformers) in Flax NNX."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfm.models import text as T
from mmfm.models.weight_porting import NameMap, PortingError, Rule, port_state_dict, transpose

SENTENCES = [
    "Invasive ductal carcinoma, grade 3, with lymphovascular invasion.",
    "No evidence of malignancy in the sampled lymph nodes.",
    "Moderately differentiated adenocarcinoma with focal necrosis; margins are clear.",
    "Dense lymphocytic infiltrate surrounds the tumour nests.",
    "Benign.",
    "Poorly differentiated squamous cell carcinoma showing extensive tumour necrosis, perineural invasion and a "
    "brisk mitotic rate of 25 per 10 high-power fields; the surgical resection margin is involved at the deep aspect.",
    "Ki-67 index approximately 40%.",
    "Stroma is desmoplastic, with scattered CD8-positive T cells.",
]


@pytest.fixture(scope="module")
def flax_model():
    return T.load_pretrained(T.TextConfig(trainable="last_k", last_k=2))


@pytest.fixture(scope="module")
def torch_reference():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = T.minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    enc = tok(SENTENCES, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return enc["input_ids"].numpy(), enc["attention_mask"].numpy(), emb.numpy()


def test_tokenizer_matches_hf(torch_reference):
    ids, mask = T.tokenize(SENTENCES, max_len=64)
    np.testing.assert_array_equal(ids, torch_reference[0])
    np.testing.assert_array_equal(mask, torch_reference[1])


def test_sentence_embeddings_match_pytorch(flax_model, torch_reference):
    ids, mask = T.tokenize(SENTENCES, max_len=64)
    ours = np.asarray(flax_model(ids, mask))
    assert ours.shape == (len(SENTENCES), 384)
    assert np.abs(ours - torch_reference[2]).max() <= 1e-4


def test_more_padding_does_not_change_embedding(flax_model):
    a = np.asarray(flax_model(*T.tokenize(SENTENCES[:3], max_len=32)))
    b = np.asarray(flax_model(*T.tokenize(SENTENCES[:3], max_len=128)))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_frozen_layers_get_no_gradient_and_no_optimizer_state(flax_model):
    ids, mask = T.tokenize(SENTENCES[:2], max_len=16)
    grads = nnx.jit(nnx.grad(lambda m: m(ids, mask).sum()))(flax_model)  # one compile, not one per eager op
    paths = {p[0] if p[0] != "layers" else f"layers.{p[1]}" for p, _ in nnx.to_flat_state(grads)}
    assert paths == {"layers.4", "layers.5"}  # only the last k=2 layers are trainable
    n_param = sum(v.size for _, v in nnx.to_flat_state(nnx.state(flax_model, nnx.Param)))
    n_frozen = sum(v.size for _, v in nnx.to_flat_state(nnx.state(flax_model, T.Frozen)))
    assert 0 < n_param < n_frozen
    g5 = grads["layers"][5]["query"]["kernel"][...]
    assert float(jnp.abs(g5).sum()) > 0


def test_trainable_modes():
    bert = T.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16)
    count = lambda m, t: len(nnx.to_flat_state(nnx.state(m, t)))  # noqa: E731
    frozen = T.TextEncoder(T.TextConfig(trainable="frozen"), rngs=nnx.Rngs(0), bert=bert)
    full = T.TextEncoder(T.TextConfig(trainable="all"), rngs=nnx.Rngs(0), bert=bert)
    assert count(frozen, nnx.Param) == 0 and count(full, T.Frozen) == 0
    assert count(frozen, T.Frozen) == count(full, nnx.Param)
    with pytest.raises(ValueError, match="trainable"):
        T.TextEncoder(T.TextConfig(trainable="some"), rngs=nnx.Rngs(0), bert=bert)


def _tiny_bert_state_dict(bert: T.BertConfig, prefix: str = "") -> dict[str, np.ndarray]:
    """A BERT-family state dict with HF names (BioClinicalBERT-style 'bert.' prefix, gamma/beta norms)."""
    rng = np.random.default_rng(0)
    h, i = bert.hidden_size, bert.intermediate_size
    sd = {
        f"{prefix}embeddings.word_embeddings.weight": rng.normal(size=(bert.vocab_size, h)),
        f"{prefix}embeddings.position_embeddings.weight": rng.normal(size=(bert.max_position_embeddings, h)),
        f"{prefix}embeddings.token_type_embeddings.weight": rng.normal(size=(2, h)),
        f"{prefix}embeddings.LayerNorm.gamma": rng.normal(size=h),
        f"{prefix}embeddings.LayerNorm.beta": rng.normal(size=h),
        f"{prefix}pooler.dense.weight": rng.normal(size=(h, h)),
        "cls.predictions.bias": rng.normal(size=bert.vocab_size),
    }
    for layer in range(bert.num_hidden_layers):
        L = f"{prefix}encoder.layer.{layer}."
        for name, shape in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                            ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                            ("intermediate.dense", (i, h)), ("output.dense", (h, i))):
            sd[L + name + ".weight"] = rng.normal(size=shape)
            sd[L + name + ".bias"] = rng.normal(size=shape[0])
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[L + norm + ".weight"] = rng.normal(size=h)
            sd[L + norm + ".bias"] = rng.normal(size=h)
    return {k: v.astype(np.float32) for k, v in sd.items()}


def test_porting_other_bert_family_names():
    bert = T.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=12, max_position_embeddings=10)
    sd = _tiny_bert_state_dict(bert, prefix="bert.")
    model = T.TextEncoder(T.TextConfig(trainable="all"), rngs=nnx.Rngs(1), bert=bert)
    port_state_dict(model, sd, T.BERT_NAME_MAP)
    np.testing.assert_array_equal(model.layers[1].intermediate.kernel[...], sd["bert.encoder.layer.1.intermediate.dense.weight"].T)
    np.testing.assert_array_equal(model.embeddings_norm.scale[...], sd["bert.embeddings.LayerNorm.gamma"])


def test_porting_errors_name_the_offending_keys():
    bert = T.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=12, max_position_embeddings=10)
    model = T.TextEncoder(T.TextConfig(trainable="all"), rngs=nnx.Rngs(1), bert=bert)
    sd = _tiny_bert_state_dict(bert)
    missing = dict(sd)
    del missing["encoder.layer.0.attention.self.key.bias"]
    with pytest.raises(PortingError, match=r"missing.*layers\.0\.key\.bias"):
        port_state_dict(model, missing, T.BERT_NAME_MAP)
    wrong = dict(sd)
    wrong["encoder.layer.0.output.dense.weight"] = np.zeros((8, 13), np.float32)
    with pytest.raises(PortingError, match=r"shape mismatch: encoder\.layer\.0\.output\.dense\.weight"):
        port_state_dict(model, wrong, T.BERT_NAME_MAP)
    extra = dict(sd, **{"encoder.layer.0.attention.self.rotary.weight": np.zeros(3, np.float32)})
    with pytest.raises(PortingError, match=r"unexpected.*rotary"):
        port_state_dict(model, extra, T.BERT_NAME_MAP)


def test_general_name_map_on_a_custom_module():
    class Tiny(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

    m = Tiny()
    w, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.0, 2.0], np.float32)
    port_state_dict(m, {"fc.weight": w, "fc.bias": b},
                    NameMap((Rule(r"fc\.weight", "proj.kernel", transpose), Rule(r"fc\.bias", "proj.bias"))))
    x = np.ones((1, 3), np.float32)
    np.testing.assert_allclose(np.asarray(m.proj(x)), x @ w.T + b)
