"""The command line: every command is a typed dataclass parsed by draccus; help, flags, YAML and `--set`
come from the same fields; user errors are one line on stderr with exit code 2."""

from __future__ import annotations

import dataclasses
import os
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


def test_compilation_cache_defaults_to_the_user_cache_dir_and_respects_overrides(tmp_path):
    from mmfm.cli.jit_cache import configure, pop_flag

    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert configure(environ=env) == str(tmp_path / "mmfm" / "jax") == env["JAX_COMPILATION_CACHE_DIR"]
    assert int(env["JAX_COMPILATION_CACHE_MAX_SIZE"]) > 0  # bounded: JAX then locks the directory across processes
    env = {"MMFM_COMPILATION_CACHE": str(tmp_path / "mine")}
    assert configure(environ=env) == str(tmp_path / "mine")
    env = {"JAX_COMPILATION_CACHE_DIR": "/explicit", "MMFM_COMPILATION_CACHE": str(tmp_path / "mine")}
    assert configure(environ=env) == "/explicit"  # an explicit JAX setting wins over a directory
    for off in ({"MMFM_COMPILATION_CACHE": "off"}, {"JAX_COMPILATION_CACHE_DIR": "/explicit"}):
        value = pop_flag(["demo", "--compilation-cache", "off"])[1] if "JAX_COMPILATION_CACHE_DIR" in off else None
        assert configure(value, environ=off) is None and off["JAX_ENABLE_COMPILATION_CACHE"] == "false"
    assert pop_flag(["embed", "--compilation-cache=/c", "--run", "r"]) == (["embed", "--run", "r"], "/c")
    assert pop_flag(["--no-compilation-cache", "demo"]) == (["demo"], "off")


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    code = ("from mmfm.cli import jit_cache; jit_cache.configure()\n"
            "import jax, jax.numpy as jnp\n"
            "hits = []\n"
            "jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e))\n"
            "print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum()))\n"
            "print(hits.count('/jax/compilation_cache/cache_hits'))\n")
    env = dict(os.environ, MMFM_COMPILATION_CACHE=str(tmp_path / "jit"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    (v1, h1), (v2, h2) = (r.stdout.split() for r in runs)
    assert v1 == v2 and int(h1) == 0 and int(h2) >= 1  # same result, the second run compiled nothing
    assert any(p.name.endswith("-cache") for p in (tmp_path / "jit").iterdir())


def test_a_short_run_starts_the_backend_with_the_classic_emitters_and_leaves_xla_flags_as_they_were():
    """`fast_compile`'s `start_backend(cheap_emitters=True)`: every program of the process compiles as with
    `xla_cpu_use_fusion_emitters=false` (a function may still ask for the fusion emitters), XLA_FLAGS is restored for
    subprocesses, and a process whose backend already runs is left alone."""
    code = ("import os, jax, jax.numpy as jnp\n"
            "from mmfm.cli.jit_cache import start_backend\n"
            "before = os.environ.get('XLA_FLAGS')\n"
            "assert start_backend(cheap_emitters=True) and os.environ.get('XLA_FLAGS') == before\n"
            "assert not start_backend(cheap_emitters=True)  # the backend runs: nothing changes\n"
            "f = lambda x, w: (jnp.tanh(x @ w) * jnp.exp(-x) + jax.nn.gelu(x)).sum(0)\n"
            "args = jnp.ones((64, 32)), jnp.ones((32, 32))\n"
            "hlo = lambda **o: jax.jit(f).lower(*args).compile(o or None).as_text()\n"
            "print(hlo() == hlo(xla_cpu_use_fusion_emitters=False), hlo() == hlo(xla_cpu_use_fusion_emitters=True))\n")
    env = dict(os.environ, MMFM_COMPILATION_CACHE="off", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "False"]


def test_called_from_python_main_leaves_the_garbage_collector_alone(tmp_path, capsys):
    """The `mmfm` process freezes its objects into the collector's permanent generation (after the imports, and at
    exit) and collects its young generation less often; a test or notebook calling `main([...])` keeps its own
    collector's settings."""
    import gc

    before = gc.get_freeze_count(), gc.get_threshold()
    assert main(["validate", str(tmp_path / "missing")]) == 1  # a finished check that found a problem
    assert (gc.get_freeze_count(), gc.get_threshold()) == before
    code = "import gc, sys; from mmfm.cli import main; sys.argv = ['mmfm', 'validate', '--help']; main(); " \
           "print(gc.get_freeze_count() > 0, gc.get_threshold()[0])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split()[-2:] == ["True", "20000"], run.stderr
