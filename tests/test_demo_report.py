"""`mmfm demo --seeds 2` at toy sizes: the report's table reads chance · baselines · model · oracle, every model
cell is the mean ± SD across seeds of what each seed's probe wrote, and the paired comparison over seeds is the
paired t-test a reader would compute from those files (scipy)."""

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from mmfm.cli import main

pytestmark = pytest.mark.slow
TOY = ["--cases", "60", "--sim.feature_dim", "16", "--sim.bag_size_median", "40", "--sim.n_genes", "300",
       "--n_bootstrap", "5", "--no-plots", "--seeds", "2"]
for key, value in {"train.steps": 2, "train.eval_every": 2, "train.ckpt_every": 2, "train.progress": "false",
                   "loader.batch_size": 8, "loader.tiles_per_slide": 16, "loader.n_genes": 50, "model.embed_dim": 16,
                   "model.slide.abmil.hidden": 16, "model.slide.abmil.attn_dim": 8, "model.rna.hidden": 16,
                   "model.protein.hidden": 16, "data.eval_max_cases": 16}.items():
    TOY += ["--set", f"{key}={value}"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--out", str(out), *TOY]) == 0
    return out


def _fold_means(results: Path, task: str, metric: str, embedding: str) -> float:
    r = pd.read_csv(results)
    return float(r[(r.task == task) & (r.metric == metric) & (r.embedding == embedding)].value.mean())  # NaN: skipped


def test_report_table_reads_chance_baselines_model_oracle(demo):
    readme = (demo / "report" / "README.md").read_text()
    assert "## Chance · baselines · model · oracle" in readme
    assert ("| task | target | metric | chance | baseline: slide_meanpool | baseline: slide_random | "
            "baseline: baseline:grade | model: slide | model: slide_backbone | model: rna | model: report | oracle |") in readme
    # report text is a modality of the demo: slide↔report retrieval and zero-shot rows beside the linear probes
    assert "model: slide->report" in readme and "model: report->slide" in readme
    assert "| necrosis (zero-shot) | report_necrosis | auroc (zero-shot) | 0.500 |" in readme
    assert "| necrosis | report_necrosis | auroc | 0.500 |" in readme
    refs = pd.read_csv(demo / "report" / "references_seeds.csv", keep_default_na=False).set_index("task")
    assert refs.loc["subtype", "chance"] == "0.500" and refs.loc["overall survival", "chance"] == "0.500"
    assert "site-only" in refs.loc["site robustness", "chance"]  # RI is read against a site-only embedding too
    # every model cell = mean ± SD (ddof=1) over the seeds of each seed's own fold mean (results.csv)
    per_seed = [_fold_means(demo / "report" / d / "results.csv", "subtype", "auroc", "slide") for d in ("", "seed-1")]
    assert refs.loc["subtype", "model: slide"] == f"{np.mean(per_seed):.3f} ± {np.std(per_seed, ddof=1):.3f}"
    oracle = _fold_means(demo / "report" / "results.csv", "subtype", "auroc", "oracle")
    assert refs.loc["subtype", "oracle"] == f"{oracle:.3f} ± 0.000"  # the ceiling does not depend on the seed
    assert oracle > 0.9  # the latent subtype is in the oracle: a sanity check that the right truth was attached


def test_seeds_share_the_split_and_baselines_and_are_compared_pairwise(demo):
    s0, s1 = (json.loads((demo / d / "splits.json").read_text()) for d in ("run", "run-seed1"))
    assert s0 == s1 and s0["val"] and not set(s0["val"]) & set(s0["heldout"])
    e0, e1 = ad.read_h5ad(demo / "embeddings.h5ad"), ad.read_h5ad(demo / "embeddings-seed1.h5ad")
    assert (e0.obs["split"] == "heldout").all() and list(e0.obs_names) == list(e1.obs_names)
    for key in ("slide_meanpool", "slide_random", "oracle"):
        np.testing.assert_array_equal(e0.obsm[key], e1.obsm[key])
    assert not np.allclose(np.nan_to_num(e0.obsm["slide"]), np.nan_to_num(e1.obsm["slide"]))  # two seeds, two models
    paired = pd.read_csv(demo / "report" / "paired_seeds.csv", keep_default_na=False)
    row = paired[(paired.task == "subtype") & (paired.baseline == "slide_meanpool")].iloc[0]
    a = [_fold_means(demo / "report" / d / "results.csv", "subtype", "auroc", "slide") for d in ("", "seed-1")]
    b = [_fold_means(demo / "report" / d / "results.csv", "subtype", "auroc", "slide_meanpool") for d in ("", "seed-1")]
    t = sps.ttest_rel(a, b)
    assert row.method == "paired t over seeds" and int(row.n) == 2
    assert float(row["mean"]) == pytest.approx(np.mean(np.subtract(a, b)))
    assert float(row.p) == pytest.approx(t.pvalue)
