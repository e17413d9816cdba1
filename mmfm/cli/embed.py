"""`mmfm embed`: case- and slide-level embeddings of a trained run → AnnData."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmfm.config import narrow
from mmfm.eval.embed import EmbedConfig

DESCRIPTION = """\
Embed the cases of a cohort with a trained run (every tile of every bag, no sampling): OUT.h5ad holds one row
per case with each modality's embedding in obsm (plus the mean-pool and random-init baselines), OUT.slides.h5ad
one row per slide. By default only the run's held-out cases are embedded — the ones `mmfm probe` may test on;
--cases all embeds every case, --cases FILE those listed (one case_id per line). --extra_encoders "[DIR, …]"
adds the slide encoders of export directories (a public checkpoint brought in by `mmfm import-encoder`) as
obsm['slide_<DIR name>'], so `mmfm probe` compares them with the run's encoder (embeddings: [slide, slide_<name>]).
--combat "[slide]" adds obsm['slide_combat']: the embedding corrected for cases.csv `site` (--combat_site) by
ComBat fitted on the run's pretraining cases only (embedded for the fit, not written), so the probes' test cases
never enter the fit.

example: mmfm embed --run runs/demo --cohort cohort --out runs/demo/embeddings.h5ad"""


@dataclass(frozen=True)
class Config(EmbedConfig):
    run: str = ""                      # run directory of `mmfm pretrain`
    cohort: str = ""                   # cohort directory
    out: str = ""                      # output .h5ad (a .slides.h5ad is written beside it)
    step: Literal["latest", "best"] | int = "latest"  # checkpoint: latest, best (train.best_metric) or a step number
    cases: str = "heldout"             # heldout (the run's held-out cases) | all | a file with one case_id per line


def run(cfg: Config) -> int:
    from mmfm.eval.embed import embed
    from mmfm.train.rundir import read_splits

    for key in ("run", "cohort", "out"):
        if not getattr(cfg, key):
            raise ValueError(f"--{key}: required")
    if cfg.cases == "heldout":
        case_ids = read_splits(cfg.run)["heldout"]
    elif cfg.cases == "all":
        case_ids = None
    else:
        path = Path(cfg.cases)
        if not path.is_file():
            raise FileNotFoundError(f"--cases {cfg.cases}: not 'heldout', 'all' or a file of case ids")
        case_ids = path.read_text().split()
    emb_cfg = narrow(cfg, EmbedConfig)
    adata, slides = embed(cfg.run, cfg.cohort, cfg.out, cfg=emb_cfg, case_ids=case_ids, step=cfg.step)
    print(f"wrote {cfg.out}: {adata.n_obs} cases ({cfg.cases}) × {list(adata.obsm)}; {slides.n_obs} slides")
    return 0
