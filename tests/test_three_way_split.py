"""Three-way pretraining split (issue 15): train / validation / held-out cases, whole sites when asked, and the
probe's refusal of the validation cases that chose the checkpoint."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from mmfm import cli
from mmfm.data.splits import split_cases
from mmfm.eval.probe import LeakageError, probe

IDS = [f"c{i:03d}" for i in range(100)][::-1]  # input order must not matter
TASK = [{"name": "y", "type": "classification", "label": "y", "folds": 3}]


def test_partitions_follow_one_seeded_permutation_and_heldout_ignores_val_fraction():
    train, val, held = split_cases(IDS, 0.2, 5, val_fraction=0.15)
    ids, order = sorted(IDS), np.random.default_rng(5).permutation(100)  # the permutation, written out
    assert held == sorted(ids[i] for i in order[:20])
    assert val == sorted(ids[i] for i in order[20:35])
    assert train == sorted(ids[i] for i in order[35:])
    _, no_val, same_held = split_cases(IDS, 0.2, 5)
    assert no_val == [] and same_held == held  # adding validation cases never moves a probe-test case


def test_split_by_site_keeps_every_site_on_one_side():
    rng = np.random.default_rng(0)
    sites = rng.choice([f"s{i}" for i in range(12)], size=len(IDS), p=rng.dirichlet(np.ones(12) * 3))
    site_of = dict(zip(IDS, sites))
    parts = split_cases(IDS, 0.2, 1, val_fraction=0.1, sites=sites)
    on = [{site_of[c] for c in p} for p in parts]
    assert not (on[0] & on[1] or on[0] & on[2] or on[1] & on[2])
    assert sorted(c for p in parts for c in p) == sorted(IDS)
    size = pd.Series(sites).value_counts()
    for cases, want, sites_in in ((parts[2], 20, on[2]), (parts[1], 10, on[1])):
        # whole sites are taken while the partition is short: at least its share, and the last site was needed
        assert len(cases) >= want and any(len(cases) - size[s] < want for s in sites_in)
    with pytest.raises(ValueError, match="without a site: c098"):
        split_cases(IDS, 0.2, 1, sites=[None if c == "c098" else "a" for c in IDS])
    with pytest.raises(ValueError, match="1 site"):
        split_cases(IDS, 0.2, 1, sites=["a"] * len(IDS))


def _embeddings(val: list[str]) -> ad.AnnData:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    x = rng.standard_normal((60, 4)) + y[:, None]
    a = ad.AnnData(x, obs=pd.DataFrame({"y": y}, index=[f"c{i:03d}" for i in range(60)]))
    a.uns["validation_cases"] = val
    return a


def test_probe_refuses_validation_cases_unless_allowed_and_records_them(tmp_path, capsys):
    a = _embeddings(["c003", "c007"])
    with pytest.raises(LeakageError, match=r"validation cases.*c003, c007.*--allow_validation_overlap"):
        probe(a, TASK, tmp_path / "out", plots=False, n_bootstrap=0)
    with pytest.warns(UserWarning, match="VALIDATION OVERLAP"):
        r = probe(a, TASK, tmp_path / "out", plots=False, n_bootstrap=0, allow_validation_overlap=True)
    assert r.validation_overlap == {"y": ["c003", "c007"]} and r.overlap == {}
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "WARNING: test cases were validation cases of the run" in md and "c003, c007" in md
    # the command's route: --validation_cases FILE, refused without the flag: one line, exit 2
    b = _embeddings([])
    b.write_h5ad(tmp_path / "e.h5ad")
    (tmp_path / "val.txt").write_text("c011\n")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(TASK))
    args = ["probe", "--embeddings", str(tmp_path / "e.h5ad"), "--tasks", str(tmp_path / "t.yaml"),
            "--out", str(tmp_path / "cli"), "--validation_cases", str(tmp_path / "val.txt"), "--no-plots"]
    capsys.readouterr()
    assert cli.main(args) == 2 and not (tmp_path / "cli" / "results.csv").exists()
    err = capsys.readouterr().err
    assert err.startswith("mmfm probe: error: ") and "c011" in err and err.count("\n") == 1
    with pytest.warns(UserWarning, match="VALIDATION OVERLAP"):
        assert cli.main(args + ["--allow_validation_overlap"]) == 0
