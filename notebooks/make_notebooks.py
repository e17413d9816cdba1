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
""",
    """md:## 1. A cohort (simulated here; `data_cards/cohort_format.md` describes the contract for your own)""",
    """
from mmfm.data.simulate import SimConfig, simulate_cohort
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
from mmfm.train.metrics import read_jsonl

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
    """md:## 4. Probes with the field's protocols (Patho-Bench-compatible), baselines side by side""",
    """
from mmfm.eval.probe import probe
from mmfm.eval.report import headline_table

res = probe(OUT / "embeddings.h5ad", CONFIGS / "tasks" / "demo.yaml", OUT / "report", n_bootstrap=20 if SMALL else 100)
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
from mmfm.data.simulate import SimConfig, simulate_cohort
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

if __name__ == "__main__":
    nbf.write(notebook(QUICKSTART), HERE / "01_quickstart.ipynb")
    nbf.write(notebook(PROBING), HERE / "02_survival_mutation_probing.ipynb")
