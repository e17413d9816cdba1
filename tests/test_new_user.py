"""What a new user hits (issue 10): the README's pipeline runs as written, a re-run never loses work, and every
bad input is one line on stderr naming the file / key / task with exit code 2 — never a traceback."""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
from pathlib import Path

import pytest

from mmfm.cli import main
from mmfm.simulate import SimConfig, simulate_cohort

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SMALL = ["--set", "train.steps=3", "--set", "train.eval_every=3", "--set", "train.ckpt_every=3",
         "--set", "loader.batch_size=8", "--set", "loader.tiles_per_slide=16", "--set", "loader.n_genes=40",
         "--set", "train.progress=false", "--set", "data.eval_max_cases=16"]


def readme_pipeline() -> list[list[str]]:
    block = re.search(r"```bash\n(mmfm simulate.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [shlex.split(line.split("#")[0].replace("[--resume]", "")) for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A simulated cohort and a finished 3-step run (the pieces the error tests need)."""
    root = tmp_path_factory.mktemp("user")
    cohort = simulate_cohort(root / "cohort", SimConfig(n_cases=60, feature_dim=16, bag_size_median=40,
                                                        n_genes=200, seed=3))
    run = root / "run"
    assert main(["pretrain", "--config", str(REPO / "configs/demo.yaml"), "--out", str(run),
                 "--set", f"data.cohort={cohort}", *SMALL]) == 0
    return root, cohort, run


def test_readme_pipeline_runs_as_written(tmp_path, monkeypatch, capsys):
    """Each README command, in order, from a fresh folder; only sizes are changed (a 2-core CI budget: options
    appended, and the probe's task file is configs/tasks/demo_quick.yaml, demo.yaml's tasks with 3 folds) and
    `extract` is left out (it needs slides and a tile encoder's weights: tests/test_bridges_extract.py)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    extra = {"simulate": ["--cases", "60", "--feature_dim", "16", "--bag_size_median", "40", "--n_genes", "200"],
             "pretrain": SMALL, "probe": ["--no-plots", "--n_bootstrap", "5"]}
    smaller = {"configs/tasks/demo.yaml": "configs/tasks/demo_quick.yaml"}
    commands = readme_pipeline()
    assert [c[1] for c in commands] == ["simulate", "extract", "validate", "pretrain", "embed", "probe"]
    assert set(smaller) <= {a for c in commands for a in c}  # the README's task file, as written
    for argv in commands:
        if argv[1] == "extract":
            continue
        assert main([smaller.get(a, a) for a in argv[1:]] + extra.get(argv[1], [])) == 0, \
            f"{shlex.join(argv)} failed:\n{capsys.readouterr()}"
    # embed took the run's held-out cases (what probe may test), so probe ran without an overlap refusal
    assert (tmp_path / "runs/demo/probe/summary.md").exists()


def test_pretrain_into_a_used_run_directory_is_refused_before_any_work(small, capsys):
    root, cohort, run = small
    before = {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in run.glob("*.jsonl")}
    rc = main(["pretrain", "--config", str(REPO / "configs/demo.yaml"), "--out", str(run),
               "--set", f"data.cohort={cohort}", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and f"{run}: run directory is not empty" in err and "--resume" in err
    assert {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in run.glob("*.jsonl")} == before


def test_batch_larger_than_the_cohort_names_the_key(small, tmp_path, capsys):
    _, cohort, _ = small
    rc = main(["pretrain", "--config", str(REPO / "configs/demo.yaml"), "--out", str(tmp_path / "r"),
               "--set", f"data.cohort={cohort}", "--set", "loader.batch_size=64"])
    err = capsys.readouterr().err
    assert rc == 2 and "LoaderConfig.batch_size=64 exceeds the" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing left behind


@pytest.mark.parametrize("case", ["missing", "no_shapes", "no_checkpoint", "bad_step", "best_without_metric",
                                  "bad_cohort", "bad_cases_file"])
def test_embed_bad_inputs(small, tmp_path, case, capsys):
    _, cohort, run = small
    args = {"run": str(run), "cohort": str(cohort), "out": str(tmp_path / "e.h5ad")}
    expect = ""
    if case == "missing":
        args["run"], expect = str(tmp_path / "nope"), "no such run directory"
    elif case in ("no_shapes", "no_checkpoint", "best_without_metric"):
        broken = tmp_path / "broken"
        shutil.copytree(run, broken)
        if case == "no_shapes":  # a pretrain that failed before writing its shapes
            (broken / "shapes.json").unlink()
            expect = "shapes.json is missing"
        elif case == "no_checkpoint":
            shutil.rmtree(broken / "checkpoints")
            expect = "no finished checkpoint"
        else:  # --step best needs the held-out metric of train.best_metric
            (broken / "eval.jsonl").unlink()
            args["step"], expect = "best", "no checkpoint with eval metric 'recall@5/slide->rna'"
        args["run"] = str(broken)
    elif case == "bad_step":
        args["step"], expect = "7", "no checkpoint for step 7 (have [3])"
    elif case == "bad_cohort":
        args["cohort"], expect = str(tmp_path / "no_cohort"), "no_cohort"
    elif case == "bad_cases_file":
        args["cases"], expect = str(tmp_path / "ids.txt"), "not 'heldout', 'all' or a file"
    argv = ["embed"] + [x for k, v in args.items() for x in (f"--{k}", v)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "Traceback" not in err, err


def test_probe_on_few_cases_uses_fewer_folds_with_a_note(tmp_path):
    import anndata as ad
    import numpy as np
    import pandas as pd

    from mmfm.eval.probe import probe

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"subtype": ["a"] * 4 + ["b"] * 3}, index=[f"c{i}" for i in range(7)])
    emb = ad.AnnData(obs=obs, obsm={"slide": rng.normal(size=(7, 3))})
    res = probe(emb, [{"name": "sub", "type": "classification", "label": "subtype", "embeddings": ["slide"]}],
                tmp_path / "p", plots=False)
    assert any("sub: 5 folds reduced to 4: the largest class has 4 case(s)" in n for n in res.notes)
    assert set(res.results["fold"]) == {"0", "1", "2", "3"}


def test_probe_with_too_few_cases_names_the_task_and_counts(tmp_path, capsys):
    import anndata as ad
    import numpy as np
    import pandas as pd

    obs = pd.DataFrame({"subtype": ["a", "b", "c"]}, index=["c1", "c2", "c3"])
    ad.AnnData(obs=obs, obsm={"slide": np.random.default_rng(0).normal(size=(3, 4))}).write_h5ad(tmp_path / "e.h5ad")
    (tmp_path / "t.yaml").write_text("- {name: sub, type: classification, label: subtype, embeddings: [slide]}\n")
    rc = main(["probe", "--embeddings", str(tmp_path / "e.h5ad"), "--tasks", str(tmp_path / "t.yaml"),
               "--out", str(tmp_path / "p"), "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 2 and "task 'sub': too few cases for 2 folds" in err and "'a': 1" in err
