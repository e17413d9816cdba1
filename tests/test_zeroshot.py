"""Zero-shot classification through the text tower: prompt ensembles, metrics, the task, and a real tiny run."""

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from mmfm.eval import tasks_zeroshot as Z

REPO = Path(__file__).resolve().parents[1]


def mann_whitney_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie), by counting pairs."""
    p, n = score[pos], score[~pos]
    return float(((p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()) / (len(p) * len(n)))


def test_metrics_against_pair_counting_and_numpy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    s = rng.normal(size=(60, 3)) + 0.8 * np.eye(3)[y]
    got = Z.metrics(y, s, ["a", "b", "c"])
    c = s - s.mean(1, keepdims=True)
    assert got["auroc"] == pytest.approx(np.mean([mann_whitney_auc(y == k, c[:, k]) for k in range(3)]))
    pred = s.argmax(1)
    rec = [np.mean(pred[y == k] == k) for k in range(3)]
    assert [got[f"recall[{n}]"] for n in "abc"] == pytest.approx(rec)
    assert got["bacc"] == pytest.approx(np.mean(rec))
    yb = (y > 0).astype(int)
    two = Z.metrics(yb, s[:, :2], ["no", "yes"])
    assert two["auroc"] == pytest.approx(mann_whitney_auc(yb == 1, s[:, 1] - s[:, 0]))


def fake_encoder(dim=6):
    """Deterministic text → vector (seeded by the text), not normalised: the ensemble must normalise."""
    def encode(texts):
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=dim) * (1 + len(t)) for t in texts])
    return encode


def test_prompt_ensemble_is_the_renormalised_mean_of_normalised_prompts():
    enc = fake_encoder()
    classes = {"1": ["grade one", "low grade"], "2": "high grade"}
    templates = ["{}.", "A slide of {}."]
    got = Z.class_embeddings(enc, classes, templates)

    def unit(v):
        return v / np.linalg.norm(v)

    want1 = unit(np.mean([unit(enc([t])[0]) for t in ["grade one.", "A slide of grade one.", "low grade.",
                                                      "A slide of low grade."]], 0))
    want2 = unit(np.mean([unit(enc([t])[0]) for t in ["high grade.", "A slide of high grade."]], 0))
    np.testing.assert_allclose(got, np.stack([want1, want2]), atol=1e-12)


def spec(**kw):
    base = {"name": "nec", "type": "zeroshot", "label": "nec", "classes": {True: ["necrosis"], False: ["no necrosis"]},
            "templates": ["{}."], "embeddings": ["slide"], "n_bootstrap": 50}
    return Z.ZeroShotSpec.from_dict({**base, **kw})


def toy_adata(n=80, noise=0.6, seed=0):
    """Slide embeddings near the class embedding of each case's label; case-00 has two slides (late fusion)."""
    rng = np.random.default_rng(seed)
    cls = Z._unit(rng.normal(size=(2, 6)))
    y = rng.integers(0, 2, n)
    x = cls[y] + noise * rng.normal(size=(n, 6))
    obs = pd.DataFrame({"case_id": [f"c{i:02d}" for i in range(n)],
                        "nec": np.where(y == 0, "True", "False")}, index=[f"s{i}" for i in range(n)])
    x[5] = np.nan  # absent modality: left out
    return ad.AnnData(obs=obs, obsm={"slide": x}), cls, y


def test_evaluate_rows_bootstrap_and_summary():
    from mmfm.eval import report

    adata, cls, _ = toy_adata()
    rows, boot = Z.evaluate(adata, spec(), cls)
    res = pd.DataFrame(rows)
    point = res.set_index("metric")["value"]
    assert point["n_test"] == 79
    assert point["auroc"] > 0.9 and point["bacc"] > 0.8  # the embeddings do sit near their class
    assert set(res.fold) == {"all"} and set(res.model) == {"zero-shot"}
    b = pd.DataFrame(boot)
    assert (b.groupby("metric").size() == 50).all()
    summary = report.summarize(res.assign(shots="", draw=""), b.assign(shots=""))
    auc = summary[summary.metric == "auroc"].iloc[0]
    assert auc["mean"] == pytest.approx(point["auroc"]) and auc.lo <= auc["mean"] <= auc.hi
    folds = pd.DataFrame({"fold_0": ["test"] * 10 + ["train"] * 70}, index=[f"c{i:02d}" for i in range(80)])
    rows, _ = Z.evaluate(adata, spec(n_bootstrap=0), cls, folds)
    assert pd.DataFrame(rows).set_index("metric")["value"]["n_test"] == 9  # test cases only (c05 has no slide)


def test_spec_and_data_errors_name_the_key():
    with pytest.raises(Z.ZeroShotError, match="unknown key"):
        spec(prompt="x")
    with pytest.raises(Z.ZeroShotError, match="templates"):
        spec(templates=["no placeholder"])
    with pytest.raises(Z.ZeroShotError, match="classes"):
        spec(classes={True: ["only one class"]})
    adata, cls, _ = toy_adata()
    adata.obs.loc["s3", "nec"] = "maybe"
    with pytest.raises(Z.ZeroShotError, match="maybe"):
        Z.evaluate(adata, spec(), cls)
    with pytest.raises(Z.ZeroShotError, match="'label'"):
        Z.evaluate(adata, spec(label="absent_column"), cls)
    with pytest.raises(Z.ZeroShotError, match="obsm"):
        Z.evaluate(toy_adata()[0], spec(embeddings=["rna"]), cls)


def test_demo_task_file_parses():
    from mmfm.eval.probe import load_tasks

    specs = Z.load_specs(REPO / "configs" / "tasks" / "demo_report.yaml")
    assert {s.label for s in specs} == {"report_reported_grade", "report_necrosis", "report_lvi"}
    assert list(specs[0].classes) == ["1", "2", "3"] and list(specs[1].classes) == ["true", "false"]
    import yaml

    others = [t for t in yaml.safe_load((REPO / "configs/tasks/demo_report.yaml").read_text())
              if t["type"] != "zeroshot"]
    retrieval = next(t for t in load_tasks(others) if t.type == "retrieval")
    assert ("slide", "report") in retrieval.pairs and ("report", "slide") in retrieval.pairs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from _report_run import tiny_report_run

    return tiny_report_run(tmp_path_factory.getbasetemp() / "report_run")


@pytest.mark.slow
def test_text_tower_matches_embed_and_zero_shot_runs(run, tmp_path):
    """encode_text on a report's text = `mmfm embed`'s report embedding (which trained through the cache)."""
    from mmfm.data.cohort import Cohort
    from mmfm.eval.embed import EmbedConfig, embed
    from mmfm.eval.probe import probe
    from mmfm.eval.text_tower import encode_text, load_tower
    from mmfm.eval.truth import join_truth

    cohort_dir, run_dir = run
    held = json.loads((run_dir / "splits.json").read_text())["heldout"]
    cases, _ = embed(run_dir, cohort_dir, tmp_path / "e.h5ad", case_ids=held, cfg=EmbedConfig(baselines=()))
    reports = Cohort.open(cohort_dir).reports
    with_report = [c for c in held if c in reports.index]
    got = encode_text(run_dir, reports[with_report].tolist())
    want = cases[with_report].obsm["report"]
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert load_tower(run_dir) is load_tower(run_dir)  # loaded once per run

    scores = Z.zero_shot(run_dir, cases.obsm["slide"], {"g1": "grade 1", "g3": ["grade 3", "high grade"]})
    assert list(scores.columns) == ["g1", "g3"] and scores.shape == (len(held), 2)
    ok = np.isfinite(cases.obsm["slide"]).all(1)
    assert np.isfinite(scores.to_numpy()[ok]).all() and np.isnan(scores.to_numpy()[~ok]).all()

    adata = join_truth(cases, cohort_dir)
    specs = {s.name: s for s in Z.load_specs(REPO / "configs" / "tasks" / "demo_report.yaml")}
    rows, boot = Z.run(adata, specs["necrosis (zero-shot)"])
    res = pd.DataFrame(rows)
    assert set(res.embedding) == {"slide", "report"}
    assert {"auroc", "bacc", "recall[true]", "recall[false]", "n_test"} <= set(res.metric)
    assert len(boot) > 0
    pr = probe(cases, [{"name": "xmodal", "type": "retrieval", "pairs": [["slide", "report"], ["report", "slide"]]}],
               tmp_path / "probe", n_bootstrap=10, plots=False)
    assert {"slide->report", "report->slide"} <= set(pr.results.embedding)


def test_join_truth_labels_only_cases_with_a_report(tmp_path):
    from mmfm.eval.truth import join_truth

    (tmp_path / "truth").mkdir()
    pd.DataFrame({"case_id": ["a", "b", "c"], "has_report": [True, False, True],
                  "report_necrosis": [True, True, False], "report_reported_grade": [3, 2, 1]}
                 ).to_csv(tmp_path / "truth" / "cases.csv", index=False)
    adata = ad.AnnData(obs=pd.DataFrame(index=["c", "a", "b", "z"]))
    got = join_truth(adata, tmp_path, ["report_necrosis", "report_reported_grade"]).obs
    assert got["report_reported_grade"].tolist()[:2] == [1, 3] and pd.isna(got["report_reported_grade"]).tolist() == \
        [False, False, True, True]
    assert [Z.canonical(v) for v in got["report_necrosis"][:2]] == ["false", "true"]
    with pytest.raises(ValueError, match="report_lvi"):
        join_truth(adata, tmp_path, ["report_lvi"])
    join_truth(adata, tmp_path, ["report_necrosis", "report_reported_grade"]).write_h5ad(tmp_path / "j.h5ad")
