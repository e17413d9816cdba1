"""Heatmaps: exact placement of tile scores on the thumbnail, tile maps that decompose the slide embedding, and
the whole command on the real CMU-1-Small-Region.svs."""

import h5py
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from mmfm.bridges.heatmap_render import blend, score_raster


def brute_force_raster(coords, ps, values, W, H, tw, th):
    """Paint every tile on a level-0 canvas, then send level-0 pixel (x, y) to thumbnail pixel (x·tw//W, y·th//H)."""
    num, den = np.zeros((H, W)), np.zeros((H, W))
    for (x, y), v in zip(coords, values):
        num[max(y, 0):min(y + ps, H), max(x, 0):min(x + ps, W)] += v
        den[max(y, 0):min(y + ps, H), max(x, 0):min(x + ps, W)] += 1
    ty = (np.arange(H) * th // H)[:, None]
    tx = (np.arange(W) * tw // W)[None, :]
    idx = (ty * tw + tx).ravel()
    n = np.bincount(idx, num.ravel(), th * tw)
    d = np.bincount(idx, den.ravel(), th * tw)
    return np.where(d > 0, n / np.where(d > 0, d, 1), np.nan).reshape(th, tw)


def test_raster_places_scores_on_exactly_the_covered_pixels():
    rng = np.random.default_rng(0)
    W, H, tw, th, ps = 1000, 700, 137, 96, 64
    xs, ys = np.meshgrid(np.arange(-30, W, 50), np.arange(0, H + 20, 50))  # overlapping, some past the edges
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    coords = coords[rng.random(len(coords)) < 0.6]
    values = rng.random(len(coords))
    got = score_raster(coords, ps, values, (W, H), (tw, th))
    want = brute_force_raster(coords, ps, values, W, H, tw, th)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-12)


def model_and_bag(slide_cfg, n=37, d=12, seed=0):
    from mmfm.data.batch import BatchShapes
    from mmfm.models import ModelConfig, MultimodalModel

    model = MultimodalModel(ModelConfig(embed_dim=8, slide=slide_cfg),
                            BatchShapes(batch_size=1, tiles_per_slide=n, feature_dim=d, n_genes=5), ("slide", "rna"),
                            rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(1, n, d)).astype(np.float32)
    c = np.stack(np.meshgrid(np.arange(8), np.arange(5)), -1).reshape(-1, 2)[:n][None].astype(np.int32)
    return model, f, c, np.ones((1, n), bool), np.zeros((1, n), np.int32)


@pytest.mark.parametrize("heads,merge", [(1, "concat"), (3, "concat"), (2, "mean")])
def test_abmil_tile_similarity_is_the_one_tile_bag_embedding(heads, merge):
    """ABMIL tokens do not see other tiles, so a tile's map value must equal its one-tile bag's slide embedding."""
    from mmfm.eval.heatmap import slide_maps
    from mmfm.models import SlideConfig
    from mmfm.models.abmil import ABMILConfig

    model, f, c, m, fr = model_and_bag(SlideConfig(abmil=ABMILConfig(hidden=16, n_heads=heads, attn_dim=8,
                                                                     merge=merge)))
    q = np.random.default_rng(1).normal(size=8)
    maps = slide_maps(model, f[0], c[0], fr[0], {"similarity_q": q})
    encode = nnx.jit(lambda model, *bag: model.encode_slide(*bag))  # one compile per shape, not one per eager op
    one_tile = np.asarray(encode(model, f[0][:, None], c[0][:, None], m[0][:, None], fr[0][:, None]).embedding)
    np.testing.assert_allclose(maps["similarity_q"], one_tile @ (q / np.linalg.norm(q)), atol=1e-5)
    attn = np.asarray(encode(model, f, c, m, fr).attention)[0]
    assert sorted(k for k in maps if k.startswith("attention")) == [f"attention_head{h}" for h in range(heads)]
    for h in range(heads):
        np.testing.assert_allclose(maps[f"attention_head{h}"], attn[h], atol=1e-6)
        assert maps[f"attention_head{h}"].sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("readout", ["attention", "mean_concat"])
def test_transformer_tiles_decompose_the_slide_projection(readout):
    """Linear head: the slide's raw projection is the (head-averaged) attention-weighted mean of the tiles'
    raw projections, or their plain mean for the mean_concat readout."""
    from mmfm.eval.heatmap import tile_embeddings
    from mmfm.models import SlideConfig
    from mmfm.models.transformer import TransformerConfig

    tcfg = TransformerConfig(width=16, depth=2, n_heads=2, n_registers=2, readout=readout, readout_heads=3,
                             dropout=0.0)
    model, f, c, m, fr = model_and_bag(SlideConfig(kind="transformer", transformer=tcfg))
    out, tiles = tile_embeddings(model, f, c, m, fr, normalize=False)
    slide = np.asarray(model.encode_slide(f, c, m, fr, normalize=False).embedding)[0]
    w = np.asarray(out.attention)[0].mean(0) if readout == "attention" else np.full(f.shape[1], 1 / f.shape[1])
    np.testing.assert_allclose(w @ np.asarray(tiles)[0], slide, atol=1e-4)


@pytest.fixture(scope="module")
def run(report_run):
    return report_run


@pytest.fixture(scope="module")
def cmu_cohort(run, wsi_dir, tmp_path_factory):
    """The tiny run's cohort plus a bag for the real CMU-1-Small-Region.svs: the extraction's own tissue grid
    (128 px tiles at 20×), random 16-d features, attached to a case that has RNA and a report."""
    from conftest import writable_copy

    from mmfm.bridges.readers import open_slide
    from mmfm.bridges.tissue import TissueConfig, segment_tissue, tile_grid
    from mmfm.data.bags import patch_size_level0, write_bag
    from mmfm.data.cohort import Cohort

    cohort_dir, run_dir = run
    out = writable_copy(cohort_dir, tmp_path_factory.mktemp("cmu") / "cohort")  # the shared run stays untouched
    wsi = wsi_dir / "CMU-1-Small-Region.svs"
    with open_slide(wsi) as r:
        ps = patch_size_level0(128, 20.0, r.mpp)
        thumb, _ = r.thumbnail(8.0)
        tissue = segment_tissue(thumb, r.mpp * r.dimensions[0] / thumb.shape[1], TissueConfig())
        grid = tile_grid(tissue, r.dimensions, ps, 0.25)
    feats = np.random.default_rng(0).normal(size=(len(grid.coords), 16)).astype(np.float16)
    write_bag(out / "bags" / "CMU-1-Small-Region.h5", feats, grid.coords, patch_size_level0=ps, encoder="sim-uni",
              fragment=grid.fragment)
    pres = Cohort.open(cohort_dir, scan_features=False).presence()
    case = pres.index[pres.rna & pres.report][0]
    slides = pd.read_csv(out / "slides.csv")
    slides.loc[len(slides)] = {"slide_id": "CMU-1-Small-Region", "case_id": case, "path": "bags/CMU-1-Small-Region.h5"}
    slides.to_csv(out / "slides.csv", index=False)
    return out, run_dir, wsi, grid, ps


@pytest.mark.slow
def test_heatmap_command_on_the_real_slide(cmu_cohort, tmp_path, capsys):
    """`mmfm heatmap` as a user types it: tile scores in the h5, each overlay pixel-exact on the thumbnail."""
    from PIL import Image

    from mmfm.bridges.heatmap_render import render_all, scaled
    from mmfm.bridges.readers import open_slide
    from mmfm.cli import main
    from mmfm.eval.heatmap import read_tile_scores

    cohort, run_dir, wsi, grid, ps = cmu_cohort
    prompt = "Tumour necrosis is present."
    common = ["--run", str(run_dir), "--cohort", str(cohort), "--out", str(tmp_path / "hm")]
    rc = main(["heatmap", *common, "--slide", "CMU-1-Small-Region", "--wsi", str(wsi),
               "--queries", f"[rna, report, '{prompt}']", "--thumb_max_px", "400", "--top_k", "4", "--alpha", "0.6"])
    assert rc == 0, capsys.readouterr().err
    assert "CMU-1-Small-Region.tile_scores.h5" in capsys.readouterr().out
    h5 = tmp_path / "hm" / "CMU-1-Small-Region.tile_scores.h5"
    assert len(grid.coords) > 50
    ts = read_tile_scores(h5)
    np.testing.assert_array_equal(ts.coords, grid.coords)  # level-0 top-left, TRIDENT convention
    with h5py.File(h5) as f:
        assert f["coords"].attrs["patch_size_level0"] == ps and f["coords"].dtype == np.int64
        assert f.attrs["step"] == "latest" and f.attrs["run_dir"] == str(run_dir.absolute())
    assert set(ts.scores) == {"attention_head0", "similarity_rna", "similarity_report", "similarity_prompt2"}
    assert ts.queries["similarity_prompt2"] == prompt
    assert ts.scores["attention_head0"].sum() == pytest.approx(1.0, abs=1e-4)
    assert np.abs(ts.scores["similarity_rna"]).max() <= 1 + 1e-5

    with open_slide(wsi) as r:  # the thumbnail the renderer must have used: longest side 400 px
        W, H = r.dimensions
        thumb, (tw, th) = r.thumbnail(max(W, H) * r.mpp / 400)
    assert max(tw, th) == 400

    for name in ts.scores:
        overlay = np.asarray(Image.open(tmp_path / "hm" / f"CMU-1-Small-Region.{name}.overlay.png").convert("RGB"))
        assert overlay.shape == thumb.shape
        want = brute_force_raster(grid.coords, ps, scaled(ts.scores[name], "rank"), W, H, tw, th)
        covered = np.isfinite(want)
        assert 0.2 < covered.mean() < 1.0
        np.testing.assert_array_equal(overlay[~covered], thumb[~covered])  # the bare slide where no tile reaches
        expect = blend(thumb, want, "jet", 0.6)
        assert np.abs(overlay.astype(int) - expect.astype(int)).max() <= 3  # LUT bin at float-rounding edges
        assert (np.abs(overlay.astype(int) - expect.astype(int)) > 0).mean() < 0.01
        assert (tmp_path / "hm" / f"CMU-1-Small-Region.{name}.png").stat().st_size > 0
        assert (tmp_path / "hm" / f"CMU-1-Small-Region.{name}.topk.png").stat().st_size > 0

    grid_only = render_all(ts, tmp_path / "grid")  # no WSI: the tile grid
    assert [p.name for p in grid_only["similarity_rna"]] == ["CMU-1-Small-Region.similarity_rna.png"]
    for argv, message in [(["--slide", "nope"], "slides.csv: no slide 'nope'"),
                          (["--slide", "CMU-1-Small-Region", "--query", "protein"], "no protein modality"),
                          (["--slide", "CMU-1-Small-Region", "--cmap", "jett"], "not a matplotlib colour map"),
                          (["--slide", "CMU-1-Small-Region", "--scale", "log"], "scale")]:
        assert main(["heatmap", *common, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mmfm heatmap: error:") and message in err and len(err.splitlines()) == 1, err
