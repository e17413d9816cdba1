"""Tile-encoder registry, preprocessing, pooling, and offline-only weight loading."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mmfm.bridges import encoders as enc
from mmfm.bridges.encoders import (REGISTRY, EncoderError, TileEncoder, autocast_dtype, build_model, encode,
                                   load_encoder)

# Published sizes (model cards / papers): output dim and parameter count of the tile encoder.
PUBLISHED = {"uni": (1024, 303e6), "uni2-h": (1536, 681e6), "virchow2": (2560, 632e6),
             "h-optimus-0": (1536, 1.13e9), "gigapath": (1536, 1.13e9)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_foundation_encoders_have_published_shapes(name):
    """Built on the meta device: the real architecture, no memory, no weights, no download."""
    spec = REGISTRY[name]
    with torch.device("meta"):
        model = build_model(spec)
        out = TileEncoder(spec, model, "none", True)(torch.zeros(2, 256, 256, 3, dtype=torch.uint8))
    dim, n_params = PUBLISHED[name]
    assert spec.dim == dim and tuple(out.shape) == (2, dim)
    assert abs(sum(p.numel() for p in model.parameters()) - n_params) < 0.01 * n_params


def test_preprocess_matches_numpy():
    spec = REGISTRY["h-optimus-0"]
    e = TileEncoder(spec, torch.nn.Identity(), "none", True)
    tiles = np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    got = e.preprocess(torch.from_numpy(tiles)).numpy()
    ref = ((tiles / 255.0 - np.array(spec.mean)) / np.array(spec.std)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    giga = TileEncoder(REGISTRY["gigapath"], torch.nn.Identity(), "none", True)
    assert tuple(giga.preprocess(torch.from_numpy(tiles)).shape) == (2, 3, 224, 224)  # 256 resize → 224 crop


def test_cls_mean_pooling_skips_register_tokens():
    """Virchow2-style output: CLS ‖ mean of patch tokens, the 4 register tokens excluded."""
    spec = dataclasses.replace(REGISTRY["vit-test"], name="tiny-virchow", dim=128, pooling="cls_mean",
                               kwargs={**REGISTRY["vit-test"].kwargs, "reg_tokens": 4, "global_pool": ""})
    torch.manual_seed(0)
    e = TileEncoder(spec, build_model(spec), "none", True)
    tiles = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8)
    got = encode(e, tiles, torch.float32)
    with torch.no_grad():
        tokens = e.model.forward_features(e.preprocess(tiles))
    assert tokens.shape[1] == 1 + 4 + 196
    ref = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1)
    assert got.shape == (3, 128)
    torch.testing.assert_close(got, ref)


def test_weights_from_safetensors_and_state_dict(tmp_path):
    torch.manual_seed(1)
    src = build_model(REGISTRY["vit-test"])
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "w.pt")
    tiles = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    ref = src.eval()(TileEncoder(REGISTRY["vit-test"], torch.nn.Identity(), "", True).preprocess(tiles))
    for f in ("w.safetensors", "w.pt"):
        e = load_encoder("vit-test", tmp_path / f, seed=123)  # another seed: weights must come from the file
        assert not e.random_init and e.weights.endswith(f)
        torch.testing.assert_close(encode(e, tiles, torch.float32), ref.detach())


def test_bad_weights_are_named_errors(tmp_path):
    torch.save({"blocks.0.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(EncoderError, match=r"other\.pt: does not match vit-test"):
        load_encoder("vit-test", tmp_path / "other.pt")
    torch.save({"x": object()}, tmp_path / "pickle.pt")  # arbitrary objects are never unpickled
    with pytest.raises(EncoderError, match=r"pickle\.pt: cannot read weights"):
        load_encoder("vit-test", tmp_path / "pickle.pt")
    with pytest.raises(EncoderError, match="weights file not found"):
        load_encoder("vit-test", tmp_path / "missing.safetensors")
    with pytest.raises(EncoderError, match="unknown encoder 'nope'"):
        load_encoder("nope")


def test_no_weights_without_explicit_random_init(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(EncoderError, match="--weights"):
        load_encoder("vit-tiny")
    e = load_encoder("vit-test", random_init=True)
    assert e.random_init and e.weights == "random-init"


def test_offline_hf_cache_is_used(monkeypatch, tmp_path):
    """A pre-populated HF cache (as after `huggingface-cli download`) is found without network."""
    spec = dataclasses.replace(REGISTRY["vit-test"], name="vit-test-hub", hf_repo="someone/vit-test")
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    torch.manual_seed(2)
    src = build_model(spec)
    repo = tmp_path / ("models--" + spec.hf_repo.replace("/", "--"))
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, snap / "model.safetensors")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    e = load_encoder("vit-test-hub")
    assert not e.random_init and e.weights == str(snap / "model.safetensors")
    for (k, v), w in zip(src.state_dict().items(), e.model.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)


def test_autocast_choice():
    e = load_encoder("vit-test", random_init=True)
    cpu = torch.device("cpu")
    assert autocast_dtype(e, cpu, "bf16") == torch.bfloat16
    assert autocast_dtype(e, cpu, "auto") == torch.float32  # the test ViT is an fp32 model
    assert autocast_dtype(e, torch.device("cuda"), "auto") == torch.float32
    uni_like = TileEncoder(REGISTRY["uni"], e.model, "", True)
    assert autocast_dtype(uni_like, torch.device("cuda"), "auto") == torch.float16  # the authors' precision
    with pytest.raises(EncoderError, match="precision"):
        autocast_dtype(e, cpu, "fp8")
    assert enc.PRECISIONS["bf16"] == torch.bfloat16


class _Slow(torch.nn.Module):
    """Stands in for a network whose speed depends on whether bf16 autocast is on: it advances a fake clock (the
    one `autocast_dtype` reads) by 50 ms in its slow dtype, so the outcome never depends on the machine's load."""

    def __init__(self, slow_in: torch.dtype, clock: list):
        super().__init__()
        self.slow_in, self.clock, self.lin = slow_in, clock, torch.nn.Linear(3, 4)

    def forward(self, x):
        bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        self.clock[0] += 0.05 if (torch.bfloat16 if bf16 else torch.float32) == self.slow_in else 0.0
        return self.lin(x.mean((2, 3)))


@pytest.mark.parametrize("slow_in, pick", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_cpu_auto_precision_takes_the_faster(slow_in, pick, monkeypatch):
    """On CPU, a bf16 model runs under bf16 autocast only if a trial shows it is faster."""
    clock = [0.0]
    monkeypatch.setattr(enc, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    e = TileEncoder(REGISTRY["uni2-h"], _Slow(slow_in, clock), "", True)
    tiles = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    assert autocast_dtype(e, torch.device("cpu"), "auto", tiles) == pick
    assert autocast_dtype(e, torch.device("cpu"), "auto") == torch.float32  # no sample, no trial: fp32


def test_offline_cache_file_names_per_encoder(monkeypatch, tmp_path):
    """CONCH v1.5 ships its vision tower as `pytorch_model_vision.bin`: that is the file looked up offline."""
    repo = tmp_path / "models--MahmoodLab--conchv1_5"
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert enc.cached_weights(REGISTRY["conch-v1.5"]) is None
    (snap / "pytorch_model.bin").write_bytes(b"")  # the generic name is not CONCH v1.5's file
    assert enc.cached_weights(REGISTRY["conch-v1.5"]) is None
    (snap / "pytorch_model_vision.bin").write_bytes(b"")
    assert enc.cached_weights(REGISTRY["conch-v1.5"]) == snap / "pytorch_model_vision.bin"
