"""ComBat (mmfm.eval.combat) against scanpy's independent implementation, the fit never seeing the test cases, and
`mmfm embed --combat` fitting on the run's pretraining cases only."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from mmfm.eval import combat


def _sites_with_effects(seed=0, n=72, d=6):
    """Site-shifted and site-scaled features: four sites of unequal size."""
    rng = np.random.default_rng(seed)
    site = rng.choice(np.array(["s0", "s1", "s2", "s3"]), size=n, p=[0.4, 0.3, 0.2, 0.1])
    code = pd.factorize(site, sort=True)[0]
    x = rng.normal(size=(n, d)) * (1 + 0.5 * code)[:, None] + rng.normal(size=(4, d))[code] * 2
    return x, site


def _scanpy_combat(x, site):
    a = ad.AnnData(x.copy(), obs=pd.DataFrame({"site": pd.Categorical(site)}, index=[str(i) for i in range(len(x))]))
    return sc.pp.combat(a, key="site", inplace=False)


def test_matches_scanpy_combat_fitted_on_the_same_cases():
    x, site = _sites_with_effects()
    got = combat.fit(x, site).apply(x, site)
    np.testing.assert_allclose(got, _scanpy_combat(x, site), atol=1e-4)  # scanpy stops its iteration at 1e-4
    assert np.abs(got - x).max() > 0.5  # a real correction


def test_fit_never_sees_test_cases_and_applies_each_sites_fitted_map():
    x, site = _sites_with_effects(seed=1)
    train = np.arange(len(x)) % 3 != 0
    f = combat.fit(x[train], site[train])
    y = f.apply(x, site)
    moved = x.copy()
    moved[~train] = np.random.default_rng(9).normal(size=moved[~train].shape) * 50  # any other test cases
    f2 = combat.fit(moved[train], site[train])
    for a, b in zip((f.mean, f.sd, f.gamma, f.delta2), (f2.mean, f2.sd, f2.gamma, f2.delta2)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(f2.apply(moved, site)[train], y[train])
    # each site's correction is one affine map per feature: scanpy's fit on the training cases gives it, and the
    # test cases of that site follow the same map
    ref = _scanpy_combat(x[train], site[train])
    for s in np.unique(site):
        tr, te = np.flatnonzero(train & (site == s)), np.flatnonzero(~train & (site == s))
        rows = np.flatnonzero(site[train] == s)
        slope = (ref[rows[1]] - ref[rows[0]]) / (x[tr[1]] - x[tr[0]])
        np.testing.assert_allclose(y[te], ref[rows[0]] + slope * (x[te] - x[tr[0]]), atol=1e-3)


def test_unfitted_sites_and_absent_rows_pass_through():
    x, site = _sites_with_effects(seed=2)
    site = site.astype(object)
    site[:1] = "lonely"  # one fitted case: no within-site variance
    x[5] = np.nan  # modality absent
    f = combat.fit(x, site)
    assert "lonely" not in f.sites and f.n_fit["lonely"] == 1
    new = np.array(["unseen", "lonely", site[7]])
    y = f.apply(x[[3, 0, 7]], new)
    np.testing.assert_array_equal(y[:2], x[[3, 0]])
    assert not np.allclose(y[2], x[7])
    assert f.unfitted(new) == {"lonely": 1, "unseen": 1}
    assert np.isnan(f.apply(x[[5]], site[[5]])).all()
    with pytest.raises(ValueError, match="site with >= 2 cases"):
        combat.fit(x[:3], ["a", "b", "c"])


def test_embed_fits_combat_on_the_pretraining_cases_only(report_run, tmp_path):
    """`embed(..., combat=('slide',))` on the held-out cases = ComBat fitted on the pretraining cases' own
    embeddings alone (so no held-out case enters the fit), and the fit cases are not written."""
    from mmfm.eval.embed import EmbedConfig, embed

    cohort_dir, run = report_run
    splits = json.loads((run / "splits.json").read_text())
    cfg = EmbedConfig(baselines=(), combat=("slide",))
    held, _ = embed(run, cohort_dir, tmp_path / "h.h5ad", cfg=cfg, case_ids=splits["heldout"])
    train, _ = embed(run, cohort_dir, tmp_path / "t.h5ad", cfg=EmbedConfig(baselines=()), case_ids=splits["train"])
    assert list(held.obs_names) == splits["heldout"] and set(held.obs["split"]) == {"heldout"}
    ref = combat.fit(train.obsm["slide"], train.obs["site"]).apply(held.obsm["slide"], held.obs["site"])
    np.testing.assert_allclose(held.obsm["slide_combat"], ref, atol=1e-5)
    record = json.loads(held.uns["combat"])
    assert sum(record["slide"]["fit_cases_per_site"].values()) == len(splits["train"])
    with pytest.raises(ValueError, match="--combat_site 'hospital'"):
        embed(run, cohort_dir, tmp_path / "x.h5ad", cfg=EmbedConfig(combat=("slide",), combat_site="hospital"))
