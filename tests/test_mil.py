"""`mil` probes: the gated-attention MIL model and its losses against independent PyTorch / NumPy computations, and
the task run on a tiny simulated cohort beside the linear probe of the same target (same test cases, no test case
in model selection, determinism, frozen vs fine-tuned encoders)."""

from __future__ import annotations

import functools

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_cohort
from flax import nnx

from mmfm.eval.probes import mil
from mmfm.eval.probe import probe
from mmfm.eval.tasks.base import TaskError
from mmfm.eval.tasks.mil import read_bags
from mmfm.models.mil import MILModel, clam_abmil
from mmfm.objectives.supervised import assign_bins, cox_nll, survival_nll, time_bins, weighted_ce

# chunk 0: slides as rows in length buckets, the step these few-tile probe runs took before cases were packed; the
# packed step (its chunk loops compile ~3× longer) has its own tests below
TINY_TRAIN = {"epochs": 2, "hidden": 16, "attn_dim": 8, "max_tiles": 64, "chunk": 0}


# ---------------------------------------------------------------- model and losses vs independent references


def _torch_mil(p: dict, x, mask, case_of_row, row_valid):
    """Gated ABMIL (CLAM) written out in torch from the same weights: ReLU projection, tanh ⊙ sigmoid attention,
    masked softmax, attention-weighted sum, mean over a case's slides, linear head."""
    h = torch.relu(x @ p["w1"] + p["b1"])
    a = torch.tanh(h @ p["wa"] + p["ba"]) * torch.sigmoid(h @ p["wb"] + p["bb"])
    logits = (a @ p["score"][0]).masked_fill(~mask, float("-inf"))
    attn = torch.softmax(logits, dim=1)
    slide = (attn[..., None] * h).sum(1)
    member = ((case_of_row[None, :] == torch.arange(len(case_of_row))[:, None]) & row_valid[None, :]).to(slide.dtype)
    case = member @ slide / member.sum(1, keepdim=True).clamp(min=1)
    return case @ p["wh"] + p["bh"]


@pytest.mark.parametrize("chunks", [(), (8, 2)])
def test_gated_attention_mil_and_gradients_match_torch(chunks):
    """The whole-bag pooling with slides as rows, and the chunked one of the training step with a case's slides
    packed back to back in one row (a chunk of 8 tiles then chunks of 2, online softmax per slide, a slide starting
    mid-chunk, the tiles past the last — 12-13 — never visited, and its own backward pass)."""
    rng = np.random.default_rng(0)
    d, n, r = 12, 10, 4
    model = MILModel(clam_abmil(d, hidden=8, attn_dim=6, dropout=0.0, rngs=nnx.Rngs(0)), 3, rngs=nnx.Rngs(1))
    x = rng.normal(size=(r, n, d)).astype(np.float32)
    mask = np.ones((r, n), bool)
    mask[1, 4:] = mask[2, 2:] = mask[:, 7:] = False
    x[~mask] = 99.0  # padding must not matter
    case_of_row = np.array([0, 0, 1, 0], np.int32)  # case 0 = rows 0 and 1 (two slides), case 1 = row 2
    row_valid = np.array([True, True, True, False])
    y = np.array([2, 0, 0, 0], np.int32)
    valid = np.array([1, 1, 0, 0], np.float32)
    w = np.array([0.5, 1.0, 2.0], np.float32)
    packed = np.full((2, 14, d), 99.0, np.float32), np.zeros((2, 14), bool), np.zeros((2, 14), np.int32)
    for case, rows in enumerate([[0, 1], [2]]):  # case 0: 7 + 4 tiles, case 1: 2 tiles, then padding
        start = 0
        for j, row in enumerate(rows):
            t = x[row][mask[row]]
            packed[0][case, start:start + len(t)], packed[1][case, start:start + len(t)] = t, True
            packed[2][case, start:start + len(t)] = j
            start += len(t)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        if chunks:
            out = m.packed(*map(jnp.asarray, packed), 2, chunks)
            return weighted_ce(out, jnp.asarray(y[:2]), jnp.asarray(w), jnp.asarray(valid[:2])), out
        out = m(jnp.asarray(x), jnp.zeros((r, n, 2), jnp.int32), jnp.asarray(mask), None, jnp.asarray(case_of_row),
                jnp.asarray(row_valid))
        return weighted_ce(out, jnp.asarray(y), jnp.asarray(w), jnp.asarray(valid)), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)  # one compile, not one per op
    flat = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(params)}
    names = {"w1": "encoder.pre.0.linear.kernel", "b1": "encoder.pre.0.linear.bias",
             "wa": "encoder.pool.tanh_branch.kernel", "ba": "encoder.pool.tanh_branch.bias",
             "wb": "encoder.pool.gate_branch.kernel", "bb": "encoder.pool.gate_branch.bias",
             "score": "encoder.pool.score", "wh": "head.kernel", "bh": "head.bias"}
    assert set(names.values()) == set(flat)  # every parameter is covered by the reference
    tp = {k: torch.tensor(flat[v], dtype=torch.float64, requires_grad=True) for k, v in names.items()}
    t_out = _torch_mil(tp, torch.tensor(x, dtype=torch.float64), torch.tensor(mask), torch.tensor(case_of_row).long(),
                       torch.tensor(row_valid))
    keep = torch.tensor(valid > 0)
    t_loss = torch.nn.functional.cross_entropy(t_out[keep], torch.tensor(y).long()[keep],
                                               weight=torch.tensor(w, dtype=torch.float64))
    t_loss.backward()
    np.testing.assert_allclose(np.asarray(out)[:2], t_out.detach().numpy()[:2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(value), t_loss.item(), rtol=1e-5)
    gflat = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}
    for k, v in names.items():
        np.testing.assert_allclose(gflat[v], tp[k].grad.numpy(), rtol=1e-3, atol=1e-6, err_msg=k)


def test_chunked_training_step_trains_what_length_buckets_train():
    """Without dropout, the packed step (one length, chunks of 64, 32 and 16 tiles up to a case's last, its own
    backward pass, 16 steps per call) and the length-bucketed step (one step per call) make the same updates in the
    same order: same model. (Several slides per case: the chunked pooling's torch test.)"""
    from mmfm.eval.embed import Bag

    rng = np.random.default_rng(0)
    d, lengths = 8, [20, 50, 19, 17, 50, 20, 18, 49]  # two length buckets: 20 and 56
    bag = lambda n: Bag(rng.normal(size=(n, d)).astype(np.float32), np.zeros((n, 2), np.int32),  # noqa: E731
                        np.zeros(n, np.int32))
    bags = [[bag(n)] for n in lengths]
    cases = mil.CaseSet([f"c{i}" for i in range(len(bags))], bags, np.arange(len(bags)) % 2)
    params = lambda m: {k: np.asarray(v.get_value())  # noqa: E731
                        for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    outs = []
    for chunk in (0, 16):
        cfg = mil.MilConfig(epochs=2, hidden=16, attn_dim=8, dropout=0.0, min_bucket=8, chunk=chunk)
        model = MILModel(clam_abmil(d, hidden=16, attn_dim=8, dropout=0.0, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))
        assert mil.packed_layout(model, cases, cfg) == (mil.Layout((64, 32, 16), 64, 1, 16) if chunk else None)
        start = params(model)
        outs.append(params(mil.train(model, "class", cases, None, cfg, seed=0, n_classes=2).model))
    for k, v in outs[0].items():
        np.testing.assert_allclose(outs[1][k], v, rtol=1e-4, atol=1e-6, err_msg=str(k))
    assert any(not np.allclose(v, start[k]) for k, v in outs[0].items())  # it trained


def test_steps_grouped_in_one_call_train_what_single_steps_train():
    """Packed cases (several slides each), with dropout: `steps_per_call` steps as one scanned call — the last group
    padded with inactive steps — make the same updates, dropout masks included, as one step per call."""
    from mmfm.eval.embed import Bag

    rng = np.random.default_rng(1)
    d = 8
    bag = lambda n: Bag(rng.normal(size=(n, d)).astype(np.float32), np.zeros((n, 2), np.int32),  # noqa: E731
                        np.zeros(n, np.int32))
    bags = [[bag(n) for n in lens] for lens in ([20], [9, 30], [17], [40, 5, 12], [25], [33], [8, 8])]
    cases = mil.CaseSet([f"c{i}" for i in range(len(bags))], bags, np.arange(len(bags)) % 2)
    outs = []
    for per_call in (1, 3):  # 7 steps per epoch: groups of 3, 3 and 1 + 2 inactive
        cfg = mil.MilConfig(epochs=2, hidden=16, attn_dim=8, max_tiles=24, chunk=8, chunk_large=16,
                            steps_per_call=per_call)
        model = MILModel(clam_abmil(d, hidden=16, attn_dim=8, rngs=nnx.Rngs(0)), 2, dropout=0.25, rngs=nnx.Rngs(1))
        assert mil.packed_layout(model, cases, cfg) == mil.Layout((16, 8), 64, 4, per_call)
        fitted = mil.train(model, "class", cases, None, cfg, seed=0, n_classes=2)
        assert fitted.steps == 14
        outs.append((fitted.history, {k: np.asarray(v.get_value())
                                      for k, v in nnx.to_flat_state(nnx.state(fitted.model, nnx.Param))}))
    assert [h["train_loss"] for h in outs[0][0]] == pytest.approx([h["train_loss"] for h in outs[1][0]], rel=1e-5)
    for k, v in outs[0][1].items():
        np.testing.assert_allclose(outs[1][1][k], v, rtol=1e-5, atol=1e-7, err_msg=str(k))


def test_learning_rates_follow_optax_warmup_cosine():
    """The per-step learning rates (NumPy, so no device work per fold) are optax's warm-up + cosine schedule."""
    import optax

    cfg = mil.MilConfig(lr=3e-4)
    for total, warmup, cases in ((50, 0, 1), (50, 7, 4), (5, 5, 1)):
        ref = optax.warmup_cosine_decay_schedule(0.0 if warmup else 3e-4 * np.sqrt(cases), 3e-4 * np.sqrt(cases),
                                                 warmup, max(total, warmup + 1))
        np.testing.assert_allclose(mil.lr_steps(cfg, total, warmup, cases), [float(ref(t)) for t in range(total + 1)],
                                   rtol=1e-5, atol=1e-9)


def _nll_reference(logits, bins, event, alpha=0.0, eps=1e-7):
    """Patho-Bench / Patch-GCN NLLSurvLoss written with NumPy and its clamp."""
    h = 1 / (1 + np.exp(-logits))
    s = np.cumprod(1 - h, axis=1)
    s_pad = np.concatenate([np.ones((len(h), 1)), s], axis=1)
    i = np.arange(len(h))
    unc = -event * (np.log(np.clip(s_pad[i, bins], eps, None)) + np.log(np.clip(h[i, bins], eps, None)))
    cen = -(1 - event) * np.log(np.clip(s_pad[i, bins + 1], eps, None))
    return np.mean(unc + (1 - alpha) * cen)


def test_discrete_time_survival_nll_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(9, 4))
    bins = rng.integers(0, 4, 9)
    event = (rng.random(9) < 0.6).astype(float)
    got = survival_nll(jnp.asarray(logits), jnp.asarray(bins), jnp.asarray(event), jnp.ones(9))
    np.testing.assert_allclose(float(got), _nll_reference(logits, bins, event), rtol=1e-5)
    half = survival_nll(jnp.asarray(logits), jnp.asarray(bins), jnp.asarray(event), jnp.asarray(np.arange(9) < 5))
    np.testing.assert_allclose(float(half), _nll_reference(logits[:5], bins[:5], event[:5]), rtol=1e-5)
    time = rng.exponential(100, 50)
    ev = rng.random(50) < 0.5
    edges = time_bins(time, ev, 4)
    np.testing.assert_allclose(edges, np.quantile(time[ev], [0.25, 0.5, 0.75]))
    counts = np.bincount(assign_bins(time[ev], edges), minlength=4)
    assert counts.min() >= ev.sum() // 4 - 1  # quartiles of the uncensored times


def test_cox_partial_likelihood_matches_numpy():
    rng = np.random.default_rng(2)
    risk, time = rng.normal(size=8), rng.permutation(8).astype(float) + 1
    event = np.array([1, 0, 1, 1, 0, 1, 0, 1], float)
    ref = -sum(risk[i] - np.log(np.exp(risk[time >= time[i]]).sum()) for i in range(8) if event[i]) / event.sum()
    got = cox_nll(jnp.asarray(risk), jnp.asarray(time), jnp.asarray(event), jnp.ones(8))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


# ---------------------------------------------------------------- the task on a tiny cohort


cohort = pytest.fixture(scope="module")(tiny_cohort)  # one fresh cohort per module


def _adata(root) -> ad.AnnData:
    """Case-level mean-pool embeddings (late fusion of slide means) and the cohort's labels, as `mmfm embed` writes:
    read once per cohort (each open checks every bag), a copy per call."""
    return _read_adata(root).copy()


@functools.cache
def _read_adata(root) -> ad.AnnData:
    from mmfm.data.cohort import Cohort

    c = Cohort.open(root)
    bags = read_bags(root, c.cases.index)
    ids = [i for i in c.cases.index if i in bags]
    x = np.stack([np.mean([b.features.mean(0) for b in bags[i]], 0) for i in ids])
    obs = c.cases.loc[ids][["subtype", "os_days", "os_event"]].copy()
    obs["subtype"] = obs["subtype"].astype(str)
    return ad.AnnData(obs=obs, obsm={"slide_meanpool": x}, uns={"cohort": str(root)})


def _tasks(**mil_keys):
    return [{"name": "subtype", "type": "classification", "label": "subtype", "embeddings": ["slide_meanpool"],
             "folds": 3},
            {"name": "subtype_mil", "type": "mil", "label": "subtype", "beside": "subtype", "folds": 3,
             "train": TINY_TRAIN, **mil_keys}]


def test_mil_rows_pair_with_linear_rows_and_never_select_on_test(cohort, tmp_path, monkeypatch):
    seen = {"train": [], "predict": []}
    real_train, real_predict = mil.train, mil.predict

    def spy_train(model, kind, tr, va, cfg, **kw):
        seen["train"].append((set(tr.ids), set(va.ids) if va is not None else set()))
        return real_train(model, kind, tr, va, cfg, **kw)

    def spy_predict(model, cases, cfg):
        seen["predict"].append(set(cases.ids))
        return real_predict(model, cases, cfg)

    monkeypatch.setattr(mil, "train", spy_train)
    monkeypatch.setattr(mil, "predict", spy_predict)
    adata = _adata(cohort)
    res = probe(adata, _tasks(train={**TINY_TRAIN, "select": "refit"}), tmp_path / "a", n_bootstrap=0, plots=False)
    folds = pd.read_csv(tmp_path / "a" / "folds" / "subtype.tsv", sep="\t", index_col=0)
    mil_folds = pd.read_csv(tmp_path / "a" / "folds" / "subtype_mil.tsv", sep="\t", index_col=0)
    pd.testing.assert_frame_equal(folds, mil_folds)  # the linear twin's folds, from the one fold implementation
    assert len(seen["train"]) == 2 * folds.shape[1]  # select refit: inner run, then the whole training fold
    vals = [va for _, va in seen["train"] if va]
    tests = [p for p in seen["predict"] if p not in vals]
    for (itr, va), (whole, none), test, fc in zip(seen["train"][::2], seen["train"][1::2], tests, folds.columns):
        want_test = set(folds.index[folds[fc] == "test"].astype(str))
        want_train = set(folds.index[folds[fc] == "train"].astype(str))
        assert test == want_test  # exactly the linear probe's test cases
        assert itr | va == want_train and not (itr & va) and va  # selection: inside the training fold only
        assert whole == want_train and not none  # the refit: the whole training fold, no validation
    r = res.results
    n_test = r[r.metric == "n_test"].pivot_table(index="fold", columns="embedding", values="value")
    assert (n_test["mil:abmil"] == n_test["slide_meanpool"]).all()
    assert set(r[r.embedding == "mil:abmil"].task) == {"subtype"}  # filed beside the linear task
    assert np.isfinite(r[(r.embedding == "mil:abmil") & (r.metric == "auroc")].value).all()
    assert (r[(r.embedding == "mil:abmil") & (r.metric == "wall_s")].value > 0).all()
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "supervised: mil:abmil" in summary


def test_mil_is_deterministic_for_a_seed(cohort, tmp_path):
    adata = _adata(cohort)
    runs = [probe(adata, _tasks(), tmp_path / str(i), n_bootstrap=0, plots=False).results for i in range(2)]
    a, b = (r[(r.embedding == "mil:abmil") & (r.metric == "auroc")].value.to_numpy() for r in runs)
    np.testing.assert_array_equal(a, b)


def test_pieces_started_before_the_embeddings_are_the_probes_rows(cohort, tmp_path, monkeypatch):
    """`start_early` trains the abmil piece on the cases' labels alone (an AnnData without embeddings, as the demo
    has beside pretraining); the probe takes its rows (it trains nothing more) and writes what it writes alone."""
    from concurrent.futures import ThreadPoolExecutor

    from mmfm.eval.probe import start_early

    adata = _adata(cohort)
    alone = probe(adata, _tasks(), tmp_path / "alone", n_bootstrap=0, plots=False).results
    with ThreadPoolExecutor(1) as pool:
        started = start_early(ad.AnnData(obs=adata.obs, uns=adata.uns), _tasks(), pool, n_bootstrap=0)
        assert list(started) == ["subtype_mil"] and list(started["subtype_mil"].units) == [0]
        started["subtype_mil"].units[0].result()
    monkeypatch.setattr(mil, "train", lambda *a, **k: pytest.fail("a started piece was trained again"))
    taken = probe(adata, _tasks(), tmp_path / "taken", n_bootstrap=0, plots=False, started=started).results
    timing = lambda df: df[df.metric != "wall_s"].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(timing(alone), timing(taken))


def test_selection_never_reads_test_labels(cohort):
    """Each `select`: relabelling the test fold changes neither the kept epoch nor a test prediction; relabelling
    training cases does (so the check can fail)."""
    from mmfm.eval import folds as folds_mod
    from mmfm.eval.tasks.base import Collector, Target
    from mmfm.eval.tasks.mil import MilSpec, run

    adata = _adata(cohort)
    labels = adata.obs["subtype"]
    folds = folds_mod.generate_folds(labels.index, labels, None, k=3, seed=0, site_preserved=False,
                                     test_size=None)[["fold_0"]]
    test, train = (labels.index[folds.fold_0 == s] for s in ("test", "train"))

    def relabel(cases):
        y = labels.copy()
        y[cases] = np.roll(labels[cases].to_numpy(), 1)
        return y

    outs = {}
    real_predict = mil.predict

    def spy_predict(model, cases, cfg):
        out = real_predict(model, cases, cfg)
        if set(cases.ids) == set(test):
            outs.setdefault("pred", []).append(out)
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(mil, "predict", spy_predict)
    try:
        for select in ("inner", "refit", "last"):
            spec = MilSpec(name="s", type="mil", label="subtype",
                           train=mil.MilConfig(**TINY_TRAIN, select=select))
            runs = {}
            variants = [("true", labels), ("test relabelled", relabel(test))]
            variants += [("train relabelled", relabel(train[:8]))] if select == "refit" else []
            for name, y in variants:
                outs.clear()
                col = Collector(n_bootstrap=0)
                run(adata, spec, [Target("", y, folds)], col)
                runs[name] = ([r["value"] for r in col.rows if r["metric"] == "epoch"], outs["pred"][-1])
            assert runs["true"][0] == runs["test relabelled"][0], select
            np.testing.assert_array_equal(runs["true"][1], runs["test relabelled"][1], err_msg=select)
            if select == "refit":
                assert not np.allclose(runs["true"][1], runs["train relabelled"][1])
    finally:
        mp.undo()


def test_beside_needs_identical_folds(cohort, tmp_path):
    with pytest.raises(TaskError, match="folds of target"):
        probe(_adata(cohort), _tasks(seed=1), tmp_path, n_bootstrap=0, plots=False)


def test_survival_mil_lines_up_with_the_linear_survival_probe(cohort, tmp_path):
    """Discrete-time NLL rows beside a coxnet probe: filed under its model, Harrell and Uno C, paired per fold with
    the pretrained embedding (checked against the fold differences); the Cox loss runs too."""
    adata = _adata(cohort)
    adata.obsm["slide"] = adata.obsm["slide_meanpool"] @ np.random.default_rng(0).normal(size=(32, 8))
    tasks = [{"name": "os", "type": "survival", "time": "os_days", "event": "os_event", "embeddings": ["slide"],
              "models": ["coxnet"], "folds": 2},
             {"name": "os_nll", "type": "mil", "time": "os_days", "event": "os_event", "beside": "os", "folds": 2,
              "train": TINY_TRAIN},
             {"name": "os_cox", "type": "mil", "time": "os_days", "event": "os_event", "folds": 2,
              "train": {**TINY_TRAIN, "survival_loss": "cox", "batch_size": 8}}]
    res = probe(adata, tasks, tmp_path, n_bootstrap=0, plots=False)
    r = res.results
    nll = r[(r.task == "os") & (r.embedding == "mil:abmil")]
    assert set(nll.model) == {"coxnet"} and {"c_index", "uno_c", "n_test"} <= set(nll.metric)
    assert np.isfinite(r[(r.task == "os_cox") & (r.metric == "c_index")].value).all()
    paired = pd.read_csv(tmp_path / "paired.csv")
    for metric in ("c_index", "uno_c"):
        p = paired[(paired.embedding == "mil:abmil") & (paired.baseline == "slide") & (paired.metric == metric)]
        assert len(p) == 1 and p.model.iloc[0] == "coxnet" and p.n.iloc[0] == 2
        v = r[(r.task == "os") & (r.metric == metric)].pivot_table(index="fold", columns="embedding", values="value")
        np.testing.assert_allclose(p["mean"].iloc[0], (v["mil:abmil"] - v["slide"]).mean())
    assert "mil:abmil" in (tmp_path / "summary.md").read_text()


def test_frozen_keeps_the_export_encoder_and_finetune_moves_it(cohort, tmp_path):
    from mmfm.models.abmil import ABMILConfig
    from mmfm.models.config import ModelConfig, SlideConfig
    from mmfm.models.export_format import load_slide_encoder, write_export
    from mmfm.models.multimodal import build_slide_encoder

    adata = _adata(cohort)
    d = adata.obsm["slide_meanpool"].shape[1]
    slide = SlideConfig(kind="abmil", abmil=ABMILConfig(hidden=16, n_heads=1, attn_dim=8))
    enc = build_slide_encoder(slide, d, dtype=jnp.float32, rngs=nnx.Rngs(3))
    write_export(tmp_path / "e", {"encoders.slide": enc}, ModelConfig(slide=slide),
                 {"batch_size": 2, "feature_dim": d}, {"test": True})
    before = nnx.state(load_slide_encoder(tmp_path / "e")[0], nnx.Param)
    kept = {}
    real_train = mil.train

    def spy_train(model, kind, tr, va, cfg, *, frozen=False, **kw):
        fitted = real_train(model, kind, tr, va, cfg, frozen=frozen, **kw)
        kept.setdefault("frozen" if frozen else "other", []).append(nnx.state(fitted.model.encoder, nnx.Param))
        return fitted

    mp = pytest.MonkeyPatch()
    mp.setattr(mil, "train", spy_train)
    try:
        tasks = [{"name": "s", "type": "mil", "label": "subtype", "folds": 2, "run": str(tmp_path / "e"),
                  "inits": ["scratch", "finetune", "frozen"], "train": TINY_TRAIN}]
        r = probe(adata, tasks, tmp_path / "p", n_bootstrap=0, plots=False).results
    finally:
        mp.undo()
    assert set(r.embedding) == {"mil:scratch", "mil:finetune", "mil:frozen"}
    leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves(s)]  # noqa: E731
    for s in kept["frozen"]:
        for a, b in zip(leaves(s), leaves(before)):
            np.testing.assert_array_equal(a, b)
    finetuned = kept["other"][2:]  # scratch's 2 folds first, then finetune
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(finetuned[0]), leaves(before)))


def test_regression_mil_predicts_the_linear_twins_genes_on_its_folds(cohort, tmp_path):
    """`source: rna` MIL rows (MSE head on the fold's z-scored genes) sit beside the linear regression task: the
    same folds, the same genes per fold (chosen on the training cases), paired case for case."""
    adata = _adata(cohort)
    tasks = [{"name": "expr", "type": "regression", "source": "rna", "hvg": 8, "embeddings": ["slide_meanpool"],
              "folds": 2, "permutations": 0},
             {"name": "expr_mil", "type": "mil", "source": "rna", "hvg": 8, "beside": "expr", "folds": 2,
              "train": TINY_TRAIN}]
    res = probe(adata, tasks, tmp_path, n_bootstrap=0, plots=False)
    r = res.results
    n_test = r[r.metric == "n_test"].pivot_table(index="fold", columns="embedding", values="value")
    assert (n_test["mil:abmil"] == n_test["slide_meanpool"]).all()
    assert np.isfinite(r[(r.embedding == "mil:abmil") & (r.metric == "pearson_mean")].value).all()
    per = pd.read_csv(tmp_path / "per_target.csv")
    genes = per.groupby(["embedding", "fold"]).target.apply(frozenset).unstack(0)
    assert (genes["mil:abmil"] == genes["slide_meanpool"]).all() and genes["mil:abmil"].map(len).eq(8).all()
    assert set(r[r.embedding == "mil:abmil"].task) == {"expr"}  # filed beside the linear task, same table
    refs = pd.read_csv(tmp_path / "references.csv")
    assert "supervised: mil:abmil" in refs.columns and (refs.task == "expr").any()


def test_mse_loss_matches_numpy():
    import jax.numpy as jnp

    r = np.random.default_rng(0)
    out, y, valid = r.standard_normal((5, 3)), r.standard_normal((5, 3)), np.array([1, 1, 0, 1, 0], np.float32)
    got = mil.loss_fn("mse")(jnp.asarray(out), {"y": jnp.asarray(y), "valid": jnp.asarray(valid)}, {})
    np.testing.assert_allclose(float(got), ((out - y) ** 2).mean(1)[valid > 0].mean(), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.xla_optimized  # 40 epochs: 0.84x CPU optimised; the rest of the file 0.7x unoptimised
def test_abmil_learns_what_mean_pooling_cannot_on_the_default_simulator():
    """Learnability: on a small default simulated cohort, gated ABMIL trained on subtype beats the mean-pool linear
    probe (sklearn LogisticRegression, C 0.5, balanced — the issue's reference) on the same stratified folds.

    Why it can: the default simulator puts the subtype's own shift on *tumour* tiles only, while programmes also
    move the tissue composition, so the bag mean mixes the subtype signal with how much tumour a slide holds; a pool
    that weighs tiles by what they show can undo that. The linear probe on the mean of tumour tiles only (what
    undoing it is worth to a linear read-out) reaches ≈ +0.10 AUROC over the plain mean at these sizes (+0.135 at
    1024-d, 600 tiles, the reference's +0.13). Sizes and optimiser are the test's, not the literature's (stated):
    256-d features, 128 tiles, hidden 64 / attention 32, 8 cases per step at lr 1e-3 for 40 epochs — the
    literature's one case per step at 2e-4 for 20 epochs needs ~10× the updates, too slow for a unit test. Measured
    (2 folds, AUROC gain over the mean pool): +0.052 / +0.149; with the attention replaced by uniform weights (a
    mean of the ReLU projection) +0.027 / +0.086 — much of the gain is the nonlinear projection, the rest is
    attention — so the bounds (every fold > 0.03, mean ≥ 0.08) sit between the two, and a MIL with broken attention,
    head or gradients fails them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from mmfm.eval.embed import Bag
    from mmfm.simulate import SimConfig
    from mmfm.simulate.tile_features import simulate_slide
    from mmfm.simulate.world import draw_case, make_world

    sim = SimConfig(n_cases=150, seed=7, feature_dim=256, bag_size_median=128, n_genes=8, n_proteins=4)
    world = make_world(sim)
    cases = [c for c in (draw_case(sim, world, i) for i in range(sim.n_cases)) if c.n_slides]
    bags = [[Bag(s.features.astype(np.float32), s.coords // sim.patch_size_level0, s.fragment)
             for s in (simulate_slide(sim, world, c, j) for j in range(c.n_slides))] for c in cases]
    y = np.array([c.subtype for c in cases])
    meanpool = np.stack([np.mean([b.features.mean(0) for b in bs], 0) for bs in bags])
    data = mil.CaseSet([c.case_id for c in cases], bags, y)
    cfg = mil.MilConfig(epochs=40, lr=1e-3, batch_size=8, hidden=64, attn_dim=32, max_tiles=64)

    gains = []
    for k, (tr, te) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0).split(meanpool, y)):
        if k == 2:
            break
        lin = LogisticRegression(C=0.5, class_weight="balanced", max_iter=10000).fit(meanpool[tr], y[tr])
        auc_lin = roc_auc_score(y[te], lin.predict_proba(meanpool[te]), multi_class="ovr")
        make = lambda: MILModel(clam_abmil(256, hidden=64, attn_dim=32, rngs=nnx.Rngs(k)), 4,  # noqa: E731
                                dropout=cfg.dropout, rngs=nnx.Rngs(k + 1))
        fitted = mil.fit(make, "class", data.take(tr), (None, None), cfg, seed=k, n_classes=4)  # select last
        out = mil.predict(fitted.model, data.take(te), cfg)
        auc_mil = roc_auc_score(y[te], jax.nn.softmax(out, -1), multi_class="ovr")
        gains.append(auc_mil - auc_lin)
    assert min(gains) > 0.03 and np.mean(gains) >= 0.08, gains


def test_frozen_and_finetune_heads_start_at_the_linear_probe_of_the_embedding():
    """LP-FT: `fit_head` sets the fresh head to sklearn's balanced, C=1 logistic regression on the z-scored case
    embeddings (every tile, deterministic). The regime that left `frozen` / `finetune` at chance: embeddings with a
    large common mean and a small class signal, where a random head moved by AdamW at 2e-4 barely learns."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from mmfm.eval.embed import Bag

    rng = np.random.default_rng(0)
    d, n, k = 6, 36, 3
    y = np.arange(n) % k
    shift = rng.normal(size=(k, d)).astype(np.float32)
    bags = []
    for i in range(n):
        t = int(rng.integers(5, 12))
        f = (3.0 + 0.2 * rng.normal(size=(t, d)) + 0.15 * shift[y[i]]).astype(np.float32)
        bags.append([Bag(f, np.zeros((t, 2), np.int32), np.zeros(t, np.int32))])
    cases = mil.CaseSet([f"c{i}" for i in range(n)], bags, y=y)
    cfg = mil.MilConfig(epochs=1, max_tiles=16, min_bucket=16)
    model = MILModel(clam_abmil(d, hidden=8, attn_dim=4, dropout=0.0, rngs=nnx.Rngs(0)), k, rngs=nnx.Rngs(1))
    emb = mil.case_embeddings(model, cases, cfg)
    mil.fit_head(model, "class", cases, {"y": y.astype(np.int32)}, mil.balanced_weights(y, k), cfg)
    out = mil.predict(model, cases, cfg)
    proba = np.exp(out - out.max(1, keepdims=True))
    proba /= proba.sum(1, keepdims=True)
    z = StandardScaler().fit_transform(emb)
    ref = LogisticRegression(C=1.0, class_weight="balanced", max_iter=10000, tol=1e-10).fit(z, y).predict_proba(z)
    np.testing.assert_allclose(proba, ref, atol=2e-3)
    assert roc_auc_score(y, ref, multi_class="ovr") > 0.8  # the probe has a signal to start from

    fitted = mil.train(model, "class", cases, None, cfg, seed=0, frozen=True, n_classes=k, probe_head=True)
    out = mil.predict(fitted.model, cases, cfg)
    assert roc_auc_score(y, np.exp(out) / np.exp(out).sum(1, keepdims=True), multi_class="ovr") > 0.8
