"""Held-out evaluation during pretraining: cross-modal retrieval recall@k and RankMe.

The run's validation cases (never trained on, first `data.eval_max_cases` by id; never the probes' held-out
cases, so choosing a checkpoint or a recipe on these curves cannot leak into the probes) are embedded with the
current weights in eval mode. Each slide is represented by a fixed sample of `loader.tiles_per_slide` tiles
(seeded per case, unshuffled), the same at every evaluation, so curves are comparable across steps
(all tiles would need a per-bag-size compile; the embed command does that).
Rows of one case are averaged (then re-normalised) into one case embedding per modality.

Retrieval for a pair (a, b): among cases with both modalities, query each case's a-embedding
against every b-embedding by cosine similarity; recall@k = fraction whose own case ranks in the
top k (ties count against: `mmfm.metrics`, the probes' definition). Reported both ways,
`recall@k/a->b` and `recall@k/b->a`, next to the
chance level k / n. RankMe (Garrido et al. 2023) = exp(entropy of the normalised singular values)
of the case embeddings of each modality: a collapse detector (TANGLE selects checkpoints by it).

With `data.eval_robustness_label` (a cases.csv column of the biology, e.g. subtype) each modality's case embeddings
also get PathoROB's robustness index against cases.csv `site` — `robustness_index@k/<modality>`, does a validation
case's neighbourhood share its biology rather than its hospital (mmfm/eval/probes/robustness.py) — beside the same
cases' random-ranking (`chance_…`) and site-only (`site_only_…`) references, which move with the validation subset,
not with the weights. `train.best_metric: robustness_index@10/slide` then chooses the checkpoint by it: on
validation cases only, so the probes' RI on the held-out cases stays an unbiased read-out.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

import pandas as pd

from mmfm.metrics import KS, paired_recall, robustness_scores
from mmfm.objectives import resolve_pairs
from mmfm.objectives.diagnostics import rankme
from mmfm.train.sharding import batch_sharding, global_batch, replicated

def case_embeddings(rows: dict[str, np.ndarray], present: dict[str, np.ndarray],
                    case_index: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """Average the rows of each case (per modality, present rows only), L2-normalised."""
    out = {}
    for m, z in rows.items():
        keep = present[m] & (case_index >= 0)
        by_case: dict[int, list] = {}
        for c, v in zip(case_index[keep], z[keep]):
            by_case.setdefault(int(c), []).append(v)
        out[m] = {c: (lambda v: v / max(np.linalg.norm(v), 1e-12))(np.mean(vs, 0)) for c, vs in by_case.items()}
    return out


_RANKME = jax.jit(rankme)


def _rankme(z: np.ndarray) -> float:
    """RankMe of the case embeddings, rows zero-padded to a power of two (masked out, the singular values are
    unchanged): one compile serves every modality and evaluation, where eager ops compiled ~10 kernels each."""
    size = 1 << (len(z) - 1).bit_length()
    padded = np.zeros((size, z.shape[1]), np.float32)
    padded[:len(z)] = z
    return float(_RANKME(padded, np.arange(size) < len(z)))


def retrieval_metrics(cases: dict[str, dict[int, np.ndarray]], pairs, ks=KS) -> dict[str, float]:
    out = {}
    for m, d in cases.items():
        if len(d) >= 2:
            z = np.stack(list(d.values()))
            out[f"rankme/{m}"] = _rankme(z)
            out[f"n_cases/{m}"] = len(d)
    for a, b in pairs:
        common = sorted(set(cases.get(a, {})) & set(cases.get(b, {})))
        if len(common) < 2:
            continue
        za = np.stack([cases[a][c] for c in common])
        zb = np.stack([cases[b][c] for c in common])
        for q, g, name in ((za, zb, f"{a}->{b}"), (zb, za, f"{b}->{a}")):
            for k, r in paired_recall(q, g, ks).items():
                out[f"recall@{k}/{name}"] = r
        for k in ks:
            out[f"chance@{k}/{a}-{b}"] = min(1.0, k / len(common))
        out[f"n_cases/{a}-{b}"] = len(common)
    return out


def robustness_metrics(cases: dict[str, dict[int, np.ndarray]], bio: pd.Series, site: pd.Series,
                       ks=KS) -> dict[str, float]:
    """RI@k per modality (and its chance / site-only references) over the cases whose biology and site are known;
    `bio` and `site` are indexed by case index (row of Cohort.cases)."""
    out = {}
    for m, d in cases.items():
        idx = [c for c in sorted(d) if pd.notna(bio.iloc[c]) and pd.notna(site.iloc[c])]
        if len(idx) < 2:
            continue
        z = np.stack([d[c] for c in idx])
        b, s = bio.iloc[idx].astype(str).to_numpy(), site.iloc[idx].astype(str).to_numpy()
        out.update({f"{k}/{m}": v for k, v in robustness_scores(z, b, s, ks).items()})
        out[f"n_robustness_cases/{m}"] = len(idx)
    return out


def eval_batch_size(n_cases: int, batch_size: int, n_devices: int) -> int:
    """Largest batch ≤ batch_size and ≤ n_cases that splits evenly over the devices (0: too few cases)."""
    return (min(batch_size, n_cases) // n_devices) * n_devices


class HeldOutEvaluator:
    """Callable `(state) -> metrics dict` over a fixed subset of held-out cases.

    The loader drops an epoch's partial batch, so the held-out cases are covered by chunks of
    `eval_batch_size` cases, the last chunk overlapping the one before; a case seen twice gets the
    same tiles (the sampling RNG is seeded per case), so its average is unchanged.
    """

    def __init__(self, cohort, cfg, heldout_ids, train_loader, ts, mesh, modalities):
        from mmfm.data.loader import TileBagLoader, case_presence

        ids = sorted(heldout_ids)
        present = case_presence(cohort, ids, modalities)  # the loader skips cases with none of them
        ids = [c for i, c in enumerate(ids) if any(p[i] for p in present.values())][: cfg.data.eval_max_cases]
        self.batch_size = eval_batch_size(len(ids), cfg.loader.batch_size, mesh.size)
        if self.batch_size == 0:
            raise ValueError(f"data.val_fraction: {len(ids)} validation cases cannot fill one batch on "
                             f"{mesh.size} devices; raise it or set train.eval_every=0")
        lcfg = dataclasses.replace(cfg.loader, batch_size=self.batch_size, shuffle=False, seed=cfg.train.seed,
                                   workers=0, prefetch=0, site_balance=False, site_augment=0.0)  # training only
        starts = list(range(0, len(ids) - self.batch_size + 1, self.batch_size))
        if starts[-1] + self.batch_size < len(ids):
            starts.append(len(ids) - self.batch_size)
        self.loaders = [TileBagLoader(cohort, lcfg, ids[s: s + self.batch_size], modalities,
                                      transforms=train_loader.transforms,
                                      process_index=jax.process_index(), process_count=jax.process_count())
                        for s in starts]
        self.pairs = resolve_pairs(cfg.objective.pairs, modalities)
        self.bio_site = None
        if cfg.data.eval_robustness_label:
            missing = [c for c in (cfg.data.eval_robustness_label, "site") if c not in cohort.cases.columns]
            if missing:
                raise ValueError(f"data.eval_robustness_label: {cohort.root}/cases.csv has no column "
                                 f"{', '.join(map(repr, missing))} (the validation robustness index needs the "
                                 f"biology column and `site`)")
            self.bio_site = (cohort.cases[cfg.data.eval_robustness_label].reset_index(drop=True),
                             cohort.cases["site"].reset_index(drop=True))
        self.mesh = mesh
        graphdef = ts.graphdef

        def embed(state, batch):
            module, _ = nnx.merge(graphdef, state)
            return module.model(batch, deterministic=True)

        self.embed = jax.jit(embed, in_shardings=(ts.shardings, batch_sharding(mesh)),
                             out_shardings=replicated(mesh))

    def __call__(self, state) -> dict[str, float]:
        cases = self.case_embeddings(state)
        out = retrieval_metrics(cases, self.pairs)
        if self.bio_site is not None:
            out.update(robustness_metrics(cases, *self.bio_site))
        return out

    def case_embeddings(self, state) -> dict[str, dict[int, np.ndarray]]:
        """modality → case index → the validation case's L2-normalised embedding under the current weights."""
        bsh = batch_sharding(self.mesh)
        rows, present, cidx = {}, {}, []
        for loader in self.loaders:
            batch = global_batch(loader.batch(0), bsh)
            emb = self.embed(state, batch)
            g = {k: np.asarray(multihost_utils.process_allgather(batch[k], tiled=True))
                 for k in ["case_index"] + [f"{m}/present" for m in emb]}
            cidx.append(g["case_index"])
            for m, z in emb.items():
                rows.setdefault(m, []).append(np.asarray(jax.device_get(z), np.float32))
                present.setdefault(m, []).append(g[f"{m}/present"])
        return case_embeddings({m: np.concatenate(v) for m, v in rows.items()},
                               {m: np.concatenate(v) for m, v in present.items()}, np.concatenate(cidx))

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()
