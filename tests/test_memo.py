"""`mmfm.memo`: inside `reusing()` a key is computed once; outside (a library call) every call computes; the
pipeline's cohort and checkpoint reuse go through it."""

import threading

from mmfm import memo


def test_once_inside_the_scope_every_time_outside():
    calls = []

    def compute():
        calls.append(1)
        return object()

    a, b = memo.once("k", compute), memo.once("k", compute)
    assert a is not b and len(calls) == 2  # no scope: nothing kept
    with memo.reusing():
        c = memo.once("k", compute)
        with memo.reusing():  # nested: the outer scope's answers
            assert memo.once("k", compute) is c and memo.kept("k")
        assert memo.once("k", compute) is c and memo.once("other", compute) is not c
        seen = []
        t = threading.Thread(target=lambda: seen.append(memo.once("k", compute)))  # other threads share it
        t.start()
        t.join()
        assert seen == [c]
    assert len(calls) == 4 and not memo.kept("k")
    assert memo.once("k", compute) is not c  # closed: forgotten


def test_an_error_is_not_kept():
    def fail():
        raise ValueError("bad cohort")

    with memo.reusing():
        for _ in range(2):
            try:
                memo.once("k", fail)
            except ValueError as e:
                assert "bad cohort" in str(e)
        assert not memo.kept("k")


def test_a_pipeline_checks_its_cohort_once(tmp_path, monkeypatch):
    """Cohort.open / validate of one folder inside the scope read the bags once; a scanned answer serves an
    unscanned request, not the other way round."""
    from mmfm.data import cohort as cohort_mod
    from mmfm.simulate import SimConfig, simulate_cohort

    tiny_cohort = simulate_cohort(tmp_path / "c", SimConfig(n_cases=8, feature_dim=8, bag_size_median=16,
                                                            bag_size_max=32, n_genes=40, n_proteins=4))

    checks = []
    real = cohort_mod._check
    monkeypatch.setattr(cohort_mod, "_check", lambda root, scan, *a: checks.append(scan) or real(root, scan, *a))
    with memo.reusing():
        first = cohort_mod.Cohort.open(tiny_cohort, scan_features=False)
        cohort_mod.Cohort.open(tiny_cohort, scan_features=False)
        assert checks == [False]
        assert cohort_mod.validate(tiny_cohort).ok and checks == [False, True]
        again = cohort_mod.Cohort.open(tiny_cohort, scan_features=False)
        assert checks == [False, True] and again is not first  # a Cohort of its own around the shared tables
    cohort_mod.Cohort.open(tiny_cohort)
    assert checks == [False, True, True]


def test_a_second_thread_waits_for_the_first_answer():
    import time

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return object()

    with memo.reusing():
        got = []
        threads = [threading.Thread(target=lambda: got.append(memo.once("k", slow))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(calls) == 1 and len(got) == 3 and all(g is got[0] for g in got)
