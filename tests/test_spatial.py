"""Spatial transcriptomics: spot ↔ tile matching on a hand-built slide, the spot-table contract in `validate`,
`mmfm import hest` on a HEST-layout folder written here from the documented format, the simulator's spots against
its tile truth, and the spot-level probe on patient-level folds."""

import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

from mmfm.data.bags import write_bag
from mmfm.data.cohort import Cohort, validate
from mmfm.data.spots import match_spots
from mmfm.importers.hest import HestConfig, run_hest

S = 512  # tile side, level-0 px


def test_spot_tile_matching_on_a_hand_built_slide():
    """Three tiles of an L (the fourth is background); centres on edges belong to the tile right of / below."""
    tiles = np.array([[0, 0], [S, 0], [0, S]])
    spots = np.array([[10, 10], [S - 0.5, 5], [S, 5], [2 * S - 0.5, S - 0.5], [2 * S, 5], [600, 600], [-1, 5],
                      [256, 2 * S - 0.01], [256, 2 * S]])
    np.testing.assert_array_equal(match_spots(spots, tiles, S), [0, 0, 1, 1, -1, -1, -1, 2, -1])
    r = np.random.default_rng(0)
    grid = np.argwhere(r.random((12, 9)) < 0.6)[:, ::-1] * S + 37  # a ragged tissue mask, offset origin
    pts = r.uniform(-S, 13 * S, (3000, 2))
    inside = ((pts[:, None] >= grid[None]) & (pts[:, None] < grid[None] + S)).all(-1)  # brute force: spots × tiles
    want = np.where(inside.any(1), inside.argmax(1), -1)
    np.testing.assert_array_equal(match_spots(pts, grid, S), want)


def _bag(path, coords, dim=8, seed=0):
    feats = np.random.default_rng(seed).standard_normal((len(coords), dim)).astype(np.float32)
    write_bag(path, feats, coords, patch_size_level0=S, encoder="enc",
              coord_attrs={"patch_size": 256, "target_magnification": 20.0})


def _spot_table(path, xy, diameter=110.0, genes=("G1", "G2", "G3")):
    counts = np.random.default_rng(1).poisson(5, (len(xy), len(genes))).astype(np.float32)
    a = ad.AnnData(counts, obs=pd.DataFrame(index=[f"AAAC{i:04d}-1" for i in range(len(xy))]),
                   var=pd.DataFrame(index=list(genes)), obsm={"spatial": np.asarray(xy, np.float64)})
    if diameter is not None:
        a.uns["spot_diameter_px"] = diameter
    a.write_h5ad(path)
    return a


def _hest_folder(tmp_path):
    """A HEST-1k-layout download (metadata table, st/, patches/) and a TRIDENT feature folder for its slides."""
    root, feats = tmp_path / "hest", tmp_path / "features"
    (root / "st").mkdir(parents=True)
    (root / "patches").mkdir()
    feats.mkdir()
    meta = pd.DataFrame({
        "dataset_title": ["study A", "study A", "study B", "study B"], "id": ["TENX1", "TENX2", "NCBI3", "ZEN4"],
        "organ": ["Bowel"] * 4, "oncotree_code": ["COAD"] * 4, "species": ["Homo sapiens"] * 4,
        "patient": ["Patient 1", "Patient 1", "", ""], "st_technology": ["Visium", "Visium", "Xenium", "Visium"],
        "inter_spot_dist": [100, 100, "", 100], "spot_diameter": [55, 55, "", 55],
        "pixel_size_um_estimated": [0.5, 0.25, 0.27, 0.5]})
    meta.to_csv(root / "HEST_v1_1_0.csv", index=False)
    tiles = np.array([[x, y] for x in range(0, 4 * S, S) for y in range(0, 3 * S, S)])
    xy = np.array([[100 + 230 * i, 80 + 300 * j] for i in range(9) for j in range(6)], float)  # some off tiles
    for sid in ("TENX1", "TENX2", "NCBI3", "ZEN4"):
        a = _spot_table(root / "st" / f"{sid}.h5ad", xy, diameter=None)
        with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
            f["img"] = np.zeros((a.n_obs - 2, 4, 4, 3), np.uint8)  # two spots without a patch
            f["coords"] = xy[:-2].astype(np.int64)
            f["barcode"] = np.array([[b.encode()] for b in a.obs_names[:-2]])
        if sid != "ZEN4":  # ZEN4: no tile features extracted yet
            _bag(feats / f"{sid}.h5", tiles)
    return root, feats, tiles, xy


def test_import_hest_writes_spot_tables_beside_the_tiles(tmp_path):
    root, feats, tiles, xy = _hest_folder(tmp_path)
    out = tmp_path / "cohort"
    report = run_hest(HestConfig(out=out, root=root, features=feats))
    assert report.validation["ok"], report.validation["errors"]
    assert sorted(report.matched) == ["TENX1", "TENX2"]
    assert report.unmatched["samples of another technology (technologies: ['Visium'])"] == ["NCBI3 (Xenium)"]
    assert any(k.startswith("samples without tile features") and v == ["ZEN4"] for k, v in report.unmatched.items())
    cohort = Cohort.open(out)
    assert list(cohort.cases.index) == ["Patient 1"]  # two samples of one patient: one case, two slides
    assert set(cohort.slides.index) == {"TENX1", "TENX2"} and (cohort.slides.case_id == "Patient 1").all()
    on_tiles = int(((xy[:, None] >= tiles[None]) & (xy[:, None] < tiles[None] + S)).all(-1).any(1).sum())
    assert (cohort.slides.n_spots == on_tiles).all() and 0 < on_tiles < len(xy)
    spots = ad.read_h5ad(out / "spots" / "TENX2.h5ad")
    assert spots.uns["spot_diameter_px"] == pytest.approx(55 / 0.25)  # µm / (µm per level-0 px)
    np.testing.assert_array_equal(spots.obsm["spatial"], xy)
    saved = json.loads((out / "imports" / "hest.json").read_text())
    assert saved["per_case"]["TENX1"]["spots_with_a_patch"] == len(xy) - 2
    assert saved["per_case"]["TENX1"]["spot_diameter_px"] == pytest.approx(110.0)


def test_validate_names_a_broken_spot_table(tmp_path):
    root, feats, tiles, xy = _hest_folder(tmp_path)
    out = tmp_path / "cohort"
    run_hest(HestConfig(out=out, root=root, features=feats, ids=("TENX1",)))
    _spot_table(out / "spots" / "TENX1.h5ad", xy / 10)  # coordinates at another pyramid level: still on tiles
    assert validate(out).ok
    _spot_table(out / "spots" / "TENX1.h5ad", xy + 10 * S)  # off every tile
    rep = validate(out)
    assert not rep.ok and any("spots spots/TENX1.h5ad: none of its 54 spot centres" in e for e in rep.errors)
    a = _spot_table(out / "spots" / "TENX1.h5ad", xy)
    a.X[3, 1] = -1.0
    a.write_h5ad(out / "spots" / "TENX1.h5ad")
    assert any("non-negative" in e and "spots/TENX1.h5ad" in e for e in validate(out).errors)
    assert validate(out, scan_features=False).ok  # headers only: counts are scanned with the features
    _spot_table(out / "spots" / "TENX1.h5ad", xy, diameter=None)
    assert any("uns['spot_diameter_px']" in e and "slide TENX1" in e for e in validate(out).errors)
    cohort = Cohort.open(out, strict=False)  # the slide's bag stays usable, its spot table is left out
    assert cohort.slides.loc["TENX1", "n_spots"] == 0 and cohort.slides.loc["TENX1", "spots"] == ""


@pytest.fixture(scope="module")
def spatial_cohort(tmp_path_factory):
    from mmfm.simulate import SimConfig, simulate_cohort

    return simulate_cohort(tmp_path_factory.mktemp("spatial") / "cohort",
                           SimConfig(n_cases=16, n_sites=2, feature_dim=16, n_genes=120, n_proteins=8,
                                     bag_size_median=48, bag_size_max=128, multi_slide_rate=0.0, spatial_rate=0.6))


def test_simulated_spots_follow_the_tile_under_them(spatial_cohort):
    """Immune genes are higher in spots over immune tiles than over tumour tiles, stromal genes over stroma."""
    cohort = Cohort.open(spatial_cohort)
    model = json.loads((spatial_cohort / "truth" / "model.json").read_text())
    genes = pd.read_csv(spatial_cohort / "truth" / "genes.csv", index_col=0)
    rows = []
    for sid, s in cohort.slides[cohort.slides.n_spots > 0].iterrows():
        a = ad.read_h5ad(s.spots)
        with h5py.File(s.path) as f:
            coords = f["coords"][:]
        types = np.load(spatial_cohort / "truth" / "tiles" / f"{sid}.npy")
        tile = match_spots(a.obsm["spatial"], coords, int(s.patch_size_level0))
        x = np.log1p(a.X / a.X.sum(1, keepdims=True) * 1e4)
        for m in ("immune", "stromal"):
            rows += [{"module": m, "type": model["tile_types"][t], "v": v}
                     for t, v in zip(types[tile], x[:, (genes.module == m).to_numpy()].mean(1))]
    df = pd.DataFrame(rows).groupby(["module", "type"]).v.mean()
    assert df["immune", "immune"] > df["immune", "tumour"] + 0.5
    assert df["stromal", "stroma"] > df["stromal", "tumour"] + 0.5


def test_spot_probe_on_patient_level_folds(spatial_cohort, tmp_path):
    from mmfm.eval.probe import probe

    cases = pd.read_csv(spatial_cohort / "cases.csv", dtype=str).case_id
    emb = ad.AnnData(obs=pd.DataFrame(index=cases), uns={"cohort": str(spatial_cohort)})
    task = {"name": "st", "type": "spots", "embeddings": ["tiles", "oracle"], "hvg": 20, "pca": 8, "folds": 3}
    res = probe(emb, [task], tmp_path / "out", plots=False)
    s = res.summary.set_index(["embedding", "metric"])["mean"]
    assert s["oracle", "pearson_mean"] > s["tiles", "pearson_mean"] > s["tiles", "chance_pearson_mean"] + 0.1
    assert s["baseline:mean", "r2_mean"] < 0.01  # the training mean explains nothing on new patients
    folds = pd.read_csv(tmp_path / "out" / "folds" / "st.tsv", sep="\t", index_col="case_id")
    assert (folds == "test").sum(axis=1).eq(1).all()  # every patient tested once, all its spots on one side
    per = pd.read_csv(tmp_path / "out" / "per_target.csv")
    assert per.groupby(["embedding", "fold"]).target.nunique().eq(20).all()


def _space_ranger(folder, barcodes, genes, counts, positions, diameter):
    """A Space Ranger `outs/` folder as 10x documents it: filtered_feature_bc_matrix.h5 (CSC, features × barcodes),
    spatial/tissue_positions.csv (barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres),
    spatial/scalefactors_json.json and the two PNG images."""
    import matplotlib.image
    import scipy.sparse as sp

    (folder / "spatial").mkdir(parents=True)
    m = sp.csc_matrix(counts.T.astype(np.int32))
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["library_ids"] = np.array([b"lib1"])
        g = f.create_group("matrix")
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        g["data"], g["indices"], g["indptr"] = m.data, m.indices.astype(np.int64), m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, np.int32)
        ft = g.create_group("features")
        ft["id"] = np.array([f"ENSG{i:05d}".encode() for i in range(len(genes))])
        ft["name"] = np.array([n.encode() for n in genes])
        ft["feature_type"] = np.array([b"Gene Expression"] * len(genes))
        ft["genome"] = np.array([b"GRCh38"] * len(genes))
    positions.to_csv(folder / "spatial" / "tissue_positions.csv", index=False)
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": diameter, "tissue_hires_scalef": 0.1, "tissue_lowres_scalef": 0.03,
         "fiducial_diameter_fullres": 1.6 * diameter}))
    for res in ("hires", "lowres"):
        matplotlib.image.imsave(folder / "spatial" / f"tissue_{res}_image.png", np.zeros((4, 4, 3)))


def test_import_visium_reads_a_space_ranger_folder(tmp_path):
    from mmfm.importers.hest import VisiumConfig, run_visium

    tiles = np.array([[x, y] for x in range(0, 3 * S, S) for y in range(0, 2 * S, S)])
    barcodes = [f"ACGT{i:04d}-1" for i in range(6)]
    x, y = np.array([100, 700, 1300, 200, 900, 5000]), np.array([50, 60, 70, 800, 900, 50])
    positions = pd.DataFrame({"barcode": barcodes, "in_tissue": [1, 1, 1, 1, 0, 1], "array_row": range(6),
                              "array_col": range(6), "pxl_row_in_fullres": y, "pxl_col_in_fullres": x})
    counts = np.random.default_rng(0).poisson(3, (6, 4))
    _space_ranger(tmp_path / "sampleA" / "outs", barcodes, ["G1", "G2", "G3", "G4"], counts, positions, 180.5)
    (tmp_path / "features").mkdir()
    _bag(tmp_path / "features" / "sampleA.h5", tiles)
    out = tmp_path / "cohort"
    report = run_visium(VisiumConfig(out=out, inputs=(tmp_path / "sampleA" / "outs",), features=tmp_path / "features"))
    assert report.matched == ["sampleA"] and report.validation["ok"], report.validation
    spots = ad.read_h5ad(out / "spots" / "sampleA.h5ad")
    keep = [0, 1, 2, 3, 5]  # in tissue
    assert list(spots.obs_names) == [barcodes[i] for i in keep]
    np.testing.assert_array_equal(spots.obsm["spatial"], np.stack([x, y], 1)[keep])  # (x, y) = (col, row)
    np.testing.assert_array_equal(np.asarray(spots.X.todense() if hasattr(spots.X, "todense") else spots.X),
                                  counts[keep])
    assert spots.uns["spot_diameter_px"] == 180.5
    assert Cohort.open(out).slides.loc["sampleA", "n_spots"] == 4  # the spot at x = 5000 lies on no tile
