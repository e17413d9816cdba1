"""The bad-input catalogue: what a lab's real files do wrong, over every command, each case asserting the command's
documented exit status (2 bad input; `validate` 1 for a cohort with errors), one line naming the culprit (file and
row, slide, case, config key or task; a cohort that cannot be opened names it on the first line, then lists every
problem, as `mmfm validate` does), no traceback, and that no file already in the workspace changed.

Each case breaks a private copy of one small simulated cohort (or writes its own inputs) and runs the command
in-process, as `mmfm ...` would. Cases that the contract accepts (CRLF and BOM tables, unicode and spaces in paths)
are the last part: they must give exactly what a clean input gives.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, built_once, writable_copy
from mmfm.cli import main

DEMO = str(REPO / "configs" / "demo.yaml")
SMALL = ["--set", "train.steps=2", "--set", "loader.batch_size=8", "--set", "loader.tiles_per_slide=8",
         "--set", "train.progress=false"]


def _simulate(out: Path) -> None:
    from mmfm.simulate import SimConfig, simulate_cohort

    simulate_cohort(out / "cohort", SimConfig(n_cases=24, n_sites=3, feature_dim=8, n_genes=32, n_proteins=8,
                                              bag_size_median=24, bag_size_max=48, seed=11))


@pytest.fixture(scope="session")
def clean_cohort(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "bad_inputs_cohort", _simulate) / "cohort"


@pytest.fixture
def ws(clean_cohort, tmp_path) -> Path:
    """A workspace: a private copy of the cohort at ws/cohort, and room for other inputs."""
    writable_copy(clean_cohort, tmp_path / "cohort")
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


# ---- small editors of a cohort copy -------------------------------------------------------------------------

def edit_csv(path: Path, fn: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    fn(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


def bag_of(cohort: Path, i: int = 0) -> tuple[str, Path]:
    row = pd.read_csv(cohort / "slides.csv", dtype=str).iloc[i]
    return row["slide_id"], cohort / row["path"]


def set_feature(cohort: Path, value: float) -> str:
    sid, path = bag_of(cohort, 2)
    with h5py.File(path, "r+") as f:
        f["features"][1, 3] = value
    return sid


def widen_bag(cohort: Path) -> str:
    sid, path = bag_of(cohort, 1)
    with h5py.File(path, "r+") as f:
        feats, attrs = f["features"][:], dict(f["features"].attrs)
        del f["features"]
        d = f.create_dataset("features", data=np.concatenate([feats, feats[:, :1]], axis=1))
        d.attrs.update(attrs)
    return sid


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def cut_mid_line(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 7])


def write_tasks(ws: Path, tasks: list[dict]) -> str:
    (ws / "tasks.yaml").write_text(yaml.safe_dump(tasks))
    return str(ws / "tasks.yaml")


def embeddings(ws: Path, **obs_cols) -> str:
    """A small embeddings AnnData (what `mmfm embed` writes): 30 cases, `slide` in obsm, obs columns given."""
    rng = np.random.default_rng(0)
    n = 30
    obs = pd.DataFrame({"subtype": np.repeat(["a", "b", "c"], 10), "os_days": rng.uniform(10, 900, n),
                        "os_event": rng.integers(0, 2, n), "site": np.tile(["s1", "s2", "s3"], 10)},
                       index=[f"case{i:02d}" for i in range(n)])
    for k, v in obs_cols.items():
        obs[k] = v
    a = ad.AnnData(np.zeros((n, 0), np.float32), obs=obs)
    a.obsm["slide"] = rng.normal(size=(n, 6)).astype(np.float32)
    a.write_h5ad(ws / "emb.h5ad")
    return str(ws / "emb.h5ad")


MAF_HEADER = "Hugo_Symbol\tEntrez_Gene_Id\tVariant_Classification\tTumor_Sample_Barcode\tFILTER\n"
MAF_ROW = "TP53\t7157\tMissense_Mutation\tTCGA-AA-0001-01A-11D-A001-09\tPASS\n"


# ---- the catalogue ----------------------------------------------------------------------------------------------

@dataclass
class Bad:
    """`setup(ws)` breaks the workspace and returns the command's argv; the output must match `culprit`."""
    setup: Callable[[Path], list[str]]
    culprit: str
    rc: int = 2


def validate(ws):
    return ["validate", str(ws / "cohort"), "--headers-only"]


def validate_full(ws):
    return ["validate", str(ws / "cohort")]


def pretrain(ws, *sets):
    return ["pretrain", "--config", DEMO, "--out", str(ws / "run"), "--set", f"data.cohort={ws / 'cohort'}",
            *SMALL, *[a for s in sets for a in ("--set", s)]]


def _rm(path: Path) -> None:
    path.unlink()


CASES: dict[str, Bad] = {
    # cohort files (validate: exit 1, every problem named by file and row)
    "cohort.yaml missing": Bad(lambda ws: (_rm(ws / "cohort/cohort.yaml"), validate(ws))[1],
                               r"cohort\.yaml: missing", 1),
    "cohort.yaml not YAML": Bad(lambda ws: ((ws / "cohort/cohort.yaml").write_text("name: [unclosed\n"),
                                            validate(ws))[1], r"cohort\.yaml: not valid YAML \(line 2, column 1: ", 1),
    "cases.csv missing": Bad(lambda ws: (_rm(ws / "cohort/cases.csv"), validate(ws))[1], r"cases\.csv: missing", 1),
    "cases.csv empty": Bad(lambda ws: ((ws / "cohort/cases.csv").write_text(""), validate(ws))[1],
                           r"cases\.csv: cannot be parsed", 1),
    "cases.csv duplicate case id": Bad(
        lambda ws: (edit_csv(ws / "cohort/cases.csv", lambda d: pd.concat([d, d.iloc[[3]]])), validate(ws))[1],
        r"cases\.csv.*duplicate.*case_id", 1),
    "cases.csv negative survival time": Bad(
        lambda ws: (edit_csv(ws / "cohort/cases.csv", lambda d: d.assign(os_days=d.os_days.mask(d.index == 4, "-3"))),
                    validate(ws))[1], r"cases\.csv line 6 \(case \S+\): os_days '-3' is negative", 1),
    "cases.csv event not 0/1": Bad(
        lambda ws: (edit_csv(ws / "cohort/cases.csv", lambda d: d.assign(os_event=d.os_event.mask(d.index == 0, "2"))),
                    validate(ws))[1], r"cases\.csv line 2 \(case \S+\): os_event '2'", 1),
    "cases.csv time not a number": Bad(
        lambda ws: (edit_csv(ws / "cohort/cases.csv", lambda d: d.assign(os_days=d.os_days.mask(d.index == 1, "n/a"))),
                    validate(ws))[1], r"cases\.csv line 3 \(case \S+\): os_days 'n/a'", 1),
    "cases.csv cut mid-line": Bad(lambda ws: (cut_mid_line(ws / "cohort/cases.csv"), validate(ws))[1],
                                  r"cases\.csv: ends in the middle of line 25", 1),
    "cases.csv a 2 MiB header": Bad(lambda ws: ((ws / "cohort/cases.csv").write_bytes(b"case_id," * (1 << 18)),
                                               validate(ws))[1],
                                    r"cases\.csv: cannot be parsed as CSV \(cases\.csv: no line break in the first 1 MiB", 1),
    "slides.csv missing column": Bad(
        lambda ws: (edit_csv(ws / "cohort/slides.csv", lambda d: d.drop(columns="path")), validate(ws))[1],
        r"slides\.csv: required column\(s\) \['path'\] missing", 1),
    "slides.csv duplicate slide id": Bad(
        lambda ws: (edit_csv(ws / "cohort/slides.csv", lambda d: pd.concat([d, d.iloc[[0]]])), validate(ws))[1],
        r"slides\.csv.*duplicate.*slide_id", 1),
    "slides.csv unknown case": Bad(
        lambda ws: (edit_csv(ws / "cohort/slides.csv", lambda d: d.assign(case_id=d.case_id.mask(d.index == 0, "X9"))),
                    validate(ws))[1], r"slides\.csv line 2 \(slide \S+\): case_id 'X9' not in cases\.csv", 1),
    "slides.csv slide id climbs out": Bad(
        lambda ws: (edit_csv(ws / "cohort/slides.csv",
                             lambda d: d.assign(slide_id=d.slide_id.mask(d.index == 1, "../../heatmaps/x"))),
                    validate(ws))[1], r"slides\.csv line 3: slide_id '\.\./\.\./heatmaps/x' is not a file name", 1),
    "slides.csv path climbs out": Bad(
        lambda ws: (edit_csv(ws / "cohort/slides.csv",
                             lambda d: d.assign(path=d.path.mask(d.index == 0, "../../../../etc/passwd"))),
                    validate(ws))[1], r"slides\.csv line 2 \(slide \S+\): bag path \.\./\.\./\.\./\.\./etc/passwd "
                                      r"climbs out of the cohort directory", 1),
    "bag missing": Bad(lambda ws: (_rm(bag_of(ws / "cohort")[1]), validate(ws))[1],
                       r"slides\.csv line 2 \(slide \S+\): bag file bags/\S+ missing", 1),
    "bag a dangling symlink": Bad(
        lambda ws: ((p := bag_of(ws / "cohort")[1]).unlink(), p.symlink_to(ws / "nowhere.h5"), validate(ws))[2],
        r"slides\.csv line 2 \(slide \S+\): bag file bags/\S+ missing", 1),
    "bag truncated": Bad(lambda ws: (truncate(bag_of(ws / "cohort")[1]), validate(ws))[1],
                         r"bags/\S+\.h5 \(slide \S+, case \S+\): unreadable bag", 1),
    "bag not HDF5": Bad(lambda ws: (bag_of(ws / "cohort")[1].write_text("features,coords\n1,2\n"), validate(ws))[1],
                        r"bags/\S+\.h5 \(slide \S+, case \S+\): unreadable bag", 1),
    "bag a directory": Bad(lambda ws: ((p := bag_of(ws / "cohort")[1]).unlink(), p.mkdir(), validate(ws))[2],
                           r"slides\.csv line 2 \(slide \S+\): bag file bags/\S+ missing", 1),
    "NaN features": Bad(lambda ws: (set_feature(ws / "cohort", np.nan), validate_full(ws))[1],
                        r"bags/\S+\.h5 \(slide \S+, case \S+\).*(NaN|non-finite)", 1),
    "inf features": Bad(lambda ws: (set_feature(ws / "cohort", np.inf), validate_full(ws))[1],
                        r"bags/\S+\.h5 \(slide \S+, case \S+\).*(inf|non-finite)", 1),
    "mixed feature widths": Bad(lambda ws: (widen_bag(ws / "cohort"), validate(ws))[1], r"bags/\S+\.h5 \(slide \S+, case \S+\): feature dim 9 differs from cohort\.yaml", 1),
    "rna.h5ad truncated": Bad(lambda ws: (truncate(ws / "cohort/rna.h5ad"), validate(ws))[1], r"rna\.h5ad: cannot be read as AnnData", 1),
    "rna.h5ad not AnnData": Bad(lambda ws: ((ws / "cohort/rna.h5ad").write_text("gene,case\n"), validate(ws))[1],
                                r"rna\.h5ad: cannot be read as AnnData", 1),
    "reports.jsonl bad line": Bad(
        lambda ws: ((ws / "cohort/reports.jsonl").write_text('{"case_id": "x", "text": "ok"}\n{not json\n'),
                    validate(ws))[1], r"reports\.jsonl line 2", 1),
    # pretrain: config and paths, refused before any work
    "pretrain unknown config key": Bad(lambda ws: pretrain(ws, "train.stepz=3"), r"unknown config key\(s\) train\.stepz"),
    "pretrain wrong type": Bad(lambda ws: pretrain(ws, "train.steps=many"), r"train\.steps: Couldn't parse 'many'"),
    "pretrain zero steps": Bad(lambda ws: pretrain(ws, "train.steps=0"), r"train\.steps: must be >= 1"),
    "pretrain negative batch": Bad(lambda ws: pretrain(ws, "loader.batch_size=-8"), r"batch_size must be ≥ 1, got -8"),
    "pretrain cohort missing": Bad(lambda ws: pretrain(ws, f"data.cohort={ws / 'nope'}"), r"cohort \S+/nope: "),
    "pretrain config file missing": Bad(
        lambda ws: ["pretrain", "--config", str(ws / "missing.yaml"), "--out", str(ws / "run")], r"missing\.yaml: .*No such file"),
    "pretrain config not YAML": Bad(
        lambda ws: ((ws / "bad.yaml").write_text("train: {steps: [\n"),
                    ["pretrain", "--config", str(ws / "bad.yaml"), "--out", str(ws / "run")])[1], r"bad\.yaml: not valid YAML \(line 2"),
    "pretrain out is a file": Bad(lambda ws: ((ws / "run").write_text("x"), pretrain(ws))[1],
                                  r"run: --out is a file, not a run directory"),
    "pretrain out under a file": Bad(
        lambda ws: ((ws / "f").write_text("x"), pretrain(ws)[:4] + [str(ws / "f" / "run")] + pretrain(ws)[5:])[1],
        r"Not a directory: '\S+/f/run'"),
    "pretrain modality no case has": Bad(lambda ws: pretrain(ws, "data.modalities=[slide, nonsense]"),
                                         r"data\.modalities\.1: Cannot convert 'nonsense'"),
    # embed / export on run directories that are not runs
    "embed run missing": Bad(lambda ws: ["embed", "--run", str(ws / "norun"), "--cohort", str(ws / "cohort"),
                                         "--out", str(ws / "e.h5ad")], r"norun: no such run directory"),
    "embed run without checkpoint": Bad(
        lambda ws: ((ws / "run").mkdir(), (ws / "run/config.yaml").write_text("{}\n"),
                    ["embed", "--run", str(ws / "run"), "--cohort", str(ws / "cohort"),
                     "--out", str(ws / "e.h5ad")])[2], r"run: splits\.json is missing"),
    "export run missing": Bad(lambda ws: ["export", "--run", str(ws / "norun"), "--out", str(ws / "x")],
                              r"norun: no such run directory"),
    # probe tasks
    "probe task names a missing column": Bad(
        lambda ws: ["probe", "--embeddings", embeddings(ws), "--out", str(ws / "p"), "--tasks",
                    write_tasks(ws, [{"name": "t1", "type": "classification", "label": "grade",
                                      "embeddings": ["slide"]}])], r"task 't1': key 'label' names obs column 'grade'"),
    "probe single-class label": Bad(
        lambda ws: ["probe", "--embeddings", embeddings(ws, subtype="a"), "--out", str(ws / "p"), "--tasks",
                    write_tasks(ws, [{"name": "t1", "type": "classification", "label": "subtype",
                                      "embeddings": ["slide"]}])], r"task 't1': key 'label' column 'subtype' has fewer than 2 classes"),
    "probe every case censored": Bad(
        lambda ws: ["probe", "--embeddings", embeddings(ws, os_event=0), "--out", str(ws / "p"), "--tasks",
                    write_tasks(ws, [{"name": "os", "type": "survival", "time": "os_days", "event": "os_event",
                                      "embeddings": ["slide"]}])], r"task 'os': key 'event' column 'os_event' has 0 event"),
    "probe unknown task type": Bad(
        lambda ws: ["probe", "--embeddings", embeddings(ws), "--out", str(ws / "p"), "--tasks",
                    write_tasks(ws, [{"name": "t1", "type": "regresion", "embeddings": ["slide"]}])], r"tasks\.yaml: tasks\[0\] \(t1\): type 'regresion'"),
    "probe tasks file missing": Bad(
        lambda ws: ["probe", "--embeddings", embeddings(ws), "--out", str(ws / "p"), "--tasks", str(ws / "no.yaml")],
        r"no\.yaml"),
    "probe embedding key missing": Bad(
        lambda ws: ["probe", "--embeddings", embeddings(ws), "--out", str(ws / "p"), "--tasks",
                    write_tasks(ws, [{"name": "t1", "type": "classification", "label": "subtype",
                                      "embeddings": ["rna"]}])], r"task 't1': key 'embeddings' names 'rna'"),
    # importers
    "maf cut inside its header": Bad(
        lambda ws: ((ws / "a.maf").write_text("#version 2.4\n" + MAF_HEADER[:-12]),
                    ["import", "maf", "--out", str(ws / "cohort"), "--inputs", f"[{ws / 'a.maf'}]"])[1],
        r"a\.maf: ends in the middle of a line \(line 2\)"),
    "maf cut mid-row": Bad(
        lambda ws: ((ws / "a.maf").write_text(MAF_HEADER + MAF_ROW + MAF_ROW[:20]),
                    ["import", "maf", "--out", str(ws / "cohort"), "--inputs", f"[{ws / 'a.maf'}]"])[1],
        r"a\.maf: ends in the middle of a line \(line 3\)"),
    "maf gzip truncated": Bad(
        lambda ws: ((ws / "a.maf.gz").write_bytes(gzip.compress((MAF_HEADER + MAF_ROW * 200).encode())[:120]),
                    ["import", "maf", "--out", str(ws / "cohort"), "--inputs", f"[{ws / 'a.maf.gz'}]"])[1],
        r"a\.maf\.gz: cannot be read as a MAF"),
    "maf one huge line": Bad(
        lambda ws: ((ws / "a.maf").write_bytes(b"\0\1" * (1 << 20)),
                    ["import", "maf", "--out", str(ws / "cohort"), "--inputs", f"[{ws / 'a.maf'}]"])[1],
        r"a\.maf: cannot be read as a MAF: \S+a\.maf: no line break in the first 1 MiB"),
    "maf missing column": Bad(
        lambda ws: ((ws / "a.maf").write_text("Hugo_Symbol\tFILTER\nTP53\tPASS\n"),
                    ["import", "maf", "--out", str(ws / "cohort"), "--inputs", f"[{ws / 'a.maf'}]"])[1],
        r"a\.maf line 1: MAF column\(s\) \['Variant_Classification', 'Tumor_Sample_Barcode'\] missing"),
    "clinical table empty": Bad(
        lambda ws: ((ws / "cdr.tsv").write_text(""),
                    ["import", "clinical", "--out", str(ws / "cohort"), "--cdr", str(ws / "cdr.tsv")])[1],
        r"cdr\.tsv: cannot be read"),
    "rna matrix is an image": Bad(
        lambda ws: ((ws / "x.tsv").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)),
                    ["import", "gdc-rna", "--out", str(ws / "cohort"), "--format", "wide",
                     "--inputs", f"[{ws / 'x.tsv'}]"])[1],
        r"x\.tsv: cannot be read"),
    # the other commands
    "extract slide folder missing": Bad(
        lambda ws: ["extract", "--wsi-dir", str(ws / "no_slides"), "--out", str(ws / "x"), "--encoder", "vit-test",
                    "--random-init"], r"--wsi_dir \S+/no_slides: no such directory"),
    "extract unknown encoder": Bad(
        lambda ws: ((ws / "wsi").mkdir(), ["extract", "--wsi-dir", str(ws / "wsi"), "--out", str(ws / "x"),
                                           "--encoder", "uni-9", "--random-init"])[1],
        r"unknown encoder 'uni-9'; known: "),
    "import-encoder checkpoint missing": Bad(
        lambda ws: ["import-encoder", "--checkpoint", str(ws / "w.safetensors"), "--out", str(ws / "enc")],
        r"w\.safetensors: weights file not found"),
    "run pipeline file missing": Bad(lambda ws: ["run", str(ws / "pipe.yaml")], r"pipe\.yaml: .*No such file"),
    "launch unknown executor": Bad(
        lambda ws: ["launch", "--executor", "kubernetes", "--config", DEMO, "--out", str(ws / "run")],
        r"executor: Cannot convert 'kubernetes'"),
    # simulate
    "simulate zero cases": Bad(lambda ws: ["simulate", "--out", str(ws / "sim"), "--n_cases", "0"], r"n_cases=0 must be >= 1"),
    "simulate out is a file": Bad(lambda ws: ((ws / "sim").write_text("x"), ["simulate", "--out", str(ws / "sim"),
                                                                           "--n_cases", "8"])[1], r"sim: exists, is not empty"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_one_line_naming_its_culprit_and_changes_nothing(name, ws, capsys):
    case = CASES[name]
    argv = case.setup(ws)
    before = snapshot(ws)
    rc = main(argv)
    out, err = capsys.readouterr()
    said = err if case.rc == 2 else out + err
    assert rc == case.rc, f"{name}: exit {rc}\n{out}\n{err}"
    assert "Traceback" not in said, said
    assert re.search(case.culprit, said), f"{name}: {case.culprit!r} not in:\n{said}"
    if case.rc == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert re.search(case.culprit, lines[0]), err  # named on the first line
        assert len(lines) == 1 or re.match(r"mmfm \S+: error: cohort \S+: \d+ error", lines[0]), err
    after = snapshot(ws)
    assert {k: v for k, v in after.items() if k in before} == before, f"{name}: a file already there changed"
    assert not [k for k in after if k not in before and Path(k).name.startswith(".") and ".tmp" in k]


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 40


# ---- inputs the contract accepts: the same result as the clean input -------------------------------------------

def _crlf_bom(path: Path) -> None:
    text = path.read_text()
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())


def test_crlf_bom_tables_and_unicode_paths_validate_like_the_clean_cohort(clean_cohort, tmp_path, capsys):
    assert main(["validate", str(clean_cohort), "--headers-only", "--json", str(tmp_path / "clean.json")]) == 0
    odd = writable_copy(clean_cohort, tmp_path / "Kohorte mit Leerzeichen – é" / "cohort")
    for name in ("cases.csv", "slides.csv"):
        _crlf_bom(odd / name)
    assert main(["validate", str(odd), "--headers-only", "--json", str(tmp_path / "odd.json")]) == 0, \
        capsys.readouterr()
    clean, got = (json.loads((tmp_path / f).read_text()) for f in ("clean.json", "odd.json"))
    assert got["ok"] and got["errors"] == [] and got["excluded"] == clean["excluded"] == []
    assert len(got["warnings"]) == len(clean["warnings"])
    from mmfm.data.cohort import Cohort

    a, b = Cohort.open(clean_cohort), Cohort.open(odd)
    pd.testing.assert_frame_equal(a.cases, b.cases)
    assert list(a.slides.index) == list(b.slides.index) and list(a.slides.n_tiles) == list(b.slides.n_tiles)
