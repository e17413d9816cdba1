"""The PyTorch twins (`mmfm/bridges/torch_slide.py`) reproduce mmfm's Flax slide encoders from an export
directory — every kind and readout, projection heads, the case encoder — in fp32 to ≤ 1e-5 on bags with
padding at random positions and tissue fragments, from level-0 pixel coordinates as TRIDENT passes them.
Weights here are random and then perturbed (non-zero biases, LayerNorm scales ≠ 1); trained weights are
covered by tests/test_export.py."""

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from mmfm.bridges import torch_slide as T
from mmfm.data.bags import grid_indices
from mmfm.data.batch import BatchShapes
from mmfm.models import ModelConfig, MultimodalModel
from mmfm.models.abmil import ABMILConfig
from mmfm.models.case import CaseConfig
from mmfm.models.config import SlideConfig
from mmfm.models.export_format import write_export
from mmfm.models.transformer import TransformerConfig

D, PSL0 = 12, 512
TINY = {"width": 16, "depth": 3, "n_heads": 2, "mlp_ratio": 2.0, "block_q": 8, "block_k": 8, "mlp_chunk": 16,
        "readout_heads": 2}
CONFIGS = {
    "abmil_concat_mlp_head": (SlideConfig(abmil=ABMILConfig(hidden=16, attn_dim=8, n_heads=2)), CaseConfig(), 24),
    "abmil_mean_prenorm_exact": (SlideConfig(abmil=ABMILConfig(hidden=16, attn_dim=8, n_heads=3, merge="mean",
                                                               pre_norm=True, norm_eps=1e-5, act="gelu_exact",
                                                               n_pre_layers=2)), CaseConfig(), None),
    "transformer_alternate_registers_case": (
        SlideConfig(kind="transformer", transformer=TransformerConfig(**TINY, n_registers=2)),
        CaseConfig(kind="transformer", width=8, depth=2, n_heads=2, max_slides=2), None),
    "transformer_rope_attention": (
        SlideConfig(kind="transformer", transformer=TransformerConfig(**TINY, n_registers=0, layer_pattern="rope",
                                                                      readout="attention")), CaseConfig(), None),
}  # the class-token readout, exact GELU and no input norm are checked through imported ViTs (test_slide_import.py)


def perturb(module, seed=0, scale=0.1):
    """Every parameter + noise: biases and LayerNorm offsets become non-zero, scales ≠ 1."""
    params = nnx.state(module, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(module, jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                                 for x, k in zip(leaves, keys)]))


def export_model(tmp_path, slide, case, head_hidden):
    cfg = ModelConfig(embed_dim=8, head_hidden=head_hidden, slide=slide, case=case)
    model = MultimodalModel(cfg, BatchShapes(batch_size=2, tiles_per_slide=8, feature_dim=D), ("slide",),
                            rngs=nnx.Rngs(0))
    perturb(model)
    parts = {"encoders.slide": model.encoders["slide"], "heads.slide": model.heads["slide"]}
    if model.case_encoder is not None:
        parts["case_encoder"] = model.case_encoder
    write_export(tmp_path / "export", parts, cfg, {"batch_size": 2, "feature_dim": D}, {"test": True})
    return model, tmp_path / "export"


def bags(seed=0, lengths=(37, 20), n=48):
    """Two bags as TRIDENT has them (level-0 px top-left coords, fragments), padded to n at random positions
    with garbage; and the grid Flax sees (computed per bag from its real tiles, as `mmfm embed` does)."""
    rng = np.random.default_rng(seed)
    f = (50 * rng.standard_normal((len(lengths), n, D))).astype(np.float32)
    px = rng.integers(0, 10 ** 6, (len(lengths), n, 2))
    frag = rng.integers(0, 3, (len(lengths), n)).astype(np.int32)
    mask = np.zeros((len(lengths), n), bool)
    grid = np.zeros((len(lengths), n, 2), np.int32)
    for b, m in enumerate(lengths):
        pos = np.sort(rng.choice(n, m, replace=False))
        cells = rng.choice(400, m, replace=False)
        px[b, pos] = (np.stack([cells % 20, cells // 20], 1) + [1000, 77]) * PSL0 + rng.integers(0, PSL0, (m, 2))
        f[b, pos] = rng.standard_normal((m, D))
        mask[b, pos] = True
        grid[b, pos] = grid_indices(px[b, pos], PSL0)
    return f, px, mask, frag, grid


def flax_fn(model, project):
    return nnx.jit(lambda mdl, f, g, m, fr: mdl.encode_slide(f, g, m, fr, project=project).embedding)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pytorch_twin_reproduces_flax(tmp_path, name):
    model, export = export_model(tmp_path, *CONFIGS[name])
    twin = T.from_export(export)
    backbone = T.from_export(export, project=False)
    f, px, mask, frag, grid = bags()
    for project, tm in ((True, twin), (False, backbone)):
        want = np.asarray(flax_fn(model, project)(model, f, grid, mask, frag))
        with torch.no_grad():
            got = tm(torch.from_numpy(f), torch.from_numpy(px), PSL0, torch.from_numpy(mask),
                     torch.from_numpy(frag)).numpy()
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        print(f"{name} project={project}: max |torch - flax| = {np.abs(got - want).max():.2e}")
    with torch.no_grad():  # TRIDENT's batch dict, one bag without padding
        real = mask[1]
        batch = {"features": torch.from_numpy(f[1:, real]), "coords": torch.from_numpy(px[1:, real]),
                 "attributes": {"patch_size_level0": PSL0}}
        padded = twin(torch.from_numpy(f[1:]), torch.from_numpy(px[1:]), PSL0, torch.from_numpy(mask[1:]))
        np.testing.assert_allclose(twin(batch).numpy(), padded.numpy(), atol=1e-5)


def test_case_encoder_twin_aggregates_like_flax(tmp_path):
    model, export = export_model(tmp_path, *CONFIGS["transformer_alternate_registers_case"])
    twin = T.from_export(export)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, model.encoders["slide"].out_dim)).astype(np.float32)
    m = np.array([[1, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    want = np.asarray(nnx.jit(lambda mdl, x, m: mdl.aggregate_slides(x, m))(model, x, m))
    with torch.no_grad():
        got = twin.aggregate(torch.from_numpy(x), torch.from_numpy(m)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_chunked_attention_equals_whole():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 8, generator=g) for _ in range(3))
    valid = torch.rand(2, 37, generator=g) < 0.8
    seg = torch.randint(0, 3, (2, 37), generator=g)
    whole = T.attention(q, k, v, valid, seg)
    np.testing.assert_allclose(T.attention(q, k, v, valid, seg, max_elements=100).numpy(), whole.numpy(), atol=1e-6)
    allowed = valid[:, None, None, :] & (seg[:, None, :, None] == seg[:, None, None, :])
    logits = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) / 8 ** 0.5 + torch.where(allowed, 0.0, float("-inf"))
    ref = torch.softmax(logits, -1) @ v.transpose(1, 2)
    np.testing.assert_allclose(whole.numpy(), torch.nan_to_num(ref).transpose(1, 2).numpy(), atol=1e-5)


def test_export_directory_is_checked(tmp_path):
    _, export = export_model(tmp_path, *CONFIGS["abmil_concat_mlp_head"])
    (export / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256 differs"):
        T.from_export(export)
    with pytest.raises(FileNotFoundError, match="config.json"):
        T.from_export(tmp_path)


def test_read_state_dict_refuses_pickled_code(tmp_path):
    """The one checkpoint reader of the bridges (`encoders.read_state_dict`) serves slide-encoder imports too."""
    from mmfm.bridges.encoders import EncoderError, read_state_dict

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"w": torch.ones(2), "evil": Evil()}, tmp_path / "bad.pt")
    with pytest.raises(EncoderError, match=r"bad\.pt: cannot read weights"):
        read_state_dict(tmp_path / "bad.pt")
    torch.save({"model_state_dict": {"a.weight": torch.ones(2, 3, dtype=torch.float16)}}, tmp_path / "ok.pt")
    got = read_state_dict(tmp_path / "ok.pt")
    assert list(got) == ["a.weight"] and got["a.weight"].shape == (2, 3)
