"""`mmfm demo`: the shipped pipeline file configs/pipelines/demo.yaml (or demo_quick.yaml with --quick), run by
`mmfm.cli.pipeline` exactly as `mmfm run` runs any pipeline file; the flags are short names for its keys."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from mmfm.cli.pipeline import PIPELINES, Pipeline, read_pipeline, run_pipeline
from mmfm.config import cli_args, narrow

DESCRIPTION = """\
The whole pipeline on a simulated cohort, as a researcher would run it on their own: simulate → validate →
pretrain slide ↔ RNA ↔ protein ↔ report text (configs/demo_report.yaml, shipped with the package) → embed
the held-out cases → probe (configs/tasks/demo_report.yaml: survival, subtype, mutations, retrieval across
every pair, robustness, and the facts the reports state, linear beside zero-shot) → heatmaps of two held-out
slides → report (--out/report/README.md with every plot). Each row reads chance · baselines
(mean-pool, random-init) · pretrained · oracle (the simulator's latent variables), with paired differences
model − baseline; --seeds N pretrains N seeds and reports the spread across them. Re-running reuses finished
steps. The steps are the pipeline file configs/pipelines/demo.yaml (`mmfm run` runs it, or your own, on any
cohort); --quick runs configs/pipelines/demo_quick.yaml, the same steps and report rows on a small cohort.
Flags: --cases, --seed, --sim.KEY (the simulator), --seeds, --n_bootstrap, --no-plots; any key of the
pretraining recipe with --set train.steps=50 (or --recipe.train.steps=50), any pipeline key with its full name
(--pretrain.seeds 3).

example: mmfm demo --out demo_out --cases 500 --seeds 3"""

ALIASES = {"cases": "cohort.simulate.n_cases", "seed": "cohort.simulate.seed", "sim": "cohort.simulate",
           "seeds": "pretrain.seeds", "recipe": "pretrain.overrides", "n_bootstrap": "probe.n_bootstrap",
           "plots": "report.plots"}
SET_PREFIX = "pretrain.overrides."


@dataclass
class Config(Pipeline):
    quick: bool = False                # configs/pipelines/demo_quick.yaml: every report row on a small cohort


def base(argv: list[str]) -> dict:
    """The shipped pipeline file the flags override key by key (--quick picks the small one)."""
    _, overrides = cli_args(argv, ALIASES, SET_PREFIX)
    quick = [yaml.safe_load(value) for key, _, value in (o.partition("=") for o in overrides) if key == "quick"]
    return read_pipeline(PIPELINES / ("demo_quick.yaml" if quick and quick[-1] else "demo.yaml"))


def run(cfg: Config) -> int:
    run_pipeline(narrow(cfg, Pipeline), log="demo")
    return 0
