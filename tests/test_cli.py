"""The command line: every command is a typed dataclass parsed by draccus; help, flags, YAML and `--set`
come from the same fields; user errors are one line on stderr with exit code 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from mmfm import config
from mmfm.cli import COMMANDS, load_command, main


def _commands():
    from mmfm.importers import IMPORTERS

    return [[n] for n in COMMANDS if n != "import"] + [["import", s] for s in IMPORTERS]


@pytest.mark.parametrize("argv", _commands(), ids=" ".join)
def test_every_command_has_a_description_an_example_and_field_help(argv, capsys):
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    mod = load_command(argv[0])
    config = mod.SUBCOMMANDS[argv[1]][0] if len(argv) > 1 else mod.Config
    first = (mod.describe(argv[1]) if len(argv) > 1 else mod.DESCRIPTION).strip().splitlines()[0]
    assert out.startswith(first)
    assert f"example: mmfm {' '.join(argv)}" in out
    for f in dataclasses.fields(config):
        assert f"--{f.name}" in out, f"{argv}: --{f.name} missing from --help"


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
    (["heatmap", "--run", "nope", "--cohort", "c", "--slide", "s", "--out", "o"], "nope: no such run directory"),
    (["heatmap", "--run", "r", "--cohort", "c", "--out", "o"], "required field(s) slide"),
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


def test_import_commands_build_a_cohort_that_validates(tmp_path, capsys):
    """`mmfm import <source>` on a GDC-format folder (the published formats, written by the fixture writer):
    the same importers as the Python API, driven by flags."""
    from mmfm.data.cohort import validate
    from mmfm.testing import write_gdc_download

    dl = write_gdc_download(tmp_path / "gdc")
    out = str(tmp_path / "cohort")
    steps = [["features", "--inputs", str(dl.trident_dir), "--preservation", "FFPE"],
             ["gdc-rna", "--inputs", str(dl.rna_dir), "--sample_sheet", str(dl.rna_sheet)],
             ["maf", "--inputs", str(dl.maf_dir), "--sample_sheet", str(dl.maf_sheet), "--genes", "[TP53, KRAS]"],
             ["clinical", "--cdr", str(dl.cdr)]]
    for step in steps:
        assert main(["import", *step, "--out", out]) == 0, capsys.readouterr()
    rep = validate(out)
    assert rep.ok, rep.format()
    assert {"mut_TP53", "mut_KRAS", "os_days"} <= set(
        __import__("pandas").read_csv(tmp_path / "cohort" / "cases.csv").columns)


def test_import_errors_name_the_source_or_file(tmp_path, capsys):
    assert main(["import", "frobnicate"]) == 2
    assert "choose a source: gdc-rna" in capsys.readouterr().err
    assert main(["import", "clinical", "--out", str(tmp_path / "c"), "--cdr", str(tmp_path / "missing.tsv")]) == 2
    err = capsys.readouterr().err
    assert "missing.tsv" in err and "Traceback" not in err
