"""Writes the notebooks from this source (cells as plain text, outputs stripped). Run after editing."""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent


def notebook(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c.strip())
                for c in cells]
    return nb


QUICKSTART = [
    """md:# mmfm quickstart: the demo through the Python API

Simulate a cohort → validate it → pretrain a slide encoder aligned with RNA and protein (multimodal SigLIP)
→ embed the held-out cases with all tiles → probe survival, subtype, mutations, retrieval and site robustness,
with mean-pool and random-init baselines beside the pretrained embedding.

`MMFM_SMALL=1` (set by the test suite) shrinks everything so the notebook runs in about a minute.""",
    """
import os
from pathlib import Path

SMALL = os.environ.get("MMFM_SMALL") == "1"
OUT = Path(os.environ.get("MMFM_NB_OUT", "nb_out")) / "quickstart"
N_CASES = 48 if SMALL else 400
SIM = dict(feature_dim=64, bag_size_median=48, bag_size_max=256, n_genes=200, n_proteins=16) if SMALL else {}
TRAIN = ["train.steps=6", "train.eval_every=3", "train.ckpt_every=3", "loader.batch_size=16",
         "loader.tiles_per_slide=32", "loader.n_genes=64", "data.heldout_fraction=0.5"] if SMALL else []
TASKS = "demo_quick.yaml" if SMALL else "demo.yaml"  # small: the same rows with 3 folds, cheaper MIL shapes
""",
    """md:## 1. A cohort (simulated here; `data_cards/cohort_format.md` describes the contract for your own)""",
    """
from mmfm.simulate import SimConfig, simulate_cohort
from mmfm.data.cohort import Cohort, validate

cohort_dir = simulate_cohort(OUT / "cohort", SimConfig(n_cases=N_CASES, seed=0, **SIM))
report = validate(cohort_dir)
print(report.format())
cohort = Cohort.open(cohort_dir)
cohort.presence().mean().rename("fraction of cases with the modality")
""",
    """md:## 2. Pretraining (`configs/demo.yaml`, shipped with the package; overrides as in `mmfm pretrain --set`)

The recipe's `data.modalities` says what the run trains on: the loader emits those modalities and the model
encodes them. The run directory must be new (or empty) unless you resume it.""",
    """
import shutil
from importlib import resources
from mmfm.train import load_config, pretrain

CONFIGS = resources.files("mmfm") / "configs"  # the recipes and task files, in a checkout or a wheel
cfg = load_config(CONFIGS / "demo.yaml", [f"data.cohort={cohort_dir}", *TRAIN])
print("modalities:", cfg.data.modalities)
shutil.rmtree(OUT / "run", ignore_errors=True)  # a fresh run each time the notebook is executed
result = pretrain(cfg, OUT / "run")
result
""",
    """
import pandas as pd
import matplotlib.pyplot as plt
from mmfm.train.monitor import read_jsonl

metrics = pd.DataFrame(read_jsonl(OUT / "run" / "metrics.jsonl"))
ax = metrics.plot(x="step", y=[c for c in metrics.columns if c == "loss" or c.startswith("loss/")], figsize=(6, 3))
ax.set_ylabel("SigLIP loss");
""",
    """md:## 3. Embeddings of the held-out cases (all tiles per slide; baselines included)""",
    """
import json
from mmfm.eval.embed import embed

held = json.loads((OUT / "run" / "splits.json").read_text())["heldout"]
cases, slides = embed(OUT / "run", cohort_dir, OUT / "embeddings.h5ad", case_ids=held)
cases
""",
    """md:## 4. Probes with the field's protocols (Patho-Bench-compatible), baselines side by side

The task file `configs/tasks/demo.yaml` (the small run: `demo_quick.yaml`, the same tasks with 3 folds).""",
    """
from mmfm.eval.probe import probe
from mmfm.eval.report import headline_table

res = probe(OUT / "embeddings.h5ad", CONFIGS / "tasks" / TASKS, OUT / "report", n_bootstrap=20 if SMALL else 100)
headline_table(res.summary)
""",
    """
from IPython.display import Image, display
for png in sorted((OUT / "report").glob("*.png"))[:4]:
    display(Image(str(png), width=520))
""",
]

PROBING = [
    """md:# Survival and mutation probing, on real and simulated data

`mmfm probe` accepts any AnnData whose `obsm`/`X` hold features and whose `obs` hold labels. Here:
1. real data shipped with scikit-survival — GSE7390 breast-cancer expression with time to distant metastasis;
2. a simulated cohort's mean-pooled tile features, with driver-mutation panels and overall survival.""",
    """
import os
from pathlib import Path
import numpy as np
import pandas as pd
import anndata as ad
from sksurv.datasets import load_breast_cancer
from mmfm.eval.probe import probe

SMALL = os.environ.get("MMFM_SMALL") == "1"
OUT = Path(os.environ.get("MMFM_NB_OUT", "nb_out")) / "probing"
""",
    """md:## 1. GSE7390 (198 patients, 76 probes): CoxNet probe, Harrell's and Uno's C, KM by predicted risk""",
    """
X, y = load_breast_cancer()
genes = X.select_dtypes("number").drop(columns=["age", "size", "grade"], errors="ignore")
obs = pd.DataFrame({"time": y["t.tdm"], "event": y["e.tdm"].astype(int), "age": X["age"].to_numpy()},
                   index=[f"P{i:03d}" for i in range(len(X))])
gse = ad.AnnData(X=genes.to_numpy(np.float32), obs=obs)
tasks = [{"name": "GSE7390 distant metastasis", "type": "survival", "time": "time", "event": "event",
          "embeddings": ["X"], "baseline": ["age"], "folds": 3 if SMALL else 5}]
res = probe(gse, tasks, OUT / "gse7390", n_bootstrap=20 if SMALL else 100)
res.summary[["task", "embedding", "model", "metric", "text"]]
""",
    """md:## 2. A simulated cohort: mean-pooled tile features → mutations and survival""",
    """
from mmfm.simulate import SimConfig, simulate_cohort
from mmfm.data.cohort import Cohort
from mmfm.data.bags import read_bag

sim = SimConfig(n_cases=60 if SMALL else 300, seed=1, feature_dim=64 if SMALL else 1024,
                bag_size_median=48 if SMALL else 1000, bag_size_max=256 if SMALL else 20000)
cohort = Cohort.open(simulate_cohort(OUT / "cohort", sim))
slides = cohort.slides[cohort.slides.n_tiles > 0]
pooled = np.stack([read_bag(p)["features"].astype(np.float32).mean(0) for p in slides.path])
feats = pd.DataFrame(pooled, index=slides.case_id.astype(str)).groupby(level=0).mean()  # late fusion
obs = cohort.cases.loc[feats.index]
sim_ad = ad.AnnData(obs=obs.astype({c: "float" for c in cohort.mutation_columns}), obsm={"meanpool": feats.to_numpy()})
tasks = [
    {"name": "mutations", "type": "mutation", "labels": ["mut_*"], "embeddings": ["meanpool"], "min_positives": 5,
     "folds": 3 if SMALL else 5},
    {"name": "overall survival", "type": "survival", "time": "os_days", "event": "os_event",
     "embeddings": ["meanpool"], "folds": 3 if SMALL else 5},
]
res = probe(sim_ad, tasks, OUT / "simulated", n_bootstrap=20 if SMALL else 100)
res.summary[res.summary.metric.isin(["auroc", "c_index"])][["task", "target", "model", "metric", "text"]]
""",
    """
from IPython.display import Image, display
for png in sorted((OUT / "simulated").glob("*km*.png"))[:2]:
    display(Image(str(png), width=480))
""",
]

GDC = [
    """md:# From a GDC download to probes: `mmfm import` through the Python API

A lab starts from files downloaded with `gdc-client download -m manifest.txt` (STAR gene counts, RPPA, masked
somatic MAFs, the sample sheets), the TCGA-CDR clinical table, TCGA-Reports texts and the tile features TRIDENT or
CLAM wrote. Here a tiny folder in exactly those formats is written by the test fixtures (nothing is downloaded),
imported into a cohort, validated, pretrained on for a few steps, embedded and probed. Every importer reports what
it matched, what it could not and which rule chose between duplicates (`data_cards/gdc_tcga.md`).

`MMFM_SMALL=1` (set by the test suite) keeps it to about a minute.""",
    """
import os
from pathlib import Path

SMALL = os.environ.get("MMFM_SMALL") == "1"
OUT = Path(os.environ.get("MMFM_NB_OUT", "nb_out")) / "gdc"
CONFIGS = Path("../configs") if Path("../configs").exists() else Path("configs")
N_EXTRA = 42 if SMALL else 200
TRAIN = (["train.steps=6", "train.eval_every=3", "train.ckpt_every=3", "train.warmup=2", "loader.batch_size=16",
          "loader.tiles_per_slide=32", "loader.n_genes=32", "data.heldout_fraction=0.5", "model.embed_dim=32",
          "model.slide.abmil.hidden=32", "model.slide.abmil.attn_dim=16", "model.rna.hidden=32"] if SMALL else
         ["train.steps=300", "train.eval_every=100", "train.ckpt_every=100", "train.warmup=30", "train.lr=1e-3",
          "loader.batch_size=32", "loader.tiles_per_slide=64", "loader.n_genes=48", "data.heldout_fraction=0.4",
          "model.embed_dim=64", "model.slide.abmil.hidden=64", "model.slide.abmil.attn_dim=32", "model.rna.hidden=64"])
""",
    """md:## 1. A GDC-format download (written by the fixtures: two projects, DX and frozen slides, two aliquots of
one case, a case without MAF, a case without RNA)""",
    """
from mmfm.testing import write_gdc_download

dl = write_gdc_download(OUT / "download", n_extra=N_EXTRA, seed=0, feature_dim=16)
sorted(str(p.relative_to(dl.root)) for p in dl.root.iterdir())
""",
    """md:## 2. Import: one call per source, each a typed config (the same fields as `mmfm import <name> --flags`)""",
    """
from mmfm.importers import IMPORTERS

cohort_dir = OUT / "cohort"
steps = {
    "features": dict(inputs=[dl.trident_dir], preservation="FFPE"),  # diagnostic slides only
    "gdc-rna": dict(inputs=[dl.rna_dir], sample_sheet=dl.rna_sheet),
    "gdc-protein": dict(inputs=[dl.protein_dir], sample_sheet=dl.protein_sheet),
    "maf": dict(inputs=[dl.maf_dir], sample_sheet=dl.maf_sheet, genes=["TP53", "PIK3CA", "KRAS", "GATA3"]),
    "clinical": dict(cdr=dl.cdr, gdc_clinical=dl.gdc_clinical),
    "reports": dict(inputs=[dl.reports_csv]),
}
reports = {}
for name, kw in steps.items():
    Config, run = IMPORTERS[name]
    reports[name] = run(Config(out=cohort_dir, **kw))
""",
    """
import json
# what the RNA import chose for the case with two tumour aliquots (and a normal), as written to imports/gdc-rna.json
saved = json.loads((cohort_dir / "imports" / "gdc-rna.json").read_text())
saved["per_case"]["TCGA-A2-A0T2"], saved["duplicates"]
""",
    """md:## 3. Validate and open: presence per modality is explicit (no MAF = mutation unknown, never wild-type)""",
    """
from mmfm.data.cohort import Cohort, validate

print(validate(cohort_dir).format())
cohort = Cohort.open(cohort_dir)
cohort.presence().loc[["TCGA-A2-A0T2", "TCGA-A2-A0CM", "TCGA-E2-A14N", "TCGA-05-4244"]]
""",
    """md:## 4. A few pretraining steps with the TCGA-BRCA recipe (`configs/tcga_brca_rna.yaml`, TANGLE mould)""",
    """
from mmfm.train import load_config, pretrain

cfg = load_config(CONFIGS / "tcga_brca_rna.yaml", [f"data.cohort={cohort_dir}", *TRAIN])
result = pretrain(cfg, OUT / "run")
result
""",
    """md:## 5. Embed the held-out cases and probe them (folds keep each tissue source site on one side)""",
    """
from mmfm.eval.embed import embed
from mmfm.eval.probe import probe
from mmfm.eval.report import headline_table

held = json.loads((OUT / "run" / "splits.json").read_text())["heldout"]
cases, slides = embed(OUT / "run", cohort_dir, OUT / "embeddings.h5ad", case_ids=held)
tasks = [
    {"name": "overall survival", "type": "survival", "time": "os_days", "event": "os_event",
     "embeddings": ["slide", "slide_meanpool", "rna"], "models": ["coxnet"], "folds": 3},
    {"name": "cancer type", "type": "classification", "label": "project",
     "embeddings": ["slide", "slide_meanpool", "rna"], "folds": 3},
    {"name": "drivers", "type": "mutation", "labels": ["mut_*"], "embeddings": ["slide", "slide_meanpool"],
     "min_positives": 3, "folds": 3},
    {"name": "cross-modal retrieval", "type": "retrieval", "pairs": [["slide", "rna"]]},
]
res = probe(OUT / "embeddings.h5ad", tasks, OUT / "probe", n_bootstrap=20 if SMALL else 100)
headline_table(res.summary)
""",
]

ZERO_SHOT = [
    """md:# Report text in use: zero-shot classification, slide ↔ report retrieval, heatmaps

A run aligned with pathology-report text (`configs/demo_report.yaml`: slide ↔ RNA ↔ protein ↔ report, the real
all-MiniLM-L6-v2 sentence encoder as a *frozen* trunk whose outputs are cached once per report) gives three things
without any labels:
1. **zero-shot classifiers** from class descriptions (prompt ensembles, as CONCH / TITAN),
2. **retrieval** of the reports closest to a slide and back,
3. **heatmaps**: which tiles the slide encoder attended to, and where the tissue looks like a text prompt or the
   case's own RNA profile.

`MMFM_SMALL=1` (set by the test suite) shrinks everything; the numbers are then smoke-test numbers, not results.""",
    """
import os, json, shutil, time
from importlib import resources
from pathlib import Path
import numpy as np
import pandas as pd

SMALL = os.environ.get("MMFM_SMALL") == "1"
OUT = Path(os.environ.get("MMFM_NB_OUT", "nb_out")) / "zero_shot"
CONFIGS = resources.files("mmfm") / "configs"  # the recipes and task files, in a checkout or a wheel
WSI = Path("../../shared/data/wsi/CMU-1-Small-Region.svs")
WSI = WSI if WSI.exists() else Path("/work/shared/data/wsi/CMU-1-Small-Region.svs")
N_CASES = 48 if SMALL else 500
SIM = dict(feature_dim=32, bag_size_median=48, bag_size_max=256, n_genes=200, n_proteins=16) if SMALL else {}
TRAIN = ["train.steps=6", "train.eval_every=6", "train.ckpt_every=6", "loader.batch_size=16",
         "loader.tiles_per_slide=32", "loader.n_genes=64", "data.heldout_fraction=0.5",
         "loader.report_max_len=64", "model.report.max_len=64"] if SMALL else []
""",
    """md:## 1. Pretraining with reports (frozen text trunk, cached features)

The cache lives in the cohort folder (`report_cache/<key>.safetensors`); the key hashes the tokenizer, the
weights and the truncation length, and each row is found by the SHA-256 of its report text.""",
    """
import logging
logging.basicConfig(level=logging.WARNING)
logging.getLogger("mmfm.models.text_cache").setLevel(logging.INFO)
from mmfm.simulate import SimConfig, simulate_cohort
from mmfm.train import load_config, pretrain

cohort_dir = simulate_cohort(OUT / "cohort", SimConfig(n_cases=N_CASES, seed=0, **SIM))
cfg = load_config(CONFIGS / "demo_report.yaml", [f"data.cohort={cohort_dir}", *TRAIN])
shutil.rmtree(OUT / "run", ignore_errors=True)  # a fresh run each time the notebook is executed
t0 = time.perf_counter()
result = pretrain(cfg, OUT / "run")
print(f"pretraining: {time.perf_counter() - t0:.0f}s")
{k: round(v, 3) for k, v in (result.eval or {}).items() if k.startswith("recall@5/") and "report" in k}
""",
    """md:## 2. Held-out embeddings, and the facts the simulated reports state as labels

`mmfm embed` writes `obsm['report']` beside the slide and RNA embeddings, and `uns['run_dir']`: the run whose text
tower the zero-shot tasks use. The labels `report_necrosis`, `report_lvi`, `report_reported_grade` come from the
cohort's latent truth (training never reads it).""",
    """
from mmfm.eval.embed import embed, EmbedConfig
from mmfm.simulate.truth import join_truth

held = json.loads((OUT / "run" / "splits.json").read_text())["heldout"]
cases, _ = embed(OUT / "run", cohort_dir, OUT / "embeddings.h5ad", case_ids=held)
cases = join_truth(cases, cohort_dir)
cases.obs[["report_reported_grade", "report_necrosis", "report_lvi"]].apply(lambda s: s.value_counts()).T
""",
    """md:## 3. The text tower as a Python API: `encode_text`, `zero_shot`""",
    """
from mmfm.eval.text_tower import encode_text
from mmfm.eval.tasks.zeroshot import zero_shot

texts = ["Tumour necrosis is present.", "No tumour necrosis is identified.",
         "Lymphovascular invasion is present.", "Poorly differentiated carcinoma, grade 3."]
t = encode_text(OUT / "run", texts)
pd.DataFrame(t @ t.T, index=texts, columns=range(len(texts))).round(3)   # cosine similarities in the shared space
""",
    """
necrosis = {True: ["tumour necrosis is present", "areas of necrosis within the tumour"],
            False: ["no tumour necrosis", "necrosis is absent"]}
scores = zero_shot(OUT / "run", cases.obsm["slide"], necrosis,
                   templates=["{}.", "Microscopic description: {}.", "Invasive carcinoma. {}."])
scores.index = cases.obs_names
scores.assign(truth=cases.obs["report_necrosis"]).head()
""",
    """md:## 4. Zero-shot next to the linear probe, slide ↔ report retrieval (`configs/tasks/demo_report.yaml`)

`type: zeroshot` tasks run in `mmfm probe` like any other: class names × templates in the task file, every
labelled case a test case, bootstrap CIs, `chance_bacc` beside. The linear probes on the same labels test the
same cases across 5 folds (3 in the small run).""",
    """
from mmfm.eval.probe import probe
from mmfm.eval.tasks import load_tasks

labels = ("reported grade", "necrosis", "lymphovascular invasion")
keep = {"cross-modal retrieval", *labels, *(f"{t} (zero-shot)" for t in labels)}
tasks_file = CONFIGS / "tasks" / ("demo_report_quick.yaml" if SMALL else "demo_report.yaml")  # small: 3 folds
tasks = [t for t in load_tasks(tasks_file) if t.name in keep]
res = probe(cases, tasks, OUT / "report", n_bootstrap=20 if SMALL else 100, plots=False)
s = res.summary
s[s.type.isin(["classification", "zeroshot"]) & s.metric.isin(["auroc", "bacc", "chance_bacc"])].pivot_table(
    index=["task", "embedding"], columns="metric", values="text", aggfunc="first", sort=False)
""",
    """
s[(s.task == "cross-modal retrieval") & s.metric.isin(["recall@1", "recall@5", "chance_recall@5"])
  ].pivot_table(index="embedding", columns="metric", values="text", aggfunc="first")
""",
    """md:## 5. Heatmaps on two held-out slides (tile grid; the simulator's tissue types as ground truth)

Attention per ABMIL head, and tile-wise similarity to the case's own RNA, its report, and a typed prompt. Each
simulated tile has a known tissue type (`truth/tiles/<slide>.npy`): the table shows the mean score per type.""",
    """
from IPython.display import Image, display
from mmfm.bridges.heatmap_render import render_all
from mmfm.data.cohort import Cohort
from mmfm.eval.heatmap import tile_scores, write_tile_scores
from mmfm.train import load_for_inference

model, run_cfg, transforms = load_for_inference(OUT / "run")      # loaded once for both slides
cohort = Cohort.open(cohort_dir, scan_features=False)
pres = cohort.presence()
held_slides = cohort.slides[cohort.slides.case_id.isin([c for c in held if pres.loc[c, "rna"] and pres.loc[c, "report"]])]
types = json.loads((Path(cohort_dir) / "truth" / "model.json").read_text())["tile_types"]
per_type = []
for slide_id in held_slides.index[:2]:
    ts = tile_scores(model, run_cfg, transforms, cohort, slide_id, ("rna", "report", "Tumour necrosis is present."))
    write_tile_scores(OUT / "heatmaps" / f"{slide_id}.tile_scores.h5", ts)
    figs = render_all(ts, OUT / "heatmaps")
    tile_type = pd.Series(np.load(Path(cohort_dir) / "truth" / "tiles" / f"{slide_id}.npy")).map(dict(enumerate(types)))
    for name, s in ts.scores.items():
        per_type.append(pd.Series(s).groupby(tile_type).mean().rename((slide_id, name)))
    display(Image(str(figs["attention_head0"][0]), width=360), Image(str(figs["similarity_prompt2"][0]), width=360))
pd.DataFrame(per_type).round(4)
""",
    """md:## 6. The real slide: CMU-1-Small-Region.svs, with the overlay placed on the thumbnail

A bag for the real slide from the extraction's own tissue grid (128 px tiles at 20×). Its features are random
here — the run's tile encoder is the simulator's — so the map shows *placement* (each tile's score on exactly the
thumbnail pixels its level-0 box covers), not biology. With a real tile encoder `mmfm extract` writes the bag.""",
    """
from mmfm.bridges.heatmap_render import HeatmapConfig, heatmap
from mmfm.bridges.readers import open_slide
from mmfm.bridges.tissue import TissueConfig, segment_tissue, tile_grid
from mmfm.data.bags import patch_size_level0, write_bag

with open_slide(WSI) as r:
    ps = patch_size_level0(128, 20.0, r.mpp)
    thumb, _ = r.thumbnail(8.0)
    grid = tile_grid(segment_tissue(thumb, r.mpp * r.dimensions[0] / thumb.shape[1], TissueConfig()),
                     r.dimensions, ps, 0.25)
dim = cohort.spec.feature_dim
write_bag(Path(cohort_dir) / "bags" / "CMU-1-Small-Region.h5",
          np.random.default_rng(0).normal(size=(len(grid.coords), dim)).astype(np.float16), grid.coords,
          patch_size_level0=ps, encoder=cohort.spec.encoder_name, fragment=grid.fragment)
slides_csv = pd.read_csv(Path(cohort_dir) / "slides.csv")
if "CMU-1-Small-Region" not in set(slides_csv.slide_id):
    slides_csv.loc[len(slides_csv)] = {"slide_id": "CMU-1-Small-Region", "case_id": held_slides.case_id.iloc[0],
                                       "path": "bags/CMU-1-Small-Region.h5"}
    slides_csv.to_csv(Path(cohort_dir) / "slides.csv", index=False)
res = heatmap(HeatmapConfig(run=str(OUT / "run"), cohort=str(cohort_dir), slide="CMU-1-Small-Region",
                            out=str(OUT / "heatmaps"), wsi=str(WSI), queries=("Tumour necrosis is present.",),
                            thumb_max_px=800, top_k=6))
print(len(grid.coords), "tiles;", res.h5)
display(Image(str(res.figures["attention_head0"][0]), width=420), Image(str(res.figures["attention_head0"][2])))
""",
]

if __name__ == "__main__":
    nbf.write(notebook(QUICKSTART), HERE / "01_quickstart.ipynb")
    nbf.write(notebook(PROBING), HERE / "02_survival_mutation_probing.ipynb")
    nbf.write(notebook(GDC), HERE / "03_from_gdc_download.ipynb")
    nbf.write(notebook(ZERO_SHOT), HERE / "04_zero_shot_and_heatmaps.ipynb")
