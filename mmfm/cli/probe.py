"""`mmfm probe`: frozen-embedding probes with the field's protocols, CIs and leakage guards."""

from __future__ import annotations

import logging

from mmfm.eval.probe import ProbeConfig as Config, run_probe

DESCRIPTION = """\
Run the tasks of a TASKS.yaml (survival, classification, mutation, few-shot, regression of genes / proteins /
clinical numbers, retrieval, robustness) on any AnnData of embeddings, supervised MIL / fine-tuning rows
(`type: mil`) on the tile bags of the cohort the embeddings came from (or --cohort), and spot-level expression
from the tiles under each spot (`type: spots`) on cohorts with spot tables, on the same folds: patient-level folds
(or a Patho-Bench split file), baselines beside every result, mean ± SE over folds or bootstrap 95% CIs. Refuses
test cases seen in pretraining unless --allow_overlap, and the run's validation cases (they chose the checkpoint)
unless --allow_validation_overlap.
Writes results.csv, bootstrap.csv, summary.md, plots and the exact folds used to --out.

example: mmfm probe --embeddings runs/demo/embeddings.h5ad --tasks configs/tasks/demo.yaml --out runs/demo/probe"""


def run(cfg: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = run_probe(cfg)
    print(f"wrote {res.out / 'results.csv'} and {res.out / 'summary.md'}")
    return 0
