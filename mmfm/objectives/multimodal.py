"""The multimodal contrastive objective: every configured pair of modalities, masked, multi-positive.

Definitions (the trainer, the tests and the paper methods section all rely on these):

* Rows. Row i is valid for modality m when `present[m][i]` and `case_index[i] >= 0` (padding
  rows are never valid). Two rows are positives iff they share `case_index`, so several slides of
  one case are all positives for that case's RNA, across devices too.
* Pair (a, b). Logits z_ij = exp(t′_ab)·⟨x^a_i, x^b_j⟩ + b_ab in float32 for every valid a-row i and
  valid b-row j. SigLIP: L_ab = Σ_{valid i,j} −log σ(y_ij z_ij) / N_ab, where N_ab
  (`valid_rows/<a>-<b>`) is the number of valid a-rows that have at least one valid b-row: SigLIP's
  "sum over columns, mean over rows" with absent rows removed. InfoNCE (b_ab = 0, exp(t′) = 1/τ):
  L_ab = ½(L_a→b + L_b→a), each the mean over anchors with ≥1 valid positive of
  logsumexp_j z_ij − mean_{j positive} z_ij; here N_ab counts those a-side anchors. A pair without
  valid rows contributes exactly 0 (and a zero, finite gradient).
* Total. loss = Σ_pairs w_ab · L_ab (a weighted SUM; weights default to 1, set them to 1/n_pairs
  for a mean).
* Site-conditional contrast (`same_site_weight` w_s, `other_site_weight` w_o; needs `site` [B], −1 = unknown).
  A negative pair (i, j) (different cases) whose rows both have a known site enters with weight c_ij = w_s if
  site_i = site_j, w_o otherwise; every other pair (positives — same case, hence same site — and pairs with an
  unknown site) weighs 1: SigLIP L_ab = Σ_{valid i,j} c_ij · (−log σ(y_ij z_ij)) / N_ab. A weight 0 masks those
  pairs out entirely (they leave the valid set, so an anchor left with no valid column leaves N_ab and the logit
  statistics); InfoNCE takes weights 0 or 1 only (its softmax then runs over the kept columns). Two readings,
  which the site-robustness comparison tests: other-site negatives can be told apart by the hospital alone,
  so w_o < 1 (or w_s > 1) conditions the contrast on site (negatives drawn within the confounder's level,
  Ma et al. 2021, "conditional contrastive learning"); same-site cases often share biology in a confounded
  cohort, so w_s = 0 removes those likely false negatives. w_s = w_o = 1 is plain contrast (bit-identical).

Implementations (`ObjectiveConfig.impl`): 'global' computes the full logit matrices (under jit with
batch-sharded inputs XLA inserts the gathers); 'gather' and 'ring' run the same arithmetic inside
`jax.shard_map` over the mesh axes the batch rows are split over (see `sharded.py`). All three give
the same loss and gradients. The objective names no mesh axis itself: the trainer jits its step with
explicit in/out shardings (no mesh context) and passes its mesh and `axis=sharding.BATCH_AXES`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mmfm import MODALITIES
from mmfm.objectives import diagnostics, infonce, sharded, siglip

KINDS = {"siglip": siglip, "infonce": infonce}


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Contrastive objective settings. `pairs` is 'all' or a list of [a, b] (a = anchor side);
    `pair_weights` maps 'a-b' → weight (missing pairs weigh 1)."""

    kind: Literal["siglip", "infonce"] = "siglip"
    pairs: Literal["all"] | tuple[tuple[str, str], ...] = "all"
    pair_weights: dict[str, float] | tuple[tuple[str, float], ...] = ()  # stored as sorted pairs (hashable)
    shared_logit_params: bool = False
    init_log_t: float = math.log(10.0)
    init_b: float = -10.0
    infonce_tau: float = 0.07
    learn_tau: bool = False
    impl: Literal["global", "gather", "ring"] = "global"
    same_site_weight: float = 1.0      # weight of same-site negative pairs (0 = masked, 1 = plain; see above)
    other_site_weight: float = 1.0     # weight of negative pairs from two different known sites (0 = masked)
    site_adversary: float = 0.0        # λ of the gradient-reversed site head on the slide embedding (0 = off)
    site_adversary_warmup: int = 0     # λ ramps linearly from 0 over this many optimizer steps (0 = constant)
    site_adversary_hidden: int = 128   # site head MLP width (0 = a linear head)

    def __post_init__(self):
        for key in ("same_site_weight", "other_site_weight"):
            w = getattr(self, key)
            if w < 0:
                raise ValueError(f"objective.{key} must be ≥ 0, got {w}")
            if self.kind == "infonce" and w not in (0.0, 1.0):
                raise ValueError(f"objective.{key}={w}: InfoNCE takes only 0 (masked) or 1; re-weighting is "
                                 f"SigLIP's (kind: siglip)")
        if self.site_adversary < 0 or self.site_adversary_warmup < 0 or self.site_adversary_hidden < 0:
            raise ValueError("objective.site_adversary, site_adversary_warmup and site_adversary_hidden must be ≥ 0")
        if self.kind not in KINDS:
            raise ValueError(f"objective.kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if self.impl not in sharded.SWEEPS:
            raise ValueError(f"objective.impl must be one of {sorted(sharded.SWEEPS)}, got {self.impl!r}")
        if self.infonce_tau <= 0:
            raise ValueError(f"objective.infonce_tau must be > 0, got {self.infonce_tau}")
        # Normalise YAML-style lists/dicts to tuples so the config stays hashable (usable as a jit static).
        if self.pairs != "all":
            if isinstance(self.pairs, str) or not all(len(p) == 2 for p in self.pairs):
                raise ValueError(f"objective.pairs must be 'all' or a list of [a, b], got {self.pairs!r}")
            object.__setattr__(self, "pairs", tuple((str(a), str(b)) for a, b in self.pairs))
        weights = self.pair_weights.items() if isinstance(self.pair_weights, Mapping) else self.pair_weights
        object.__setattr__(self, "pair_weights", tuple((str(k), float(w)) for k, w in weights))


def pair_name(a: str, b: str) -> str:
    return f"{a}-{b}"


def resolve_pairs(pairs: str | Sequence, modalities: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The ordered pairs the objective trains: all pairs among `modalities`, or the configured list."""
    known = [m for m in MODALITIES if m in modalities] + [m for m in modalities if m not in MODALITIES]
    if pairs == "all":
        return tuple(itertools.combinations(known, 2))
    out = []
    for a, b in pairs:
        if a not in known or b not in known:
            raise ValueError(f"objective.pairs: pair [{a}, {b}] names a modality not in {known}")
        if a == b or (a, b) in out or (b, a) in out:
            raise ValueError(f"objective.pairs: pair [{a}, {b}] is a self-pair or a duplicate")
        out.append((a, b))
    return tuple(out)


class LogitParams(nnx.Module):
    """Learnable logit scale t′ (used as exp t′) and bias b, one per pair or one shared by all.

    SigLIP: t′ = init_log_t (log 10), b = init_b (−10), both `nnx.Param`. InfoNCE: t′ = log(1/τ),
    an `nnx.Param` if `learn_tau` else a plain `nnx.Variable` (saved, not trained); no bias.
    Scalars per pair, replicated on every device. Initialisation is deterministic; `rngs` is taken
    for the uniform module signature.
    """

    def __init__(self, cfg: ObjectiveConfig, modalities: Sequence[str], *, rngs: nnx.Rngs):
        del rngs
        self.pairs = resolve_pairs(cfg.pairs, modalities)
        if not self.pairs:
            raise ValueError(f"objective: no pair of modalities to contrast among {list(modalities)}")
        names = {pair_name(a, b) for a, b in self.pairs}
        unknown = [k for k, _ in cfg.pair_weights if k not in names]
        if unknown:
            raise ValueError(f"objective.pair_weights: unknown pairs {unknown}; pairs are {sorted(names)}")
        self.shared = cfg.shared_logit_params
        n = 1 if self.shared else len(self.pairs)
        if cfg.kind == "siglip":
            self.log_t = nnx.Param(jnp.full((n,), cfg.init_log_t, jnp.float32))
            self.bias = nnx.Param(jnp.full((n,), cfg.init_b, jnp.float32))
        else:
            kind = nnx.Param if cfg.learn_tau else nnx.Variable
            self.log_t = kind(jnp.full((n,), -math.log(cfg.infonce_tau), jnp.float32))
            self.bias = None

    def slot(self, pair: tuple[str, str]) -> int:
        return 0 if self.shared else self.pairs.index(pair)

    def values(self) -> tuple[jax.Array, jax.Array]:
        """(t′, b) arrays of shape [n_slots]; b is zeros for InfoNCE."""
        log_t = self.log_t[...]
        return log_t, (jnp.zeros_like(log_t) if self.bias is None else self.bias[...])


def _pair_loss(kind, sweep, axis, xa, xb, ci, va, vb, scale, bias, site, site_weights):
    """Loss, anchor count and logit statistics of one pair on this device's (or the global) rows."""

    def direction(x, vx, y, vy):
        def block(y, cj, vj, sj):
            logits = sharded.pair_logits(x, y, scale, bias)
            pos = ci[:, None] == cj[None, :]
            valid = vx[:, None] & vj[None, :]
            if site_weights != (1.0, 1.0):
                known_neg = ~pos & (site[:, None] >= 0) & (sj[None, :] >= 0)
                same = site[:, None] == sj[None, :]
                c = jnp.where(known_neg, jnp.where(same, site_weights[0], site_weights[1]), 1.0)
                valid = valid & (c > 0)
            if set(site_weights) - {0.0, 1.0}:  # weights other than masks (SigLIP only)
                rows = kind.rows(logits, pos, valid, c)
            else:
                rows = kind.rows(logits, pos, valid)
            return rows, diagnostics.logit_stats(logits, pos, valid)

        def merge(a, b):
            return kind.merge(a[0], b[0]), diagnostics.merge_stats(a[1], b[1])

        acc, stats = sweep(block, merge, (y, ci, vy, site), axis)
        loss_rows, anchor = kind.row_loss(acc)
        total = sharded.psum(jnp.sum(jnp.where(anchor, loss_rows, 0.0)), axis)
        n = sharded.psum(jnp.sum(anchor, dtype=jnp.float32), axis)
        return total / jnp.maximum(n, 1.0), n, stats

    loss, n, stats = direction(xa, va, xb, vb)
    if kind.DIRECTIONS == 2:
        loss = 0.5 * (loss + direction(xb, vb, xa, va)[0])
    return loss, n, diagnostics.finalize_stats(stats, axis)


def _objective(emb, present, case_index, site, log_t, bias, *, pairs, slots, weights, kind, sweep, axis,
               site_weights):
    valid = {m: present[m] & (case_index >= 0) for m in emb}
    loss = jnp.zeros((), jnp.float32)
    diag = {}
    for (a, b), s, w in zip(pairs, slots, weights):
        name = pair_name(a, b)
        scale = jnp.exp(log_t[s])
        pl, n, stats = _pair_loss(kind, sweep, axis, emb[a], emb[b], case_index, valid[a], valid[b],
                                  scale, bias[s], site, site_weights)
        loss = loss + w * pl
        diag[f"loss/{name}"] = pl
        diag[f"valid_rows/{name}"] = n
        diag[f"t/{name}"] = scale
        if kind is siglip:
            diag[f"b/{name}"] = bias[s]
        diag.update({f"logits/{name}/{k}": v for k, v in stats.items()})
    return loss, {k: jax.lax.stop_gradient(v) for k, v in diag.items()}


def multimodal_loss(emb: Mapping[str, jax.Array], present: Mapping[str, jax.Array], case_index: jax.Array,
                    logit_params: LogitParams, cfg: ObjectiveConfig, *, axis: sharded.Axis,
                    mesh: jax.sharding.Mesh | None = None, norms: Mapping[str, jax.Array] | None = None,
                    site: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum over pairs of masked, multi-positive contrastive losses (see module docstring).

    emb: modality → [B, E] L2-normalised embeddings (any float dtype; the loss runs in float32).
    present: modality → [B] bool. case_index: [B] int32, −1 = padding row.
    norms: optional modality → [B] embedding norms before L2 normalisation, for `norm/<m>`.
    axis: the mesh axis name(s) the batch rows are split over — required, no default: the caller
    owns the mesh (the trainer passes `mmfm.train.sharding.BATCH_AXES`). None: rows are not split
    (one device, or the 'global' impl). For 'ring'/'gather', B must divide by the axes' size.
    mesh: the mesh for 'ring'/'gather' (the trainer passes its own; default: the one set by
    `jax.set_mesh`; with neither, the global computation runs). Ignored for 'global'.
    site: [B] int32 site ids (−1 = unknown), required when a site weight of `cfg` is ≠ 1, unused otherwise.
    Returns (scalar float32 loss, flat dict of float32 scalar diagnostics).
    """
    missing = [m for m in emb if m not in present]
    if missing:
        raise KeyError(f"objective: no presence mask for modalities {missing} (batch key '<m>/present')")
    for m, x in emb.items():
        if x.ndim != 2 or x.shape[0] != case_index.shape[0]:
            raise ValueError(f"objective: emb[{m!r}] has shape {x.shape}, expected [{case_index.shape[0]}, E]")
    pairs = tuple(p for p in logit_params.pairs if p[0] in emb and p[1] in emb)
    if not pairs:
        raise ValueError(f"objective: none of the pairs {logit_params.pairs} has both modalities in {list(emb)}")
    weight_of = dict(cfg.pair_weights)
    # float32 whatever the compute dtype (bf16 → fp32); float64 stays float64 (finite-difference tests).
    emb = {m: x.astype(jnp.promote_types(x.dtype, jnp.float32)) for m, x in emb.items()}
    present = {m: jnp.asarray(present[m], bool) for m in emb}
    case_index = jnp.asarray(case_index, jnp.int32)
    site_weights = (float(cfg.same_site_weight), float(cfg.other_site_weight))
    if site is None and site_weights != (1.0, 1.0):
        raise ValueError(f"objective.same_site_weight/other_site_weight = {site_weights} need the rows' sites "
                         f"(batch key 'site_index')")
    site = jnp.full_like(case_index, -1) if site is None else jnp.asarray(site, jnp.int32)
    log_t, bias = logit_params.values()

    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    impl = "global" if mesh.empty else cfg.impl  # no mesh = one device, where every impl is the global one
    fn = partial(_objective, pairs=pairs, slots=tuple(logit_params.slot(p) for p in pairs),
                 weights=tuple(weight_of.get(pair_name(*p), 1.0) for p in pairs),
                 kind=KINDS[cfg.kind], sweep=sharded.SWEEPS[impl], site_weights=site_weights)
    if impl == "global":
        loss, diag = fn(emb, present, case_index, site, log_t, bias, axis=None)
    else:
        if axis is None:
            raise ValueError(f"objective.impl={cfg.impl!r} on a mesh needs the batch's mesh axes (axis=...), "
                             f"got axis=None")
        names = axis if isinstance(axis, tuple) else (axis,)
        size = math.prod(mesh.shape[n] for n in names)
        if case_index.shape[0] % size:
            raise ValueError(f"objective: batch {case_index.shape[0]} does not divide over axis {axis} "
                             f"of size {size}")
        rows = P(axis)
        loss, diag = jax.shard_map(partial(fn, axis=axis), mesh=mesh,
                                   in_specs=(rows, rows, rows, rows, P(), P()), out_specs=(P(), P()))(
            emb, present, case_index, site, log_t, bias)

    for m in sorted({m for p in pairs for m in p}):
        rows_m = present[m] & (case_index >= 0)
        diag[f"norm/{m}"] = diagnostics.mean_norm(norms[m] if norms and m in norms else emb[m], rows_m)
        diag[f"rankme/{m}"] = diagnostics.rankme(emb[m], rows_m)
    return loss, diag
