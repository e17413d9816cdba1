"""The command line: every command is a typed dataclass parsed by draccus; help, flags, YAML and `--set`
come from the same fields; user errors are one line on stderr with exit code 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from mmfm import config
from mmfm.cli import COMMANDS, load_command, main


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_a_description_an_example_and_field_help(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    mod = load_command(name)
    assert out.startswith(mod.DESCRIPTION.strip().splitlines()[0])
    assert f"example: mmfm {name}" in out
    for f in dataclasses.fields(mod.Config):
        assert f"--{f.name}" in out, f"{name}: --{f.name} missing from --help"


def test_flags_yaml_and_set_are_one_thing(tmp_path):
    from mmfm.cli.pretrain import Config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {steps: 7, lr: 0.5}\ndata: {modalities: [slide, rna]}\n")
    a = config.parse_cli(Config, ["--config", str(recipe), "--train.steps=9", "--set", "train.lr=0.25",
                                  "--out", "RUN", "--resume", "--no-train.progress"])
    assert (a.train.steps, a.train.lr, a.out, a.resume, a.train.progress) == (9, 0.25, "RUN", True, False)
    assert a.data.modalities == ("slide", "rna")
    b = config.parse_cli(Config, ["--config", str(recipe), "--loader.batch-size", "4"])  # dashes = underscores
    assert b.loader.batch_size == 4 and b.train.steps == 7 and b.train.lr == 0.5


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--train.stepz=3"], "unknown config key(s) train.stepz"),
    (["pretrain", "--train.best_mode=mean"], "train.best_mode"),
    (["pretrain", "--data.modalities=[slide, dna]"], "data.modalities"),
    (["pretrain", "--loader.batch_size=many"], "loader.batch_size"),
    (["probe", "--embeddings", "x.h5ad", "--tasks", "t.yaml", "--out", "o", "--projection", "tsne"], "projection"),
    (["simulate", "--out", "x", "--cases", "ten"], "n_cases"),
    (["validate"], "cohort directory is required"),
    (["embed", "--run", "nope", "--cohort", "c", "--out", "o.h5ad"], "nope: no such run directory"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["pretrain", "positional"], "unexpected argument 'positional'"),
])
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_extract_without_the_torch_extra_names_the_extra():
    code = "import sys; sys.modules['torch'] = None; from mmfm.cli import main; sys.exit(main(['extract', '--help']))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 2
    assert "pip install 'mmfm[bridges]'" in res.stderr and "Traceback" not in res.stderr
