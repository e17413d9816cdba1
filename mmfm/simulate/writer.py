"""`simulate_cohort`: a complete cohort directory (data_cards/cohort_format.md) plus its latent truth (`truth/`).

Memory: cases are generated and their bags written one at a time; only per-case rows are kept.
Resume: a re-run into the same directory with the same config skips bags that are already complete.
The same seed and config give the same bytes (HDF5 without timestamps, byte-stable h5ad).
The latent truth goes to `truth/` — training code never reads it; tests and probes grade against it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from mmfm import MODALITIES
from mmfm.data.bags import write_bag
from mmfm.io import atomic_path, write_csv, write_h5ad, write_json, write_text
from mmfm.simulate import latent, layout, tile_features
from mmfm.simulate.harder import focal_region, is_focal
from mmfm.simulate.latent import DRIVERS, PROGRAMMES, SUBTYPES, TILE_TYPES, Case, World, slide_id
from mmfm.simulate.molecular import protein_values, rna_counts
from mmfm.simulate.observation import MNAR_MODALITIES, missing_probability
from mmfm.simulate.pathology import report_facts, report_text
from mmfm.simulate.sim_config import REPORT, SimConfig, rng
from mmfm.simulate.spatial import has_spots, simulate_spots
from mmfm.simulate.tile_features import simulate_slide
from mmfm.simulate.world import draw_case, make_world

TRUTH_README = """# Latent truth of a simulated cohort (mmfm.simulate)

Training code never reads this folder; tests, probes and the data card grade against it.

- `sim_config.json`: the SimConfig that produced the cohort (a re-run with the same config resumes).
- `model.json`: the generative constants (subtype means, driver prevalence/effects, hazard and
  composition coefficients) and the drawn site weights and per-site subtype prevalence.
- `cases.csv`: one row per case: site, true subtype, programme values (`prog_*`), true driver status
  (`true_mut_*`, also when cases.csv hides it), grade score, true log-hazard `risk`, uncensored event and
  censoring times, observed `os_days`/`os_event`, modality presence, latent `tumour_size_z` and the
  probability `p_missing_rna`/`p_missing_protein` it implies (MNAR option), `focal` (case-specific appearance
  confined to foci), and the report facts (necrosis, lvi, til…).
- `slides.csv`: per slide: n_tiles, n_fragments, the fraction of each tile type (`frac_*`) and of tiles carrying
  the case-specific appearance (`informative_fraction`; which ones: `mmfm.simulate.focal_region`).
- `tiles/<slide_id>.npy`: int8 tile type per bag row (same order as the bag), codes = `tile_types` in model.json;
  a spot of `spots/<slide_id>.h5ad` (option `spatial_rate`) lies on the tile `mmfm.data.spots.match_spots` finds,
  and its expression is shifted by that tile's type (`mmfm.simulate.spatial`).
- `genes.csv`, `proteins.csv`: per-feature module, baseline, programme loadings, subtype/driver effects.
"""


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy.tmp") as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def _write_h5ad(path: Path, values: list[np.ndarray], obs: list[str], var: list[str]) -> None:
    x = np.stack(values) if values else np.zeros((0, len(var)), np.float32)
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=pd.Index(obs)), var=pd.DataFrame(index=pd.Index(var)))
    write_h5ad(path, adata)


def _claim(out: Path, cfg: SimConfig) -> None:
    """Refuse to mix configs in one directory; the same config resumes."""
    marker = out / "truth" / "sim_config.json"
    want = dataclasses.asdict(cfg)
    if marker.exists():
        have = json.loads(marker.read_text())
        have = {**{k: v for k, v in dataclasses.asdict(SimConfig()).items() if k not in have}, **have}  # knobs
        # added after the cohort was written held their default value then
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            raise ValueError(f"{out}: holds a cohort simulated with a different config (keys {diff}); "
                             "choose another --out or delete it")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists, is not empty and is not a simulated cohort; refusing to write into it")
    write_json(marker, want)


def _slide_summary(sid: str, case: Case, types: np.ndarray, fragment: np.ndarray, informative: np.ndarray) -> dict:
    counts = np.bincount(types, minlength=len(TILE_TYPES)) / max(len(types), 1)
    return {"slide_id": sid, "case_id": case.case_id, "n_tiles": len(types),
            "n_fragments": int(fragment.max()) + 1 if len(fragment) else 0,
            **{f"frac_{t}": round(float(c), 6) for t, c in zip(TILE_TYPES, counts)},
            "informative_fraction": round(float(informative.mean()), 6)}


def _write_slide(cfg: SimConfig, world: World, out: Path, case: Case, j: int) -> dict:
    """Write (or, when resuming, reuse) one bag and its tile truth; return the slide's truth row."""
    sid = slide_id(case.index, j)
    bag, truth = out / "bags" / f"{sid}.h5", out / "truth" / "tiles" / f"{sid}.npy"
    spots = out / "spots" / f"{sid}.h5ad" if has_spots(cfg, case, j) else None
    if bag.exists() and truth.exists() and (spots is None or spots.exists()):  # each written atomically, bag first
        with h5py.File(bag, "r") as f:
            grid = f["coords"][:] // cfg.patch_size_level0
            return _slide_summary(sid, case, np.load(truth), f["fragment"][:],
                                  focal_region(cfg, case.index, j, grid))
    s = simulate_slide(cfg, world, case, j)
    write_bag(bag, s.features, s.coords, patch_size_level0=cfg.patch_size_level0, encoder=cfg.encoder_name,
              fragment=s.fragment,
              coord_attrs={"patch_size": cfg.patch_size, "target_magnification": cfg.target_magnification,
                           "level0_magnification": cfg.level0_magnification, "level0_width": s.level0_size[0],
                           "level0_height": s.level0_size[1], "overlap": 0, "name": sid},
              feature_attrs={"simulated": True})
    _save_npy(truth, s.types)
    if spots is not None:
        centres, _, counts, diameter = simulate_spots(cfg, world, case, j, s)
        table = ad.AnnData(X=counts, obs=pd.DataFrame(index=pd.Index([f"{sid}-{k:05d}" for k in range(len(counts))])),
                           var=pd.DataFrame(index=pd.Index(world.genes.index)),
                           obsm={"spatial": centres}, uns={"spot_diameter_px": float(diameter)})
        write_h5ad(spots, table)
    return _slide_summary(sid, case, s.types, s.fragment, s.informative)


def _model_json(cfg: SimConfig, world: World) -> dict:
    consts = {k: v.tolist() for module in (latent, tile_features, layout) for k, v in vars(module).items()
              if k.isupper() and isinstance(v, np.ndarray)}
    return {"subtypes": SUBTYPES, "programmes": PROGRAMMES, "drivers": DRIVERS, "tile_types": TILE_TYPES,
            "patch_size_level0": cfg.patch_size_level0, "site_weights": world.site_weights.tolist(),
            "site_subtype_prevalence": world.site_subtype.tolist(), **consts}


def simulate_cohort(out: str | Path, cfg: SimConfig = SimConfig()) -> Path:
    """Write a complete cohort directory (contract: helpers/COMMON.md) plus its latent truth; return its path."""
    cfg.check()
    out = Path(out)
    _claim(out, cfg)
    world = make_world(cfg)
    genes, proteins = list(world.genes.index), list(world.proteins.index)
    cases, truth, slides, slide_truth, reports = [], [], [], [], []
    rna, rna_ids, prot, prot_ids = [], [], [], []
    for i in tqdm(range(cfg.n_cases), desc="simulate cases", unit="case", disable=cfg.n_cases < 50, leave=False):
        c = draw_case(cfg, world, i)
        rr = rng(cfg, REPORT, i)
        facts = report_facts(c, rr)
        for j in range(c.n_slides):
            slide_truth.append(_write_slide(cfg, world, out, c, j))
            slides.append({"slide_id": slide_id(i, j), "case_id": c.case_id, "path": f"bags/{slide_id(i, j)}.h5",
                           "spots": f"spots/{slide_id(i, j)}.h5ad" if has_spots(cfg, c, j) else ""})
        if c.has["rna"]:
            rna.append(rna_counts(cfg, world, c))
            rna_ids.append(c.case_id)
        if c.has["protein"]:
            prot.append(protein_values(cfg, world, c))
            prot_ids.append(c.case_id)
        if c.has["report"]:
            reports.append(json.dumps({"case_id": c.case_id, "text": report_text(c, facts, rr)}))
        site = f"site{c.site:02d}"
        muts = {f"mut_{d}": (int(m) if c.has["mutation"] else pd.NA) for d, m in zip(DRIVERS, c.mutations)}
        cases.append({"case_id": c.case_id, "site": site, "os_days": c.os_days, "os_event": c.os_event,
                      "subtype": SUBTYPES[c.subtype], "grade": c.grade, **muts})
        truth.append({"case_id": c.case_id, "site": site, "subtype": SUBTYPES[c.subtype], "grade": c.grade,
                      "grade_score": c.grade_score,
                      **{f"prog_{p}": v for p, v in zip(PROGRAMMES, c.programmes)},
                      **{f"true_mut_{d}": int(m) for d, m in zip(DRIVERS, c.mutations)},
                      "risk": c.risk, "event_days": c.event_days, "censor_days": c.censor_days,
                      "os_days": c.os_days, "os_event": c.os_event, "n_slides": c.n_slides,
                      **{f"has_{m}": c.has[m] for m in MODALITIES if m != "slide"},
                      "tumour_size_z": c.size_z, "focal": is_focal(cfg, i),
                      **{f"p_missing_{m}": missing_probability(cfg, m, c.size_z) for m in MNAR_MODALITIES},
                      **{f"report_{k}": facts[k] for k in ("necrosis", "lvi", "til", "reported_grade")}})

    case_df = pd.DataFrame(cases)
    for d in DRIVERS:
        case_df[f"mut_{d}"] = case_df[f"mut_{d}"].astype("Int64")
    write_csv(out / "cases.csv", case_df, index=False)
    write_csv(out / "slides.csv", pd.DataFrame(slides, columns=["slide_id", "case_id", "path"]
                                               + (["spots"] if cfg.spatial_rate > 0 else [])), index=False)
    if rna:
        _write_h5ad(out / "rna.h5ad", rna, rna_ids, genes)
    if prot:
        _write_h5ad(out / "protein.h5ad", prot, prot_ids, proteins)
    if reports:
        write_text(out / "reports.jsonl", "\n".join(reports) + "\n")
    write_csv(out / "truth" / "cases.csv", pd.DataFrame(truth), index=False, float_format="%.6g")
    write_csv(out / "truth" / "slides.csv", pd.DataFrame(slide_truth), index=False)
    write_csv(out / "truth" / "genes.csv", world.genes, float_format="%.6g")
    write_csv(out / "truth" / "proteins.csv", world.proteins, float_format="%.6g")
    write_json(out / "truth" / "model.json", _model_json(cfg, world))
    write_text(out / "truth" / "README.md", TRUTH_README)
    spec = {"name": cfg.name, "version": "1.0",
            "description": f"Simulated slide–omics cohort (mmfm.simulate, seed {cfg.seed}, "
                           f"{cfg.n_cases} cases); not real patients. Latent truth in truth/.",
            "tile_encoder": {"name": cfg.encoder_name, "feature_dim": cfg.feature_dim},
            "target_magnification": float(cfg.target_magnification), "patch_size": int(cfg.patch_size)}
    write_text(out / "cohort.yaml", yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))  # last: marks done
    return out
