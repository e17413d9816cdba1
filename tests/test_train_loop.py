"""`mmfm pretrain` end to end on a simulated cohort with the real loader, model and objective:
kill -9 + resume reproduces the uninterrupted curve, the NaN guard keeps the last good checkpoint,
load_for_inference restores onto another mesh, every recipe validates and takes a step."""

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from conftest import REFERENCE_STEPS, REPO, pretrain_process, tiny_cohort
from conftest import run_losses as losses
from conftest import tiny_sets as overrides
from mmfm.data.batch import BatchShapes, random_batch
from mmfm.train import config, load_for_inference, loop, monitor, rundir, sharding
from mmfm.train.checkpoint import Checkpointer
from mmfm.train.sharding import MeshConfig

cohort = pytest.fixture(scope="module")(tiny_cohort)  # one fresh cohort per module


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
    """A persistent compilation cache shared by this module's subprocesses (same shapes, one compile)."""
    return tmp_path_factory.mktemp("jit_cache")


def finish(proc):
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def test_sigkill_and_resume_reproduces_the_uninterrupted_curve(reference_run, jit_cache, tmp_path):
    """kill -9 inside the (synchronous) save of checkpoint 6 (`mmfm.faults`): the partial checkpoint is never listed,
    `--resume` continues from 4 and reproduces the uninterrupted curve (conftest's `reference_run`: the same
    recipe, cohort and checkpoints)."""
    cohort, ref, out = reference_run
    n = REFERENCE_STEPS
    sets = overrides(cohort, f"train.steps={n}", "train.ckpt_every=2", "train.keep_last=10")
    assert json.loads(out.strip().splitlines()[-1])["checkpoints"] == [2, 4, 6, 8]
    killed = tmp_path / "killed"
    rc, out = finish(pretrain_process(killed, sets + ["train.async_checkpoint=false"], cache=jit_cache,
                                      faults="checkpoint.save@6:SIGKILL"))
    assert rc == -signal.SIGKILL, out
    assert Checkpointer(killed, config.TrainConfig(), read_only=True).all_steps() == [2, 4]
    assert [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("6")]  # the half-written one
    rc, out = finish(pretrain_process(killed, sets, "--resume", cache=jit_cache))
    assert rc == 0, out
    got, want = losses(killed), losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, n + 1))  # one record per step, none duplicated
    # same seed, same data order, restored RNG and optimizer state → the same curve
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)
    assert len(set(np.round(list(want.values()), 4))) == n  # a real curve, not a constant


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(cohort, jit_cache, tmp_path):
    sets = overrides(cohort, "train.steps=8", "train.ckpt_every=2", "train.inject_nan_step=3")
    rc, out = finish(pretrain_process(tmp_path / "run", sets, cache=jit_cache))
    assert rc == 3 and "non-finite value at step 3 in" in out and "loss" in out, out
    cfg = config.load_config(tmp_path / "run" / "config.yaml")
    assert Checkpointer(tmp_path / "run", cfg.train, read_only=True).all_steps() == [2]
    model, _, _ = load_for_inference(tmp_path / "run")
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    assert [r["step"] for r in monitor.read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_load_for_inference_on_other_meshes_and_run_files(cohort, tmp_path, monkeypatch):
    sets = overrides(cohort, "train.steps=4", "train.ckpt_every=2", "train.eval_every=2", "train.mesh.fsdp=2",
                     "data.val_fraction=0.25", "data.eval_robustness_label=subtype",
                     "train.best_metric=robustness_index@10/slide", "model.compute_dtype=bfloat16")
    evaluated, embedded = [], []  # the cases held-out evaluation (and so `best`) sees; their embeddings per eval

    class Spy(loop.evaluate.HeldOutEvaluator):
        def __init__(self, cohort, cfg, ids, *args):
            evaluated.extend(ids)
            super().__init__(cohort, cfg, ids, *args)

        def case_embeddings(self, state):
            embedded.append(super().case_embeddings(state))
            return embedded[-1]

    monkeypatch.setattr(loop.evaluate, "HeldOutEvaluator", Spy)
    res = loop.pretrain(config.load_config(REPO / "configs/demo.yaml", sets), tmp_path / "run")
    run = res.run_dir
    for name in ("config.yaml", "env.json", "splits.json", "shapes.json", "eval.jsonl", "transforms/index.json"):
        assert (run / name).exists(), name
    env = json.loads((run / "env.json").read_text())
    assert env["mesh"] == {"data": 4, "fsdp": 2} and len(env["devices"]) == 8 and env["versions"]["jax"]
    splits = json.loads((run / "splits.json").read_text())
    parts = [set(splits[k]) for k in ("train", "val", "heldout")]
    assert len(splits["heldout"]) == 12 and len(splits["val"]) == 12
    assert sum(map(len, parts)) == len(set.union(*parts)) == 48  # three disjoint partitions of every case
    assert sorted(evaluated) == splits["val"]  # evaluation during training never sees the probe-test cases
    ev = monitor.read_jsonl(run / "eval.jsonl")
    assert [r["step"] for r in ev] == [2, 4]
    assert all(0 <= r["recall@1/slide->rna"] <= r["recall@5/slide->rna"] <= r["recall@10/slide->rna"] <= 1
               for r in ev)
    # validation RI@k: the validation cases only, equal to a brute-force count on the same case embeddings
    cases = pd.read_csv(cohort / "cases.csv", dtype={"case_id": str}).set_index("case_id")
    for r, emb in zip(ev, embedded):
        slide = emb["slide"]
        assert sorted(cases.index[list(slide)]) == splits["val"] and r["n_robustness_cases/slide"] == 12
        z = np.stack([slide[c] for c in sorted(slide)])
        bio, site = (cases[k].to_numpy()[sorted(slide)] for k in ("subtype", "site"))
        near = np.argsort(-(z @ z.T) + 9 * np.eye(len(z)), axis=1)[:, :10]  # cosine ranking, self excluded
        so = ((bio[near] == bio[:, None]) & (site[near] != site[:, None])).sum()
        os_ = ((bio[near] != bio[:, None]) & (site[near] == site[:, None])).sum()
        assert r["robustness_index@10/slide"] == pytest.approx(so / (so + os_))
        assert 0 <= r["chance_robustness_index@10/slide"] <= 1 and "site_only_robustness_index@5/rna" in r
    best_ri = max(ev, key=lambda r: r["robustness_index@10/slide"])["step"]  # train.best_metric picks `best`
    assert rundir.resolve_step(run, config.load_config(run / "config.yaml"), "best", [2, 4]) == best_ri
    assert config.load_config(run / "config.yaml").train.mesh.fsdp == 2  # resolved config reloads
    model4, cfg, transforms = load_for_inference(run)                       # latest, all 8 devices
    model2, _, _ = load_for_inference(run, step=2, mesh=sharding.make_mesh(MeshConfig(1, 1),
                                                                                 jax.devices()[:1]))
    assert cfg.model.compute_dtype == "bfloat16"
    best = max(ev, key=lambda r: r["recall@5/slide->rna"])["step"]
    assert rundir.best_step(run, "recall@5/slide->rna", "max", [2, 4]) == best
    with pytest.raises(rundir.RunDirError, match="no checkpoint with eval metric 'recall@7/x'"):
        rundir.best_step(run, "recall@7/x", "max", [2, 4])
    with pytest.raises(rundir.RunDirError, match="no checkpoint for step 3"):
        load_for_inference(run, step=3)
    (tmp_path / "broken").mkdir()  # a run directory from a pretrain that failed early
    (tmp_path / "broken" / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(rundir.RunDirError, match="shapes.json is missing"):
        load_for_inference(tmp_path / "broken")
    shapes = BatchShapes(**json.loads((run / "shapes.json").read_text()))
    assert len(transforms["rna"].genes) == shapes.n_genes and len(transforms["protein"].genes) == shapes.n_proteins
    batch = {k: jnp.asarray(v) for k, v in random_batch(shapes, seed=3).items()}
    e4, e2 = model4(batch), model2(batch)
    assert set(e4) == {"slide", "rna", "protein"}
    assert not np.allclose(np.asarray(e4["slide"]), np.asarray(e2["slide"]), atol=1e-4)      # step 4 ≠ step 2
    np.testing.assert_allclose(np.linalg.norm(np.asarray(e4["rna"]), axis=-1), 1.0, rtol=1e-3)
    # a run without validation cases (written before they existed: it evaluated on its held-out cases) has no `best`
    (run / "splits.json").write_text(json.dumps({k: v for k, v in splits.items() if k != "val"}))
    with pytest.raises(rundir.RunDirError, match="no validation cases"):
        load_for_inference(run, step="best")


def test_pretrain_refuses_a_used_run_dir_and_a_too_small_cohort(cohort, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    cfg = config.load_config(REPO / "configs/demo.yaml", overrides(cohort, "train.steps=1"))
    with pytest.raises(rundir.RunDirError, match=r"run directory is not empty \(notes\.txt\).*--resume"):
        loop.pretrain(cfg, run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # nothing written or removed
    big = config.load_config(REPO / "configs/demo.yaml", overrides(cohort, "train.steps=1", "loader.batch_size=64"))
    with pytest.raises(config.ConfigError, match=str(cohort)):
        loop.pretrain(big, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # a config or cohort error leaves no directory behind
