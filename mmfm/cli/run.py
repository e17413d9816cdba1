"""`mmfm run PIPELINE.yaml`: a pipeline file (cohort → validate → pretrain → embed → probe → heatmaps → report)."""

from __future__ import annotations

from dataclasses import dataclass

from mmfm.cli.pipeline import Pipeline, read_pipeline, run_pipeline
from mmfm.config import ConfigError, cli_args, decode, narrow

DESCRIPTION = """\
Run a pipeline file: simulate a cohort (cohort.simulate) or take an existing one (cohort.path: validated, never
written), pretrain the recipe it names (pretrain.recipe + pretrain.overrides; pretrain.seeds seeds), embed the
held-out cases, probe them with its task file beside the baselines (and the simulator's oracle when the cohort
has its truth), draw heatmaps of a few held-out slides and write OUT/report/README.md. `mmfm demo` is this command
on the shipped configs/pipelines/demo.yaml. Re-running reuses finished steps. Any key changes with --set a.b=value.

example: mmfm run configs/pipelines/demo.yaml --set cohort.path=my_cohort --out my_demo"""

POSITIONAL = "pipeline"


@dataclass
class Config(Pipeline):
    pipeline: str = ""                 # the pipeline file (YAML), the first argument


def base(argv: list[str]) -> dict:
    """The pipeline file under the flags, its own keys checked first so that an error names the file."""
    _, overrides = cli_args(argv)
    path = next((o.partition("=")[2] for o in overrides if o.partition("=")[0] == "pipeline"), "")
    if not path:
        raise ConfigError("give a pipeline file: mmfm run PIPELINE.yaml [--set key=value ...] [--out DIR]")
    raw = read_pipeline(path)
    decode(Pipeline, raw, path)
    return raw


def run(cfg: Config) -> int:
    run_pipeline(narrow(cfg, Pipeline), log="run", where=cfg.pipeline)
    return 0
