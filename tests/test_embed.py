"""`mmfm embed`: all tiles of every bag, length buckets, late fusion, baselines, absent modalities as NaN."""

import json
from pathlib import Path

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfm.data.bags import grid_indices, read_bag
from mmfm.eval.embed import Bag, EmbedConfig, bucket_length, encode_bags, encode_bags_with, pool_bags


def masked_mean(f, c, m, fr):
    return (f * m[..., None]).sum(1) / jnp.maximum(m.sum(1, keepdims=True), 1)


def random_bags(lengths, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return [Bag(rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 50, size=(n, 2)).astype(np.int32),
                np.zeros(n, np.int32)) for n in lengths]


def test_bucket_lengths_are_powers_of_two_with_a_floor():
    assert [bucket_length(n, 256) for n in (1, 256, 257, 1000, 70000)] == [256, 256, 512, 1024, 131072]
    ladder = sorted({bucket_length(n, 64, 4) for n in range(1, 2049)})  # the training ladder of `mil`
    assert ladder == sorted({2 ** k * q // 4 for k in range(6, 11) for q in (4, 5, 6, 7)} | {2048})
    assert all(bucket_length(n, 64, 4) >= n and bucket_length(n, 64, 4) <= max(64, 1.25 * n) for n in range(1, 2049))


def test_every_tile_is_used_and_order_is_kept():
    lengths = [3, 700, 1, 300, 2500, 257]
    bags = random_bags(lengths)
    calls = []

    def encode(f, c, m, fr):
        calls.append(f.shape)
        return jax.jit(masked_mean)(f, c, m, fr)

    got = encode_bags(encode, bags, EmbedConfig(max_tiles_per_call=2048, min_bucket=256))
    want = np.stack([b.features.mean(0) for b in bags])  # all tiles, no sampling
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert {s[1] for s in calls} == {256, 512, 1024, 4096}  # few compiled shapes
    assert all(s[0] * s[1] <= 4096 for s in calls)          # memory bound per call (one bag may exceed it alone)


def test_rows_are_padded_to_a_power_of_two_and_padding_changes_nothing():
    """Any number of bags per bucket → power-of-two row counts, at least min_rows (shapes shared across cohorts);
    the padded rows are all-masked and dropped: every bag's embedding is the NumPy mean of its own tiles, whatever
    its batch."""
    for n_bags in (1, 3, 5, 7):
        bags = random_bags([10 + 7 * i for i in range(n_bags)], seed=n_bags)
        calls = []

        def encode(f, c, m, fr):
            calls.append(f.shape)
            assert m.any(1).sum() == n_bags  # one call: the bags, then all-masked padding rows
            return jax.jit(masked_mean)(f, c, m, fr)

        got = encode_bags(encode, bags, EmbedConfig(max_tiles_per_call=8 * 256, min_bucket=256, min_rows=2))
        np.testing.assert_allclose(got, np.stack([b.features.mean(0) for b in bags]), rtol=1e-5, atol=1e-6)
        assert calls == [(min(8, max(2, 1 << (n_bags - 1).bit_length())), 256, 8)]


def test_several_encoders_share_each_padded_batch():
    """Every encoder sees the same batches as it would alone (the same shapes and rows), built once for all:
    each result is the NumPy reference of its own bags, in input order."""
    bags = random_bags([3, 700, 1, 300, 2500, 257], seed=2)
    seen = {"mean": [], "max": []}

    def counted(name, fn):
        def encode(f, c, m, fr):
            seen[name].append((f.shape, np.asarray(m).sum()))
            return jax.jit(fn)(f, c, m, fr)
        return encode

    cfg = EmbedConfig(max_tiles_per_call=2048, min_bucket=256)
    got = encode_bags_with({"mean": counted("mean", masked_mean),
                            "max": counted("max", lambda f, c, m, fr: jnp.where(m[..., None], f, -jnp.inf).max(1))},
                           bags, cfg)
    np.testing.assert_allclose(got["mean"], np.stack([b.features.mean(0) for b in bags]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["max"], np.stack([b.features.max(0) for b in bags]))
    assert seen["mean"] == seen["max"] and len(seen["mean"]) == 4  # the same batches, one per bucket here
    np.testing.assert_array_equal(encode_bags(jax.jit(masked_mean), bags, cfg), got["mean"])  # as one call alone


def test_a_bag_is_read_once_per_pipeline_run(tmp_path):
    """Inside a memo scope (a pipeline run) a second `load_bag` of the same file (the MIL probe's, after the embed
    step's) returns the first object, not a second read; outside it every call reads afresh. Either way the bag holds
    every tile of the file."""
    from mmfm import memo
    from mmfm.data.bags import write_bag
    from mmfm.data.sampling import BagReader
    from mmfm.eval.embed import load_bag

    feats = np.random.default_rng(0).normal(size=(37, 8)).astype(np.float16)
    coords = np.stack([np.arange(37) * 256, np.zeros(37, int)], 1)
    write_bag(tmp_path / "a.h5", feats, coords, patch_size_level0=256, encoder="test")
    reader = BagReader()
    with memo.reusing():
        first = load_bag(tmp_path / "a.h5", 256, 37, reader)
        assert load_bag(str(tmp_path / "." / "a.h5"), 256, 37, reader) is first  # the same file by another name
    again = load_bag(tmp_path / "a.h5", 256, 37, reader)
    assert again is not first
    for bag in (first, again):
        np.testing.assert_array_equal(bag.features, feats)
        np.testing.assert_array_equal(bag.coords, grid_indices(coords, 256))


def test_pooled_bags_keep_slides_apart_on_the_grid():
    a, b = random_bags([5, 7], seed=1)
    a.fragment[:] = [0, 0, 1, 1, 1]
    p = pool_bags([a, b])
    assert len(p.features) == 12
    assert p.coords[5:, 0].min() > p.coords[:5, 0].max()  # second slide placed right of the first
    assert set(p.fragment[5:]) == {2}                      # fragments renumbered, never merged across slides


@pytest.mark.slow
def test_embed_a_trained_run(tmp_path):
    """A tiny real run: slide embeddings equal the model on the full bag; case = mean of its slides."""
    from mmfm.data.cohort import Cohort
    from mmfm.simulate import SimConfig, simulate_cohort
    from mmfm.eval.embed import embed
    from mmfm.train.config import load_config
    from mmfm.train import load_for_inference, pretrain

    cohort_dir = simulate_cohort(tmp_path / "c", SimConfig(n_cases=48, seed=3, feature_dim=32, bag_size_median=40,
                                                           bag_size_max=300, n_genes=80, n_proteins=8,
                                                           multi_slide_rate=0.5, missing_slide=0.4,
                                                           missing_rna=0.4, missing_protein=0.8))
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
        f"data.cohort={cohort_dir}", "train.steps=2", "train.eval_every=2", "train.ckpt_every=2",
        "train.progress=false", "loader.batch_size=8", "loader.tiles_per_slide=16", "loader.n_genes=32",
        "data.heldout_fraction=0.3", "data.val_fraction=0.3"])
    pretrain(cfg, tmp_path / "run")  # validation evaluation must skip cases that have none of the run's modalities
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    held = splits["heldout"]
    none = ~Cohort.open(cohort_dir).presence().loc[splits["val"], ["slide", "rna", "protein"]].any(axis=1)
    assert none.any()  # the case this exercises
    tangle = _tangle_export(tmp_path, feature_dim=32)  # public slide encoders brought in by import-encoder
    titan = _titan_export(tmp_path, feature_dim=32)
    gigapath = _gigapath_export(tmp_path, feature_dim=32)  # Prov-GigaPath-style LongNet
    cases, slides = embed(tmp_path / "run", cohort_dir, tmp_path / "e.h5ad",
                          cfg=EmbedConfig(extra_encoders=(str(tangle), str(titan), str(gigapath))))
    cohort = Cohort.open(cohort_dir)

    assert list(cases.obs_names) == list(cohort.cases.index.astype(str))
    assert cases.obs["split"].value_counts().to_dict() == {"pretrain": len(splits["train"]),
                                                           "heldout": len(held), "validation": len(splits["val"])}
    assert sorted(cases.uns["pretrain_cases"]) == splits["train"]
    assert sorted(cases.uns["validation_cases"]) == splits["val"]
    # absent modalities are NaN rows, never zeros
    has_rna = cohort.presence()["rna"].reindex(cases.obs_names).to_numpy()
    assert np.isnan(cases.obsm["rna"][~has_rna]).all() and np.isfinite(cases.obsm["rna"][has_rna]).all()

    model, _, _ = load_for_inference(tmp_path / "run")
    sid = slides.obs.index[0]
    row = cohort.slides.loc[sid]
    bag = read_bag(row.path)
    g = grid_indices(bag["coords"], int(row.patch_size_level0))
    frag = bag.get("fragment", np.zeros(len(g), np.int32))
    direct = model.encode_slide(bag["features"][None].astype(np.float32), g[None], np.ones((1, len(g)), bool),
                                frag[None].astype(np.int32)).embedding
    np.testing.assert_allclose(slides.obsm["slide"][0], np.asarray(direct)[0], atol=1e-5)
    np.testing.assert_allclose(slides.obsm["slide_meanpool"][0], bag["features"].astype(np.float32).mean(0), atol=1e-5)

    multi = slides.obs.groupby("case_id", observed=True).size()
    case = multi[multi > 1].index[0]
    np.testing.assert_allclose(cases[case].obsm["slide"][0],
                               slides[slides.obs["case_id"] == case].obsm["slide"].mean(0), atol=1e-6)
    assert ad.read_h5ad(tmp_path / "e.h5ad").obsm["slide_random"].shape[0] == cases.n_obs

    _extra_encoder_column_and_probe(tmp_path, (tangle, titan, gigapath), cases, slides, bag, g, frag)

    # `mmfm embed`: by default only the run's held-out cases; --baselines "[]" skips the baselines
    from mmfm.cli import main

    out = tmp_path / "held.h5ad"
    assert main(["embed", "--run", str(tmp_path / "run"), "--cohort", str(cohort_dir), "--out", str(out),
                 "--baselines", "[]"]) == 0
    held_ad = ad.read_h5ad(out)
    assert list(held_ad.obs_names) == [str(c) for c in held] and (held_ad.obs["split"] == "heldout").all()
    assert "slide" in held_ad.obsm and not {"slide_meanpool", "slide_random"} & set(held_ad.obsm)
    np.testing.assert_allclose(held_ad.obsm["slide"], cases[held].obsm["slide"], atol=1e-5)
    assert main(["embed", "--run", str(tmp_path / "nope"), "--cohort", str(cohort_dir), "--out", str(out)]) == 2


def _tangle_export(tmp_path, feature_dim, h=16, a=8, seed=0):
    """A TANGLE-layout checkpoint with random weights, imported by `import-encoder` into an export directory."""
    from safetensors.numpy import save_file

    from mmfm.bridges.slide_import import import_encoder

    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    state = {"pre_attn.0.weight": w(h, feature_dim), "pre_attn.0.bias": w(h), "pre_attn.1.weight": 1 + w(h),
             "pre_attn.1.bias": w(h), "attn.attention_a.0.weight": w(a, h), "attn.attention_a.0.bias": w(a),
             "attn.attention_b.0.weight": w(a, h), "attn.attention_b.0.bias": w(a),
             "attn.attention_c.weight": w(1, a), "attn.attention_c.bias": w(1)}
    save_file(state, str(tmp_path / f"tangle{feature_dim}.safetensors"))
    out = tmp_path / ("tangle" if feature_dim == 32 else f"tangle{feature_dim}")
    import_encoder(tmp_path / f"tangle{feature_dim}.safetensors", "tangle", out)
    return out


def _titan_export(tmp_path, feature_dim, w=16, seed=0):
    """A TITAN-layout checkpoint (width 16, one block of 4 heads, a 2-head contrastive pooler) with random weights,
    imported by `import-encoder` (2D ALiBi over the bags' grid, CoCa readout)."""
    from safetensors.numpy import save_file

    from mmfm.bridges.slide_import import LayoutOptions, import_encoder

    rng = np.random.default_rng(seed)
    r = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    lin = lambda name, o, i: {f"{name}.weight": r(o, i), f"{name}.bias": r(o)}
    norm = lambda name: {f"{name}.weight": 1 + r(w), f"{name}.bias": r(w)}
    b, p = "blocks.modules_list.0", "attn_pool_contrastive"
    state = {**lin("patch_embed.0", w, feature_dim), "cls_token": r(1, 1, w), **norm("norm"),
             **norm(f"{b}.norm1"), **norm(f"{b}.norm2"), **lin(f"{b}.attn.qkv", 3 * w, w),
             **lin(f"{b}.attn.proj", w, w), **lin(f"{b}.mlp.fc1", 4 * w, w), **lin(f"{b}.mlp.fc2", w, 4 * w),
             f"{p}.query": r(1, w), **norm(f"{p}.ln_q"), **norm(f"{p}.ln_k"), f"{p}.attn.in_proj_weight": r(3 * w, w),
             f"{p}.attn.in_proj_bias": r(3 * w), **lin(f"{p}.attn.out_proj", w, w)}
    save_file(state, str(tmp_path / "titan.safetensors"))
    import_encoder(tmp_path / "titan.safetensors", "titan", tmp_path / "titan", LayoutOptions(n_heads=4, pool_heads=2))
    return tmp_path / "titan"


def _gigapath_export(tmp_path, feature_dim, w=16, ffn=32, seed=0):
    """A Prov-GigaPath-layout checkpoint (one LongNet layer, 4 heads, branches (64, 1) and (256, 4)) with random
    weights, imported by `import-encoder` into an export directory."""
    from safetensors.numpy import save_file

    from mmfm.bridges.slide_import import LayoutOptions, import_encoder

    rng = np.random.default_rng(seed)
    r = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    state = {"patch_embed.proj.weight": r(w, feature_dim), "patch_embed.proj.bias": r(w), "cls_token": r(1, 1, w)}
    shapes = {**{f"self_attn.{p}_proj": (w, w) for p in "qkvo"}, "ffn.fc1": (ffn, w), "ffn.fc2": (w, ffn)}
    for name, shape in shapes.items():
        name = name.replace("o_proj", "out_proj")
        state |= {f"encoder.layers.0.{name}.weight": r(*shape), f"encoder.layers.0.{name}.bias": r(shape[0])}
    for name, n in {"encoder.layers.0.self_attn.inner_attn_ln": w, "encoder.layers.0.self_attn_layer_norm": w,
                    "encoder.layers.0.ffn.ffn_layernorm": ffn, "encoder.layers.0.final_layer_norm": w,
                    "encoder.layer_norm": w, "norm": w}.items():
        state |= {f"{name}.weight": 1 + r(n), f"{name}.bias": r(n)}
    save_file(state, str(tmp_path / "gigapath.safetensors"))
    import_encoder(tmp_path / "gigapath.safetensors", "gigapath", tmp_path / "gigapath",
                   LayoutOptions(n_heads=4, segment_lengths=(64, 256), dilation_ratios=(1, 4), layer=1))
    return tmp_path / "gigapath"


def _extra_encoder_column_and_probe(tmp_path, exports, cases, slides, bag, g, frag):
    """Each imported encoder (TANGLE's ABMIL, TITAN's ALiBi transformer, GigaPath's LongNet) embeds the same whole
    bags as obsm['slide_<name>'] (equal to that encoder on the slide's bag; for GigaPath: tests/test_gigapath.py),
    and a probe table holds them beside the run's `slide`; an export on other tile features, or whose column is
    taken, is refused, naming it."""
    from mmfm.eval.embed import _extra_encoders
    from mmfm.eval.probe import probe
    from mmfm.models.export_format import load_slide_encoder

    columns = [f"slide_{e.name}" for e in exports]
    for export, column in zip(exports, columns):
        assert cases.obsm[column].shape == (cases.n_obs, 16)
        if export.name == "gigapath":
            continue  # no eager run of the LongNet here
        enc, _, _ = load_slide_encoder(export)
        direct = enc(bag["features"][None].astype(np.float32), g[None], np.ones((1, len(g)), bool),
                     frag[None].astype(np.int32)).embedding
        np.testing.assert_allclose(slides.obsm[column][0], np.asarray(direct)[0], atol=1e-5)
    res = probe(cases, [{"name": "subtype", "type": "classification", "label": "subtype", "folds": 3,
                         "embeddings": ["slide", *columns]}], tmp_path / "probe", allow_overlap=True,
                allow_validation_overlap=True, n_bootstrap=10, plots=False)
    assert set(res.results["embedding"]) == {"slide", "slide_tangle", "slide_titan", "slide_gigapath"}
    tangle = exports[0]
    with pytest.raises(ValueError, match="tangle8: encodes 8-d tile features, the cohort's bags hold 32-d"):
        _extra_encoders((str(_tangle_export(tmp_path, feature_dim=8)),), 32, taken=set())
    with pytest.raises(ValueError, match="its column 'slide_tangle' is already taken"):
        _extra_encoders((str(tangle),), 32, taken={"slide_tangle"})
