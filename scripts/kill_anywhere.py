"""Kill anywhere: each command killed with SIGKILL (no handler, no clean-up) at seeded random points drawn from its
own trace of fault points (`mmfm.faults`: every atomic write, every training step, inside every checkpoint save),
then run again as a user would. What must hold:

  import    every file of the cohort is, right after the kill, either its version before the import or the one
            an uninterrupted import writes (never a mix inside a file); the re-run ends byte-identical to it.
  extract   every bag on disk after the kill is whole and equal to the uninterrupted run's (a partial bag is never
            accepted); the re-run redoes only the slides without a bag and ends with the same bags and tables.
  embed     OUT.h5ad after the kill is absent or whole (and then its OUT.slides.h5ad is there too, from the same
            run); the re-run gives the uninterrupted embeddings.
  pretrain  `--resume auto` after the kill ends with exactly the uninterrupted run's logged curve.

    scripts/kill_anywhere.py [--points N] [--seed S] [--commands import,extract,embed,pretrain] [--work DIR]
                             [--json OUT]

Full size by default (8 points per command); tests/test_kill_anywhere.py runs one point of each cheap command in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SIZES = ["--set", "loader.batch_size=8", "--set", "loader.tiles_per_slide=16", "--set", "loader.n_genes=32",
         "--set", "train.progress=false", "--set", "train.eval_every=0", "--set", "model.embed_dim=16",
         "--set", "model.slide.abmil.hidden=16", "--set", "model.slide.abmil.attn_dim=8",
         "--set", "model.rna.hidden=16", "--set", "model.protein.hidden=16", "--set", "train.shard_min_size=256"]


def mmfm(argv: list[str], *, faults: str = "", trace: Path | None = None, cache: Path | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    """`python -m mmfm.cli ARGV` with $MMFM_FAULTS / $MMFM_FAULTS_TRACE set as asked."""
    env = dict(os.environ, MMFM_FAULTS=faults, MMFM_FAULTS_TRACE=str(trace or ""), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if cache is not None:
        env["MMFM_COMPILATION_CACHE"] = str(cache)
    proc = subprocess.run([sys.executable, "-m", "mmfm.cli", *argv], env=env, cwd=REPO, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"mmfm {' '.join(argv)} → exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def file_hashes(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not skip(p)}


def _volatile(p: Path) -> bool:
    """Files whose bytes legitimately differ between two identical runs (reports with wall times, locks, caches)."""
    return (p.name.startswith(".") or p.suffix == ".json" or "tb" in p.parts or p.name.startswith("extract_summary"))


@dataclass
class Scenario:
    """`setup(dir, shared)` writes the inputs and the state before the command; `argv(dir)` is the command (run
    again unchanged after a kill); `killed` checks the state right after a kill, `final` the state after the re-run,
    both against the uninterrupted run's dir."""
    name: str
    setup: Callable[[Path, Path], None]
    argv: Callable[[Path], list[str]]
    killed: Callable[[Path, Path, Path], None]
    final: Callable[[Path, Path], None]


# ---- import: a MAF import over an existing GDC cohort ----------------------------------------------------------

def _import_setup(d: Path, shared: Path) -> None:
    from mmfm.testing import write_gdc_download

    dl = write_gdc_download(d / "download")
    mmfm(["import", "gdc-rna", "--out", str(d / "cohort"), "--inputs", f"[{dl.rna_dir}]",
          "--sample_sheet", str(dl.rna_sheet)])


def _import_argv(d: Path) -> list[str]:
    return ["import", "maf", "--out", str(d / "cohort"), "--inputs", f"[{d / 'download' / 'maf'}]",
            "--sample_sheet", str(d / "download" / "gdc_sample_sheet.maf.tsv")]


def _import_killed(d: Path, before: Path, ref: Path) -> None:
    now, old, new = (file_hashes(x / "cohort", _volatile) for x in (d, before, ref))
    for name, h in now.items():
        assert h in (old.get(name), new.get(name)), f"import: cohort/{name} is neither its old nor its new version"


def _import_final(d: Path, ref: Path) -> None:
    assert file_hashes(d / "cohort", _volatile) == file_hashes(ref / "cohort", _volatile), "import: re-run differs"


# ---- extract: PNG slides through the random-init test encoder ---------------------------------------------------

def _extract_setup(d: Path, shared: Path) -> None:
    from PIL import Image
    from skimage import data as skdata

    ihc = skdata.immunohistochemistry()
    (d / "wsi").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(ihc[i * 32: i * 32 + 384, i * 32: i * 32 + 384]).save(d / "wsi" / f"s{i}.png")


def _extract_argv(d: Path) -> list[str]:
    return ["extract", "--wsi-dir", str(d / "wsi"), "--out", str(d / "cohort"), "--encoder", "vit-test",
            "--random-init", "--mag", "20", "--patch-size", "256", "--mpp", "0.5", "--workers", "0",
            "--batch-size", "16", "--no-progress"]


def _read_bag(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return f["features"][:], f["coords"][:]


def _extract_killed(d: Path, before: Path, ref: Path) -> None:
    for bag in (d / "cohort" / "bags").glob("*.h5"):
        got, want = _read_bag(bag), _read_bag(ref / "cohort" / "bags" / bag.name)  # opens: whole
        assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-6), f"extract: {bag.name}"


def _extract_final(d: Path, ref: Path) -> None:
    bags = sorted(p.name for p in (d / "cohort" / "bags").glob("*.h5"))
    assert bags == sorted(p.name for p in (ref / "cohort" / "bags").glob("*.h5")), bags
    for name in bags:
        got, want = _read_bag(d / "cohort" / "bags" / name), _read_bag(ref / "cohort" / "bags" / name)
        assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-6), f"extract: {name}"
    for table in ("slides.csv", "cases.csv"):
        assert (d / "cohort" / table).read_text() == (ref / "cohort" / table).read_text(), table
    spec = [yaml.safe_load((x / "cohort" / "cohort.yaml").read_text()) for x in (d, ref)]
    assert [{k: v for k, v in c.items() if k != "description"} for c in spec][0] == \
        {k: v for k, v in spec[1].items() if k != "description"}, "extract: cohort.yaml"  # the path differs
    summary = json.loads((d / "cohort" / "extract_summary_0-of-1.json").read_text())
    redone = {r["slide_id"] for r in summary["slides"] if r["status"] == "ok"}
    kept = {r["slide_id"] for r in summary["slides"] if r["status"] == "skipped"}
    assert redone | kept == {"s0", "s1", "s2", "s3"} and not redone & kept


# ---- embed: a tiny trained run (shared by every point) -----------------------------------------------------------

def _embed_setup(d: Path, shared: Path) -> None:
    (d / "run").symlink_to(shared / "run", target_is_directory=True)
    (d / "cohort").symlink_to(shared / "cohort", target_is_directory=True)


def _embed_argv(d: Path) -> list[str]:
    return ["embed", "--run", str(d / "run"), "--cohort", str(d / "cohort"), "--out", str(d / "out" / "emb.h5ad"),
            "--cases", "all"]


def _read_emb(path: Path) -> dict:
    import anndata as ad

    a = ad.read_h5ad(path)
    return {"obs": list(a.obs_names), **{k: np.asarray(v) for k, v in a.obsm.items()}, "id": a.uns["embed_id"]}


def _same_embeddings(a: dict, b: dict, what: str) -> None:
    assert a["obs"] == b["obs"] and set(a) == set(b), what
    for k in a:
        if k not in ("obs", "id"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"{what}: obsm[{k}]")


def _embed_killed(d: Path, before: Path, ref: Path) -> None:
    out = d / "out" / "emb.h5ad"
    if out.exists():
        cases, slides = _read_emb(out), _read_emb(out.with_suffix(".slides.h5ad"))
        assert cases["id"] == slides["id"], "embed: OUT.h5ad without its own OUT.slides.h5ad"
        _same_embeddings(cases, _read_emb(ref / "out" / "emb.h5ad"), "embed after the kill")


def _embed_final(d: Path, ref: Path) -> None:
    out = d / "out" / "emb.h5ad"
    _same_embeddings(_read_emb(out), _read_emb(ref / "out" / "emb.h5ad"), "embed re-run")
    assert _read_emb(out)["id"] == _read_emb(out.with_suffix(".slides.h5ad"))["id"]


# ---- pretrain -------------------------------------------------------------------------------------------------

def _pretrain_setup(d: Path, shared: Path) -> None:
    (d / "cohort").symlink_to(shared / "cohort", target_is_directory=True)


def _pretrain_argv(d: Path) -> list[str]:
    return ["pretrain", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(d / "run"),
            "--set", f"data.cohort={d / 'cohort'}", "--set", "train.steps=6", "--set", "train.ckpt_every=2",
            "--set", "train.keep_last=10", "--set", "train.log_every=1", *SIZES, "--resume", "auto"]


def _curve(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _pretrain_killed(d: Path, before: Path, ref: Path) -> None:
    pass  # anything may be half-way; what counts is the resumed end (checked in final)


def _pretrain_final(d: Path, ref: Path) -> None:
    got, want = _curve(d / "run"), _curve(ref / "run")
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-5)


SCENARIOS = {
    "import": Scenario("import", _import_setup, _import_argv, _import_killed, _import_final),
    "extract": Scenario("extract", _extract_setup, _extract_argv, _extract_killed, _extract_final),
    "embed": Scenario("embed", _embed_setup, _embed_argv, _embed_killed, _embed_final),
    "pretrain": Scenario("pretrain", _pretrain_setup, _pretrain_argv, _pretrain_killed, _pretrain_final),
}


def shared_run(work: Path, cache: Path) -> Path:
    """A tiny simulated cohort and a 4-step run of it: what embed and pretrain start from."""
    shared = work / "shared"
    if not (shared / "run" / "checkpoints").exists():
        from mmfm.simulate import SimConfig, simulate_cohort

        simulate_cohort(shared / "cohort", SimConfig(n_cases=32, n_sites=2, feature_dim=16, n_genes=32,
                                                     n_proteins=8, bag_size_median=32, bag_size_max=96, seed=3))
        mmfm(["pretrain", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(shared / "run"),
              "--set", f"data.cohort={shared / 'cohort'}", "--set", "train.steps=2", "--set",
              "train.ckpt_every=2", *SIZES], cache=cache)
    return shared


def kill_points(trace: Path, command: str) -> list[str]:
    """The fault points a traced uninterrupted run passed, as `POINT@N` (a kill there is a real crash site)."""
    seen = list(dict.fromkeys(trace.read_text().split())) if trace.exists() else []
    if command == "pretrain":
        return [p for p in seen if p.startswith(("train.step@", "checkpoint.save@", "write:"))]
    return [p for p in seen if p.startswith("write:")]


def run_scenario(name: str, work: Path, n_points: int, seed: int, cache: Path,
                 points: list[str] | None = None) -> dict:
    """Reference run (traced), then `n_points` seeded kills (or the given `points`) each followed by a re-run."""
    sc = SCENARIOS[name]
    root = work / name
    shutil.rmtree(root, ignore_errors=True)
    shared = shared_run(work, cache) if name in ("embed", "pretrain") else work
    before = root / "before"
    before.mkdir(parents=True)
    sc.setup(before, shared)
    ref = root / "reference"
    shutil.copytree(before, ref, symlinks=True)
    trace = root / "trace.txt"
    t0 = time.time()
    mmfm(sc.argv(ref), trace=trace, cache=cache)
    ref_seconds = time.time() - t0
    menu = kill_points(trace, name)
    chosen = points if points is not None else random.Random(seed).sample(menu, min(n_points, len(menu)))
    results = []
    for i, point in enumerate(chosen):
        d = root / f"kill{i}"
        shutil.copytree(before, d, symlinks=True)
        killed = mmfm(sc.argv(d), faults=f"{point}:SIGKILL", cache=cache, check=False)
        if killed.returncode != -9:
            raise AssertionError(f"{name}: the kill at {point} did not fire (exit {killed.returncode})\n"
                                 f"{killed.stderr[-2000:]}")
        sc.killed(d, before, ref)
        bags_after_kill = sorted(p.stem for p in (d / "cohort" / "bags").glob("*.h5")) if name == "extract" else None
        mmfm(sc.argv(d), cache=cache)
        if name == "extract":
            summary = json.loads((d / "cohort" / "extract_summary_0-of-1.json").read_text())
            kept = sorted(r["slide_id"] for r in summary["slides"] if r["status"] == "skipped")
            assert kept == bags_after_kill, f"extract after {point}: skipped {kept}, had bags {bags_after_kill}"
        sc.final(d, ref)
        results.append({"point": point, "survived": True})
        shutil.rmtree(d, ignore_errors=True)
    return {"command": name, "menu": len(menu), "points": results, "reference_s": round(ref_seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commands", default="import,extract,embed,pretrain")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="mmfm-kill-"))
    cache = work / "jit-cache"
    report = {"seed": args.seed, "commands": []}
    failed = 0
    for name in args.commands.split(","):
        t0 = time.time()
        try:
            res = run_scenario(name, work, args.points, args.seed, cache)
        except AssertionError as e:
            res, failed = {"command": name, "error": str(e)}, failed + 1
        res["seconds"] = round(time.time() - t0, 1)
        report["commands"].append(res)
        print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
