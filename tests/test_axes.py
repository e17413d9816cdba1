"""Named axes end to end: every weight of the full MultimodalModel (all five modalities, the report-text
encoder included) carries logical names from `mmfm.models.axes`, the trainer's sharding puts the "embed"
side of large matrices on `fsdp`, batches on every device, and the objective takes its axes from the caller."""

import functools
import inspect
import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from mmfm.data.batch import BatchShapes
from mmfm.models import ModelConfig, MultimodalModel, SlideConfig, axes
from mmfm.models.abmil import ABMILConfig
from mmfm.models.omics import OmicsConfig
from mmfm.models.text import Frozen, TextConfig
from mmfm.models.transformer import TransformerConfig
from mmfm.objectives import LogitParams, ObjectiveConfig, multimodal_loss
from mmfm.train import sharding

H, INTER, VOCAB, POS, LAYERS = 8, 16, 30, 16, 2
SHAPES = BatchShapes(batch_size=8, tiles_per_slide=4, feature_dim=12, n_genes=20, n_proteins=6, n_mutations=5,
                     report_len=8)
MIN_SIZE = 64  # small enough that the tiny model's matrices are sharded


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT folder in the Hugging Face layout (config.json + model.safetensors, [out, in] weights)."""
    root = tmp_path_factory.mktemp("tiny_bert")
    (root / "config.json").write_text(json.dumps({
        "vocab_size": VOCAB, "hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
        "intermediate_size": INTER, "max_position_embeddings": POS, "type_vocab_size": 2}))
    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    sd = {"embeddings.word_embeddings.weight": w(VOCAB, H), "embeddings.position_embeddings.weight": w(POS, H),
          "embeddings.token_type_embeddings.weight": w(2, H),
          "embeddings.LayerNorm.weight": w(H), "embeddings.LayerNorm.bias": w(H)}
    for i in range(LAYERS):
        pre = f"encoder.layer.{i}."
        for name, (dout, din) in {"attention.self.query": (H, H), "attention.self.key": (H, H),
                                  "attention.self.value": (H, H), "attention.output.dense": (H, H),
                                  "intermediate.dense": (INTER, H), "output.dense": (H, INTER)}.items():
            sd[pre + name + ".weight"], sd[pre + name + ".bias"] = w(dout, din), w(dout)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[pre + norm + ".weight"], sd[pre + norm + ".bias"] = w(H), w(H)
    save_file(sd, str(root / "model.safetensors"))
    return root


def full_config(kind, tiny_bert, trainable="last_k", head_hidden=None):
    return ModelConfig(
        embed_dim=16, head_hidden=head_hidden,
        slide=SlideConfig(kind=kind, abmil=ABMILConfig(hidden=16, attn_dim=8),
                          transformer=TransformerConfig(width=16, depth=2, n_heads=2, n_registers=2, mlp_ratio=2.0,
                                                        readout="attention", block_q=4, block_k=4)),
        rna=OmicsConfig(kind="geneset", hidden=8, attn_dim=4, n_heads=2), protein=OmicsConfig(hidden=8),
        mutation=OmicsConfig(hidden=8, n_layers=1),
        report=TextConfig(path=str(tiny_bert), trainable=trainable, last_k=1))


@functools.cache
def abstract_state(kind, bert_dir, head_hidden):
    """The model's state as the trainer first sees it (`nnx.eval_shape`): shapes and names, no compute."""
    cfg = full_config(kind, bert_dir, head_hidden=head_hidden)
    return nnx.state(nnx.eval_shape(lambda: MultimodalModel(cfg, SHAPES, ("slide", "rna", "protein", "mutation", "report"), rngs=nnx.Rngs(0))))


def flat_shardings(tree):
    return {sharding.leaf_path(p): s.get_value() for p, s in nnx.to_flat_state(tree)}


def padded(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def weights(state):
    """{path: Variable} of every trainable or frozen weight (RNG streams and counters excluded)."""
    return {sharding.leaf_path(p): v for p, v in nnx.to_flat_state(state) if isinstance(v, (nnx.Param, Frozen))}


@pytest.mark.parametrize("kind,head_hidden", [("abmil", None), ("transformer", 8)])
def test_every_weight_carries_logical_names_of_its_rank(tiny_bert, kind, head_hidden):
    ws = weights(abstract_state(kind, tiny_bert, head_hidden))
    param_names = set(axes.LOGICAL_AXES) - {axes.BATCH}  # "batch" is an activation axis only
    bad = {}
    for path, v in ws.items():
        names = v.get_metadata().get("out_sharding")
        if v.ndim == 0:
            continue
        if (names is None or len(names) != v.ndim or not set(names) <= param_names
                or len(set(names)) != len(names)):
            bad[path] = (names, v.shape)
            continue
        # at most one axis of an array on any mesh axis under the default rules (eager sharding needs it)
        placed = [dict(axes.DEFAULT_AXIS_RULES)[n] for n in names]
        if len([a for a in placed if a]) != len({a for a in placed if a}):
            bad[path] = (names, "two names on one mesh axis")
    assert not bad, bad
    # the walk saw every modality, frozen and trainable text weights, and the parameter kinds named below
    for m in ("slide", "rna", "protein", "mutation", "report"):
        assert any(p.startswith(f"encoders/{m}/") for p in ws) and any(p.startswith(f"heads/{m}/") for p in ws), m
    assert any(isinstance(v, Frozen) for v in ws.values()) and any(
        isinstance(v, nnx.Param) and p.startswith("encoders/report/") for p, v in ws.items())
    names_of = {p: tuple(v.get_metadata()["out_sharding"]) for p, v in ws.items()}
    assert names_of["encoders/report/word_embeddings/table"] == ("vocab", "embed")
    assert names_of["encoders/report/layers/0/attention_out/kernel"] == ("heads", "embed")
    assert names_of["encoders/report/layers/1/intermediate/kernel"] == ("embed", "hidden")
    assert names_of["encoders/report/embeddings_norm/scale"] == ("embed",)
    assert names_of["encoders/rna/value_embed/linear/kernel"] == ("feature", "embed")
    assert names_of["heads/slide/" + ("fc2/kernel" if head_hidden else "fc1/kernel")][-1] == "joint"
    if kind == "transformer":
        assert names_of["encoders/slide/registers"] == ("tiles", "embed")


def test_sharded_state_puts_the_embed_side_of_large_matrices_on_fsdp(tiny_bert):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2))
    abstract = abstract_state("transformer", tiny_bert, 8)  # frozen and trainable text layers alike
    shardings = flat_shardings(sharding.state_shardings(abstract, mesh, sharding.default_axis_rules(), MIN_SIZE))
    split = set()
    for path, v in weights(abstract).items():
        names, shape = v.get_metadata()["out_sharding"], v.shape
        arr = jax.device_put(np.zeros(shape, np.float32), shardings[path])  # placed as the trainer's init_state
        # independent expectation: "embed" over fsdp (size 2) when the array is large and the dim even
        e = names.index("embed") if "embed" in names else None
        on_fsdp = e is not None and int(np.prod(shape)) >= MIN_SIZE and shape[e] % 2 == 0
        want = P(*[("fsdp" if on_fsdp and i == e else None) for i in range(len(shape))]) if on_fsdp else P()
        assert padded(arr.sharding.spec, len(shape)) == padded(want, len(shape)), (path, names, shape, arr.sharding)
        local = arr.addressable_shards[0].data.shape
        assert local == tuple(s // 2 if on_fsdp and i == e else s for i, s in enumerate(shape)), (path, local)
        if on_fsdp:
            split.add(path)
    for path in ("encoders/report/word_embeddings/table", "encoders/report/layers/0/query/kernel",
                 "encoders/report/layers/1/output/kernel", "encoders/slide/proj/kernel",
                 "encoders/slide/blocks/0/qkv/kernel", "encoders/rna/gene_embed", "heads/report/fc1/kernel"):
        assert path in split, path
    assert {p.split("/")[1] for p in split if p.startswith("encoders/")} == {"slide", "rna", "protein", "mutation",
                                                                            "report"}


def test_rules_are_completed_checked_and_never_reuse_a_mesh_axis(tiny_bert):
    rules = axes.complete_rules([["heads", "fsdp"]])  # a config override: the other names keep their defaults
    assert dict(rules)["embed"] == "fsdp" and dict(rules)["heads"] == "fsdp" and dict(rules)["vocab"] is None
    with pytest.raises(ValueError, match=r"axis_rules\[0\]: 'hiden' is not a parameter axis"):
        axes.complete_rules([("hiden", None)])
    with pytest.raises(ValueError, match=r"axis_rules\[1\]: 'heads' -> 'model'"):
        axes.complete_rules([("embed", None), ("heads", "model")])
    with pytest.raises(ValueError, match="'batch' is placed by the trainer"):
        axes.complete_rules([("batch", "data")])
    # embed and heads both on fsdp: a q/k/v kernel [embed, heads] gives fsdp to its first axis only
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2))
    abstract = abstract_state("transformer", tiny_bert, 8)
    specs = {p: s.spec for p, s in
             flat_shardings(sharding.state_shardings(abstract, mesh, [["heads", "fsdp"]], MIN_SIZE)).items()}
    assert specs["encoders/slide/blocks/0/qkv/kernel"] == P("fsdp", None)
    assert specs["encoders/slide/blocks/0/out/kernel"] == P("fsdp", None)  # [heads, embed]: heads now first


def test_batches_use_the_named_batch_axis():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2))
    assert sharding.BATCH_AXES == axes.MESH_AXES == ("data", "fsdp")
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert axes.logical_spec(("batch", "tiles", "feature"), axes.BATCH_RULES) == P(("data", "fsdp"), None, None)
    rows = jax.device_put(np.zeros((16, 3), np.float32), sharding.batch_sharding(mesh))
    assert {s.data.shape for s in rows.addressable_shards} == {(2, 3)}  # 16 rows over all 8 devices
    with pytest.raises(ValueError, match=r"logical axes \['tokens'\] have no rule"):
        axes.logical_spec(("batch", "tokens"), axes.BATCH_RULES)


def test_objective_takes_its_device_axes_from_the_caller():
    assert inspect.signature(multimodal_loss).parameters["axis"].default is inspect.Parameter.empty
    mods = ("slide", "rna")
    emb = {m: np.eye(16, 4, dtype=np.float32) for m in mods}
    present, ci = {m: np.ones(16, bool) for m in mods}, np.arange(16, dtype=np.int32)
    cfg = ObjectiveConfig(impl="ring")
    with pytest.raises(ValueError, match="impl='ring' on a mesh needs the batch's mesh axes"):
        multimodal_loss(emb, present, ci, LogitParams(cfg, mods, rngs=nnx.Rngs(0)), cfg,
                        mesh=sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2)), axis=None)
    # the ring over the trainer's BATCH_AXES == the single-device objective: tests/test_objective_sharded.py
