"""Patient-level folds: no case leakage, site preservation, stratification, Patho-Bench file layout."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mmfm.data.splits import (assert_no_case_leakage, fold_columns, make_folds, partition, read_splits,
                              survival_strata, write_splits)


def _cohort(n=100, n_sites=10, pos=30, seed=0):
    """Cases with sites, an imbalanced label (pos of n) and 1–3 slides per case (some cases none)."""
    rng = np.random.default_rng(seed)
    ids = [f"P{i:03d}" for i in range(n)]
    y = np.zeros(n)
    y[rng.choice(n, pos, replace=False)] = 1
    cases = pd.DataFrame({"site": [f"S{i % n_sites}" for i in range(n)], "mut_TP53": y,
                          "os_days": rng.exponential(500, n), "os_event": rng.integers(0, 2, n).astype(float)},
                         index=pd.Index(ids, name="case_id"))
    n_slides = rng.integers(0, 4, n)
    slides = pd.DataFrame({"slide_id": [f"{c}-DX{j}" for c, m in zip(ids, n_slides) for j in range(m)],
                           "case_id": [c for c, m in zip(ids, n_slides) for _ in range(m)]}).set_index("slide_id")
    return SimpleNamespace(cases=cases, slides=slides)


def _per_case(df):
    return df.drop_duplicates("case_id").set_index("case_id")


def test_kfold_layout_and_each_case_tested_once():
    c = _cohort()
    df = make_folds(c, label="mut_TP53", k=5)
    assert list(df.columns) == ["case_id", "slide_id", "mut_TP53"] + [f"fold_{i}" for i in range(5)]
    assert df["mut_TP53"].dtype == np.int64
    # one row per slide; a case without slides has one row with an empty slide_id
    assert sorted(df.loc[df["slide_id"] != "", "slide_id"]) == sorted(c.slides.index)
    bare = set(c.cases.index) - set(c.slides["case_id"])
    assert set(df.loc[df["slide_id"] == "", "case_id"]) == bare
    per = _per_case(df)
    assert len(per) == 100
    assert ((per[fold_columns(df)] == "test").sum(axis=1) == 1).all()
    assert_no_case_leakage(df)


def test_no_case_leakage_across_slides_in_any_fold():
    df = make_folds(_cohort(), k=4, seed=3)
    for f in fold_columns(df):
        assert (df.groupby("case_id")[f].nunique() == 1).all()
        parts = partition(df, f)
        assert not set(parts["train"]) & set(parts["test"])
        assert len(parts["train"]) + len(parts["test"]) == 100


def test_stratification_matches_class_proportions():
    df = make_folds(_cohort(pos=30), label="mut_TP53", k=5)
    per = _per_case(df)
    for f in fold_columns(df):
        test = per[per[f] == "test"]
        assert len(test) == 20 and test["mut_TP53"].sum() == 6  # 30/5 positives, 70/5 negatives per fold


def test_site_preserved_folds_never_share_a_site():
    c = _cohort(n=120, n_sites=12)
    for label in (None, "mut_TP53"):
        df = make_folds(c, label=label, k=3, site_preserved=True, seed=1)
        assert "site" in df.columns
        per = _per_case(df)
        assert ((per[fold_columns(df)] == "test").sum(axis=1) == 1).all()
        for f in fold_columns(df):
            assert not set(per.loc[per[f] == "train", "site"]) & set(per.loc[per[f] == "test", "site"])
            assert per.groupby("site")[f].nunique().max() == 1


def test_site_preserved_needs_sites():
    c = _cohort(n_sites=2)
    with pytest.raises(ValueError, match="2 site\\(s\\) cannot fill 5 site-preserved folds"):
        make_folds(c, k=5, site_preserved=True)
    c.cases.loc["P007", "site"] = np.nan
    with pytest.raises(ValueError, match="no site: P007"):
        make_folds(c, k=2, site_preserved=True)


def test_monte_carlo_splits():
    df = make_folds(_cohort(), label="mut_TP53", k=10, test_size=0.25, seed=2)
    per = _per_case(df)
    for f in fold_columns(df):
        test = per[per[f] == "test"]
        assert len(test) == 25 and abs(test["mut_TP53"].mean() - 0.3) <= 0.05
    assert len({tuple(per[f]) for f in fold_columns(df)}) == 10  # ten different draws
    site = make_folds(_cohort(), k=5, test_size=3, site_preserved=True)
    sp = _per_case(site)
    for f in fold_columns(site):
        assert sp.loc[sp[f] == "test", "site"].nunique() == 3


def test_deterministic_for_a_seed():
    c = _cohort()
    a, b = make_folds(c, label="mut_TP53", seed=7), make_folds(c, label="mut_TP53", seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert not make_folds(c, label="mut_TP53", seed=8).equals(a)


def test_missing_labels_are_left_out_with_a_warning():
    c = _cohort()
    c.cases.loc[["P001", "P002"], "mut_TP53"] = np.nan
    with pytest.warns(UserWarning, match="2 case\\(s\\) without 'mut_TP53' left out of the folds: P001, P002"):
        df = make_folds(c, label="mut_TP53")
    assert not {"P001", "P002"} & set(df["case_id"])


def test_survival_strata_is_quantile_by_event():
    cases = _cohort().cases
    s = survival_strata(cases)
    q = pd.qcut(cases["os_days"], 4, labels=False)
    np.testing.assert_array_equal(s.to_numpy(), (q * 2 + cases["os_event"]).to_numpy())
    df = make_folds(cases.assign(OS=s), label="OS", k=5)
    assert set(df["OS"]) == set(range(8))


def test_dataframe_of_cases_without_slides():
    df = make_folds(_cohort().cases, k=5)
    assert (df["slide_id"] == "").all() and len(df) == 100


def test_leakage_is_refused_naming_case_and_fold():
    df = make_folds(_cohort(), k=3)
    multi = df["case_id"].value_counts()
    case = multi.index[multi > 1][0]
    rows = np.flatnonzero(df["case_id"] == case)
    bad = df.copy()
    bad.loc[rows[0], "fold_1"] = "test" if bad.loc[rows[1], "fold_1"] == "train" else "train"
    with pytest.raises(ValueError, match=f"split fold_1: case {case} is in several partitions"):
        assert_no_case_leakage(bad)
    bad = df.copy()
    bad.loc[0, "fold_2"] = "holdout"
    with pytest.raises(ValueError, match="split fold_2: value 'holdout'"):
        assert_no_case_leakage(bad)
    bad = make_folds(_cohort(), label="mut_TP53", k=3)
    bad.loc[rows[0], "mut_TP53"] = 1 - bad.loc[rows[0], "mut_TP53"]
    with pytest.raises(ValueError, match=f"slides carry different 'mut_TP53' values: {case}"):
        assert_no_case_leakage(bad, label="mut_TP53")


def test_tsv_roundtrip_and_patho_bench_file(tmp_path):
    df = make_folds(_cohort(), label="mut_TP53", k=5, site_preserved=True)
    path = write_splits(df, tmp_path / "k=all.tsv")
    header = path.read_text().splitlines()[0].split("\t")
    assert header == ["case_id", "slide_id", "mut_TP53", "site"] + [f"fold_{i}" for i in range(5)]
    pd.testing.assert_frame_equal(read_splits(path), df)
    # a hand-written Patho-Bench style file with a validation partition
    (tmp_path / "pb.tsv").write_text("case_id\tslide_id\tBAP1_mutation\tfold_0\tfold_1\n"
                                     "C1\tC1-A\t1\ttrain\ttest\nC1\tC1-B\t1\ttrain\ttest\nC2\tC2-A\t0\tval\ttrain\n"
                                     "C3\tC3-A\t0\ttest\ttrain\n")
    pb = read_splits(tmp_path / "pb.tsv", label="BAP1_mutation")
    assert partition(pb, 0) == {"train": ["C1"], "test": ["C3"], "val": ["C2"]}
    (tmp_path / "leak.tsv").write_text("case_id\tslide_id\tfold_0\nC1\tC1-A\ttrain\nC1\tC1-B\ttest\n")
    with pytest.raises(ValueError, match="leak.tsv: split fold_0: case C1 is in several partitions"):
        read_splits(tmp_path / "leak.tsv")
