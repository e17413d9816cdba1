"""Supervised losses of the `mil` probes: class-weighted cross-entropy, the discrete-time survival NLL and the Cox
partial likelihood. Every loss takes a `valid` mask over its rows, so padded batch slots count for nothing.

- Cross-entropy weighted per class as torch's `CrossEntropyLoss(weight=w)` with mean reduction
  (Σ w_y·ℓ / Σ w_y), w = sklearn `compute_class_weight('balanced')` of the training fold (Patho-Bench).
- Discrete-time NLL (Zadeh & Schmid 2020; Patch-GCN / Patho-Bench `NLLSurvLoss`): hazards h = σ(logits) over time
  bins, S_k = Π_{j≤k}(1 − h_j), S_{-1} = 1. An event in bin y costs −(log S_{y−1} + log h_y), a censoring in bin y
  costs −log S_y; loss = mean(uncensored + (1 − α)·censored), α = 0 as Patho-Bench. Computed with log-sigmoids
  (no clamp needed; equal to the reference's eps-1e-7 clamp wherever that clamp is inactive).
- Cox partial likelihood (Breslow, no tie correction): −Σ_{events i}(r_i − log Σ_{t_j ≥ t_i} exp r_j) / #events
  over the rows of a batch (the risk set is the batch, as in DeepSurv-style minibatch training).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """sklearn's 'balanced' class weights n / (K · count_k); a class absent from `y` gets weight 0."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return w.astype(np.float32)


def weighted_ce(logits: jax.Array, y: jax.Array, weights: jax.Array, valid: jax.Array) -> jax.Array:
    """Class-weighted mean cross-entropy over valid rows: logits [B, K], y [B] int, weights [K], valid [B]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    w = weights[y] * valid
    return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1e-12)


def survival_nll(logits: jax.Array, bins: jax.Array, event: jax.Array, valid: jax.Array,
                 alpha: float = 0.0) -> jax.Array:
    """Discrete-time survival NLL over valid rows: logits [B, n_bins], bins [B] int, event [B] 0/1."""
    logits = logits.astype(jnp.float32)
    log_h = jax.nn.log_sigmoid(logits)
    log_s = jnp.cumsum(jax.nn.log_sigmoid(-logits), axis=-1)  # log S_k
    log_s_pad = jnp.concatenate([jnp.zeros_like(log_s[:, :1]), log_s], axis=-1)  # log S_{k-1}, k = 0..n
    take = lambda a, i: jnp.take_along_axis(a, i[:, None], axis=-1)[:, 0]  # noqa: E731
    event = event.astype(jnp.float32)
    uncensored = -event * (take(log_s_pad, bins) + take(log_h, bins))
    censored = -(1.0 - event) * take(log_s_pad, bins + 1)
    loss = uncensored + (1.0 - alpha) * censored
    return jnp.sum(loss * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def survival_risk(logits) -> np.ndarray:
    """Risk from discrete hazards: −Σ_k S_k (Patch-GCN), higher = earlier event."""
    s = np.cumprod(1.0 - 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64))), axis=-1)
    return -s.sum(-1)


def cox_nll(risk: jax.Array, time: jax.Array, event: jax.Array, valid: jax.Array) -> jax.Array:
    """Negative Cox partial log-likelihood (Breslow) over the valid rows of a batch: risk [B], time [B], event [B]."""
    risk = risk.astype(jnp.float32)
    at_risk = (time[None, :] >= time[:, None]) & (valid[None, :] > 0)  # [i, j]: j in the risk set of i
    log_den = jax.nn.logsumexp(jnp.where(at_risk, risk[None, :], -jnp.inf), axis=1)
    ev = event.astype(jnp.float32) * valid
    return -jnp.sum(ev * (risk - jnp.where(ev > 0, log_den, 0.0))) / jnp.maximum(jnp.sum(ev), 1.0)


def time_bins(time: np.ndarray, event: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges (n_bins − 1) at the quantiles of the uncensored times (Patch-GCN); all times if none."""
    t = np.asarray(time, float)[np.asarray(event, bool)]
    t = t if t.size else np.asarray(time, float)
    return np.unique(np.quantile(t, np.linspace(0, 1, n_bins + 1)[1:-1]))


def assign_bins(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each time given inner edges (outer edges are open: −∞ and +∞, i.e. widened to any data)."""
    return np.searchsorted(edges, np.asarray(time, float), side="right").astype(np.int32)
