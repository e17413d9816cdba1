"""Trainer building blocks: typed config, mesh + sharding rules, optimizer, sharded step, checkpoints,
metrics — on the real (tiny) MultimodalModel and objective with contract batches; the loader and the
CLI run end to end in test_train_loop.py."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mmfm.data.batch import BatchShapes, random_batch
from mmfm.models import ModelConfig, MultimodalModel, SlideConfig
from mmfm.models.abmil import ABMILConfig
from mmfm.models.omics import OmicsConfig
from mmfm.objectives import LogitParams, ObjectiveConfig, multimodal_loss
from mmfm import config as mconfig
from mmfm.train import checkpoint, config, monitor, optim, sharding
from mmfm.train.loop import make_train_step
from mmfm.train.sharding import MeshConfig
from mmfm.train.state import TrainModule, init_state

SHAPES = BatchShapes(batch_size=16, tiles_per_slide=8, feature_dim=32, n_genes=24)
MODS = ("slide", "rna")


MODEL = ModelConfig(embed_dim=32, slide=SlideConfig(abmil=ABMILConfig(hidden=64, n_heads=2, attn_dim=16)),
                    rna=OmicsConfig(hidden=32, n_layers=1))


def build(seed=0):
    def f():
        rngs = nnx.Rngs(seed)
        return TrainModule(MultimodalModel(MODEL, SHAPES, MODS, rngs=rngs),
                           LogitParams(ObjectiveConfig(), MODS, rngs=rngs))
    return f


def siglip_loss(mesh=None, impl="global"):
    ocfg = ObjectiveConfig(impl=impl)

    def loss_fn(module, batch, step):
        emb = module.model(batch, deterministic=False)
        return multimodal_loss(emb, {m: batch[f"{m}/present"] for m in emb}, batch["case_index"], module.logit,
                               ocfg, mesh=mesh, axis=sharding.BATCH_AXES)
    return loss_fn


def train_losses(mesh, n_steps=3, tcfg=None, impl="global", loss=None):
    tcfg = tcfg or config.TrainConfig(steps=10, warmup=2, lr=1e-2, shard_min_size=64)
    ts = init_state(build(), optim.make_optimizer(tcfg), mesh, tcfg.axis_rules, tcfg.shard_min_size)
    step = make_train_step(ts, loss or siglip_loss(mesh, impl), mesh, lr_schedule=optim.schedule(tcfg),
                           grad_accum=tcfg.grad_accum)
    out = []
    for i in range(n_steps):
        batch = sharding.global_batch(random_batch(SHAPES, seed=i, n_cases=10), sharding.batch_sharding(mesh))
        ts.state, m = step(ts.state, batch)
        out.append(jax.device_get(m))
    return ts, out


def mesh_of(data, fsdp, n=None):
    devs = jax.devices()[: (n or data * fsdp)]
    return sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp), devs)


# ----------------------------------------------------------------------------- config

def test_config_errors_name_the_dotted_key():
    run = config.RunConfig
    with pytest.raises(mconfig.ConfigError, match=r"unknown config key\(s\) train\.lrr"):
        mconfig.decode(run, {"train": {"lrr": 1.0}})
    with pytest.raises(mconfig.ConfigError, match=r"train\.mesh\.data: Couldn't parse 'four' into an int"):
        mconfig.decode(run, {"train": {"mesh": {"data": "four"}}})
    with pytest.raises(mconfig.ConfigError, match=r"train\.progress: Couldn't parse '1' into a bool"):
        mconfig.decode(run, {"train": {"progress": 1}})
    with pytest.raises(mconfig.ConfigError, match=r"train\.best_mode: Cannot convert 'mean' .* into one of: max, min"):
        mconfig.decode(run, {"train": {"best_mode": "mean"}})
    with pytest.raises(mconfig.ConfigError, match=r"train\.steps: Couldn't parse '5.5' into an int"):
        mconfig.decode(run, {"train": {"steps": 5.5}})
    t = mconfig.decode(config.TrainConfig, {"lr": 3, "mesh": {"fsdp": 2}}, "train")
    assert t.lr == 3.0 and isinstance(t.lr, float) and t.mesh == MeshConfig(data=-1, fsdp=2)


def test_config_owner_types_and_overrides_use_safe_yaml():
    # ObjectiveConfig (owner: objective helper) accepts pair lists and {pair: weight} mappings
    o = mconfig.decode(ObjectiveConfig, {"pairs": [["slide", "rna"]], "pair_weights": {"slide-rna": 2}}, "objective")
    assert o.pairs == (("slide", "rna"),) and o.pair_weights == (("slide-rna", 2.0),)
    with pytest.raises(mconfig.ConfigError, match=r"objective\.kind: Cannot convert 'clip'"):
        mconfig.decode(config.RunConfig, {"objective": {"kind": "clip"}})
    raw = {}
    mconfig.apply_override(raw, "train.steps=7")
    mconfig.apply_override(raw, "train.mesh.fsdp=2")
    mconfig.apply_override(raw, "data.cohort=__import__('os').system('false')")  # stays a plain string
    assert raw == {"train": {"steps": 7, "mesh": {"fsdp": 2}}, "data": {"cohort": "__import__('os').system('false')"}}
    with pytest.raises(mconfig.ConfigError, match="expected a.b.c=value"):
        mconfig.apply_override(raw, "train.steps")
    cfg = mconfig.decode(config.RunConfig, raw)
    assert cfg.train.steps == 7 and cfg.train.mesh == MeshConfig(data=-1, fsdp=2)
    assert cfg.data.cohort == "__import__('os').system('false')"
    assert mconfig.decode(config.RunConfig, mconfig.to_dict(cfg)) == cfg  # round trip


# ----------------------------------------------------------------------------- mesh and sharding rules

def test_mesh_shape_fills_minus_one_and_rejects_misfit():
    assert sharding.mesh_shape(MeshConfig(-1, 2), 8) == (4, 2)
    assert sharding.mesh_shape(MeshConfig(2, -1), 8) == (2, 4)
    with pytest.raises(ValueError, match="train.mesh"):
        sharding.mesh_shape(MeshConfig(3, 1), 8)
    mesh = mesh_of(4, 2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_rules_table_and_fit():
    mesh = mesh_of(4, 2)
    fit = lambda spec, shape, min_size=64: sharding.fit_spec(spec, shape, mesh, min_size)
    assert fit(P("fsdp", None), (32, 256)) == P("fsdp", None)
    assert fit(P("fsdp", None), (31, 256)) == P(None, None)               # 2 does not divide 31
    assert fit(P("fsdp", None), (4, 8)) == P()                            # below shard_min_size
    assert fit(P(("data", "fsdp"),), (64,), 1) == P(("data", "fsdp"),)
    assert fit(P(("data", "fsdp"),), (12,), 1) == P(None)                 # 8 does not divide 12
    abstract = nnx.split(nnx.eval_shape(build()))[1]
    sh = sharding.state_shardings(abstract, mesh, config.TrainConfig().axis_rules, 64)
    specs = {sharding.leaf_path(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(sh)[0]}
    assert specs["model/encoders/slide/pool/tanh_branch/kernel"] == P("fsdp", None)  # "embed" side over fsdp
    assert specs["model/encoders/slide/pre/0/linear/kernel"] == P("fsdp", None)      # [32, 64]
    assert specs["model/heads/slide/fc1/kernel"] == P("fsdp", None)                  # [128, 32]: Dense("embed", None)
    assert specs["model/encoders/slide/pool/tanh_branch/bias"] == P()                # below shard_min_size
    assert specs["logit/log_t"] == P() and specs["model/heads/slide/drop/rngs/key"] == P()


# ----------------------------------------------------------------------------- optimizer

def test_schedule_and_decay_mask():
    t = config.TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    sched = optim.schedule(t)
    assert float(sched(0)) == 0.0 and math.isclose(float(sched(5)), 5e-4, rel_tol=1e-5)
    for s in (10, 40, 100):  # cosine from lr at warm-up end to lr*min_lr_ratio at `steps`
        frac = (s - 10) / 90
        want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * frac))
        assert math.isclose(float(sched(s)), want, rel_tol=1e-4)
    module = build()()
    mask = optim.decay_mask(nnx.state(module, nnx.Param))
    flat = {sharding.leaf_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["model/encoders/slide/pool/tanh_branch/kernel"] and not flat["model/encoders/slide/pool/tanh_branch/bias"]
    assert not flat["logit/log_t"] and not flat["logit/bias"]


# ----------------------------------------------------------------------------- the sharded step

def test_sharded_4x2_ring_matches_one_device():
    """First 3 losses on a data×fsdp (4×2) mesh with the ring objective inside shard_map equal those of one
    device with the global objective (rel 1e-4); parameters and moments really are sharded."""
    ts8, m8 = train_losses(mesh_of(4, 2), impl="ring")
    _, m1 = train_losses(mesh_of(1, 1), impl="global")
    for a, b in zip(m8, m1):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    assert m8[0]["loss"] != m8[2]["loss"]  # it trains
    module, opt = nnx.merge(ts8.graphdef, ts8.state)
    kernel = module.model.encoders["slide"].pool.tanh_branch.kernel  # [64, 32]: "embed" side over fsdp
    assert kernel[...].sharding.spec == P("fsdp", None)
    mu = opt.opt_state[1][0].mu["model"]["encoders"]["slide"]["pool"]["tanh_branch"]["kernel"]
    assert mu[...].sharding.spec == P("fsdp", None)
    assert module.model.encoders["slide"].pool.tanh_branch.bias[...].sharding.spec == P()


def test_grad_accum_equals_full_batch_for_a_row_mean_loss():
    """For a loss that is a mean over rows, 2 micro-batches give the full-batch update exactly."""
    def row_mean(module, batch, step):
        emb = module.model(batch, deterministic=True)
        loss = jnp.mean(jnp.sum((emb["slide"] - emb["rna"]) ** 2, -1))
        return loss, {}
    mesh = mesh_of(2, 1)
    ta, ma = train_losses(mesh, 2, config.TrainConfig(steps=10, warmup=0, lr=1e-2, grad_accum=2), loss=row_mean)
    tb, mb = train_losses(mesh, 2, config.TrainConfig(steps=10, warmup=0, lr=1e-2, grad_accum=1), loss=row_mean)
    for a, b in zip(ma, mb):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    # Adam divides by sqrt(v): near-zero gradient entries amplify fp32 summation-order noise, so the
    # parameters agree to 2% of one step (lr=1e-2), not to 1e-6.
    for x, y in zip(jax.tree.leaves(ta.state), jax.tree.leaves(tb.state)):
        if jnp.issubdtype(x.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-4)


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_restores_onto_other_meshes_and_ignores_unfinished(tmp_path):
    tcfg = config.TrainConfig(keep_last=2, shard_min_size=64, async_checkpoint=True)
    ts = init_state(build(), optim.make_optimizer(tcfg), mesh_of(4, 2), tcfg.axis_rules, tcfg.shard_min_size)
    want = [np.asarray(x) for x in jax.tree.leaves(ts.state) if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)]
    ck = checkpoint.Checkpointer(tmp_path, tcfg)
    ck.save(5, ts.state, [{"epoch": 0, "pos": 3}], {"seed": 0})
    ck.close()
    # a crash mid-save leaves orbax's tmp directory: never listed, never restored
    fake = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234"
    (fake / "state").mkdir(parents=True)
    (fake / "state" / "garbage").write_text("partial")
    for mesh in (mesh_of(8, 1), mesh_of(1, 1)):
        ts2 = init_state(build(seed=1), optim.make_optimizer(tcfg), mesh, tcfg.axis_rules, tcfg.shard_min_size)
        ck = checkpoint.Checkpointer(tmp_path, tcfg)
        assert ck.all_steps() == [5] and ck.latest_step() == 5
        state, loader_state, meta = ck.restore(5, ts2.abstract)
        ck.close()
        assert loader_state == {"epoch": 0, "pos": 3} and meta["step"] == 5
        got = [x for x in jax.tree.leaves(state) if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)]
        for w, g, sh in zip(want, got, [s for s, x in zip(jax.tree.leaves(ts2.shardings), jax.tree.leaves(state))
                                        if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)]):
            np.testing.assert_array_equal(w, np.asarray(g))
            assert g.sharding.is_equivalent_to(sh, g.ndim)


def test_checkpoint_keeps_last_n_plus_best(tmp_path):
    tcfg = config.TrainConfig(keep_last=1, best_metric="recall@1/slide->rna", async_checkpoint=False,
                              shard_min_size=64)
    ts = init_state(build(), optim.make_optimizer(tcfg), mesh_of(8, 1), tcfg.axis_rules, tcfg.shard_min_size)
    ck = checkpoint.Checkpointer(tmp_path, tcfg)
    for step, r in ((1, 0.2), (2, 0.9), (3, 0.1), (4, None)):
        ck.save(step, ts.state, [{}], {}, metrics=None if r is None else {"recall@1/slide->rna": r})
    ck.close()
    assert checkpoint.Checkpointer(tmp_path, tcfg).all_steps() == [2, 4]


# ----------------------------------------------------------------------------- monitoring

def test_nan_guard_names_step_and_metric():
    monitor.check_finite({"loss": 1.0, "grad_norm": 2.0}, 3)
    with pytest.raises(monitor.NonFiniteError, match=r"step 7 in grad_norm, loss"):
        monitor.check_finite({"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3}, 7)


def test_metrics_writer_jsonl_and_resume_truncation(tmp_path):
    w = monitor.MetricsWriter(tmp_path, 10, progress=False)
    for s in (1, 2, 3, 4):
        w.log(s, {"loss": 1.0 / s, "t/slide-rna": np.float32(10.0)})
    w.log(4, {"recall@1/slide->rna": 0.5}, file="eval.jsonl", prefix="eval")
    w.close()
    rows = monitor.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[1]["loss"] == 0.5
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    w = monitor.MetricsWriter(tmp_path, 10, start_step=2, progress=False)  # resumed from the step-2 checkpoint
    w.close()
    assert [r["step"] for r in monitor.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert monitor.read_jsonl(tmp_path / "eval.jsonl") == []
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1}) + "\n{\"step\": 2, \"lo")
    assert monitor.read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1}]  # torn last line


# ----------------------------------------------------------------------------- held-out evaluation metrics

def test_retrieval_recall_and_rankme_against_brute_force():
    from mmfm.metrics import paired_recall
    from mmfm.objectives.diagnostics import rankme
    from mmfm.train import evaluate

    rng = np.random.default_rng(0)
    za = rng.standard_normal((30, 8))
    zb = za + 0.8 * rng.standard_normal((30, 8))
    got = paired_recall(za, zb, ks=(1, 5, 10))
    sim = za @ zb.T / np.linalg.norm(za, axis=1)[:, None] / np.linalg.norm(zb, axis=1)[None, :]  # cosine
    for k in (1, 5, 10):  # brute force: is i among the k highest of row i (stable order, i first on ties)?
        want = np.mean([i in np.argsort(-sim[i], kind="stable")[:k] for i in range(30)])
        assert got[k] == pytest.approx(want)
    assert paired_recall(np.ones((4, 2)), np.ones((4, 2)), ks=(1, 4)) == {1: 0.0, 4: 1.0}  # ties count against
    s = np.array([3.0, 1.0, 0.5])
    p = s / s.sum() + 1e-7
    z = np.linalg.qr(rng.standard_normal((10, 3)))[0] * s  # singular values s
    rows = np.ones(10, bool)
    assert float(rankme(jnp.asarray(z), jnp.asarray(rows))) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)
    assert evaluate.eval_batch_size(12, 16, 8) == 8 and evaluate.eval_batch_size(5, 16, 8) == 0
    # case embeddings: rows of one case averaged and re-normalised; absent rows and padding ignored
    rows = {"slide": np.array([[1.0, 0], [0, 1.0], [5.0, 5.0], [0, 3.0]])}
    cases = evaluate.case_embeddings(rows, {"slide": np.array([True, True, False, True])}, np.array([0, 0, 0, -1]))
    np.testing.assert_allclose(cases["slide"][0], [2 ** -0.5, 2 ** -0.5])
    assert set(cases["slide"]) == {0}
    # retrieval_metrics: both directions of every pair, RankMe per modality, chance k / n
    cases = {"slide": {i: za[i] / np.linalg.norm(za[i]) for i in range(30)},
             "rna": {i: zb[i] / np.linalg.norm(zb[i]) for i in range(30)}}
    out = evaluate.retrieval_metrics(cases, [("slide", "rna")], ks=(1, 5, 10))
    assert out["recall@5/slide->rna"] == pytest.approx(got[5]) and out["chance@5/slide-rna"] == pytest.approx(5 / 30)
    assert out["recall@1/rna->slide"] == pytest.approx(paired_recall(zb, za, ks=(1,))[1])
    assert out["n_cases/slide-rna"] == 30 and 1.0 < out["rankme/slide"] <= 8.0
