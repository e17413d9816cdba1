"""Adversarial site head with gradient reversal (DANN, Ganin & Lempitsky 2015), on the slide embedding.

A head h (`objective.site_adversary_hidden` wide; mmfm.models.heads.ProjectionHead without normalisation) reads
the L2-normalised slide embedding e and predicts the row's training site s ∈ {0..S−1}:
  L_site = mean over rows with a slide and a known site of −log softmax(h(R_λ(e)))_s,
and the trainer minimises L_contrastive + L_site. R_λ is the gradient-reversal layer: the identity forward,
−λ·g backward. So the head descends L_site (its own gradient is untouched) while the encoders receive
−λ·∂L_site/∂e: they move the embedding to make the site *less* predictable. λ(step) = λ_max·min(1, step/warmup)
(`objective.site_adversary`, `objective.site_adversary_warmup`; warmup 0 = constant λ_max), step = optimizer
updates done; a ramp lets the head learn the site before the encoders start fighting it (DANN ramps similarly).
Logged: `site_adv/loss` (L_site), `site_adv/acc` (the head's accuracy on those rows; falling towards
`site_adv/chance`, the majority site's share of them, means the embedding carries less site) and `site_adv/lambda`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def grad_reverse(x: jax.Array, lam: jax.Array) -> jax.Array:
    """Identity forward; backward multiplies the incoming gradient by −λ (λ itself gets no gradient)."""
    return x


def _forward(x, lam):
    return x, lam


def _backward(lam, g):
    return -lam * g, jnp.zeros_like(lam)


grad_reverse.defvjp(_forward, _backward)


def schedule(step: jax.Array, lam: float, warmup: int) -> jax.Array:
    """λ at optimizer step `step` (float32 scalar)."""
    lam = jnp.float32(lam)
    return lam if warmup <= 0 else lam * jnp.minimum(1.0, step.astype(jnp.float32) / warmup)


def site_loss(logits: jax.Array, site: jax.Array, valid: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of `logits` [B, S] against `site` [B] over `valid` rows (& site ≥ 0), with accuracy and
    the majority-site chance level of those rows (all 0 when no row counts)."""
    logits = logits.astype(jnp.float32)
    keep = valid & (site >= 0)
    target = jnp.maximum(site, 0)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], axis=1)[:, 0]
    n = jnp.maximum(jnp.sum(keep, dtype=jnp.float32), 1.0)
    loss = jnp.sum(jnp.where(keep, nll, 0.0)) / n
    acc = jnp.sum(keep & (jnp.argmax(logits, axis=1) == site), dtype=jnp.float32) / n
    counts = jnp.sum(keep[:, None] & (target[:, None] == jnp.arange(logits.shape[1])[None, :]), axis=0)
    diag = {"site_adv/loss": loss, "site_adv/acc": acc, "site_adv/chance": jnp.max(counts) / n}
    return loss, jax.lax.stop_gradient(diag)
