"""One tiny trained run with report text (frozen MiniLM, cached features): the `report_run` session fixture of
tests/conftest.py builds it once per pytest run for every test that only needs *a* trained run."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_report_run(base: Path) -> tuple[Path, Path]:
    """(cohort dir, run dir): 40 simulated cases, 16-d tile features, slide ↔ RNA ↔ report, 3 steps."""
    from mmfm.simulate import SimConfig, simulate_cohort
    from mmfm.train.config import load_config
    from mmfm.train.loop import pretrain

    cohort = simulate_cohort(base / "cohort", SimConfig(n_cases=40, seed=5, feature_dim=16, bag_size_median=40,
                                                        bag_size_max=160, n_genes=60, n_proteins=4))
    cfg = load_config(REPO / "configs" / "demo_report.yaml", [
        f"data.cohort={cohort}", "train.steps=3", "train.eval_every=3", "train.ckpt_every=3",
        "train.progress=false", "loader.batch_size=8", "loader.tiles_per_slide=16", "loader.n_genes=24",
        "loader.report_max_len=64", "data.heldout_fraction=0.5", "data.val_fraction=0.3", "data.modalities=[slide, rna, report]",
        "model.report.max_len=64", "train.best_metric=''"])
    pretrain(cfg, base / "run")
    return cohort, base / "run"
