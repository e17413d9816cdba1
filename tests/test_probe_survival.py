"""Survival probe on real packaged cohorts: the reported C-index is exactly sksurv's and lifelines' on the same
risks."""

import numpy as np
import pytest
from lifelines.datasets import load_lung
from lifelines.utils import concordance_index
from sksurv.datasets import load_breast_cancer
from sksurv.metrics import concordance_index_censored

from mmfm.eval.probes import survival


def _gse7390():
    """GSE7390 (TRANSBIG): 76 Affymetrix probes → time to distant metastasis (days)."""
    x, y = load_breast_cancer()
    probes = x[[c for c in x.columns if c.startswith("X")]].to_numpy(float)
    return probes, survival.surv(y["e.tdm"], y["t.tdm"])


def _lung():
    """NCCTG lung (lifelines), NaN rows dropped; `inst` is the real institution."""
    d = load_lung().dropna()
    x = d[["age", "sex", "ph.ecog", "ph.karno", "pat.karno", "meal.cal", "wt.loss"]].to_numpy(float)
    x = (x - x.mean(0)) / x.std(0)
    return x, survival.surv(d.status == 1, d.time)


def _split(n, seed=0, frac=0.65):
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: int(frac * n)], perm[int(frac * n):]


@pytest.mark.parametrize("data", [_gse7390, _lung], ids=["gse7390", "lung"])
@pytest.mark.parametrize("model", survival.MODELS)
def test_c_index_equals_sksurv_and_lifelines_on_real_data(data, model):
    x, y = data()
    tr, te = _split(len(x))
    risk, risk_train, alpha = survival.fit_risk(model, x[tr], y[tr], x[te], alphas=(0.07,))
    assert alpha == 0.07 and risk_train.shape == (len(tr),)
    m = survival.metrics(y[tr], y[te], risk)
    ref_sksurv = concordance_index_censored(y["event"][te], y["time"][te], risk)[0]
    ref_lifelines = concordance_index(y["time"][te], -risk, y["event"][te])
    assert m["c_index"] == pytest.approx(ref_sksurv, abs=1e-6)
    assert m["c_index"] == pytest.approx(ref_lifelines, abs=1e-6)
    assert 0.5 < m["c_index"] < 0.9  # the probe learns something on held-out patients
    assert 0.0 <= m["uno_c"] <= 1.0 and 0.0 <= m["td_auc"] <= 1.0


def test_risk_sign_follows_sksurv_convention():
    x, y = _gse7390()
    tr, te = _split(len(x))
    risk, _, _ = survival.fit_risk("coxnet", x[tr], y[tr], x[te], alphas=(0.02,))
    assert survival.harrell_c(y["event"][te], y["time"][te], -risk) == pytest.approx(
        1 - survival.harrell_c(y["event"][te], y["time"][te], risk), abs=1e-9)  # no tied risks here


def test_uno_equals_harrell_without_censoring():
    """With no censoring every IPCW weight is 1, so Uno's C reduces to Harrell's C (an independent identity)."""
    x, y = _lung()
    x, y = x[y["event"]], y[y["event"]]
    tr, te = _split(len(x), seed=1)
    risk, _, _ = survival.fit_risk("coxph", x[tr], y[tr], x[te], alphas=(0.07,))
    m = survival.metrics(y[tr], y[te], risk, tau=float(y["time"][te].max()) + 1.0)
    assert np.isclose(m["uno_c"], m["c_index"], atol=1e-9)


def _uno_c_numpy(y_train, y_test, risk, tau):
    """Uno et al. (2011) C with censoring: Σ δ_i Ĝ(T_i)^-2 1[T_i < T_j, T_i < τ] 1[r_i > r_j] / Σ δ_i Ĝ(T_i)^-2
    1[T_i < T_j, T_i < τ], ties in risk count ½. Ĝ = Kaplan–Meier of the TRAINING censoring times, right-continuous,
    events leaving the risk set before censorings at the same time; a censored j tied with event i is comparable."""
    tt, et = y_train["time"], y_train["event"]
    times = np.unique(tt)
    at_risk = np.array([(tt >= u).sum() - ((tt == u) & et).sum() for u in times])
    censored = np.array([((tt == u) & ~et).sum() for u in times])
    g = np.cumprod(1.0 - np.divide(censored, at_risk, out=np.zeros(len(times)), where=at_risk > 0))
    t, e = y_test["time"], y_test["event"]
    num = den = 0.0
    for i in range(len(t)):
        if not e[i] or t[i] >= tau:
            continue
        k = np.searchsorted(times, t[i], side="right") - 1
        w = 1.0 / (g[k] if k >= 0 else 1.0) ** 2
        for j in range(len(t)):
            if t[j] > t[i] or (t[j] == t[i] and not e[j]):
                den += w
                num += w * (1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0)
    return num / den


@pytest.mark.parametrize("data", [_gse7390, _lung], ids=["gse7390", "lung"])
def test_uno_c_with_censoring_equals_ipcw_written_out(data):
    """Real censored cohorts (GSE7390: 74% censored; lung: 28%): Uno's C equals the IPCW sum written in NumPy,
    and the weights matter (it differs from Harrell's C on the same risks)."""
    x, y = data()
    tr, te = _split(len(x), seed=4)
    risk, _, _ = survival.fit_risk("coxph", x[tr], y[tr], x[te], alphas=(0.07,))
    assert (~y["event"][te]).mean() > 0.2
    tau = survival.default_tau(y["time"][tr])
    m = survival.metrics(y[tr], y[te], risk)
    assert m["uno_c"] == pytest.approx(_uno_c_numpy(y[tr], y[te], risk, tau), abs=1e-9)
    assert abs(m["uno_c"] - m["c_index"]) > 1e-3


def test_alpha_grid_is_chosen_on_training_fold_only():
    """Inner-CV choice must not depend on test data: identical train, different test → same alpha."""
    x, y = _gse7390()
    tr, te = _split(len(x))
    _, _, a1 = survival.fit_risk("coxnet", x[tr], y[tr], x[te], alphas=survival.ALPHAS)
    _, _, a2 = survival.fit_risk("coxnet", x[tr], y[tr], x[te][::-1] * 3.0, alphas=survival.ALPHAS)
    assert a1 == a2 and a1 in survival.ALPHAS


def test_logrank_p_matches_lifelines():
    from lifelines.statistics import logrank_test

    x, y = _lung()
    high = x[:, 2] > 0  # ph.ecog above average: a real prognostic split
    p = survival.logrank_p(y, high)
    ref = logrank_test(y["time"][high], y["time"][~high], y["event"][high], y["event"][~high]).p_value
    assert p == pytest.approx(ref, rel=1e-6)
    assert p < 0.05
    assert np.isnan(survival.logrank_p(y, np.ones(len(y), bool)))


def test_td_auc_at_horizon_equals_roc_auc_without_censoring():
    """Uncensored: cumulative/dynamic AUC at h is the ROC AUC of risk for 'event by h' vs 'alive after h'."""
    from sklearn.metrics import roc_auc_score

    x, y = _lung()
    x, y = x[y["event"]], y[y["event"]]
    tr, te = _split(len(x), seed=2)
    risk, _, _ = survival.fit_risk("coxnet", x[tr], y[tr], x[te], alphas=(0.07,))
    h = float(np.median(y["time"][te]))
    m = survival.metrics(y[tr], y[te], risk, horizons=(h, 1e6))
    assert m[f"td_auc@{h:g}"] == pytest.approx(roc_auc_score(y["time"][te] <= h, risk), abs=1e-9)
    assert np.isnan(m["td_auc@1e+06"])  # beyond follow-up: undefined, not extrapolated


def test_alpha_select_each_reports_every_alpha_like_patho_bench(tmp_path):
    import anndata as ad
    import pandas as pd

    from mmfm.eval.probe import probe

    x, y = _lung()
    a = ad.AnnData(obs=pd.DataFrame({"t": y["time"], "e": y["event"].astype(int)},
                                    index=[f"p{i}" for i in range(len(y))]), obsm={"clin": x})
    task = {"name": "os", "type": "survival", "time": "t", "event": "e", "embeddings": ["clin"], "models": ["coxnet"],
            "alphas": [0.01, 0.07], "alpha_select": "each", "folds": 3}
    r = probe(a, [task], tmp_path, plots=False).results
    assert set(r.model) == {"coxnet alpha=0.01", "coxnet alpha=0.07"}
    fixed = probe(a, [dict(task, alphas=[0.07], alpha_select="inner_cv")], tmp_path / "fixed", plots=False).results
    c_each = r[(r.model == "coxnet alpha=0.07") & (r.metric == "c_index")].value.to_numpy()
    np.testing.assert_allclose(c_each, fixed[fixed.metric == "c_index"].value.to_numpy())
