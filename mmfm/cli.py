"""`mmfm <command>`: one entry point; each command lives in the module that does the work.

Every command module exposes `add_arguments(parser)` and `run(args) -> int` (the exit code).
Modules are imported only when their command runs, so `mmfm validate` never imports jax or torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "simulate": ("mmfm.data.simulate", "simulate a cohort with latent truth"),
    "validate": ("mmfm.data.cohort", "check a cohort directory and report every problem"),
    "extract": ("mmfm.bridges.extract", "whole-slide images → tile-feature bags (PyTorch)"),
    "pretrain": ("mmfm.train.loop", "sharded multimodal pretraining"),
    "embed": ("mmfm.eval.embed", "slide/case embeddings for every modality → AnnData"),
    "probe": ("mmfm.eval.probe", "survival / classification / retrieval / robustness probes"),
    "demo": ("mmfm.eval.demo", "simulate → pretrain → embed → probe → report"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmfm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:  # import only the module that will run
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
