"""Probe folds and leakage guards: case × fold tables, from a Patho-Bench split file or generated patient-level.

A fold table has one row per case (index `case_id`) and one column per fold (`fold_0` … `fold_{k-1}`) holding
'train' or 'test'. Two guards keep a probe honest: a case on both sides of a fold is refused (`mmfm.data.splits`
checks every split it reads or makes), and test cases seen in pretraining — or used as validation cases, which
chose the checkpoint — are refused unless explicitly allowed (`check_overlap`), and then reported.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pandas as pd

from mmfm.data import splits
from mmfm.io import atomic_path

log = logging.getLogger(__name__)


class LeakageError(RuntimeError):
    """Probe test cases were seen in pretraining or validation (refused unless allowed)."""


def case_folds(split: pd.DataFrame) -> pd.DataFrame:
    """Patho-Bench split table (one row per slide, already leakage-checked by mmfm.data.splits) → one row per
    case × fold_i ('train' / 'test'; 'val' rows are not used by the probes)."""
    return split.assign(case_id=split["case_id"].astype(str)).groupby("case_id")[splits.fold_columns(split)].first()


def read_split_file(path: str | Path) -> pd.DataFrame:
    """Case × fold table from a Patho-Bench split file (read_splits refuses a file that leaks a case)."""
    return case_folds(splits.read_splits(path))


def generate_folds(cases: pd.Index, strata: pd.Series | None, sites: pd.Series | None, *, k: int, seed: int,
                   site_preserved: bool, test_size: float | None) -> pd.DataFrame:
    """Patient-level folds over `cases` (stratified by `strata`, site-preserved on `sites` when asked)."""
    table = pd.DataFrame(index=pd.Index(cases, name="case_id"))
    label = None
    if strata is not None:
        table["_stratum"] = strata.reindex(table.index).astype(str).to_numpy()
        label = "_stratum"
    if sites is not None:
        table["site"] = sites.reindex(table.index).astype(str).to_numpy()
    df = splits.make_folds(table, label=label, k=k, seed=seed, site_preserved=site_preserved, test_size=test_size)
    return case_folds(df)


def all_test(cases: pd.Index) -> pd.DataFrame:
    """One fold in which every case is a test case (for tasks that fit nothing)."""
    return pd.DataFrame({"fold_0": "test"}, index=pd.Index(cases, name="case_id"))


def restrict(folds: pd.DataFrame, cases: pd.Index, what: str) -> tuple[pd.DataFrame, list[str]]:
    """The fold rows of `cases`; cases with data that the folds do not cover are left out with a note."""
    notes = []
    missing = cases.difference(folds.index)
    if len(missing):
        notes.append(f"{what}: {len(missing)} case(s) with data are not in the folds and are left out "
                     f"(e.g. {', '.join(map(str, missing[:3]))})")
        warnings.warn(notes[-1])
    return folds.loc[folds.index.intersection(cases)], notes


def tested_cases(folds: pd.DataFrame) -> set[str]:
    """Cases on the test side of at least one fold."""
    return set(folds.index[(folds == "test").any(axis=1).to_numpy()])


def write_folds(folds: pd.DataFrame, path: Path) -> None:
    """The exact folds used, for reproducibility and audit."""
    with atomic_path(path, suffix=".tsv") as tmp:
        folds.to_csv(tmp, sep="\t", index_label="case_id")


def seen_cases(given: set[str] | str | Path | None, recorded) -> set[str]:
    """Cases a probe must not test on: `given` (a set, or a file for read_pretrain_cases) ∪ `recorded` (the
    AnnData's uns entry written by `mmfm embed`)."""
    if isinstance(given, (str, Path)):
        given = read_pretrain_cases(given)
    return set(map(str, given or ())) | set(map(str, recorded if recorded is not None else ()))


def read_pretrain_cases(path: str | Path) -> set[str]:
    """Case ids, one per line, or a CSV/TSV with a `case_id` column."""
    path = Path(path)
    text = path.read_text().splitlines()
    if text and ("case_id" in text[0].split(",") or "case_id" in text[0].split("\t")):
        sep = "\t" if "\t" in text[0] else ","
        return set(pd.read_csv(path, sep=sep, dtype=str)["case_id"].dropna())
    return {line.strip() for line in text if line.strip() and not line.startswith("#")}


OVERLAP_FLAGS = {"pretraining": "--allow_overlap", "validation": "--allow_validation_overlap"}


def check_overlap(tested: dict[str, set[str]], seen: set[str], allow: bool,
                  what: str = "pretraining") -> dict[str, list[str]]:
    """{task: its test cases used in `what`}; raises LeakageError on any overlap unless `allow`.

    'pretraining': the encoder was trained on them. 'validation': they chose the checkpoint or the recipe
    (held-out evaluation during pretraining, `--step best`), so a score on them is optimistically selected.
    """
    overlap = {task: sorted(cases & seen) for task, cases in tested.items() if cases & seen}
    if overlap:
        flag = OVERLAP_FLAGS[what]
        msg = "; ".join(f"{t}: {len(c)} test case(s) seen in {what} (e.g. {', '.join(c[:3])})"
                        for t, c in overlap.items())
        if not allow:
            raise LeakageError(f"probe test cases overlap the {what} cases — {msg}. Probe on the run's held-out "
                               f"cases, or pass {flag} to run anyway (the overlap is then recorded in summary.md)")
        log.warning("%s OVERLAP (allowed): %s", what.upper(), msg)
        warnings.warn(f"{what.upper()} OVERLAP (allowed by {flag}): {msg}")
    return overlap
