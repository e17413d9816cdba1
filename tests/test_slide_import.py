"""Public slide-encoder checkpoints import into mmfm's Flax encoders: each layout against an independently
written PyTorch reference of it (random weights, padded bags), the round trip Flax → export → Flax, and
errors that name every missing / unexpected / mis-shaped key."""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
from torch import nn

from mmfm.bridges import torch_slide
from mmfm.bridges.slide_import import LayoutOptions, import_encoder
from mmfm.models.export_format import load_slide_encoder
from mmfm.models.weight_porting import PortingError

D = 12


# ----------------------------------------------------------------------------- independent references
class Gated(nn.Module):
    """Gated attention scorer as described by Ilse et al. / CLAM: tanh branch ⊙ sigmoid branch → per-head logits."""

    def __init__(self, dim, attn_dim, heads):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(0.25))
        self.attention_b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(0.25))
        self.attention_c = nn.Linear(attn_dim, heads)

    def forward(self, h):
        return self.attention_c(self.attention_a(h) * self.attention_b(h))


def pool(h, logits, mask):
    """softmax over a bag's real tiles, weighted sum of h per head: [B, N, H], [B, N, heads] → [B, heads·H]."""
    w = torch.softmax(logits.masked_fill(~mask[..., None], float("-inf")), dim=1)
    return torch.einsum("bnk,bnh->bkh", w, h).flatten(1)


class Clam(nn.Module):
    def __init__(self, hidden=16, attn_dim=8, heads=3):
        super().__init__()
        self.attention_net = nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Dropout(0.25),
                                           Gated(hidden, attn_dim, heads))
        self.classifiers = nn.Linear(hidden, 2)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden, 2)])

    def forward(self, x, mask):
        h = self.attention_net[:3](x)
        return pool(h, self.attention_net[3](h), mask)


class Tangle(nn.Module):
    def __init__(self, hidden=16, attn_dim=8):
        super().__init__()
        block = lambda i: [nn.Linear(i, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(0.1)]
        self.pre_attn = nn.Sequential(*block(D), *block(hidden))
        self.attn = Gated(hidden, attn_dim, 1)

    def forward(self, x, mask):
        h = self.pre_attn(x)
        return pool(h, self.attn(h), mask)


class ViTBlock(nn.Module):
    def __init__(self, w, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(w, eps=1e-6), nn.LayerNorm(w, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(w, 3 * w), nn.Linear(w, w)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(w, hidden), nn.Linear(hidden, w)

    def forward(self, x, key_mask, bias=0.0):
        b, n, w = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        bias = bias + torch.where(key_mask[:, None, None, :], 0.0, float("-inf"))
        a = torch.softmax(q @ k.transpose(-1, -2) / (w // self.heads) ** 0.5 + bias, -1) @ v
        x = x + self.attn.proj(a.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class ViT(nn.Module):
    """timm-style position-free slide ViT: Linear patch embedding, class + register tokens, class-token readout."""

    def __init__(self, w=16, depth=2, heads=2, regs=2):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(D, w)
        self.cls_token = nn.Parameter(torch.randn(1, 1, w))
        self.reg_token = nn.Parameter(torch.randn(1, regs, w))
        self.blocks = nn.ModuleList(ViTBlock(w, heads, 3 * w) for _ in range(depth))
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.head = nn.Linear(w, 5)

    def forward(self, x, mask):
        b = x.shape[0]
        t = torch.cat([self.cls_token.expand(b, -1, -1), self.reg_token.expand(b, -1, -1), self.patch_embed.proj(x)], 1)
        key_mask = torch.cat([torch.ones(b, 1 + self.reg_token.shape[1], dtype=torch.bool), mask], 1)
        for blk in self.blocks:
            t = blk(t, key_mask)
        return self.norm(t)[:, 0]


# ALiBi's slopes for 12 heads (Press et al.): the 8-head sequence 2^-1 … 2^-8, then every other one of the 16-head
# sequence (2^-0.5, 2^-1.5, …) — TITAN's get_slopes; not the geometric 2^(-8(h+1)/12) a power-of-two rule would give.
TITAN_SLOPES = [2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]


class Pooler(nn.Module):
    """CoCa attentional pooler: LayerNorm'd learned queries attend over LayerNorm'd tokens (torch's multi-head
    attention, default LayerNorm ε 1e-5), as TITAN's `attn_pool` / `attn_pool_contrastive`."""

    def __init__(self, w, heads, queries):
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, w))
        self.attn = nn.MultiheadAttention(w, heads)
        self.ln_q, self.ln_k = nn.LayerNorm(w), nn.LayerNorm(w)

    def forward(self, x):  # [1, N, W] → [1, queries, W]
        kv = self.ln_k(x).transpose(0, 1)
        return self.attn(self.ln_q(self.query)[:, None], kv, kv, need_weights=False)[0].transpose(0, 1)


class Titan(nn.Module):
    """TITAN's slide encoder with its public key names, small (width 48, depth 2; TITAN: 768, 6), TITAN's 12 heads
    and 8 pooler heads: Linear + GELU patch embedding, class token, timm blocks whose logits get 2D ALiBi
    −slope_h · ‖g_i − g_j‖₂ between tiles (0 for the class token), grid g = ⌊(xy − min xy) / patch_size_lv0⌋,
    final LayerNorm, contrastive pooler (1 query) over class token + tiles, × proj only for the zero-shot space.
    One slide at a time and only its tiles, as TITAN runs at batch size 1."""

    def __init__(self, w=48, depth=2, heads=12, pool_heads=8):
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Linear(D, w), nn.GELU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, w))
        self.blocks = nn.Module()
        self.blocks.modules_list = nn.ModuleList(ViTBlock(w, heads, 4 * w) for _ in range(depth))
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.attn_pool = Pooler(w, pool_heads, 4)  # captioning queries for the report decoder: not the embedding
        self.attn_pool_contrastive = Pooler(w, pool_heads, 1)
        self.proj = nn.Parameter(torch.randn(w, w))

    def forward(self, features, coords, patch_size_lv0, slopes=TITAN_SLOPES, project=False):
        grid = torch.div(coords - coords.min(0).values, patch_size_lv0, rounding_mode="floor").double()
        dist = ((grid[:, None] - grid[None]) ** 2).sum(-1).sqrt().float()
        bias = torch.zeros(len(slopes), len(grid) + 1, len(grid) + 1)
        bias[:, 1:, 1:] = -torch.tensor(slopes)[:, None, None] * dist
        t = torch.cat([self.cls_token[0], self.patch_embed(features)])[None]
        for blk in self.blocks.modules_list:
            t = blk(t, torch.ones(1, t.shape[1], dtype=torch.bool), bias)
        pooled = self.attn_pool_contrastive(self.norm(t))[0, 0]
        return pooled @ self.proj if project else pooled


def randomised(module, seed=0):
    """Random weights everywhere (biases, LayerNorm scales included), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module.eval()


def padded_bags(seed=0, lengths=(30, 11), n=40):
    rng = np.random.default_rng(seed)
    f = (30 * rng.standard_normal((len(lengths), n, D))).astype(np.float32)
    mask = np.zeros((len(lengths), n), bool)
    for b, m in enumerate(lengths):
        pos = rng.choice(n, m, replace=False)
        mask[b, pos] = True
        f[b, pos] = rng.standard_normal((m, D))
    coords = rng.integers(0, 30, (len(lengths), n, 2)).astype(np.int32)
    return f, coords, mask


def compare(ref, out_dir, **kw):
    enc, slide_cfg, feature_dim = load_slide_encoder(out_dir)
    f, coords, mask = padded_bags(**kw)
    with torch.no_grad():
        want = ref(torch.from_numpy(f), torch.from_numpy(mask)).numpy()
    got = np.asarray(nnx.jit(lambda e, f, c, m: e(f, c, m).embedding)(enc, f, coords, mask))
    twin = torch_slide.from_export(out_dir, project=False)
    with torch.no_grad():
        got_twin = twin(torch.from_numpy(f), torch.from_numpy(coords), 1, torch.from_numpy(mask)).numpy()
    assert feature_dim == D and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_twin, want, atol=1e-5, rtol=0)
    print(f"{out_dir.name}: max |flax - reference| = {np.abs(got - want).max():.2e}, "
          f"|torch twin - reference| = {np.abs(got_twin - want).max():.2e}")
    return slide_cfg


def test_clam_layout_multi_branch_from_a_state_dict(tmp_path):
    ref = randomised(Clam(heads=3))
    torch.save(ref.state_dict(), tmp_path / "clam.pt")
    res = import_encoder(tmp_path / "clam.pt", "clam", tmp_path / "clam")
    assert res["slide"]["abmil"]["n_heads"] == 3 and res["left_alone"] == []
    cfg = compare(ref, tmp_path / "clam")
    assert (cfg.abmil.hidden, cfg.abmil.attn_dim, cfg.abmil.act) == (16, 8, "relu")


def test_tangle_layout_under_its_prefix_from_safetensors_through_the_command(tmp_path, capsys):
    import yaml
    from safetensors.torch import save_file

    from mmfm.cli import main
    from mmfm.config import decode
    from mmfm.models.config import ModelConfig

    ref = randomised(Tangle(), seed=1)
    state = {f"wsi_embedder.{k}": v for k, v in ref.state_dict().items()}
    state["rna_embedder.blocks.0.0.weight"] = torch.ones(4, 4)  # another tower: left alone, reported
    save_file(state, str(tmp_path / "tangle.safetensors"))
    assert main(["import-encoder", "--checkpoint", str(tmp_path / "tangle.safetensors"), "--layout", "tangle",
                 "--out", str(tmp_path / "tangle")]) == 0
    out = capsys.readouterr().out
    assert "abmil slide encoder on 12-d tile features" in out and "1 outside the slide encoder left alone" in out
    cfg = compare(ref, tmp_path / "tangle", seed=1)
    assert cfg.abmil.pre_norm and cfg.abmil.n_pre_layers == 2 and cfg.abmil.act == "gelu_exact"
    printed = yaml.safe_load(out[out.index("model:"):])  # the architecture a recipe copies
    assert decode(ModelConfig, printed["model"]).slide == cfg


def test_vit_layout(tmp_path):
    ref = randomised(ViT(), seed=2)
    torch.save({"model": ref.state_dict()}, tmp_path / "vit.pth")
    res = import_encoder(tmp_path / "vit.pth", "vit", tmp_path / "vit", LayoutOptions(n_heads=2))
    t = res["slide"]["transformer"]
    assert (t["width"], t["depth"], t["n_registers"], t["mlp_ratio"], t["readout"]) == (16, 2, 3, 3.0, "cls")
    compare(ref, tmp_path / "vit", seed=2)


@pytest.mark.parametrize("kind", ["abmil", "transformer"])
def test_round_trip_flax_export_flax_is_exact(tmp_path, kind):
    from mmfm.models import build_slide_encoder
    from mmfm.models.config import ModelConfig, SlideConfig
    from mmfm.models.export_format import write_export
    from mmfm.models.transformer import TransformerConfig

    slide = SlideConfig(kind=kind, transformer=TransformerConfig(width=16, depth=2, n_heads=2, n_registers=1))
    enc = build_slide_encoder(slide, D, dtype=np.float32, rngs=nnx.Rngs(5))
    write_export(tmp_path / "e", {"encoders.slide": enc}, ModelConfig(slide=slide),
                 {"feature_dim": D}, {})
    back, cfg, _ = load_slide_encoder(tmp_path / "e")
    assert cfg == slide
    f, coords, mask = padded_bags(3)
    run = nnx.jit(lambda e, f, c, m: e(f, c, m).embedding)
    np.testing.assert_array_equal(run(back, f, coords, mask), run(enc, f, coords, mask))


def test_mismatches_name_every_key(tmp_path):
    state = randomised(Clam(heads=1)).state_dict()
    del state["attention_net.3.attention_b.0.bias"]
    state["attention_net.3.attention_a.0.weight"] = torch.zeros(9, 16)   # attn_dim 9 vs attention_b's 8
    state["attention_net.3.attention_x.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(PortingError) as err:
        import_encoder(tmp_path / "bad.pt", "clam", tmp_path / "o")
    msg = str(err.value)
    for key in ("pool.gate_branch.bias", "attention_net.3.attention_x.weight", "attention_net.3.attention_b.0.weight"):
        assert key in msg, msg
    assert not (tmp_path / "o").exists()


def test_command_errors_are_one_line_naming_the_file_or_key(tmp_path, capsys):
    from mmfm.cli import main

    torch.save(randomised(ViT()).state_dict(), tmp_path / "v.pt")
    for argv, message in [(["--checkpoint", str(tmp_path / "missing.pt")], "missing.pt: weights file not found"),
                          (["--checkpoint", str(tmp_path / "v.pt"), "--layout", "vit"], "set n_heads"),
                          (["--checkpoint", str(tmp_path / "v.pt"), "--layout", "vitt"], "layout"),
                          (["--checkpoint", str(tmp_path / "v.pt"), "--layout", "clam"], "no key(s) match")]:
        assert main(["import-encoder", "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mmfm import-encoder: error:") and message in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,layout,match", [
    ({"pos_embed": torch.zeros(1, 5, 16)}, "vit", "pos_embed .absolute position"),
    ({}, "clam", "no key.s. match"),
    ({"attn.1.attention_a.0.weight": torch.zeros(8, 16)}, "tangle", "TANGLEv2"),
])
def test_unsupported_checkpoints_are_refused_with_the_reason(tmp_path, extra, layout, match):
    state = dict(randomised(ViT() if layout != "tangle" else Tangle()).state_dict(), **extra)
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(PortingError, match=match):
        import_encoder(tmp_path / "c.pt", layout, tmp_path / "o", LayoutOptions(n_heads=2))
    with pytest.raises(PortingError, match="set n_heads"):
        torch.save(randomised(ViT()).state_dict(), tmp_path / "v.pt")
        import_encoder(tmp_path / "v.pt", "vit", tmp_path / "o")


def test_an_imported_encoder_initialises_a_model_of_the_same_architecture(tmp_path):
    from mmfm.data.batch import BatchShapes
    from mmfm.models import ModelConfig, MultimodalModel
    from mmfm.models.export_format import (
        ExportFormatError,
        init_slide_encoder,
        model_config,
        read_export,
    )

    torch.save(randomised(Clam(heads=1)).state_dict(), tmp_path / "clam.pt")
    import_encoder(tmp_path / "clam.pt", "clam", tmp_path / "clam")
    slide = model_config(read_export(tmp_path / "clam")[0]).slide
    model = MultimodalModel(ModelConfig(slide=slide), BatchShapes(batch_size=2, tiles_per_slide=8, feature_dim=D),
                            ("slide",), rngs=nnx.Rngs(0))
    init_slide_encoder(model.encoders["slide"], slide, tmp_path / "clam")
    ref, _, _ = load_slide_encoder(tmp_path / "clam")
    f, coords, mask = padded_bags(4)
    np.testing.assert_array_equal(model.encoders["slide"](f, coords, mask).embedding, ref(f, coords, mask).embedding)
    import dataclasses

    other = dataclasses.replace(slide, abmil=dataclasses.replace(slide.abmil, act="gelu"))
    with pytest.raises(ExportFormatError, match="act: export 'relu' vs config 'gelu'"):
        init_slide_encoder(model.encoders["slide"], other, tmp_path / "clam")


def titan_bags(seed=0, lengths=(30, 11), n=40, ps=512):
    """Padded bags: real tiles at level-0 px on a lattice of stride ps from an arbitrary origin, one per cell."""
    rng = np.random.default_rng(seed)
    f = (30 * rng.standard_normal((len(lengths), n, D))).astype(np.float32)
    px = rng.integers(0, 10 ** 6, (len(lengths), n, 2))
    mask = np.zeros((len(lengths), n), bool)
    for b, m in enumerate(lengths):
        pos, cells = rng.choice(n, m, replace=False), rng.choice(64, m, replace=False)
        mask[b, pos] = True
        f[b, pos] = rng.standard_normal((m, D))
        px[b, pos] = rng.integers(0, 3000, 2) + ps * np.stack([cells // 8, cells % 8], 1)
    return f, px, mask


def test_titan_layout_against_an_independent_reference(tmp_path):
    """TITAN's key names (under `vision_encoder.`, beside a text tower) → mmfm's transformer with 2D ALiBi and the
    CoCa readout: the slide embedding of padded bags equals the reference on each slide's own tiles, with the
    dense-in-one-block and the many-block kernel; ALiBi's slopes and the bias itself are what makes it equal."""
    import dataclasses

    from safetensors.torch import save_file

    from mmfm.data.bags import grid_indices
    from mmfm.models.transformer import TransformerSlideEncoder

    ref = randomised(Titan(), seed=5)
    state = {f"vision_encoder.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    state["text_encoder.text_projection"] = torch.ones(2, 2)
    save_file(state, str(tmp_path / "titan.safetensors"))
    with pytest.raises(PortingError, match="width 48 is not TITAN's 768; set n_heads and pool_heads"):
        import_encoder(tmp_path / "titan.safetensors", "titan", tmp_path / "o")
    heads = LayoutOptions(n_heads=12, pool_heads=8)
    res = import_encoder(tmp_path / "titan.safetensors", "titan", tmp_path / "titan", heads)
    t = res["slide"]["transformer"]
    assert res["left_alone"] == ["text_encoder.text_projection"] and res["feature_dim"] == D
    assert (t["depth"], t["layer_pattern"], t["readout"], t["readout_heads"], t["n_registers"]) == (
        2, "alibi", "coca", 8, 1)

    enc, slide_cfg, _ = load_slide_encoder(tmp_path / "titan")
    enc_blocks = TransformerSlideEncoder(dataclasses.replace(slide_cfg.transformer, block_q=8, block_k=16), D,
                                         rngs=nnx.Rngs(1))  # ALiBi built per 8 × 16 block, blocks overlapping N
    nnx.update(enc_blocks, nnx.state(enc))
    f, px, mask = titan_bags()
    grid = np.zeros(px.shape, np.int32)
    for b in range(len(f)):
        grid[b, mask[b]] = grid_indices(px[b, mask[b]], 512)  # as `mmfm embed` reads a bag
    run = nnx.jit(lambda e, f, c, m: e(f, c, m).embedding)

    def reference(**kw):
        with torch.no_grad():
            return np.stack([ref(torch.from_numpy(f[b, mask[b]]), torch.from_numpy(px[b, mask[b]]), 512, **kw).numpy()
                             for b in range(len(f))])

    want, got = reference(), np.asarray(run(enc_blocks, f, grid, mask))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for wrong in ([2 ** (-8 * (h + 1) / 12) for h in range(12)], [0.0] * 12):  # geometric slopes; no bias
        assert np.abs(got - reference(slopes=wrong)).max() > 1e-3
    print(f"titan: max |flax - reference| = {np.abs(got - want).max():.2e}")

    # --project: the pooled query × TITAN's proj (its zero-shot space), applied on the right as TITAN does
    import_encoder(tmp_path / "titan.safetensors", "titan", tmp_path / "zs", dataclasses.replace(heads, project=True))
    zs, zs_cfg, _ = load_slide_encoder(tmp_path / "zs")
    assert zs_cfg.transformer.coca_proj
    np.testing.assert_allclose(got @ np.asarray(zs.pool.proj[...]), reference(project=True), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="PyTorch twin does not implement layer_pattern='alibi', readout='coca'"):
        torch_slide.from_export(tmp_path / "titan", project=False)
