"""Patient-level folds in the Patho-Bench split-file layout.

One row per slide (a case without slides gets one row with an empty slide_id):
  case_id  slide_id  [<label>]  [site]  fold_0 ... fold_{k-1}     values 'train' / 'test' (read: also 'val')
Folds are drawn over cases, never slides, so two slides of one patient can never sit on both sides
of a split; `assert_no_case_leakage` enforces it on every split read or written. Site-preserved
folds put every case of a site (medical centre, TCGA tissue-source site or institution) in the same
partition, so a probe cannot score by recognising the site's stain and scanner.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import (
    GroupKFold,
    GroupShuffleSplit,
    KFold,
    ShuffleSplit,
    StratifiedGroupKFold,
    StratifiedKFold,
    StratifiedShuffleSplit,
)

from mmfm.io import atomic_path, id_list

PARTS = ("train", "test", "val")
FOLD = re.compile(r"fold_\d+")


def split_cases(case_ids, fraction: float, seed: int, *, val_fraction: float = 0.0,
                sites=None) -> tuple[list[str], list[str], list[str]]:
    """Patient-level pretraining split (a case is a patient): (train, validation, held-out), deterministic in `seed`.

    Held-out cases (`fraction`) are the probes' test cases: never pretrained on and never used to choose a
    checkpoint or a recipe; validation cases (`val_fraction`, of all cases) are what held-out evaluation during
    pretraining and `--step best` see. The held-out set does not depend on `val_fraction`. With `sites` (one per
    case, in `case_ids` order) whole sites go to one partition — held-out and validation centres are then unseen
    in pretraining — so the fractions are met approximately (sites in random order, each taken while the
    partition is short of its share).
    """
    ids = sorted(map(str, case_ids))
    rng = np.random.default_rng(seed)
    if sites is None:
        units = [[ids[i]] for i in rng.permutation(len(ids))]
    else:
        site = pd.Series(list(sites), index=[str(c) for c in case_ids], dtype=object).loc[ids]
        if site.isna().any():
            raise ValueError(f"split by site: case(s) without a site: {id_list(site.index[site.isna()])}")
        site = site.astype(str)
        names = sorted(site.unique())
        units = [list(site.index[site == names[i]]) for i in rng.permutation(len(names))]
    parts: dict[str, list[str]] = {"heldout": [], "val": [], "train": []}
    want = {"heldout": round(fraction * len(ids)), "val": round(val_fraction * len(ids))}
    for unit in units:
        parts[next((p for p in ("heldout", "val") if len(parts[p]) < want[p]), "train")] += unit
    if sites is not None and ids and not parts["train"]:
        raise ValueError(f"split by site: {len(units)} site(s) leave no training cases at heldout_fraction="
                         f"{fraction}, val_fraction={val_fraction}")
    return sorted(parts["train"]), sorted(parts["val"]), sorted(parts["heldout"])


def pretrain_split(cases: pd.DataFrame, data) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, held-out) as pretraining splits a cohort's `cases` table with a run's `data` config
    (heldout_fraction, split_seed, val_fraction, split_by_site): known before pretraining starts."""
    return split_cases(cases.index, data.heldout_fraction, data.split_seed, val_fraction=data.val_fraction,
                       sites=cases["site"] if data.split_by_site else None)


def fold_columns(df: pd.DataFrame) -> list[str]:
    return sorted((c for c in df.columns if FOLD.fullmatch(str(c))), key=lambda c: int(c[5:]))


def survival_strata(cases: pd.DataFrame, n_bins: int = 4, time: str = "os_days", event: str = "os_event") -> pd.Series:
    """Patho-Bench's survival stratification label: time quantile × event (8 classes for quartiles).

    Only for stratifying folds; cases with unknown time or event get NaN (and are left out of folds).
    """
    known = cases[time].notna() & cases[event].notna()
    out = pd.Series(np.nan, index=cases.index, name=f"{time}_strata")
    if known.any():  # ranks make the quantile edges unique even with tied times
        q = pd.qcut(cases.loc[known, time].rank(method="first"), min(n_bins, int(known.sum())), labels=False)
        out[known] = q * 2 + cases.loc[known, event].astype(int)
    return out


def _case_table(cases) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(cases indexed by case_id, slides with slide_id + case_id or None) from a Cohort or a DataFrame."""
    if hasattr(cases, "cases") and hasattr(cases, "slides"):  # a Cohort
        slides = cases.slides.reset_index()[["slide_id", "case_id"]]
        return cases.cases, slides
    df = cases.reset_index() if "case_id" not in cases.columns else cases
    if "slide_id" in df.columns:  # one row per slide already
        slides = df[["slide_id", "case_id"]]
        return df.drop(columns="slide_id").drop_duplicates("case_id").set_index("case_id"), slides
    return df.set_index("case_id"), None


def make_folds(cases, label: str | None = None, k: int = 5, seed: int = 0, site_preserved: bool = False,
               test_size: float | int | None = None) -> pd.DataFrame:
    """Patient-level folds, one row per slide (Patho-Bench layout).

    cases: a Cohort, or a DataFrame of cases (case_id index or column; with a slide_id column it is
        read as one row per slide).
    label: column to stratify on (and to write); cases with a missing label are left out, with a warning.
    test_size None: k-fold, each case in test exactly once. Otherwise k Monte-Carlo train/test splits
        with this test fraction (or count) of cases — of sites when site_preserved.
    site_preserved: all cases of a `site` share one partition in every fold (stratified on a best-effort
        basis for k-fold; Monte-Carlo site splits are not stratified).
    """
    table, slides = _case_table(cases)
    table = table.copy()
    table.index = table.index.astype(str)
    if label is not None:
        if label not in table.columns:
            raise ValueError(f"make_folds: label column {label!r} not among the case columns {list(table.columns)}")
        missing = table.index[table[label].isna()]
        if len(missing):
            warnings.warn(f"make_folds: {len(missing)} case(s) without {label!r} left out of the folds: "
                          f"{id_list(missing)}", stacklevel=2)
            table = table.drop(index=missing)
    if site_preserved:
        if "site" not in table.columns:
            raise ValueError("make_folds: site_preserved=True needs a 'site' column")
        no_site = table.index[table["site"].isna()]
        if len(no_site):
            raise ValueError(f"make_folds: site_preserved=True but case(s) have no site: {id_list(no_site)}")
    n = len(table)
    y = None if label is None else table[label].to_numpy()
    groups = table["site"].astype(str).to_numpy() if site_preserved else None
    if test_size is None:
        if site_preserved:
            splitter = (StratifiedGroupKFold(k, shuffle=True, random_state=seed) if label is not None
                        else GroupKFold(k, shuffle=True, random_state=seed))
            if len(set(groups)) < k:
                raise ValueError(f"make_folds: {len(set(groups))} site(s) cannot fill {k} site-preserved folds")
        else:
            splitter = (StratifiedKFold(k, shuffle=True, random_state=seed) if label is not None
                        else KFold(k, shuffle=True, random_state=seed))
    elif site_preserved:
        splitter = GroupShuffleSplit(k, test_size=test_size, random_state=seed)
    else:
        splitter = (StratifiedShuffleSplit(k, test_size=test_size, random_state=seed) if label is not None
                    else ShuffleSplit(k, test_size=test_size, random_state=seed))
    assign = np.full((n, k), "train", dtype=object)
    for f, (_, test) in enumerate(splitter.split(np.zeros((n, 1)), y, groups)):
        assign[test, f] = "test"
    folds = pd.DataFrame(assign, index=table.index, columns=[f"fold_{f}" for f in range(k)])

    cols = [label] if label is not None else []
    cols += ["site"] if site_preserved else []
    per_case = table[cols].join(folds)
    if label is not None and pd.api.types.is_float_dtype(per_case[label]) and \
            np.all(np.mod(per_case[label], 1) == 0):
        per_case[label] = per_case[label].astype(np.int64)  # 0/1 flags are written as integers
    if slides is None:
        rows = pd.DataFrame({"case_id": table.index, "slide_id": ""})
    else:
        slides = slides.astype(str)
        slides = slides[slides["case_id"].isin(table.index)]
        bare = table.index[~table.index.isin(slides["case_id"])]
        rows = pd.concat([slides[["case_id", "slide_id"]], pd.DataFrame({"case_id": bare, "slide_id": ""})])
        rows = rows.assign(_order=rows["case_id"].map({c: i for i, c in enumerate(table.index)}))
        rows = rows.sort_values(["_order", "slide_id"], kind="stable").drop(columns="_order")
    out = rows.merge(per_case, left_on="case_id", right_index=True, how="left").reset_index(drop=True)
    assert_no_case_leakage(out, label=label)
    return out


def assert_no_case_leakage(df: pd.DataFrame, label: str | None = None) -> None:
    """Raise ValueError, naming the case and fold, if any case (via any of its slides) is in two partitions
    of a fold; also on unknown partition values, repeated slide ids and a label that differs between
    slides of one case."""
    if "case_id" not in df.columns:
        raise ValueError("split: no 'case_id' column")
    folds = fold_columns(df)
    if not folds:
        raise ValueError(f"split: no fold_<i> columns (has {list(df.columns)})")
    for f in folds:
        bad = ~df[f].isin(PARTS)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"split {f}: value {df[f].iloc[i]!r} for case {df['case_id'].iloc[i]} "
                             f"(row {i}) is not one of {list(PARTS)}")
        parts = df.groupby("case_id", sort=False)[f].nunique()
        if (parts > 1).any():
            case = parts.index[parts > 1][0]
            rows = df[df["case_id"] == case]
            where = ", ".join(f"{s or '<no slide>'}={p}" for s, p in zip(rows.get("slide_id", [""] * len(rows)), rows[f]))
            raise ValueError(f"split {f}: case {case} is in several partitions ({where}); "
                             f"{int((parts > 1).sum())} leaking case(s) in this fold")
    if "slide_id" in df.columns:
        sid = df["slide_id"].astype(str)
        dup = sid[(sid != "") & sid.duplicated()]
        if len(dup):
            raise ValueError(f"split: slide_id(s) on several rows: {id_list(dup.unique())}")
    if label is not None:
        n = df.groupby("case_id", sort=False)[label].nunique(dropna=False)
        if (n > 1).any():
            raise ValueError(f"split: case(s) whose slides carry different {label!r} values: {id_list(n.index[n > 1])}")


def partition(df: pd.DataFrame, fold: int | str) -> dict[str, list[str]]:
    """{'train': case_ids, 'test': case_ids[, 'val': ...]} of one fold, each case once, in file order."""
    col = fold if isinstance(fold, str) else f"fold_{fold}"
    per_case = df.drop_duplicates("case_id")
    return {p: per_case.loc[per_case[col] == p, "case_id"].astype(str).tolist()
            for p in PARTS if (per_case[col] == p).any()}


def _sep(path) -> str:
    return "," if str(path).endswith(".csv") else "\t"


def read_splits(path: str | os.PathLike, label: str | None = None) -> pd.DataFrame:
    """Read a Patho-Bench split file (TSV, or CSV by suffix); refuses one that leaks a case."""
    df = pd.read_csv(path, sep=_sep(path), dtype=str, keep_default_na=False)
    for col in ("case_id", "slide_id"):
        if col not in df.columns:
            raise ValueError(f"{path}: required column {col!r} missing (has {list(df.columns)})")
    folds = fold_columns(df)
    for col in df.columns:
        if col in ("case_id", "slide_id") or col in folds:
            continue
        values = df[col].mask(df[col].eq(""))
        try:
            df[col] = pd.to_numeric(values)
        except (ValueError, TypeError):
            df[col] = values
    try:
        assert_no_case_leakage(df, label=label)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return df


def write_splits(df: pd.DataFrame, path: str | os.PathLike, label: str | None = None) -> Path:
    """Write atomically as TSV (CSV if the name ends in .csv), after the leakage check."""
    assert_no_case_leakage(df, label=label)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep=_sep(path), index=False)
    return Path(path)
