"""`mmfm probe` end to end on an external AnnData built from real GSE7390 expression (sksurv), checked against
independent sklearn / scikit-survival / lifelines fits on the same folds; leakage guards and task-schema errors."""

import numpy as np
import pandas as pd
import pytest
import yaml
from lifelines.utils import concordance_index
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sksurv.datasets import load_breast_cancer
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.metrics import concordance_index_censored

import anndata as ad
from mmfm import cli
from mmfm.config import parse_cli
from mmfm.eval import probe as probe_mod
from mmfm.eval.probe import LeakageError, ProbeConfig, TaskError, probe, run_probe
from mmfm.eval.tasks import TASKS as TASK_TYPES


def _gse7390() -> ad.AnnData:
    """198 real breast tumours: 76 probe intensities as X, clinical + distant-metastasis outcome in obs."""
    x, y = load_breast_cancer()
    probes = x[[c for c in x.columns if c.startswith("X")]].to_numpy(np.float32)
    obs = pd.DataFrame({
        "er": x["er"].astype(str).to_numpy(), "grade": x["grade"].astype(str).to_numpy(),
        "age": x["age"].to_numpy(), "size": x["size"].to_numpy(),
        "dmfs_days": y["t.tdm"], "dmfs_event": y["e.tdm"].astype(int),
    }, index=[f"GSE7390_{i:03d}" for i in range(len(x))])
    obs["er_pos"] = (obs.er == "positive").astype(int)
    obs["grade_poor"] = (obs.grade == "poorly differentiated").astype(int)
    a = ad.AnnData(probes, obs=obs)
    z = (probes - probes.mean(0)) / probes.std(0)
    a.obsm["rna"] = z[:, :16]  # two views of one case in a shared space, for cross-modal retrieval
    a.obsm["slide"] = z[:, :16] + np.random.default_rng(0).normal(size=(len(z), 16))
    return a


def _split_file(path, a: ad.AnnData, k: int = 3) -> pd.DataFrame:
    """Patho-Bench layout, one row per slide (here one slide per case), folds stratified on ER."""
    df = pd.DataFrame({"case_id": a.obs_names, "slide_id": a.obs_names + "_DX1", "er": a.obs.er.to_numpy()})
    for i, (_, te) in enumerate(StratifiedKFold(k, shuffle=True, random_state=0).split(df, df.er)):
        df[f"fold_{i}"] = "train"
        df.loc[te, f"fold_{i}"] = "test"
    df.to_csv(path, sep="\t", index=False)
    return df


TASKS = [
    {"name": "er_status", "type": "classification", "label": "er", "embeddings": ["X"], "baseline": ["age", "size"]},
    {"name": "panel", "type": "mutation", "labels": ["er_pos", "grade_*"], "embeddings": ["rna"]},
    {"name": "dmfs", "type": "survival", "time": "dmfs_days", "event": "dmfs_event", "embeddings": ["X"],
     "models": ["coxnet"], "alphas": [0.07]},
    {"name": "er_fewshot", "type": "fewshot", "label": "er", "embeddings": ["rna"], "shots": [2, 8], "draws": 2},
    {"name": "retrieval", "type": "retrieval", "pairs": [["slide", "rna"]], "embeddings": ["rna"]},
]
FAST = [{"name": "er_status", "type": "classification", "label": "er", "embeddings": ["rna"]}]


@pytest.fixture(scope="module")
def run_cli(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    a = _gse7390()
    a.write_h5ad(tmp / "emb.h5ad")
    split = _split_file(tmp / "splits.tsv", a)
    (tmp / "tasks.yaml").write_text(yaml.safe_dump({"tasks": TASKS}))
    cfg = parse_cli(ProbeConfig, ["--embeddings", str(tmp / "emb.h5ad"), "--tasks", str(tmp / "tasks.yaml"),
                                  "--splits", str(tmp / "splits.tsv"), "--out", str(tmp / "out"),
                                  "--projection", "pca"])
    res = run_probe(cfg)
    return res.out, tmp / "out", a, split


def test_cli_writes_results_summary_and_plots(run_cli):
    res_out, out, _, _ = run_cli
    assert res_out == out
    res = pd.read_csv(out / "results.csv", dtype={"fold": str})
    assert {"task", "embedding", "metric", "fold", "value"} <= set(res.columns)
    assert set(res.task) == {t["name"] for t in TASKS}
    assert set(res.target[res.task == "panel"]) == {"er_pos", "grade_poor"}  # per gene, glob expanded
    assert (out / "summary.md").exists() and (out / "er_status.png").exists()
    assert (out / "km_dmfs_X_coxnet.png").stat().st_size > 1000
    assert set(pd.read_csv(out / "folds" / "dmfs.tsv", sep="\t").columns) == {"case_id", "fold_0", "fold_1", "fold_2"}


def test_classification_equals_independent_sklearn_fit_on_same_folds(run_cli):
    _, out, a, split = run_cli
    res = pd.read_csv(out / "results.csv", dtype={"fold": str})
    got = res[(res.task == "er_status") & (res.embedding == "X") & (res.metric == "auroc")].sort_values("fold")
    y = (a.obs.er == "positive").to_numpy().astype(int)
    x = a.X.astype(np.float64)  # the probe fits in float64 whatever the stored dtype
    ref = []
    for i in range(3):
        tr, te = (split[f"fold_{i}"] == "train").to_numpy(), (split[f"fold_{i}"] == "test").to_numpy()
        lr = LogisticRegression(C=0.5, class_weight="balanced", max_iter=10000, random_state=0).fit(x[tr], y[tr])
        ref.append(roc_auc_score(y[te], lr.predict_proba(x[te])[:, 1]))
    np.testing.assert_allclose(got.value, ref, atol=1e-6)
    # summary.md reports mean ± SE (sample SD / √k) over the three folds, 3 decimals, baseline as a row of the same
    # table
    md = (out / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| er | X |"))
    assert f"{np.mean(ref):.3f} ± {np.std(ref, ddof=1) / np.sqrt(3):.3f}" in row
    assert any(line.startswith("| er | baseline:age+size |") for line in md.splitlines())


def test_survival_equals_independent_coxnet_and_lifelines(run_cli):
    _, out, a, split = run_cli
    res = pd.read_csv(out / "results.csv", dtype={"fold": str})
    got = res[(res.task == "dmfs") & (res.metric == "c_index")].sort_values("fold").value.to_numpy()
    t, e = a.obs.dmfs_days.to_numpy(), a.obs.dmfs_event.to_numpy().astype(bool)
    y = np.array(list(zip(e, t)), dtype=[("e", bool), ("t", float)])
    for i in range(3):
        tr, te = (split[f"fold_{i}"] == "train").to_numpy(), (split[f"fold_{i}"] == "test").to_numpy()
        m = CoxnetSurvivalAnalysis(alphas=[0.07], l1_ratio=0.5, max_iter=100000).fit(a.X[tr].astype(float), y[tr])
        risk = m.predict(a.X[te].astype(float))
        assert got[i] == pytest.approx(concordance_index_censored(e[te], t[te], risk)[0], abs=1e-6)
        assert got[i] == pytest.approx(concordance_index(t[te], -risk, e[te]), abs=1e-6)
    assert np.isfinite(res[(res.task == "dmfs") & (res.metric == "logrank_p")].value).all()


def test_cross_modal_retrieval_reports_chance_beside(run_cli):
    _, out, _, _ = run_cli
    res = pd.read_csv(out / "results.csv", dtype={"fold": str})
    r = res[(res.task == "retrieval") & (res.fold == "0")].set_index("metric").value
    n_test = 66  # 198 cases / 3 folds; one relevant key per query
    assert r["chance_recall@1"] == pytest.approx(1 / n_test)
    assert r["recall@1"] > 10 * r["chance_recall@1"]


def test_single_fold_reports_bootstrap_mean_and_percentile_ci(tmp_path):
    a = _gse7390()
    split = _split_file(tmp_path / "s.tsv", a)[["case_id", "slide_id", "er", "fold_0"]]
    split.to_csv(tmp_path / "one.tsv", sep="\t", index=False)
    r = probe(a, FAST, tmp_path / "out", splits=tmp_path / "one.tsv", n_bootstrap=40, plots=False)
    boot = pd.read_csv(tmp_path / "out" / "bootstrap.csv")
    v = boot[(boot.embedding == "rna") & (boot.metric == "auroc")].value.to_numpy()
    assert len(v) == 40
    s = r.summary.set_index(["embedding", "metric"]).loc[("rna", "auroc")]
    assert s["mean"] == pytest.approx(v.mean()) and s["lo"] == pytest.approx(np.percentile(v, 2.5))
    assert s["text"] == f"{v.mean():.3f} [{np.percentile(v, 2.5):.3f}, {np.percentile(v, 97.5):.3f}]"


def test_late_fusion_of_several_slides_per_case(tmp_path):
    """Two identical slide rows per case → the same case-level numbers as one row per case."""
    a = _gse7390()
    _split_file(tmp_path / "s.tsv", a)
    twice = ad.concat([a, a], index_unique="-")
    twice.obs["case_id"] = np.r_[a.obs_names, a.obs_names]
    one = probe(a, FAST, tmp_path / "one", splits=tmp_path / "s.tsv", plots=False).results
    two = probe(twice, FAST, tmp_path / "two", splits=tmp_path / "s.tsv", plots=False).results
    one, two = (r[r.metric != "wall_s"] for r in (one, two))  # every number but the fold's wall time
    assert len(one) == len(two) > 0
    np.testing.assert_allclose(one.value, two.value, atol=1e-9)


def test_case_in_train_and_test_is_refused(tmp_path):
    a = _gse7390()
    split = _split_file(tmp_path / "s.tsv", a)
    bad = pd.concat([split, split.iloc[[0]].assign(slide_id="second_slide")], ignore_index=True)
    bad.loc[len(bad) - 1, "fold_0"] = "test" if split.loc[0, "fold_0"] == "train" else "train"
    bad.to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=f"case {split.case_id[0]} is in several partitions"):
        probe(a, FAST, tmp_path / "out", splits=tmp_path / "bad.tsv", plots=False)


def test_pretraining_overlap_refused_unless_allowed(tmp_path, capsys):
    a = _gse7390()
    _split_file(tmp_path / "s.tsv", a)
    a.uns["pretrain_cases"] = list(a.obs_names[:5])
    with pytest.raises(LeakageError, match="GSE7390_000"):
        probe(a, FAST, tmp_path / "out", splits=tmp_path / "s.tsv", plots=False)
    with pytest.warns(UserWarning, match="PRETRAINING OVERLAP"):
        r = probe(a, FAST, tmp_path / "out", splits=tmp_path / "s.tsv", plots=False, allow_overlap=True)
    assert r.overlap == {"er_status": list(a.obs_names[:5])}
    assert "WARNING: test cases were seen in pretraining" in (tmp_path / "out" / "summary.md").read_text()
    # the command's route: --pretrain-cases file, refused without --allow-overlap
    b = _gse7390()
    b.write_h5ad(tmp_path / "e.h5ad")
    (tmp_path / "pre.txt").write_text("GSE7390_007\n")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(FAST))
    args = ["--embeddings", str(tmp_path / "e.h5ad"), "--tasks", str(tmp_path / "t.yaml"), "--splits",
            str(tmp_path / "s.tsv"), "--out", str(tmp_path / "cli"), "--pretrain-cases", str(tmp_path / "pre.txt"),
            "--no-plots"]
    capsys.readouterr()
    assert cli.main(["probe", *args]) == 2 and not (tmp_path / "cli" / "results.csv").exists()
    err = capsys.readouterr().err
    assert err.startswith("mmfm probe: error: ") and "GSE7390_007" in err and err.count("\n") == 1


@pytest.mark.parametrize("task, message", [
    ({"name": "t", "type": "classification", "label": "er", "colour": 1}, "unknown key 'colour'"),
    ({"name": "t", "type": "survival", "time": "dmfs_days"}, r"required field\(s\) event"),
    ({"name": "t", "type": "regression", "label": "er"}, "type 'regression'"),
    ({"name": "t", "type": "classification", "label": "missing_col"}, "'label' names obs column 'missing_col'"),
    ({"name": "t", "type": "classification", "label": "er", "embeddings": ["uni"]}, "'embeddings' names 'uni'"),
    ({"name": "t", "type": "mutation", "labels": ["mut_*"]}, "'labels' entry 'mut_\\*' matches no obs column"),
    ({"name": "t", "type": "classification", "label": "er", "folds": "five"}, "folds: Couldn't parse 'five'"),
    ({"name": "t", "type": "classification", "label": "one_class"}, "'label' column 'one_class' has fewer than 2"),
    ({"name": "t", "type": "survival", "time": "dmfs_days", "event": "no_event"}, "'event' column 'no_event' has 0"),
])
def test_task_errors_name_the_key(tmp_path, task, message):
    a = _gse7390()
    a.obs["one_class"], a.obs["no_event"] = "tumour", 0
    _split_file(tmp_path / "s.tsv", a)
    with pytest.raises(TaskError, match=message):
        probe(a, [task], tmp_path / "out", splits=tmp_path / "s.tsv", plots=False)


def test_load_tasks_reports_file_and_index(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"tasks": [TASKS[0], {"name": "x", "type": "survival"}]}))
    with pytest.raises(TaskError, match=r"t\.yaml: tasks\[1\] \(x\): Missing required field\(s\) time, event"):
        probe_mod.load_tasks(tmp_path / "t.yaml")


def test_generated_folds_are_patient_level_and_site_preserved(tmp_path):
    """Without a split file, folds come from mmfm.data.splits: every case tested once, a site never split."""
    a = _gse7390()
    a.obs["site"] = np.array([f"site{i % 6}" for i in range(a.n_obs)])
    tasks = [dict(FAST[0], folds=3, site="site", site_preserved=True),
             {"name": "dmfs", "type": "survival", "time": "dmfs_days", "event": "dmfs_event", "embeddings": ["rna"],
              "models": ["coxph"], "alphas": [0.07], "folds": 4}]
    r = probe(a, tasks, tmp_path / "out", plots=False)
    folds = pd.read_csv(tmp_path / "out" / "folds" / "er_status.tsv", sep="\t", index_col="case_id")
    assert ((folds == "test").sum(axis=1) == 1).all() and len(folds) == a.n_obs
    site = a.obs.site.reindex(folds.index)
    assert (folds.groupby(site.to_numpy()).nunique() == 1).all().all()  # each site on one side of every fold
    surv = pd.read_csv(tmp_path / "out" / "folds" / "dmfs.tsv", sep="\t", index_col="case_id")
    assert ((surv == "test").sum(axis=1) == 1).all() and surv.shape == (a.n_obs, 4)
    c = r.results[(r.results.task == "dmfs") & (r.results.metric == "c_index")].value
    assert len(c) == 4 and c.mean() > 0.55


def test_documented_tasks_example_parses():
    doc = probe_mod.__doc__
    specs = probe_mod.load_tasks(yaml.safe_load(doc[doc.index("    - {name: os"):]))
    assert {s.type for s in specs} == set(TASK_TYPES)
