"""Zero-shot classification (the `zeroshot` probe task type): prompt ensembles, metrics, the task through the probe
driver, and a real tiny run whose text tower encodes the prompts."""

import json
import zlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from mmfm.eval.probe import TaskError, load_tasks, probe
from mmfm.eval.report import headline_table
from mmfm.eval.tasks import zeroshot as Z

REPO = Path(__file__).resolve().parents[1]


def mann_whitney_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie), by counting pairs."""
    p, n = score[pos], score[~pos]
    return float(((p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()) / (len(p) * len(n)))


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


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
    assert got["bacc"] == pytest.approx(np.mean(rec)) and got["chance_bacc"] == pytest.approx(1 / 3)
    yb = (y > 0).astype(int)
    two = Z.metrics(yb, s[:, :2], ["no", "yes"])
    assert two["auroc"] == pytest.approx(mann_whitney_auc(yb == 1, s[:, 1] - s[:, 0]))
    one = Z.metrics(np.zeros(5, int), s[:5, :2], ["no", "yes"])  # a resample with one class: undefined, not 0
    assert np.isnan(one["auroc"]) and np.isnan(one["recall[yes]"]) and one["bacc"] == one["recall[no]"]


def fake_encoder(dim=6):
    """Deterministic text → vector (seeded by the text), not normalised: the ensemble must normalise."""
    def encode(texts):
        return np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=dim) * (1 + len(t))
                         for t in texts])
    return encode


def test_prompt_ensemble_is_the_renormalised_mean_of_normalised_prompts():
    enc = fake_encoder()
    got = Z.class_embeddings(enc, {"1": ["grade one", "low grade"], "2": "high grade"}, ["{}.", "A slide of {}."])
    want1 = unit(np.mean([unit(enc([t])[0]) for t in ["grade one.", "A slide of grade one.", "low grade.",
                                                      "A slide of low grade."]], 0))
    want2 = unit(np.mean([unit(enc([t])[0]) for t in ["high grade.", "A slide of high grade."]], 0))
    np.testing.assert_allclose(got, np.stack([want1, want2]), atol=1e-12)


TASK = {"name": "nec", "type": "zeroshot", "label": "nec", "classes": {True: ["necrosis"], False: "no necrosis"},
        "templates": ["{}.", "Necrosis: {}"], "embeddings": ["slide"]}


def toy_adata(cls: np.ndarray, n=80, noise=0.9, seed=0):
    """Slide rows near the class embedding of their case's label (True = row 0 of `cls`); case c00 has a second
    slide (late fusion) and case c05's only slide has no embedding (absent)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    case = [f"c{i:02d}" for i in range(n)] + ["c00"]
    y = np.append(y, y[0])
    x = cls[y] + noise * rng.normal(size=(n + 1, cls.shape[1]))
    x[5] = np.nan
    obs = pd.DataFrame({"case_id": case, "nec": np.where(y == 0, "True", "False")},
                       index=[f"s{i}" for i in range(n + 1)])
    return ad.AnnData(obs=obs, obsm={"slide": x}, uns={"run_dir": "unused: the tower is patched"})


def test_zeroshot_task_through_the_probe_driver(tmp_path, monkeypatch):
    enc = fake_encoder()
    monkeypatch.setattr(Z, "text_tower", lambda adata, spec: enc)
    spec = load_tasks([TASK])[0]
    cls = Z.class_embeddings(enc, spec.classes, spec.templates)
    a = toy_adata(cls)
    r = probe(a, [TASK], tmp_path, n_bootstrap=50)
    # NumPy reference: late-fuse rows per case, cosine with each class, AUROC of s_false − s_true for False
    x = pd.DataFrame(a.obsm["slide"]).groupby(a.obs.case_id.to_numpy()).mean().dropna()
    s = unit(x.to_numpy()) @ cls.T
    is_false = (a.obs.groupby("case_id").nec.first()[x.index] == "False").to_numpy()
    point = r.results[r.results.fold == "0"].set_index("metric").value
    assert point["n_test"] == 79  # c05 has no embedding
    assert point["auroc"] == pytest.approx(mann_whitney_auc(is_false, s[:, 1] - s[:, 0]))
    pred_false = s[:, 1] > s[:, 0]
    assert point["recall[false]"] == pytest.approx(pred_false[is_false].mean())
    assert point["recall[true]"] == pytest.approx((~pred_false[~is_false]).mean())
    assert point["auroc"] > 0.75  # the embeddings do sit near their class: not two chance values compared
    assert set(r.results.model) == {"zero-shot"} and set(r.results.target) == {"nec"}
    folds = pd.read_csv(tmp_path / "folds" / "nec.tsv", sep="\t", index_col="case_id")
    assert (folds.fold_0 == "test").all() and len(folds) == 80  # nothing fitted: every labelled case is tested
    auc = r.summary[r.summary.metric == "auroc"].iloc[0]
    assert auc.lo < point["auroc"] < auc.hi and auc.n == 50  # bootstrap CI over cases
    assert "nec · nec · auroc (zero-shot)" in set(headline_table(r.summary).index)
    assert (tmp_path / "nec.png").stat().st_size > 1000


def test_plot_takes_a_bootstrap_mean_outside_its_interval(tmp_path):
    """98 resamples at 1/3 and 2 missing a class (bacc 1/2): the mean lies above the 97.5% percentile."""
    from mmfm.eval.report import plot_task, summarize

    key = {"task": "g", "type": "zeroshot", "target": "grade", "embedding": "slide", "model": "zero-shot", "shots": "",
           "metric": "auroc"}
    res = pd.DataFrame([{**key, "draw": "", "fold": "0", "value": 1 / 3}])
    boot = pd.DataFrame([{**key, "boot": b, "value": 0.5 if b < 2 else 1 / 3} for b in range(100)])
    s = summarize(res, boot)
    assert s["mean"].iloc[0] > s.hi.iloc[0]
    assert plot_task(s, tmp_path / "g.png") and (tmp_path / "g.png").stat().st_size > 1000


def test_zeroshot_data_errors_name_the_task_and_key(tmp_path, monkeypatch):
    enc = fake_encoder()
    monkeypatch.setattr(Z, "text_tower", lambda adata, spec: enc)
    cls = Z.class_embeddings(enc, {"true": ["x"], "false": ["y"]}, ["{}."])
    a = toy_adata(cls)
    a.obs.loc["s3", "nec"] = "maybe"
    with pytest.raises(TaskError, match=r"'nec'.*\['maybe'\].*'classes'"):
        probe(a, [TASK], tmp_path, plots=False)
    a = toy_adata(cls)
    a.obsm["wide"] = np.ones((a.n_obs, 7))
    with pytest.raises(TaskError, match="'wide' is 7-d but the text tower gives 6-d"):
        probe(a, [{**TASK, "embeddings": ["wide"]}], tmp_path, plots=False)
    monkeypatch.undo()
    del a.uns["run_dir"]
    with pytest.raises(TaskError, match="set key 'run'"):
        probe(a, [TASK], tmp_path, plots=False)
    with pytest.raises(TaskError, match=f"key 'run' '{tmp_path / 'nope'}'.*no such run directory"):
        probe(a, [{**TASK, "run": str(tmp_path / "nope")}], tmp_path, plots=False)


@pytest.mark.parametrize("change, message", [
    ({"prompt": "x"}, "unknown key 'prompt' for type 'zeroshot'"),
    ({"templates": ["no placeholder"]}, r"'templates' entries need exactly one '\{\}'"),
    ({"classes": {True: ["only one class"]}}, "'classes' must map at least 2"),
    ({"classes": {True: ["a"], "true": ["b"]}}, "label values that mean the same"),
    ({"classes": {"a": "x", "b": []}}, "'classes' entry 'b' needs at least one"),
    ({"baseline": ["grade"]}, "zero-shot task fits nothing"),
    ({"step": "last"}, "step"),
])
def test_spec_errors_name_file_task_and_key(tmp_path, change, message):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump([{**TASK, **change}]))
    with pytest.raises(TaskError, match=message) as e:
        load_tasks(tmp_path / "t.yaml")
    assert str(e.value).startswith(f"{tmp_path / 't.yaml'}: tasks[0] (nec)")


def test_demo_task_file_decodes_zero_shot_beside_linear_probes_and_retrieval():
    specs = {s.name: s for s in load_tasks(REPO / "configs" / "tasks" / "demo_report.yaml")}
    zs = [s for s in specs.values() if isinstance(s, Z.ZeroshotSpec)]
    assert {s.label for s in zs} == {"report_reported_grade", "report_necrosis", "report_lvi"}
    assert {s.label for s in specs.values() if s.type == "classification"} >= {s.label for s in zs}  # linear beside
    assert list(specs["reported grade (zero-shot)"].classes) == ["1", "2", "3"]
    assert list(specs["necrosis (zero-shot)"].classes) == ["true", "false"]
    assert {("slide", "report"), ("report", "slide")} <= set(specs["cross-modal retrieval"].pairs)


@pytest.fixture(scope="module")
def run(report_run):
    return report_run


@pytest.mark.slow
def test_text_tower_matches_embed_and_zero_shot_runs(run, tmp_path, caplog):
    """encode_text on a report's text = `mmfm embed`'s report embedding (which trained through the cache), and the
    demo's zero-shot tasks run from the embeddings' own run."""
    import jax

    from mmfm.data.cohort import Cohort
    from mmfm.eval.embed import EmbedConfig, embed
    from mmfm.eval.text_tower import TextTower, encode_text, load_tower
    from mmfm.simulate.truth import join_truth
    from mmfm.train.rundir import load_for_inference

    cohort_dir, run_dir = run
    held = json.loads((run_dir / "splits.json").read_text())["heldout"]
    cases, _ = embed(run_dir, cohort_dir, tmp_path / "e.h5ad", case_ids=held, cfg=EmbedConfig(baselines=()))
    reports = Cohort.open(cohort_dir).reports
    with_report = [c for c in held if c in reports.index]
    got = encode_text(run_dir, reports[with_report].tolist())
    np.testing.assert_allclose(got, cases[with_report].obsm["report"], atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert load_tower(run_dir) is load_tower(run_dir)  # loaded once per run
    model, run_cfg, _ = load_for_inference(run_dir)  # another tower of the same graph (heatmaps, a second seed) …
    with jax.log_compiles():
        caplog.clear()
        again = TextTower(model, run_cfg.loader.report_max_len)(reports[with_report].tolist())
    np.testing.assert_array_equal(again, got)  # … runs the forward compiled for the first, no compile of its own
    assert not [m for m in caplog.messages if m.startswith("Compiling jit(run)")]

    classes = {"g1": "grade 1", "g3": ["grade 3", "high grade"]}
    scores = Z.zero_shot(run_dir, cases.obsm["slide"], classes, templates=["{}."])
    cls = unit(np.stack([unit(encode_text(run_dir, ["grade 1."]))[0],
                         unit(unit(encode_text(run_dir, ["grade 3.", "high grade."])).mean(0))]))
    ok = np.isfinite(cases.obsm["slide"]).all(1)
    np.testing.assert_allclose(scores.to_numpy()[ok], unit(cases.obsm["slide"][ok]) @ cls.T, atol=1e-5)
    assert list(scores.columns) == ["g1", "g3"] and np.isnan(scores.to_numpy()[~ok]).all()

    tasks = [t for t in load_tasks(REPO / "configs/tasks/demo_report.yaml") if t.name == "necrosis (zero-shot)"]
    assert len(tasks) == 1
    tasks.append({"name": "xmodal", "type": "retrieval", "pairs": [["slide", "report"], ["report", "slide"]]})
    r = probe(join_truth(cases, cohort_dir), tasks, tmp_path / "probe", n_bootstrap=10, plots=False)
    zs = r.results[r.results.type == "zeroshot"]
    assert set(zs.embedding) == {"slide", "report"}
    assert {"auroc", "bacc", "chance_bacc", "recall[true]", "recall[false]", "n_test"} <= set(zs.metric)
    assert {"slide->report", "report->slide"} <= set(r.results.embedding)


def test_join_truth_labels_only_cases_with_a_report(tmp_path):
    from mmfm.simulate.truth import join_truth

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
