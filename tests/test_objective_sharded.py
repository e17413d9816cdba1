"""Sharded objective == single-device objective (loss, diagnostics, gradients) on 8 forced CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mmfm.objectives import LogitParams, ObjectiveConfig, multimodal_loss

MODS = ("slide", "rna", "protein")


def batch(b=16, e=8, seed=0):
    """Rows of one case spread over distant devices, padding rows in the middle, an absent modality per row."""
    rng = np.random.default_rng(seed)
    emb = {m: rng.standard_normal((b, e)).astype(np.float32) for m in MODS}
    emb = {m: x / np.linalg.norm(x, axis=1, keepdims=True) for m, x in emb.items()}
    ci = rng.integers(0, b // 3, size=b).astype(np.int32)
    ci[[0, 7, 15]] = 99                 # one case on devices 0, 3 and 7 (of 8)
    ci[[5, 10]] = -1                    # padding rows on two devices
    present = {m: (rng.random(b) > 0.3) & (ci >= 0) for m in MODS}
    present["protein"][:8] = False      # half the devices have no protein at all
    return emb, present, ci


def loss_and_grads(emb, present, ci, lp, cfg, mesh=None, axis=None, site=None):
    g, s = nnx.split(lp)

    def f(e, s):
        return multimodal_loss(e, present, ci, nnx.merge(g, s), cfg, mesh=mesh, axis=axis, site=site)

    (loss, diag), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(emb, s)
    return jax.device_get((loss, diag, grads))


@functools.cache
def single_device(kind, seed):
    cfg = ObjectiveConfig(kind=kind, learn_tau=True)
    return loss_and_grads(*batch(seed=seed), LogitParams(cfg, MODS, rngs=nnx.Rngs(0)), cfg)


def assert_same(a, b, tol=1e-5):
    (la, da, ga), (lb, db, gb) = a, b
    np.testing.assert_allclose(la, lb, rtol=tol, atol=tol)
    assert da.keys() == db.keys()
    for k in da:
        np.testing.assert_allclose(da[k], db[k], rtol=tol, atol=tol, err_msg=k)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)
    assert max(np.abs(x).max() for x in jax.tree.leaves(ga)) > 1e-3  # gradients are not trivially zero


def mesh_of(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


DATA, DATA_FSDP = ((8,), "data"), ((4, 2), ("data", "fsdp"))


@pytest.mark.parametrize("kind,impl,shape,axis", [
    ("siglip", "ring", *DATA), ("siglip", "gather", *DATA), ("siglip", "ring", *DATA_FSDP),
    ("siglip", "gather", *DATA_FSDP), ("infonce", "ring", *DATA_FSDP), ("infonce", "gather", *DATA_FSDP)])
def test_shard_map_impls_equal_single_device(kind, impl, shape, axis):
    emb, present, ci = batch()
    names = axis if isinstance(axis, tuple) else (axis,)
    mesh = mesh_of(shape, names)
    cfg = ObjectiveConfig(kind=kind, learn_tau=True)
    lp = LogitParams(cfg, MODS, rngs=nnx.Rngs(0))
    single = single_device(kind, 0)
    rows = NamedSharding(mesh, P(axis))
    put = lambda x: jax.device_put(x, rows)  # noqa: E731
    sharded = loss_and_grads(jax.tree.map(put, emb), jax.tree.map(put, present), put(ci), lp,
                             ObjectiveConfig(kind=kind, learn_tau=True, impl=impl), mesh=mesh, axis=axis)
    assert_same(sharded, single)
    assert single[1]["valid_rows/slide-protein"] > 0


def test_global_impl_under_jit_with_sharded_inputs():
    emb, present, ci = batch()
    mesh = mesh_of((4, 2), ("data", "fsdp"))
    cfg = ObjectiveConfig(learn_tau=True)
    lp = LogitParams(cfg, MODS, rngs=nnx.Rngs(0))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    put = lambda x: jax.device_put(x, rows)  # noqa: E731
    sharded = loss_and_grads(jax.tree.map(put, emb), jax.tree.map(put, present), put(ci), lp, cfg, mesh=mesh)
    assert_same(sharded, single_device("siglip", 0))


def test_ring_uses_the_context_mesh_and_handles_a_modality_absent_everywhere():
    emb, present, ci = batch(seed=2)
    present = dict(present, protein=np.zeros_like(present["protein"]))
    mesh = mesh_of((8,), ("data",))
    cfg = ObjectiveConfig(impl="ring")
    lp = LogitParams(cfg, MODS, rngs=nnx.Rngs(0))
    single = loss_and_grads(emb, present, ci, lp, ObjectiveConfig())
    with jax.set_mesh(mesh):
        ring = loss_and_grads(emb, present, ci, lp, cfg, axis="data")
    assert_same(ring, single)
    assert ring[1]["loss/slide-protein"] == 0.0 and np.all(np.isfinite(ring[2][0]["protein"]))


def test_ring_logit_memory_is_per_block():
    """The ring's largest temporary is a b_local² block, the all-gather's b_local × B (compiled memory)."""
    b, e = 256, 16
    emb = {m: jnp.ones((b, e)) / e**0.5 for m in ("slide", "rna")}
    present = {m: jnp.ones((b,), bool) for m in emb}
    ci = jnp.arange(b, dtype=jnp.int32)
    mesh = mesh_of((8,), ("data",))
    temp = {}
    for impl in ("ring", "gather"):
        cfg = ObjectiveConfig(impl=impl)
        lp = LogitParams(cfg, tuple(emb), rngs=nnx.Rngs(0))
        f = jax.jit(jax.grad(lambda x: multimodal_loss(x, present, ci, lp, cfg, mesh=mesh, axis="data")[0]))
        temp[impl] = f.lower(emb).compile().memory_analysis().temp_size_in_bytes
    assert temp["ring"] < temp["gather"] / 2, temp


def test_batch_must_divide_over_the_axis():
    emb, present, ci = batch()
    emb, present, ci = {m: x[:12] for m, x in emb.items()}, {m: x[:12] for m, x in present.items()}, ci[:12]
    cfg = ObjectiveConfig(impl="gather")
    with pytest.raises(ValueError, match="batch 12 does not divide"):
        multimodal_loss(emb, present, ci, LogitParams(cfg, MODS, rngs=nnx.Rngs(0)), cfg,
                        mesh=mesh_of((8,), ("data",)), axis="data")


# ----------------------------------------------------------------------------- site-conditional SigLIP

def sites_of(ci):
    """Rows of a case share its site (case % 3); case 1's site is unknown, padding rows have none."""
    return np.where((ci >= 0) & (ci != 1), ci % 3, -1).astype(np.int32)


def site_weighted_reference(emb, present, ci, site, same_w, other_w, pairs, log_t=np.log(10.0), bias=-10.0):
    """Σ_pairs Σ_{kept i,j} c_ij·(−log σ(y_ij z_ij)) / #anchors, vectorised NumPy in float64."""
    total = 0.0
    for a, b in pairs:
        z = np.exp(log_t) * emb[a].astype(np.float64) @ emb[b].astype(np.float64).T + bias
        pos = ci[:, None] == ci[None, :]
        known = (site[:, None] >= 0) & (site[None, :] >= 0)
        c = np.where(~pos & known, np.where(site[:, None] == site[None, :], same_w, other_w), 1.0)
        keep = (present[a] & (ci >= 0))[:, None] & (present[b] & (ci >= 0))[None, :] & (c > 0)
        nll = np.logaddexp(0.0, -np.where(pos, z, -z))
        total += np.sum(np.where(keep, c * nll, 0.0)) / max(keep.any(1).sum(), 1)
    return total


PAIR = (("slide", "rna"),)
ALL_PAIRS = (("slide", "rna"), ("slide", "protein"), ("rna", "protein"))


def pair_loss(same_w, other_w, site, kind="siglip"):
    emb, present, ci = batch()
    cfg = ObjectiveConfig(kind=kind, pairs=PAIR, same_site_weight=same_w, other_site_weight=other_w)
    lp = LogitParams(cfg, MODS, rngs=nnx.Rngs(0))
    return float(jax.jit(lambda e: multimodal_loss(e, present, ci, lp, cfg, axis=None, site=site)[0])(emb))


@pytest.mark.parametrize("same_w,other_w", [(0.0, 1.0), (2.5, 0.5)])
def test_site_weighted_siglip_matches_numpy(same_w, other_w):
    emb, present, ci = batch()
    site = sites_of(ci)
    want = site_weighted_reference(emb, present, ci, site, same_w, other_w, PAIR)
    np.testing.assert_allclose(pair_loss(same_w, other_w, site), want, rtol=1e-5)
    assert abs(want - site_weighted_reference(emb, present, ci, site, 1.0, 1.0, PAIR)) > 1e-3  # weights matter


def test_infonce_with_other_site_negatives_masked_matches_numpy():
    """InfoNCE's softmax over the kept columns only: positives and same-site (or unknown-site) negatives."""
    emb, present, ci = batch()
    site = sites_of(ci)
    z = 1 / 0.07 * emb["slide"].astype(np.float64) @ emb["rna"].astype(np.float64).T
    pos = ci[:, None] == ci[None, :]
    other = ~pos & (site[:, None] >= 0) & (site[None, :] >= 0) & (site[:, None] != site[None, :])

    def reference(mask):
        losses = []
        for zz, va, vb, m in ((z, present["slide"], present["rna"], mask), (z.T, present["rna"], present["slide"],
                                                                             mask.T)):
            keep = ((va & (ci >= 0))[:, None] & (vb & (ci >= 0))[None, :]) & ~m
            rows = [np.logaddexp.reduce(zz[i][keep[i]]) - zz[i][keep[i] & pos[i]].mean()
                    for i in range(len(ci)) if (keep[i] & pos[i]).any()]
            losses.append(np.mean(rows))
        return np.mean(losses)

    want = reference(other)
    np.testing.assert_allclose(pair_loss(1.0, 0.0, site, "infonce"), want, rtol=1e-5)
    assert abs(want - reference(np.zeros_like(other))) > 1e-3  # the mask matters

def test_plain_weights_ignore_sites_and_sites_are_required_otherwise():
    emb, present, ci = batch()
    assert pair_loss(1.0, 1.0, sites_of(ci)) == pair_loss(1.0, 1.0, None)
    cfg = ObjectiveConfig(other_site_weight=0.0)
    with pytest.raises(ValueError, match="need the rows' sites"):
        multimodal_loss(emb, present, ci, LogitParams(cfg, MODS, rngs=nnx.Rngs(0)), cfg, axis=None)
    with pytest.raises(ValueError, match="InfoNCE takes only 0"):
        ObjectiveConfig(kind="infonce", same_site_weight=0.5)


@functools.cache
def site_weighted_single_device():
    emb, present, ci = batch()
    cfg = ObjectiveConfig(same_site_weight=2.5, other_site_weight=0.0, learn_tau=True)
    return loss_and_grads(emb, present, ci, LogitParams(cfg, MODS, rngs=nnx.Rngs(0)), cfg, site=sites_of(ci))


@pytest.mark.parametrize("impl", ["gather", "ring"])
def test_site_weighted_siglip_is_the_same_on_every_impl(impl):
    """A weight and a mask together (same-site ×2.5, other-site masked): loss, diagnostics and gradients of the
    shard_map impls on 8 devices == the global one on one device == NumPy."""
    emb, present, ci = batch()
    site = sites_of(ci)
    cfg = ObjectiveConfig(same_site_weight=2.5, other_site_weight=0.0, learn_tau=True, impl=impl)
    mesh = mesh_of((8,), ("data",))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
    sharded = loss_and_grads(jax.tree.map(put, emb), jax.tree.map(put, present), put(ci),
                             LogitParams(cfg, MODS, rngs=nnx.Rngs(0)), cfg, mesh=mesh, axis="data", site=put(site))
    single = site_weighted_single_device()
    assert_same(sharded, single)
    np.testing.assert_allclose(single[0], site_weighted_reference(emb, present, ci, site, 2.5, 0.0, ALL_PAIRS),
                               rtol=1e-5)
