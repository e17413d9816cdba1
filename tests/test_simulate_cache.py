"""The machine's cohort cache (mmfm.simulate.cache): a restored cohort is the simulated one byte for byte, the key
follows every config knob and the simulator's code, a copy never shares storage with the cache, and concurrent or
interrupted writers leave a whole entry or none."""

import dataclasses
import hashlib
import os
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np

from mmfm.cli.pipeline import CohortStep, Pipeline, cohort
from mmfm.data import scan_cache
from mmfm.simulate import SimConfig, cache, simulate_cohort

TINY = SimConfig(n_cases=6, feature_dim=8, bag_size_median=40, n_genes=40, n_proteins=8, spatial_rate=0.5,
                 multi_slide_rate=0.5)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_restored_cohort_is_the_simulated_one_byte_for_byte(tmp_path):
    fresh = digests(simulate_cohort(tmp_path / "fresh", TINY))
    assert any(k.startswith("spots/") for k in fresh) and any(k.startswith("bags/") for k in fresh)
    folder = tmp_path / "cache"
    out, restored = cache.simulate_cached(tmp_path / "first", TINY, folder)  # a miss: simulated, then stored
    assert not restored and digests(out) == fresh
    out, restored = cache.simulate_cached(tmp_path / "second", TINY, folder)
    assert restored and digests(out) == fresh  # the manifest stays in the cache
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    # a real copy: rewriting a restored file in place (h5py "w" keeps the inode) does not reach the cache
    bag = out / "bags" / next(k for k in fresh if k.startswith("bags/")).split("/")[1]
    with h5py.File(bag, "w") as f:
        f["features"] = np.zeros((1, 8), np.float32)
    again, restored = cache.simulate_cached(tmp_path / "third", TINY, folder)
    assert restored and digests(again) == fresh


def test_key_follows_every_knob_and_the_simulator_code(tmp_path, monkeypatch):
    keys = {cache.cache_key(TINY)}
    for change in ({"seed": 1}, {"n_cases": 7}, {"name": "other"}, {"site_effect": 0.5}, {"spatial_rate": 0.0}):
        keys.add(cache.cache_key(dataclasses.replace(TINY, **change)))
    assert len(keys) == 6 and cache.cache_key(dataclasses.replace(TINY)) == cache.cache_key(TINY)

    # the fingerprint covers every module of the package (but the cache itself) and what the writer calls
    pkg = Path(cache.__file__).parents[1]
    files = set(cache.code_files())
    assert set((pkg / "simulate").glob("*.py")) - files == {pkg / "simulate" / "cache.py"}
    assert {pkg / "data" / "bags.py", pkg / "io.py", pkg / "__init__.py"} <= files

    # one byte of simulator code changed: another key
    writer = pkg / "simulate" / "writer.py"
    same, edited = tmp_path / "same" / "writer.py", tmp_path / "edited" / "writer.py"
    for p, extra in ((same, ""), (edited, "#")):
        p.parent.mkdir()
        p.write_text(writer.read_text() + extra)
    found = []
    for p in (same, edited):
        monkeypatch.setattr(cache, "code_files", lambda p=p: tuple(f if f != writer else p for f in files))
        cache.code_fingerprint.cache_clear()
        found.append(cache.cache_key(TINY))
    cache.code_fingerprint.cache_clear()
    assert found[0] != found[1]


def test_concurrent_writers_leave_one_whole_entry_and_a_damaged_entry_is_a_miss(tmp_path):
    src = simulate_cohort(tmp_path / "src", TINY)
    folder = tmp_path / "cache"
    threads = [threading.Thread(target=cache.store, args=(folder, TINY, src)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in folder.iterdir()] == [cache.cache_key(TINY)]  # no temporary copy left behind

    entry = folder / cache.cache_key(TINY)
    (entry / "reports.jsonl").write_text("cut")  # cut short: the manifest's sizes disagree
    assert not cache.restore(folder, TINY, tmp_path / "out")
    assert not entry.exists() and not (tmp_path / "out").exists()
    out, restored = cache.simulate_cached(tmp_path / "out", TINY, folder)  # simulated again, stored again
    assert not restored and digests(out) == digests(src) and entry.exists()

    (tmp_path / "a-file").write_text("")  # a cache folder that cannot be written: the run goes on, uncached
    out, restored = cache.simulate_cached(tmp_path / "out2", TINY, tmp_path / "a-file")
    assert not restored and digests(out) == digests(src)


def test_least_recently_used_entries_go_past_the_bound(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    a, b = TINY, dataclasses.replace(TINY, seed=1)
    cache.simulate_cached(tmp_path / "a", a, folder)
    size = sum(p.stat().st_size for p in (folder / cache.cache_key(a)).rglob("*") if p.is_file())
    monkeypatch.setattr(cache, "MAX_BYTES", int(size * 1.5))
    stale = folder / ".leftover.tmp"
    stale.mkdir()
    os.utime(stale, (0, 0))  # a killed writer's copy, long ago
    cache.simulate_cached(tmp_path / "b", b, folder)
    assert sorted(p.name for p in folder.iterdir()) == [cache.cache_key(b)]


def test_the_pipeline_restores_a_validated_cohort_unless_the_machine_caches_are_off(tmp_path, monkeypatch):
    p = Pipeline(cohort=CohortStep(simulate=TINY))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "true")
    monkeypatch.setattr(scan_cache, "RACY_NS", 0)  # the tiny cohort's bags are all younger than 2 s
    scanned = []
    result = scan_cache.ScanCache.result
    monkeypatch.setattr(scan_cache.ScanCache, "result",
                        lambda self, bag, scan: result(self, bag, lambda: scanned.append(bag.name) or scan()))
    first, about = cohort(p, tmp_path / "one")
    n_bags = len(list((first / "bags").glob("*.h5")))
    assert "cohort cache" not in about and len(scanned) == n_bags > 0  # validated: every bag's features scanned
    assert (tmp_path / "jax" / "cohorts" / cache.cache_key(TINY) / scan_cache.FILE).is_file()
    second, about = cohort(p, tmp_path / "two")
    assert "copied from the cohort cache" in about and digests(second) == digests(first)
    assert len(scanned) == n_bags  # the restored bags (same bytes, same mtimes) are not scanned again
    again, about = cohort(p, tmp_path / "two")  # an existing cohort resumes in place
    assert "cohort cache" not in about and again == second

    shutil.rmtree(tmp_path / "jax")
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "false")  # --compilation-cache off
    third, about = cohort(p, tmp_path / "three")
    assert "cohort cache" not in about and not (tmp_path / "jax").exists()
    assert {k: v for k, v in digests(third).items() if k != scan_cache.FILE} == {  # scanned at another time
        k: v for k, v in digests(first).items() if k != scan_cache.FILE}
