"""`survival`: linear Cox probes (CoxNet, CoxPH) per embedding × model × fold; folds stratified on Patho-Bench's
time-quartile × event code. Pooled test risks (split at each fold's median training risk) feed the
Kaplan–Meier plot and the log-rank p."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from mmfm.data.splits import survival_strata
from mmfm.eval.probes import survival
from mmfm.eval.tasks.base import (Collector, FoldSpec, Target, TaskError, case_features, case_values, fold_sides,
                                  result_key)


@dataclass(frozen=True, kw_only=True)
class SurvivalSpec(FoldSpec):
    time: str  # obs column: survival time (days)
    event: str  # obs column: event (0/1)
    models: tuple[Literal["coxnet", "coxph"], ...] = survival.MODELS
    alphas: tuple[float, ...] = survival.ALPHAS  # one value = fixed; several = inner-CV choice on train
    alpha_select: Literal["inner_cv", "each"] = "inner_cv"  # 'each': one result row per α (Patho-Bench's grid)
    l1_ratio: float = 0.5  # CoxNet elastic-net mix
    tau: float | None = None  # Uno's C truncation (days); default 80th percentile of training time
    horizons: tuple[float, ...] = ()  # time-dependent AUC horizons (days), e.g. [365, 1095, 1825]
    standardize: bool = False  # z-score features with each training fold's mean/SD before the fit (recorded)

    def outcomes(self, adata) -> pd.DataFrame:
        """Cases with a known time and event: columns `time`, `event`."""
        return pd.concat({"time": pd.to_numeric(case_values(adata, self, "time", self.time), errors="coerce"),
                          "event": pd.to_numeric(case_values(adata, self, "event", self.event), errors="coerce")},
                         axis=1).dropna()

    def targets(self, adata, notes):
        df = self.outcomes(adata)
        if df.event.sum() < 2:
            raise TaskError(f"task {self.name!r}: key 'event' column {self.event!r} has {int(df.event.sum())} "
                            f"event(s) among {len(df)} cases; a survival probe needs events")
        return {"": (df.index, survival_strata(df, time="time", event="event"))}


def run(adata, spec: SurvivalSpec, targets: list[Target], col: Collector) -> None:
    (target,) = targets
    df = spec.outcomes(adata)
    if (df.time < 0).any():
        raise TaskError(f"task {spec.name!r}: key 'time' column {spec.time!r} is negative for case "
                        f"{df.index[(df.time < 0).to_numpy()][0]!r}")
    if not df.event.isin([0, 1]).all():
        bad = df[~df.event.isin([0, 1])]
        raise TaskError(f"task {spec.name!r}: key 'event' column {spec.event!r} must be 0/1; case "
                        f"{bad.index[0]!r} has {bad.event.iloc[0]}")
    y_all = survival.surv(df.event.to_numpy(), df.time.to_numpy())
    pos = pd.Series(np.arange(len(df)), index=df.index)
    folds = target.folds
    single = folds.shape[1] == 1
    for emb in spec.probe_embeddings():
        feats = case_features(adata, spec, emb)
        cases = feats.index.intersection(df.index)
        runs = ([(m, spec.alphas) for m in spec.models] if spec.alpha_select == "inner_cv" else
                [(m, (a,)) for m in spec.models for a in spec.alphas])
        for kind, alphas in runs:
            model = kind if spec.alpha_select == "inner_cv" else f"{kind} alpha={alphas[0]:g}"
            pooled = []
            for i, fc in enumerate(folds.columns):
                tr, te = fold_sides(folds, fc, cases)
                ytr, yte = y_all[pos[tr].to_numpy()], y_all[pos[te].to_numpy()]
                key = result_key(spec, emb, model=model)
                if ytr["event"].sum() < 2 or len(te) == 0:
                    col.notes.append(f"{spec.name} {emb} {model} {fc}: skipped (<2 training events or empty test)")
                    continue
                t0 = time.perf_counter()
                try:
                    risk, risk_tr, alpha = survival.fit_risk(kind, feats.loc[tr].to_numpy(), ytr,
                                                             feats.loc[te].to_numpy(), alphas=alphas,
                                                             l1_ratio=spec.l1_ratio, seed=spec.seed,
                                                             standardize=spec.standardize)
                except (ArithmeticError, ValueError) as e:
                    col.notes.append(f"{spec.name} {emb} {model} {fc}: fit failed ({e}); recorded as N/A")
                    col.add(key, i, {m: np.nan for m in survival.METRICS})
                    continue
                col.evaluate(key, i, len(te), lambda idx: survival.metrics(
                    ytr, yte[idx], risk[idx], tau=spec.tau, horizons=spec.horizons), single, spec.seed)
                col.add(key, i, {"alpha": alpha, "n_test": len(te), "n_train": len(tr),
                                 "standardized": float(spec.standardize), "wall_s": time.perf_counter() - t0})
                pooled.append(pd.DataFrame({"case_id": te, "fold": i, "time": yte["time"], "event": yte["event"],
                                            "risk": risk, "high_risk": risk > np.median(risk_tr)}))
            if pooled:
                p = pd.concat(pooled, ignore_index=True)
                col.survival_preds[(spec.name, emb, model)] = p
                col.add(result_key(spec, emb, model=model), "pooled",
                        {"logrank_p": survival.logrank_p(survival.surv(p.event, p.time), p.high_risk.to_numpy())})
