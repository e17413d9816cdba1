"""The demo's pipeline (configs/pipelines/demo_quick.yaml) at toy sizes with two pretraining seeds, run by
`mmfm run` on an existing cohort: the report's table reads chance · baselines · model · oracle, every model cell is
the mean ± SD across seeds of what each seed's probe wrote, and the paired comparison over seeds is the paired
t-test a reader would compute from those files (scipy). `mmfm demo --quick` with the demo's short flags decodes to
the same pipeline, so it writes the same report; the wheel test runs it."""

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from mmfm.cli import demo as demo_cmd
from mmfm.cli import main
from mmfm.cli import run as run_cmd
from mmfm.cli.pipeline import PIPELINES, HeatmapStep, Pipeline, heatmap_slides
from mmfm.config import narrow, parse_cli

QUICK = str(PIPELINES / "demo_quick.yaml")
RECIPE = {"train.steps": 2, "train.eval_every": 2, "train.ckpt_every": 2, "train.progress": "false",
          "loader.batch_size": 8, "loader.tiles_per_slide": 16, "loader.n_genes": 50, "model.embed_dim": 16,
          "model.slide.abmil.hidden": 16, "model.slide.abmil.attn_dim": 8, "model.rna.hidden": 16,
          "model.protein.hidden": 16, "data.eval_max_cases": 16, "loader.site_balance": "true"}
DEMO = ["--cases", "60", "--sim.feature_dim", "16", "--sim.bag_size_median", "40", "--sim.n_genes", "300",
        "--n_bootstrap", "5", "--no-plots", "--seeds", "2", "--embed.combat", "[slide]", *[a for k, v in RECIPE.items() for a in ("--set", f"{k}={v}")]]
RUN = ["--cohort.simulate.n_cases=60", "--cohort.simulate.feature_dim=16", "--cohort.simulate.bag_size_median=40",
       "--cohort.simulate.n_genes=300", "--probe.n_bootstrap=5", "--report.plots=false", "--pretrain.seeds=2",
       "--embed.combat=[slide]",
       *[f"--pretrain.overrides.{k}={v}" for k, v in RECIPE.items()]]


def _pipeline(cmd, argv: list[str]) -> Pipeline:
    """What `mmfm <cmd> ARGV` runs (the command line's own parsing, nothing run)."""
    return narrow(parse_cli(cmd.Config, argv, base=cmd.base(argv), aliases=getattr(cmd, "ALIASES", {}),
                            set_prefix=getattr(cmd, "SET_PREFIX", "")), Pipeline)


def test_demo_quick_is_the_quick_pipeline_file_under_the_same_keys():
    demo = _pipeline(demo_cmd, ["--quick", "--out", "o", *DEMO])
    assert demo == _pipeline(run_cmd, ["--pipeline", QUICK, "--out", "o", *RUN])
    assert demo.cohort.simulate.n_cases == 60 and demo.pretrain.seeds == 2 and not demo.report.plots
    assert _pipeline(demo_cmd, ["--out", "o"]) != _pipeline(demo_cmd, ["--quick", "--out", "o"])
    assert _pipeline(demo_cmd, ["--quick=false", "--out", "o"]) == _pipeline(demo_cmd, ["--out", "o"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """`mmfm run` on the cohort `mmfm demo --quick` would simulate, simulated beforehand: no simulation step."""
    from mmfm.simulate import simulate_cohort

    from mmfm.train.checkpoint import Checkpointer

    base = tmp_path_factory.mktemp("demo")
    cohort = simulate_cohort(base / "cohort", _pipeline(demo_cmd, ["--quick", *DEMO]).cohort.simulate)
    out = base / "out"
    read = Checkpointer.restore_state
    with pytest.MonkeyPatch.context() as patch:  # every checkpoint the run reads back (RESTORED)
        patch.setattr(Checkpointer, "restore_state", lambda self, step, target: RESTORED.append(
            (str(self.directory), step)) or read(self, step, target))
        assert main(["run", QUICK, "--out", str(out), "--cohort.path", str(cohort), *RUN]) == 0
    return out


RESTORED: list[tuple[str, int]] = []


def _fold_means(results: Path, task: str, metric: str, embedding: str) -> float:
    r = pd.read_csv(results)
    return float(r[(r.task == task) & (r.metric == metric) & (r.embedding == embedding)].value.mean())  # NaN: skipped


@pytest.mark.slow
def test_report_table_reads_chance_baselines_model_oracle(demo):
    readme = (demo / "report" / "README.md").read_text()
    assert "## Chance · baselines · model · oracle" in readme
    assert ("| task | target | metric | chance | baseline: slide_meanpool | baseline: slide_random | "
            "baseline: baseline:grade | model: slide | model: slide_combat | model: slide_backbone | model: rna | "
            "model: report | "
            "supervised: mil:abmil | supervised: mil:finetune | oracle |") in readme  # MIL rows beside the linear ones
    # report text is a modality of the demo: slide↔report retrieval and zero-shot rows beside the linear probes
    assert "model: slide->report" in readme and "model: report->slide" in readme
    assert "| necrosis (zero-shot) | report_necrosis | auroc (zero-shot) | 0.500 |" in readme
    assert "| necrosis | report_necrosis | auroc | 0.500 |" in readme
    refs = pd.read_csv(demo / "report" / "references_seeds.csv", keep_default_na=False).set_index("task")
    assert refs.loc["subtype", "chance"] == "0.500" and refs.loc["overall survival", "chance"] == "0.500"
    assert "site-only" in refs.loc["site robustness", "chance"]  # RI is read against a site-only embedding too
    # a site option of the recipe is named, and ComBat is a column of its own in the robustness row
    assert "site-robustness options: loader.site_balance=True;" in readme
    assert "`slide_combat` = `slide` ComBat-corrected for site" in readme
    ri = [_fold_means(demo / "report" / d / "results.csv", "site robustness", "robustness_index@10", "slide_combat")
          for d in ("", "seed-1")]  # refitted per seed, on that run's pretraining cases
    assert refs.loc["site robustness", "model: slide_combat"] == f"{np.mean(ri):.3f} ± {np.std(ri, ddof=1):.3f}"
    # every model cell = mean ± SD (ddof=1) over the seeds of each seed's own fold mean (results.csv)
    per_seed = [_fold_means(demo / "report" / d / "results.csv", "subtype", "auroc", "slide") for d in ("", "seed-1")]
    assert refs.loc["subtype", "model: slide"] == f"{np.mean(per_seed):.3f} ± {np.std(per_seed, ddof=1):.3f}"
    # the bulk expression row: mean per-gene r and significant genes, read against the permutation null on the same
    # folds, the mean-pool / random-init / grade-only (RNA-free) baselines and the oracle
    expr = refs.loc[["expression"]].set_index("metric")
    assert list(expr.index) == ["pearson_mean", "n_significant"]
    row = expr.loc["pearson_mean"]
    assert "—" not in set(row[["baseline: slide_meanpool", "baseline: baseline:grade", "model: slide", "oracle"]])
    r = [_fold_means(demo / "report" / d / "results.csv", "expression", "pearson_mean", "slide")
         for d in ("", "seed-1")]
    assert row["model: slide"] == f"{np.mean(r):.3f} ± {np.std(r, ddof=1):.3f}"
    null = [_fold_means(demo / "report" / "results.csv", "expression", "chance_pearson_mean", e)
            for e in ("slide_meanpool", "slide_random", "baseline:grade", "oracle")]  # the same for every seed
    lo, hi = (float(v) for v in (row["chance"].split("–") * 2)[:2])  # the permutation null's range over columns
    assert lo - 5e-4 <= min(null) and max(null) <= hi + 5e-4 and -0.3 < lo <= hi < 0.3
    oracle = _fold_means(demo / "report" / "results.csv", "subtype", "auroc", "oracle")
    assert refs.loc["subtype", "oracle"] == f"{oracle:.3f} ± 0.000"  # the ceiling does not depend on the seed
    assert oracle > 0.9  # the latent subtype is in the oracle: a sanity check that the right truth was attached


@pytest.mark.slow
def test_each_seeds_trained_state_is_handed_to_its_next_steps_not_read_back(demo, tmp_path):
    """Embed, heatmaps and the MIL probe take the state pretraining ended with (`rundir.offer_trained`): no
    checkpoint is read back within the run, and the embeddings are those of a restore from the run's files."""
    from mmfm.eval.embed import EmbedConfig, embed

    assert RESTORED == []
    held = json.loads((demo / "run" / "splits.json").read_text())["heldout"]
    again, _ = embed(demo / "run", demo.parent / "cohort", tmp_path / "again.h5ad", case_ids=held,
                     cfg=EmbedConfig(baselines=()))  # outside the run's scope: restored from the checkpoint
    e0 = ad.read_h5ad(demo / "embeddings.h5ad")
    assert list(again.obs_names) == list(e0.obs_names) and {"slide", "rna", "report"} <= set(again.obsm)
    for key in again.obsm:
        np.testing.assert_array_equal(again.obsm[key], e0.obsm[key], err_msg=key)


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
    expr = paired[paired.task == "expression"]
    assert {"slide_meanpool", "slide_random", "baseline:grade"} <= set(expr.baseline)
    assert set(expr.metric) == {"pearson_mean", "n_significant"}
    assert row.method == "paired t over seeds" and int(row.n) == 2
    assert float(row["mean"]) == pytest.approx(np.mean(np.subtract(a, b)))
    assert float(row.p) == pytest.approx(t.pvalue)


@pytest.mark.slow
def test_heatmap_slides_from_the_cohort_are_those_whose_embeddings_hold_every_queried_modality(demo):
    """The heatmaps start before the embed step: their slides, chosen from the cohort and the split, are the first
    held-out slides whose case's embedding rows are finite for every queried modality of the run."""
    from mmfm import memo
    from mmfm.train.rundir import read_config

    cases, slides = ad.read_h5ad(demo / "embeddings.h5ad"), ad.read_h5ad(demo / "embeddings.slides.h5ad")
    held = json.loads((demo / "run" / "splits.json").read_text())["heldout"]
    modalities = read_config(demo / "run").data.modalities
    skipped = 0
    with memo.reusing():  # one scope, as in the pipeline: the cohort is opened (its bags checked) once, not 6 times
        for queries in (["rna", "report", "a prompt"], ["protein"], ["a prompt"]):
            complete = np.all([np.isfinite(cases.obsm[q]).all(1) for q in queries if q in cases.obsm] or
                              [np.ones(cases.n_obs, bool)], axis=0)
            skipped += int((~complete).sum())
            expected = slides.obs_names[slides.obs["case_id"].isin(cases.obs_names[complete])].tolist()
            for n in (2, len(expected)):
                chosen = heatmap_slides(demo.parent / "cohort", held, modalities,
                                        HeatmapStep(slides=n, queries=queries))
                assert chosen == expected[:n]
    assert skipped > 0  # some held-out cases lack a queried modality


@pytest.mark.slow
def test_an_existing_cohort_is_validated_not_simulated(demo):
    cohort = demo.parent / "cohort"
    assert not list(demo.glob("cohort-*"))  # nothing simulated into the output folder
    assert (demo / "run" / "config.yaml").read_text().count(f"cohort: {cohort}") == 1  # pretrained on the given one
    readme = (demo / "report" / "README.md").read_text()
    assert readme.startswith(f"# mmfm run\n\nThe cohort {cohort}; pretraining on")
    assert "`oracle` = the same probe" in readme  # the cohort has its truth: the ceiling is still probed
