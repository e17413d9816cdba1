"""The multimodal objective against independent references: NumPy loops, finite differences, torch (open_clip)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mmfm.objectives import LogitParams, ObjectiveConfig, multimodal_loss
from mmfm.objectives.diagnostics import rankme

MODS = ("slide", "rna", "protein")


def make_batch(b=12, e=6, n_cases=5, seed=0, dtype=np.float32):
    """Masks, padding rows (one with a stray present=True) and cases with several rows (multi-positives)."""
    rng = np.random.default_rng(seed)
    emb = {m: rng.standard_normal((b, e)) for m in MODS}
    emb = {m: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype) for m, x in emb.items()}
    ci = rng.integers(0, n_cases, size=b).astype(np.int32)
    ci[:3] = [0, 0, 0]  # one case with three rows
    present = {m: rng.random(b) > 0.25 for m in MODS}
    ci[-2:] = -1
    for m in MODS:
        present[m][-2:] = False
    present["rna"][-1] = True  # padding must be excluded by case_index alone
    return emb, present, ci


def make_params(cfg, mods, log_t=None, bias=None):
    lp = LogitParams(cfg, mods, rngs=nnx.Rngs(0))
    if log_t is not None:
        lp.log_t.set_value(jnp.asarray(log_t, jnp.float32))
    if bias is not None:
        lp.bias.set_value(jnp.asarray(bias, jnp.float32))
    return lp


def reference(emb, present, ci, pairs, log_t, bias, kind, weights=None):
    """Plain loops over (i, j): the definitions in mmfm/objectives/multimodal.py, written independently."""
    total, diag = 0.0, {}
    for k, (a, b) in enumerate(pairs):
        t, bb = math.exp(log_t[k]), (bias[k] if kind == "siglip" else 0.0)
        rows = {m: [i for i in range(len(ci)) if present[m][i] and ci[i] >= 0] for m in (a, b)}

        def z(i, j, x, y):
            return t * float(np.dot(np.float64(emb[x][i]), np.float64(emb[y][j]))) + bb

        pos = [z(i, j, a, b) for i in rows[a] for j in rows[b] if ci[i] == ci[j]]
        neg = [z(i, j, a, b) for i in rows[a] for j in rows[b] if ci[i] != ci[j]]
        if kind == "siglip":
            s = sum(np.logaddexp(0.0, -(1 if ci[i] == ci[j] else -1) * z(i, j, a, b))
                    for i in rows[a] for j in rows[b])
            n = len(rows[a]) if rows[b] else 0
            loss = s / n if n else 0.0
        else:
            def direction(x, y):
                s, n = 0.0, 0
                for i in rows[x]:
                    zs = np.array([z(i, j, x, y) for j in rows[y]])
                    p = [q for q, j in enumerate(rows[y]) if ci[j] == ci[i]]
                    if p:
                        s += np.logaddexp.reduce(zs) - zs[p].mean()
                        n += 1
                return (s / n if n else 0.0), n
            (l1, n), (l2, _) = direction(a, b), direction(b, a)
            loss = 0.5 * (l1 + l2)
        w = (weights or {}).get(f"{a}-{b}", 1.0)
        total += w * loss
        name = f"{a}-{b}"
        diag[f"loss/{name}"] = loss
        diag[f"valid_rows/{name}"] = n
        diag[f"t/{name}"] = t
        if kind == "siglip":
            diag[f"b/{name}"] = bb
        for side, v in (("pos", pos), ("neg", neg)):
            diag[f"logits/{name}/{side}_mean"] = np.mean(v) if v else 0.0
            diag[f"logits/{name}/{side}_min"] = min(v) if v else 0.0
            diag[f"logits/{name}/{side}_max"] = max(v) if v else 0.0
    return total, diag


def assert_matches(loss, diag, ref_loss, ref_diag, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(float(loss), ref_loss, rtol=rtol, atol=atol)
    for k, v in ref_diag.items():
        np.testing.assert_allclose(float(diag[k]), v, rtol=rtol, atol=atol, err_msg=k)
    for k, v in diag.items():
        assert v.shape == () and v.dtype == jnp.float32 and np.isfinite(v), k


PAIRS = (("slide", "rna"), ("slide", "protein"), ("rna", "protein"))


@pytest.mark.parametrize("kind", ["siglip", "infonce"])
def test_loss_and_diagnostics_match_numpy_loops(kind):
    emb, present, ci = make_batch()
    cfg = ObjectiveConfig(kind=kind, pair_weights={"slide-protein": 0.5}, learn_tau=True)
    log_t, bias = [2.0, 1.5, 0.7], [-3.0, -1.0, 0.5]
    lp = make_params(cfg, MODS, log_t, bias if kind == "siglip" else None)
    assert lp.pairs == PAIRS
    loss, diag = jax.jit(lambda e: multimodal_loss(e, present, ci, lp, cfg, axis=None))(emb)
    ref = reference(emb, present, ci, PAIRS, log_t, bias, kind, weights={"slide-protein": 0.5})
    assert_matches(loss, diag, *ref)
    assert diag["logits/slide-rna/pos_max"] > diag["logits/slide-rna/pos_min"]  # several positives seen


def test_default_init_and_shared_params():
    cfg = ObjectiveConfig()
    lp = LogitParams(cfg, MODS, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(lp.log_t[...], [math.log(10)] * 3, rtol=1e-7)
    np.testing.assert_allclose(lp.bias[...], [-10.0] * 3)
    shared_cfg = ObjectiveConfig(shared_logit_params=True)
    shared = make_params(shared_cfg, MODS, [1.2], [-2.0])
    per_pair = make_params(cfg, MODS, [1.2] * 3, [-2.0] * 3)
    assert shared.log_t[...].shape == (1,)
    emb, present, ci = make_batch(seed=1)

    def run(lp, c):
        g, s = nnx.split(lp)
        f = lambda s: multimodal_loss(emb, present, ci, nnx.merge(g, s), c, axis=None)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, has_aux=True))(s)

    (l_shared, d_shared), gs = run(shared, shared_cfg)
    (l_pair, _), gp = run(per_pair, cfg)
    np.testing.assert_allclose(l_shared, l_pair, rtol=1e-6)
    assert_matches(l_shared, d_shared, *reference(emb, present, ci, PAIRS, [1.2] * 3, [-2.0] * 3, "siglip"))
    # Chain rule: the shared parameter's gradient is the sum of the per-pair gradients.
    np.testing.assert_allclose(gs["log_t"][...], [gp["log_t"][...].sum()], rtol=1e-5)
    np.testing.assert_allclose(gs["bias"][...], [gp["bias"][...].sum()], rtol=1e-5)


def test_infonce_tau_fixed_or_learnable():
    fixed = LogitParams(ObjectiveConfig(kind="infonce", infonce_tau=0.1), MODS, rngs=nnx.Rngs(0))
    learn = LogitParams(ObjectiveConfig(kind="infonce", learn_tau=True), MODS, rngs=nnx.Rngs(0))
    assert not isinstance(fixed.log_t, nnx.Param) and isinstance(learn.log_t, nnx.Param)
    assert fixed.bias is None and not nnx.state(fixed, nnx.Param)
    np.testing.assert_allclose(fixed.log_t[...], [math.log(10)] * 3, rtol=1e-6)
    np.testing.assert_allclose(learn.log_t[...], [math.log(1 / 0.07)] * 3, rtol=1e-6)


@pytest.mark.parametrize("kind", ["siglip", "infonce"])
def test_gradients_match_finite_differences_in_float64(kind):
    emb, present, ci = make_batch(b=7, e=3, n_cases=3, seed=2, dtype=np.float64)
    emb = {m: emb[m] for m in ("slide", "rna")}
    pairs = (("slide", "rna"),)
    cfg = ObjectiveConfig(kind=kind, learn_tau=True)
    log_t, bias = [1.125], [-0.75]  # exact in float32, the parameters' storage dtype

    def ref(e, lt, bb):
        return reference(e, present, ci, pairs, lt, bb, kind)[0]

    h = 1e-6
    fd_emb = {m: np.zeros_like(x) for m, x in emb.items()}
    for m, x in emb.items():
        for idx in np.ndindex(x.shape):
            up, dn = {k: v.copy() for k, v in emb.items()}, {k: v.copy() for k, v in emb.items()}
            up[m][idx] += h
            dn[m][idx] -= h
            fd_emb[m][idx] = (ref(up, log_t, bias) - ref(dn, log_t, bias)) / (2 * h)
    fd_t = (ref(emb, [log_t[0] + h], bias) - ref(emb, [log_t[0] - h], bias)) / (2 * h)
    fd_b = (ref(emb, log_t, [bias[0] + h]) - ref(emb, log_t, [bias[0] - h])) / (2 * h)

    with jax.enable_x64(True):
        lp = make_params(cfg, ("slide", "rna"), log_t, bias if kind == "siglip" else None)
        g, state = nnx.split(lp)
        state = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), state)
        loss_fn = lambda e, s: multimodal_loss(e, present, ci, nnx.merge(g, s), cfg, axis=None)[0]  # noqa: E731
        loss, (ge, gs) = jax.value_and_grad(loss_fn, argnums=(0, 1))(emb, state)
        assert loss.dtype == jnp.float64
        ge, gt = jax.device_get(ge), float(gs["log_t"][...][0])
        gb = float(gs["bias"][...][0]) if kind == "siglip" else None
    np.testing.assert_allclose(float(loss), ref(emb, log_t, bias), rtol=1e-10)
    for m in emb:
        np.testing.assert_allclose(ge[m], fd_emb[m], rtol=1e-6, atol=1e-8, err_msg=m)
    np.testing.assert_allclose(gt, fd_t, rtol=1e-6)
    if kind == "siglip":
        np.testing.assert_allclose(gb, fd_b, rtol=1e-6)
    assert np.abs(fd_emb["slide"]).max() > 1e-3  # the test exercises non-trivial gradients


def test_siglip_equals_open_clip_formula_in_torch():
    """open_clip SigLipLoss._loss: -logsigmoid(labels * (scale·x·yᵀ + bias)).sum() / B, labels = 2I − 1."""
    rng = np.random.default_rng(3)
    b, e = 10, 8
    x, y = (rng.standard_normal((b, e)).astype(np.float32) for _ in range(2))
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    tx, ty = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
    t_log, t_bias = torch.tensor(math.log(10.0), requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    logits = t_log.exp() * tx @ ty.T + t_bias
    labels = 2 * torch.eye(b) - 1
    ref = -torch.nn.functional.logsigmoid(labels * logits).sum() / b
    ref.backward()

    cfg = ObjectiveConfig(pairs=[["slide", "rna"]])
    lp = LogitParams(cfg, ("slide", "rna"), rngs=nnx.Rngs(0))
    g, s = nnx.split(lp)
    present = {"slide": np.ones(b, bool), "rna": np.ones(b, bool)}
    ci = np.arange(b, dtype=np.int32)
    loss_fn = lambda e, s: multimodal_loss(e, present, ci, nnx.merge(g, s), cfg, axis=None)[0]  # noqa: E731
    loss, (ge, gs) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))({"slide": x, "rna": y}, s)
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(ge["slide"], tx.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ge["rna"], ty.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gs["log_t"][...][0], t_log.grad.item(), rtol=1e-4)
    np.testing.assert_allclose(gs["bias"][...][0], t_bias.grad.item(), rtol=1e-4)


@pytest.mark.parametrize("kind", ["siglip", "infonce"])
def test_pair_without_valid_rows_contributes_zero_and_no_nan(kind):
    emb, present, ci = make_batch(seed=4)
    present = dict(present, protein=np.zeros_like(present["protein"]))
    cfg = ObjectiveConfig(kind=kind)
    lp = LogitParams(cfg, MODS, rngs=nnx.Rngs(0))
    g, s = nnx.split(lp)
    loss_fn = lambda e, s: multimodal_loss(e, present, ci, nnx.merge(g, s), cfg, axis=None)  # noqa: E731
    (loss, diag), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(emb, s)
    for name in ("slide-protein", "rna-protein"):
        assert float(diag[f"loss/{name}"]) == 0.0 and float(diag[f"valid_rows/{name}"]) == 0.0
        assert all(float(diag[f"logits/{name}/{k}"]) == 0.0 for k in ("pos_mean", "neg_min", "neg_max"))
    assert float(diag["rankme/protein"]) == 0.0 and float(diag["norm/protein"]) == 0.0
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(grads))
    assert not np.any(grads[0]["protein"])
    # Same as training on the other two modalities alone.
    sub = {m: emb[m] for m in ("slide", "rna")}
    lp2 = LogitParams(cfg, ("slide", "rna"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(loss, jax.jit(lambda e: multimodal_loss(e, present, ci, lp2, cfg, axis=None)[0])(sub),
                               rtol=1e-6)


def test_rankme_and_norm_match_numpy():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((20, 3)) @ rng.standard_normal((3, 16)) + 0.01 * rng.standard_normal((20, 16)))
    x = x.astype(np.float32)
    rows = rng.random(20) > 0.3
    s = np.linalg.svd(np.float64(x[rows]), compute_uv=False)
    p = s / s.sum() + 1e-7
    np.testing.assert_allclose(rankme(jnp.asarray(x), jnp.asarray(rows)), np.exp(-(p * np.log(p)).sum()), rtol=1e-4)
    assert 2.0 < float(rankme(jnp.asarray(x), jnp.asarray(rows))) < 4.0  # ~rank 3 data

    emb, present, ci = make_batch(seed=6)
    norms = {m: rng.uniform(1, 5, size=len(ci)).astype(np.float32) for m in MODS}
    cfg = ObjectiveConfig()
    lp = LogitParams(cfg, MODS, rngs=nnx.Rngs(0))
    _, diag = jax.jit(lambda e: multimodal_loss(e, present, ci, lp, cfg, axis=None, norms=norms))(emb)
    for m in MODS:
        keep = present[m] & (ci >= 0)
        np.testing.assert_allclose(diag[f"norm/{m}"], norms[m][keep].mean(), rtol=1e-6)
        xs = np.float64(emb[m][keep])
        sv = np.linalg.svd(xs, compute_uv=False)
        p = sv / sv.sum() + 1e-7
        np.testing.assert_allclose(diag[f"rankme/{m}"], np.exp(-(p * np.log(p)).sum()), rtol=1e-4)


def test_bfloat16_embeddings_use_a_float32_loss():
    emb, present, ci = make_batch(seed=7)
    cfg = ObjectiveConfig()
    lp = LogitParams(cfg, MODS, rngs=nnx.Rngs(0))
    half = {m: jnp.asarray(x, jnp.bfloat16) for m, x in emb.items()}
    loss, _ = multimodal_loss(half, present, ci, lp, cfg, axis=None)
    assert loss.dtype == jnp.float32
    upcast = {m: np.asarray(x.astype(jnp.float32)) for m, x in half.items()}
    ref, _ = reference(upcast, present, ci, PAIRS, [math.log(10)] * 3, [-10.0] * 3, "siglip")
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_config_and_input_errors_are_named():
    with pytest.raises(ValueError, match=r"objective\.kind"):
        ObjectiveConfig(kind="clip")
    with pytest.raises(ValueError, match=r"objective\.impl"):
        ObjectiveConfig(impl="allreduce")
    with pytest.raises(ValueError, match=r"objective\.pairs.*mutation"):
        LogitParams(ObjectiveConfig(pairs=[["slide", "mutation"]]), MODS, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"objective\.pairs.*duplicate"):
        LogitParams(ObjectiveConfig(pairs=[["slide", "rna"], ["rna", "slide"]]), MODS, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"objective\.pair_weights.*slide-report"):
        LogitParams(ObjectiveConfig(pair_weights={"slide-report": 2.0}), MODS, rngs=nnx.Rngs(0))
    cfg = ObjectiveConfig(pairs=[["slide", "rna"]], pair_weights={"slide-rna": 2})
    assert cfg.pairs == (("slide", "rna"),) and cfg.pair_weights == (("slide-rna", 2.0),)
    hash(cfg)  # usable as a jit static argument
    emb, present, ci = make_batch()
    lp = LogitParams(cfg, MODS, rngs=nnx.Rngs(0))
    with pytest.raises(KeyError, match="rna"):
        multimodal_loss(emb, {"slide": present["slide"]}, ci, lp, cfg, axis=None)
    with pytest.raises(ValueError, match="none of the pairs"):
        multimodal_loss({"slide": emb["slide"], "protein": emb["protein"]}, present, ci, lp, cfg, axis=None)


def test_infonce_equals_clip_cross_entropy_in_torch():
    """Unique cases, everything present: the symmetric CLIP/TANGLE loss (CE(z) + CE(zᵀ)) / 2, z = x·yᵀ / τ."""
    rng = np.random.default_rng(8)
    b, e, tau = 10, 8, 0.1
    x, y = (rng.standard_normal((b, e)).astype(np.float32) for _ in range(2))
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    tx, ty = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
    z, labels = tx @ ty.T / tau, torch.arange(b)
    ref = 0.5 * (torch.nn.functional.cross_entropy(z, labels) + torch.nn.functional.cross_entropy(z.T, labels))
    ref.backward()

    cfg = ObjectiveConfig(kind="infonce", infonce_tau=tau, pairs=[["slide", "rna"]])
    lp = LogitParams(cfg, ("slide", "rna"), rngs=nnx.Rngs(0))
    present = {"slide": np.ones(b, bool), "rna": np.ones(b, bool)}
    ci = np.arange(b, dtype=np.int32)
    loss_fn = jax.jit(jax.value_and_grad(lambda e: multimodal_loss(e, present, ci, lp, cfg, axis=None)[0]))
    loss, ge = loss_fn({"slide": x, "rna": y})
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(ge["slide"], tx.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ge["rna"], ty.grad.numpy(), rtol=1e-4, atol=1e-6)
