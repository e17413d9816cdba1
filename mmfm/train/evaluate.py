"""Held-out evaluation during pretraining: cross-modal retrieval recall@k and RankMe.

Held-out cases (never trained on) are embedded with the current weights in eval mode. Each
slide is represented by a fixed sample of `loader.tiles_per_slide` tiles: the evaluation loader
is rebuilt with the same seed every time, so every evaluation sees the same tiles and curves are
comparable across steps (all tiles would need a per-bag-size compile; the embed command does that).
Rows of one case are averaged (then re-normalised) into one case embedding per modality.

Retrieval for a pair (a, b): among cases with both modalities, query each case's a-embedding
against every b-embedding by cosine similarity; recall@k = fraction whose own case ranks in the
top k (ties count against). Reported both ways, `recall@k/a->b` and `recall@k/b->a`, next to the
chance level k / n. RankMe (Garrido et al. 2023) = exp(entropy of the normalised singular values)
of the case embeddings of each modality: a collapse detector (TANGLE selects checkpoints by it).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mmfm.objectives import resolve_pairs
from mmfm.train.sharding import batch_sharding, global_batch, replicated

KS = (1, 5, 10)


def recall_at_k(query: np.ndarray, gallery: np.ndarray, ks=KS) -> dict[int, float]:
    """Row i of `query` matches row i of `gallery`; fraction with the match in the top k."""
    sim = query @ gallery.T
    own = np.diag(sim)
    rank = (sim > own[:, None]).sum(1) + ((sim == own[:, None]).sum(1) - 1)  # ties count against
    return {k: float(np.mean(rank < k)) for k in ks}


def rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
    p = s / max(s.sum(), np.finfo(np.float64).tiny) + eps
    return float(np.exp(-(p * np.log(p)).sum()))


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


def retrieval_metrics(cases: dict[str, dict[int, np.ndarray]], pairs, ks=KS) -> dict[str, float]:
    out = {}
    for m, d in cases.items():
        if len(d) >= 2:
            out[f"rankme/{m}"] = rankme(np.stack(list(d.values())))
            out[f"n_cases/{m}"] = len(d)
    for a, b in pairs:
        common = sorted(set(cases.get(a, {})) & set(cases.get(b, {})))
        if len(common) < 2:
            continue
        za = np.stack([cases[a][c] for c in common])
        zb = np.stack([cases[b][c] for c in common])
        for q, g, name in ((za, zb, f"{a}->{b}"), (zb, za, f"{b}->{a}")):
            for k, r in recall_at_k(q, g, ks).items():
                out[f"recall@{k}/{name}"] = r
        for k in ks:
            out[f"chance@{k}/{a}-{b}"] = min(1.0, k / len(common))
        out[f"n_cases/{a}-{b}"] = len(common)
    return out


class HeldOutEvaluator:
    """Callable `(state) -> metrics dict` over a fixed subset of held-out cases."""

    def __init__(self, cohort, cfg, heldout_ids, train_loader, ts, mesh):
        from mmfm.data.loader import TileBagLoader

        self.ids = sorted(heldout_ids)[: cfg.data.eval_max_cases]
        lcfg = dataclasses.replace(cfg.loader, shuffle=False, seed=cfg.train.seed)
        self.make_loader = lambda: TileBagLoader(cohort, lcfg, self.ids, transforms=train_loader.transforms,
                                                 process_index=jax.process_index(),
                                                 process_count=jax.process_count())
        self.n_batches = int(np.ceil(len(self.ids) / lcfg.batch_size))
        self.pairs = resolve_pairs(cfg.objective.pairs, tuple(cfg.loader.modalities))
        self.mesh = mesh
        graphdef = ts.graphdef

        def embed(state, batch):
            module, _ = nnx.merge(graphdef, state)
            return module.model(batch, deterministic=True)

        self.embed = jax.jit(embed, in_shardings=(ts.shardings, batch_sharding(mesh)),
                             out_shardings=replicated(mesh))

    def __call__(self, state) -> dict[str, float]:
        bsh = batch_sharding(self.mesh)
        rows, present, cidx = {}, {}, []
        it = iter(self.make_loader())
        for _ in range(self.n_batches):
            host = next(it)
            batch = global_batch(host, bsh)
            emb = self.embed(state, batch)
            g = {k: np.asarray(multihost_utils.process_allgather(batch[k], tiled=True))
                 for k in ["case_index"] + [f"{m}/present" for m in emb]}
            cidx.append(g["case_index"])
            for m, z in emb.items():
                rows.setdefault(m, []).append(np.asarray(jax.device_get(z), np.float32))
                present.setdefault(m, []).append(g[f"{m}/present"])
        case_index = np.concatenate(cidx)
        cases = case_embeddings({m: np.concatenate(v) for m, v in rows.items()},
                                {m: np.concatenate(v) for m, v in present.items()}, case_index)
        return retrieval_metrics(cases, self.pairs)
