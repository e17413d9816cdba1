"""The adversarial site head (gradient reversal) against hand-computed gradients, and one tiny pretraining run with
every site-robustness switch on (`mmfm.data.site`, `objective.same_site_weight` / `other_site_weight` /
`site_adversary`) that trains, logs the new metrics and reloads for inference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, tiny_cohort, tiny_sets
from mmfm.objectives import adversary
from mmfm.train import config, load_for_inference, loop, monitor

cohort = pytest.fixture(scope="module")(tiny_cohort)


def test_gradient_reversal_flips_and_scales_only_the_encoder_side():
    """L = CE(W·R_λ(e)): ∂L/∂W is the plain gradient, ∂L/∂e is −λ times it (softmax CE by hand)."""
    rng = np.random.default_rng(0)
    e, w = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    site, lam = np.array([0, 2, 1, 1, 0]), 0.7

    def loss(e, w, lam):
        return adversary.site_loss(adversary.grad_reverse(e, lam) @ w, jnp.asarray(site), jnp.ones(5, bool))[0]

    ge, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(e, w, lam)
    p = np.exp(e @ w - (e @ w).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(3)[site]) / 5  # ∂ mean CE / ∂ logits
    np.testing.assert_allclose(gw, e.T @ dz, rtol=1e-5)
    np.testing.assert_allclose(ge, -lam * dz @ w.T, rtol=1e-5)
    np.testing.assert_array_equal(adversary.grad_reverse(e, lam), e)  # identity forward
    assert jax.grad(loss, argnums=2)(e, w, lam) == 0.0  # λ is a schedule, not a parameter


def test_site_loss_accuracy_chance_and_schedule():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]]))
    site = np.array([0, 1, 0, -1])  # the last row's site is unknown: not counted
    loss, diag = adversary.site_loss(jnp.asarray(logits), jnp.asarray(site), jnp.array([True, True, True, True]))
    np.testing.assert_allclose(loss, -np.mean(np.log([0.7, 0.3, 0.5])), rtol=1e-6)
    np.testing.assert_allclose([diag["site_adv/acc"], diag["site_adv/chance"]], [2 / 3, 2 / 3], rtol=1e-6)
    assert [float(adversary.schedule(jnp.int32(s), 0.2, 10)) for s in (0, 5, 10, 30)] == pytest.approx(
        [0.0, 0.1, 0.2, 0.2])
    assert float(adversary.schedule(jnp.int32(0), 0.2, 0)) == pytest.approx(0.2)


def test_tiny_pretraining_with_every_site_switch(cohort, tmp_path):
    sets = tiny_sets(cohort, "train.steps=3", "train.ckpt_every=3", "data.modalities=[slide, rna]",
                     "loader.site_balance=true", "loader.site_augment=0.5", "loader.site_augment_scale=true",
                     "objective.same_site_weight=2.0", "objective.other_site_weight=0.5",
                     "objective.site_adversary=0.5", "objective.site_adversary_warmup=2")
    res = loop.pretrain(config.load_config(REPO / "configs/demo.yaml", sets), tmp_path / "run")
    rows = monitor.read_jsonl(res.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["site_adv/lambda"] for r in rows] == pytest.approx([0.0, 0.25, 0.5])  # updates done: 0, 1, 2
    for r in rows:
        assert np.isfinite(r["loss"]) and r["site_adv/loss"] > 0
        assert 0 <= r["site_adv/acc"] <= 1 and 1 / 3 <= r["site_adv/chance"] <= 1
    model, cfg, _ = load_for_inference(res.run_dir)  # the run's TrainModule (with its site head) restores
    assert cfg.objective.site_adversary == 0.5 and "slide" in model.modalities
