"""`export_run` on really trained runs: the export holds exactly the restored weights of every tower and head,
the PyTorch twin reproduces the Flax slide embedding on the cohort's own bags (padding, fragments, level-0
pixel coordinates) and, for a case-encoder run, the case-level output of `mmfm embed`."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from mmfm.bridges import torch_slide
from mmfm.data.bags import grid_indices, read_bag
from mmfm.train.export import export_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.steps=3", "train.ckpt_every=1", "train.keep_last=5", "train.progress=false", "train.warmup=1",
        "loader.batch_size=8", "loader.tiles_per_slide=16", "loader.n_genes=32", "data.heldout_fraction=0.4", "data.val_fraction=0.3",
        "model.embed_dim=16", "model.slide.abmil.hidden=16", "model.slide.abmil.attn_dim=8",
        "model.rna.hidden=16", "model.protein.hidden=16"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from mmfm.simulate import SimConfig, simulate_cohort

    return simulate_cohort(tmp_path_factory.mktemp("export") / "cohort", SimConfig(
        n_cases=32, seed=4, feature_dim=16, bag_size_median=90, bag_size_min=64, bag_size_max=160, n_genes=40,
        n_proteins=8,
        multi_slide_rate=0.6, missing_slide=0.1))


def _train(cohort, tmp_path_factory, recipe, *extra):
    from mmfm.train.config import load_config
    from mmfm.train.loop import pretrain

    run = tmp_path_factory.mktemp("run") / "run"
    pretrain(load_config(REPO / "configs" / recipe, [f"data.cohort={cohort}", *TINY, *extra]), run)
    return run


@pytest.fixture(scope="module")
def abmil_run(cohort, tmp_path_factory):
    return _train(cohort, tmp_path_factory, "demo.yaml", "train.eval_every=1")


@pytest.fixture(scope="module")
def case_run(cohort, tmp_path_factory):
    return _train(cohort, tmp_path_factory, "demo_case_encoder.yaml", "train.eval_every=0", "train.ckpt_every=3",
                  "model.slide.kind=transformer",
                  "model.slide.transformer.width=16", "model.slide.transformer.depth=2",
                  "model.slide.transformer.n_heads=2", "model.slide.transformer.n_registers=2",
                  "model.slide.transformer.block_q=16", "model.slide.transformer.block_k=16",
                  "model.case.width=16", "model.case.n_heads=2")


def padded_slides(cohort_dir, slide_ids, n_pad=7, seed=0):
    """Whole bags of `slide_ids` batched with garbage padding at random positions: (features, level-0 px coords,
    mask, fragment, grid as mmfm embed computes it, patch_size_level0 per bag)."""
    from mmfm.data.cohort import Cohort

    cohort = Cohort.open(cohort_dir)
    rng = np.random.default_rng(seed)
    raw = [(read_bag(cohort.slides.loc[s, "path"]), int(cohort.slides.loc[s, "patch_size_level0"])) for s in slide_ids]
    n = max(len(b["features"]) for b, _ in raw) + n_pad
    d = raw[0][0]["features"].shape[1]
    f = (20 * rng.standard_normal((len(raw), n, d))).astype(np.float32)
    px = rng.integers(0, 10 ** 5, (len(raw), n, 2))
    mask, frag = np.zeros((len(raw), n), bool), np.zeros((len(raw), n), np.int32)
    grid = np.zeros((len(raw), n, 2), np.int32)
    for i, (bag, psl0) in enumerate(raw):
        pos = np.sort(rng.choice(n, len(bag["features"]), replace=False))
        f[i, pos], px[i, pos], mask[i, pos] = bag["features"], bag["coords"], True
        frag[i, pos] = bag["fragment"]
        grid[i, pos] = grid_indices(bag["coords"], psl0)
    return f, px, mask, frag, grid, np.array([p for _, p in raw])


def n_fragments(bag_path) -> int:
    return len(np.unique(read_bag(bag_path)["fragment"]))


def _check_twin(model, export, cohort, slide_ids):
    f, px, mask, frag, grid, psl0 = padded_slides(cohort, slide_ids)
    assert len(set(frag[mask])) > 1  # real fragments
    diffs = {}
    for project in (True, False):
        flax_fn = nnx.jit(lambda m, *a, p=project: m.encode_slide(*a, project=p).embedding)
        want = np.asarray(flax_fn(model, f, grid, mask, frag))
        twin = torch_slide.from_export(export, project=project)
        with torch.no_grad():
            got = twin(torch.from_numpy(f), torch.from_numpy(px), torch.from_numpy(psl0), torch.from_numpy(mask),
                       torch.from_numpy(frag)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        diffs[project] = float(np.abs(got - want).max())
    return diffs


def test_trained_abmil_run_exports_every_tower_exactly(abmil_run, cohort, tmp_path):
    from mmfm.cli import main
    from mmfm.models.weight_porting import load_safetensors, to_torch_state
    from mmfm.train.monitor import read_jsonl
    from mmfm.train.rundir import best_step, load_for_inference

    assert main(["export", "--run", str(abmil_run), "--out", str(tmp_path / "export"), "--step", "best"]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    evals = {r["step"]: r["recall@5/slide->rna"] for r in read_jsonl(abmil_run / "eval.jsonl")}
    assert config["source"]["step"] == max(evals, key=evals.get) == best_step(abmil_run, "recall@5/slide->rna", "max",
                                                                               sorted(evals))
    assert config["components"] == ["encoders.protein", "encoders.rna", "encoders.slide", "heads.protein",
                                    "heads.rna", "heads.slide"]
    assert json.loads((tmp_path / "export" / "transforms" / "index.json").read_text()) == \
        json.loads((abmil_run / "transforms" / "index.json").read_text())
    model, _, _ = load_for_inference(abmil_run, step=config["source"]["step"])
    want = {}
    for m in model.modalities:
        want.update(to_torch_state(model.encoders[m], f"encoders.{m}."))
        want.update(to_torch_state(model.heads[m], f"heads.{m}."))
    got = load_safetensors(tmp_path / "export" / "model.safetensors")
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    other, _, _ = load_for_inference(abmil_run, step=next(s for s in evals if s != config["source"]["step"]))
    assert not np.array_equal(to_torch_state(other.encoders["slide"])["pool.score"], got["encoders.slide.pool.score"])

    from mmfm.data.cohort import Cohort

    slides = Cohort.open(cohort).slides.query("n_tiles > 0")  # opened once: each open validates every bag
    ids = [s for s in slides.index if n_fragments(slides.loc[s, "path"]) > 1][:3]
    print("abmil run, max |torch - flax| (project, backbone):", _check_twin(model, tmp_path / "export", cohort, ids))


def test_case_encoder_run_exports_and_matches_embed(case_run, cohort, tmp_path):
    from mmfm.data.cohort import Cohort
    from mmfm.eval.embed import EmbedConfig, embed
    from mmfm.train.rundir import load_for_inference

    config = export_run(case_run, tmp_path / "export")
    assert config["source"]["step"] == 3 and "case_encoder" in config["components"]
    model, _, _ = load_for_inference(case_run)
    slides = Cohort.open(cohort).slides.query("n_tiles > 0")
    multi = slides.groupby("case_id").size()
    case = next(c for c in multi[multi > 1].index
                if any(n_fragments(slides.loc[s, "path"]) > 1 for s in slides.index[slides["case_id"] == c]))
    ids = list(slides.index[slides["case_id"] == case])
    print("transformer + case encoder run, max |torch - flax|:", _check_twin(model, tmp_path / "export", cohort, ids))

    cases, per_slide = embed(case_run, cohort, tmp_path / "e.h5ad", cfg=EmbedConfig(baselines=()), case_ids=[case])
    twin = torch_slide.from_export(tmp_path / "export")
    backbone = torch_slide.from_export(tmp_path / "export", project=False)
    f, px, mask, frag, _, psl0 = padded_slides(cohort, ids)
    with torch.no_grad():
        args = (torch.from_numpy(f), torch.from_numpy(px), torch.from_numpy(psl0), torch.from_numpy(mask),
                torch.from_numpy(frag))
        case_twin = twin.aggregate(backbone(*args)[None]).numpy()
        slide_twin = twin(*args).numpy()
    np.testing.assert_allclose(cases.obsm["slide"], case_twin, atol=1e-5)
    np.testing.assert_allclose(per_slide[ids].obsm["slide"], slide_twin, atol=1e-5)
    assert not np.allclose(cases.obsm["slide"][0], slide_twin.mean(0), atol=1e-3)  # not late fusion
    print("case-level |embed - torch aggregate|:", float(np.abs(cases.obsm["slide"] - case_twin).max()))
    with pytest.raises(ValueError, match="case encoder"):
        embed(case_run, cohort, tmp_path / "p.h5ad", cfg=EmbedConfig(multi_slide="pool"), case_ids=[case])


def test_user_errors_name_the_step_or_run(abmil_run, tmp_path, capsys):
    from mmfm.cli import main

    for argv, message in [(["--step", "999"], "no checkpoint for step 999"),
                          (["--step", "last"], "step"),
                          (["--run", str(tmp_path / "nope")], "nope: no such run directory")]:
        args = {"--run": str(abmil_run), "--out": str(tmp_path / "x")}
        args.update(dict(zip(argv[::2], argv[1::2])))
        assert main(["export", *[x for kv in args.items() for x in kv]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mmfm export: error:") and message in err.splitlines()[0], err
    assert not (tmp_path / "x").exists()


def test_a_new_run_starts_from_an_exported_slide_encoder(abmil_run, cohort, tmp_path_factory, tmp_path):
    """`train.init_slide_encoder`: the export's slide encoder is the new run's step-0 slide encoder (lr=0 keeps it),
    the rest starts fresh; an export of another architecture is refused before a run directory exists."""
    from mmfm.models.weight_porting import load_safetensors, to_torch_state
    from mmfm.train.config import ConfigError, load_config
    from mmfm.train.loop import pretrain
    from mmfm.train.rundir import load_for_inference

    export_run(abmil_run, tmp_path / "export")
    run = _train(cohort, tmp_path_factory, "demo.yaml", "train.eval_every=0", "train.steps=1", "train.lr=0",
                 f"train.init_slide_encoder={tmp_path / 'export'}")
    model, _, _ = load_for_inference(run)
    exported = load_safetensors(tmp_path / "export" / "model.safetensors")
    for k, v in to_torch_state(model.encoders["slide"], "encoders.slide.").items():
        np.testing.assert_array_equal(v, exported[k], err_msg=k)
    assert not np.array_equal(to_torch_state(model.heads["slide"], "heads.slide.")["heads.slide.fc1.weight"],
                              exported["heads.slide.fc1.weight"])  # only the slide encoder is taken
    other = tmp_path / "other"
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.cohort={cohort}", *TINY, "model.slide.abmil.hidden=8",
                                                       f"train.init_slide_encoder={tmp_path / 'export'}"])
    with pytest.raises(ValueError, match="differs from model.slide .hidden: export 16 vs config 8"):
        pretrain(cfg, other)
    assert not other.exists()
    with pytest.raises(ConfigError, match="train.init_slide_encoder .* data.modalities needs 'slide'"):
        load_config(REPO / "configs" / "demo.yaml", ["data.modalities=[rna, protein]", "train.init_slide_encoder=x"])
