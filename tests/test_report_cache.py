"""Frozen report-text trunk, cached once per report: the cache table, its key, and exactness of training on it."""

import logging
import shutil

import numpy as np
import pytest

from mmfm.data import report_cache as rc


def test_table_roundtrip_merge_and_text_identity(tmp_path):
    texts = ["Necrosis: absent.", "LVI: identified.", "Grade 3."]
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    rc.store(tmp_path, "k", texts[:2], feats[:2])
    got, found = rc.lookup(tmp_path, "k", texts)
    assert found.tolist() == [True, True, False]
    np.testing.assert_array_equal(got[:2], feats[:2])
    assert (got[2] == 0).all()
    rc.store(tmp_path, "k", texts[1:], feats[1:] + 100)  # new rows win, old unrelated rows are kept
    got, found = rc.lookup(tmp_path, "k", texts + ["Grade 3. "])  # one changed character = another report
    assert found.tolist() == [True, True, True, False]
    np.testing.assert_array_equal(got[:3], np.concatenate([feats[:1], feats[1:] + 100]))
    assert rc.lookup(tmp_path, "other-key", texts)[1].sum() == 0
    with pytest.raises(ValueError, match="width"):
        rc.store(tmp_path, "k", ["x"], np.zeros((1, 5), np.float32))


def test_a_corrupt_table_is_named_not_served(tmp_path):
    rc.table_path(tmp_path, "k").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="k.safetensors"):
        rc.lookup(tmp_path, "k", ["a"])


def test_key_follows_file_contents_and_length(tmp_path):
    for name in rc.KEY_FILES:
        (tmp_path / name).write_text(name)
    k = rc.cache_key(tmp_path, 128)
    assert rc.cache_key(tmp_path, 128) == k and rc.cache_key(tmp_path, 64) != k
    (tmp_path / "model.safetensors").write_text("other weights")
    assert rc.cache_key(tmp_path, 128) != k
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        rc.cache_key(tmp_path, 128)


@pytest.fixture(scope="module")
def trunk():
    from mmfm.models.text import TextConfig, load_pretrained

    return load_pretrained(TextConfig(trainable="frozen"))


REPORTS = ["FINAL DIAGNOSIS: Invasive carcinoma, grade 3, with solid sheets of tumour cells. Necrosis: absent.",
           "Carcinoma, not otherwise specified, grade 1.",
           ("Invasive carcinoma showing a tubulopapillary growth pattern; moderately differentiated. LVI: identified. "
            "Mitotic count: 12 per 10 HPF. Lymph nodes: 2/14 positive. Margins are free of tumour (closest 4.5 mm)."),
           "Benign.", "Tumour emboli are seen within lymphovascular spaces."]


def test_length_bucketed_features_equal_the_trunk_at_full_length(trunk):
    from mmfm.models.text import TextConfig, tokenize
    from mmfm.models.text_cache import sentence_features

    got = sentence_features(REPORTS, TextConfig(trainable="frozen"), max_len=64, batch_size=2, length_step=16)
    ids, mask = tokenize(REPORTS, 64)
    np.testing.assert_allclose(got, np.asarray(trunk(ids, mask, deterministic=True)), atol=2e-5)


def test_features_are_compiled_optimised_whatever_the_process_setting():
    """A short run (`fast_compile`) turns XLA's optimisations off for the process, and this test process compiles
    with the classic emitters: the report trunk's forward is still compiled as with XLA's defaults (`OPTIMISED`),
    bit for bit the features of an optimised process."""
    import jax

    from mmfm.models.text import TextConfig
    from mmfm.models.text_cache import sentence_features

    cfg, before = TextConfig(trainable="frozen"), jax.config.read("jax_disable_most_optimizations")
    features = {}
    try:
        for off in (True, False):
            jax.config.update("jax_disable_most_optimizations", off)
            features[off] = sentence_features(REPORTS[:2], cfg, max_len=32, batch_size=2)
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
    np.testing.assert_array_equal(features[True], features[False])


def test_model_on_cached_features_equals_model_on_tokens():
    """The exactness claim: training on the cache = the frozen trunk + head on token ids (eval mode)."""
    from flax import nnx

    from mmfm.data.batch import BatchShapes
    from mmfm.models import ModelConfig, MultimodalModel
    from mmfm.models.text import TextConfig, tokenize
    from mmfm.models.text_cache import sentence_features

    shapes = BatchShapes(batch_size=len(REPORTS), report_len=64, n_genes=4)
    cfg = ModelConfig(embed_dim=8, report=TextConfig(trainable="frozen", max_len=64))
    model = MultimodalModel(cfg, shapes, ("rna", "report"), rngs=nnx.Rngs(0))
    ids, mask = tokenize(REPORTS, 64)
    tokens = {"report/input_ids": ids, "report/attention_mask": mask}
    cached = {**tokens, "report/features": sentence_features(REPORTS, cfg.report, 64)}
    np.testing.assert_allclose(np.asarray(model.encode("report", cached)), np.asarray(model.encode("report", tokens)),
                               atol=1e-5)
    trainable = MultimodalModel(ModelConfig(embed_dim=8, report=TextConfig(trainable="last_k", last_k=1, max_len=64)),
                                shapes, ("rna", "report"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="trainable"):
        trainable.encode("report", cached)


@pytest.mark.slow
def test_loader_emits_cached_features_and_falls_back_without_them(tmp_path, caplog):
    from mmfm.data.cohort import Cohort
    from mmfm.data.loader import LoaderConfig, case_presence, case_tensors
    from mmfm.simulate import SimConfig, simulate_cohort
    from mmfm.models.text import TextConfig
    from mmfm.models.text_cache import fill_report_cache, sentence_features

    cohort = Cohort.open(simulate_cohort(tmp_path / "c", SimConfig(n_cases=12, seed=1, feature_dim=8,
                                                                   bag_size_median=16, bag_size_max=32, n_genes=40,
                                                                   n_proteins=4, missing_report=0.3)))
    cfg = LoaderConfig(batch_size=4, report_max_len=64, report_cache="cache")
    ids = list(cohort.cases.index)
    present = case_presence(cohort, ids, ["report"])
    assert 0 < present["report"].sum() < len(ids)  # absent rows are exercised
    with caplog.at_level(logging.WARNING):
        dense = case_tensors(cohort, ids, cfg, present=present).dense
    assert "report/features" not in dense and "not in the report cache" in caplog.text
    with pytest.raises(ValueError, match="frozen"):
        fill_report_cache(cohort, TextConfig(), tmp_path / "c" / "cache", 64)
    fill = fill_report_cache(cohort, TextConfig(trainable="frozen"), tmp_path / "c" / "cache", 64)
    assert (fill.n_reports, fill.n_computed) == (present["report"].sum(), present["report"].sum())
    again = fill_report_cache(cohort, TextConfig(trainable="frozen"), tmp_path / "c" / "cache", 64)
    assert again.n_computed == 0 and again.table == fill.table
    feats = case_tensors(cohort, ids, cfg, present=present).dense["report/features"]
    texts = cohort.reports.reindex(ids)[present["report"]].tolist()
    np.testing.assert_allclose(feats[present["report"]],
                               sentence_features(texts, TextConfig(trainable="frozen"), 64), atol=1e-5)
    assert (feats[~present["report"]] == 0).all()
    shutil.rmtree(tmp_path / "c" / "cache")


def test_report_features_are_computed_once_per_machine(report_run, tmp_path, monkeypatch):
    """`mmfm run` fills the report cache before pretraining from a table per machine (beside the compilation cache,
    one per set of report texts): a second cohort with the same reports computes nothing and gets the same rows;
    with the compilation cache off, every cohort computes its own."""
    from conftest import writable_copy

    from mmfm.cli.pipeline import report_features
    from mmfm.data.cohort import Cohort
    from mmfm.models import text_cache
    from mmfm.train.config import load_config

    cohort, run = report_run
    computed = []

    def fake(texts, cfg, max_len, batch_size=32):  # the trunk is tested above; here only who computes what
        computed.append(len(texts))
        return np.stack([np.full(8, len(t) + i, np.float32) for i, t in enumerate(texts)])

    monkeypatch.setattr(text_cache, "sentence_features", fake)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    monkeypatch.delenv("JAX_ENABLE_COMPILATION_CACHE", raising=False)

    def fill(name):
        c = writable_copy(cohort, tmp_path / name)
        cfg = load_config(run / "config.yaml", [f"data.cohort={c}"])
        folder = rc.resolve_folder(c, cfg.loader.report_cache)
        shutil.rmtree(folder, ignore_errors=True)  # the fixture's run filled it
        assert report_features(cfg)
        texts = Cohort.open(c, scan_features=False, scan_cache=False).reports.astype(str).tolist()
        got, found = rc.lookup(folder, rc.cache_key(cfg.model.report.weights_dir, cfg.loader.report_max_len), texts)
        assert found.all()
        return got, len(texts)

    first, n = fill("a")
    assert computed == [n]
    second, _ = fill("b")
    assert computed == [n]  # nothing computed for the second cohort
    np.testing.assert_array_equal(second, first)
    assert len(list((tmp_path / "jax" / "report-features").iterdir())) == 1
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "false")
    fill("c")
    assert computed == [n, n]


def test_a_warmed_trunk_is_read_once_per_pipeline_scope(monkeypatch):
    """`text_cache.warm` (a pipeline runs it beside its cohort step) reads and builds the trunk once: inside the
    pipeline's `memo.reusing()` scope the features read nothing again and are those of a cold call."""
    from mmfm import memo
    from mmfm.models import text, text_cache
    from mmfm.models.text import TextConfig

    cfg = TextConfig(trainable="frozen")
    cold = text_cache.sentence_features(REPORTS[:3], cfg, max_len=32, batch_size=2)
    reads = []
    read = text.load_safetensors
    monkeypatch.setattr(text, "load_safetensors", lambda p: reads.append(p) or read(p))
    with memo.reusing():
        text_cache.warm(cfg, 32)
        assert len(reads) == 1
        warm = text_cache.sentence_features(REPORTS[:3], cfg, max_len=32, batch_size=2)
        assert len(reads) == 1  # the warmed trunk, not a second read
    np.testing.assert_array_equal(warm, cold)
    text_cache.sentence_features(REPORTS[:1], cfg, max_len=32, batch_size=2)
    assert len(reads) == 2  # outside a scope every call reads afresh
