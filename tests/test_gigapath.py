"""Prov-GigaPath's slide encoder (`import-encoder --layout gigapath`) against an independent PyTorch LongNetViT
written here from the documented behaviour: MAE 2D sin-cos positions indexed ⌊px/256⌋·ngrids + ⌊py/256⌋ + 1, torchscale's
sub-LN encoder layer, and LongNet dilated attention computed naively — per branch, per segment, per head an explicit
index gather of the head's lattice (zero-padded as the reference pads), a dense softmax, then the branches merged by
their log-sum-exp. Small shapes (stated in `ARCH`); random weights with the checkpoint's key names and shapes."""

import math

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
from torch import nn
from torch.nn import functional as F

from mmfm.bridges.slide_import import LayoutOptions, import_encoder
from mmfm.models.export_format import load_slide_encoder

# width 16, 4 heads, FFN 24, depth 2; three branches: segments of 4 (dilation 1), 12 (dilation 3: ⌈4/3⌉ = 2 heads
# per offset, heads padded as LongNet pads them) and 64 (dilation 8, longer than any bag: one zero-padded segment)
D, ARCH = 12, dict(width=16, heads=4, ffn=24, depth=2, segments=(4, 12, 64), ratios=(1, 3, 8))
NGRIDS = 64  # the reference's position table (GigaPath's is 1000 × 1000: the same values for cells below 64)


def lattice_offsets(heads, ratio):
    """LongNet: heads in `ratio` groups of ⌈H/r⌉, group g reading the positions ≡ g (mod r)."""
    return [j // math.ceil(heads / ratio) for j in range(heads)]


def wrong_offsets(heads, ratio):  # a plausible misreading: head j reads positions ≡ j (mod r)
    return [j % ratio for j in range(heads)]


def dilated_reference(q, k, v, segments, ratios, offsets):
    """q, k, v [L, H, d] → [L, H, d], looping over branches, segments and heads (LongNet, eq. 4–9)."""
    length, heads, d = q.shape
    outs, lses = [], []
    for seg_len, r in zip(segments, ratios):
        s = min(seg_len, length)
        n_seg, padded = -(-length // s), -(-s // r) * r
        out = torch.zeros(n_seg * s, heads, d, dtype=q.dtype)
        lse = torch.full((n_seg * s, heads), -1e8, dtype=q.dtype)
        for g in range(n_seg):
            # the segment's tokens, then zero vectors up to a multiple of r (and of s for the last segment)
            seg = [torch.cat([x[g * s:(g + 1) * s], torch.zeros(padded - len(x[g * s:(g + 1) * s]), heads, d)])
                   for x in (q, k, v)]
            for j, o in enumerate(offsets(heads, r)):
                idx = torch.arange(o, padded, r)
                qq, kk, vv = (x[idx, j] for x in seg)
                logits = qq @ kk.T / math.sqrt(d)
                keep = idx < s
                out[g * s + idx[keep], j] = (torch.softmax(logits, -1) @ vv)[keep]
                lse[g * s + idx[keep], j] = torch.logsumexp(logits, -1)[keep]
        outs.append(out[:length])
        lses.append(lse[:length])
    weights = torch.softmax(torch.stack(lses), 0)
    return sum(o * w[..., None] for o, w in zip(outs, weights))


class Layer(nn.Module):
    """torchscale's encoder layer with subln (pre-LN, LayerNorm before out_proj and inside the FFN), ε 1e-5."""

    def __init__(self, offsets):
        super().__init__()
        w, f = ARCH["width"], ARCH["ffn"]
        self.offsets = offsets
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(w, w))
        self.self_attn.inner_attn_ln = nn.LayerNorm(w, eps=1e-5)
        self.self_attn_layer_norm = nn.LayerNorm(w, eps=1e-5)
        self.ffn = nn.Module()
        self.ffn.fc1, self.ffn.fc2, self.ffn.ffn_layernorm = nn.Linear(w, f), nn.Linear(f, w), nn.LayerNorm(f, eps=1e-5)
        self.final_layer_norm = nn.LayerNorm(w, eps=1e-5)

    def forward(self, x):  # [L, W], one bag
        h, a = self.self_attn_layer_norm(x), self.self_attn
        split = lambda t: t.reshape(len(x), ARCH["heads"], -1)
        o = dilated_reference(split(a.q_proj(h)), split(a.k_proj(h)), split(a.v_proj(h)), ARCH["segments"],
                              ARCH["ratios"], self.offsets)
        x = x + a.out_proj(a.inner_attn_ln(o.reshape(len(x), -1)))
        return x + self.ffn.fc2(self.ffn.ffn_layernorm(F.gelu(self.ffn.fc1(self.final_layer_norm(x)))))


def sincos_table(width, ngrids):
    """MAE's get_2d_sincos_pos_embed with a leading zero row for the class token: row 1 + i·ngrids + j is the cell
    (x = i, y = j); its first half encodes j, its second half i."""
    one_d = lambda p: np.concatenate([np.sin(np.outer(p, om)), np.cos(np.outer(p, om))], 1)
    om = 1.0 / 10000 ** (np.arange(width // 4) / (width / 4))
    jj, ii = np.meshgrid(np.arange(ngrids), np.arange(ngrids))
    table = np.concatenate([one_d(jj.ravel()), one_d(ii.ravel())], 1)
    return torch.from_numpy(np.concatenate([np.zeros((1, width)), table])).float()


class LongNetViT(nn.Module):
    def __init__(self, offsets=lattice_offsets):
        super().__init__()
        w = ARCH["width"]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(D, w)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(Layer(offsets) for _ in range(ARCH["depth"]))
        self.encoder.layer_norm = nn.LayerNorm(w, eps=1e-5)
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.register_buffer("pos_embed", sincos_table(w, NGRIDS), persistent=False)

    def forward(self, x, px, layer, global_pool):
        """x [L, D] tile features, px [L, 2] level-0 pixels (tile size 256) → the slide embedding [W]."""
        cell = torch.floor(px / 256.0).long()
        t = self.patch_embed.proj(x) + self.pos_embed[cell[:, 0] * NGRIDS + cell[:, 1] + 1]
        states = [torch.cat([self.cls_token[0] + self.pos_embed[:1], t])]
        for blk in self.encoder.layers:
            states.append(blk(states[-1]))
        h = self.encoder.layer_norm(states[-1]) if layer == -1 else states[layer]
        return self.norm(h[1:].mean(0)) if global_pool else self.norm(h)[0]


def randomised(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((1.0 if "norm" in name or "ln" in name else 0.0) + 0.4 * torch.randn(p.shape, generator=g))
    return module.eval()


def bags(seed, lengths=(33, 7), n=40):
    """Padded rows: real tiles at random places (lengths not multiples of any segment or dilation), grid cells
    with their minimum at (0, 0) (mmfm's convention, which GigaPath shares only then)."""
    rng = np.random.default_rng(seed)
    f = (30 * rng.standard_normal((len(lengths), n, D))).astype(np.float32)
    cells = rng.integers(0, 40, (len(lengths), n, 2)).astype(np.int32)
    mask = np.zeros((len(lengths), n), bool)
    for b, m in enumerate(lengths):
        pos = np.sort(rng.choice(n, m, replace=False))
        mask[b, pos] = True
        f[b, pos] = rng.standard_normal((m, D))
        cells[b, pos] -= cells[b, pos].min(0)
    return f, cells, mask


@pytest.mark.parametrize("layer,global_pool", [(1, True), (-1, False)])  # TRIDENT's readout (layer < depth); final CLS
def test_gigapath_layout_equals_an_independent_longnet(tmp_path, layer, global_pool):
    ref = randomised(LongNetViT(), seed=3)
    torch.save({"model": ref.state_dict()}, tmp_path / "slide_encoder.pth")
    opts = LayoutOptions(segment_lengths=ARCH["segments"], dilation_ratios=ARCH["ratios"], n_heads=ARCH["heads"],
                         layer=layer, global_pool=global_pool)
    res = import_encoder(tmp_path / "slide_encoder.pth", "gigapath", tmp_path / "gp", opts)
    g = res["slide"]["gigapath"]
    assert (g["width"], g["depth"], g["ffn_dim"], res["feature_dim"]) == (16, 2, 24, D)
    enc, _, _ = load_slide_encoder(tmp_path / "gp")
    f, cells, mask = bags(seed=layer + 2)
    got = np.asarray(nnx.jit(lambda e, f, c, m: e(f, c, m).embedding)(enc, f, cells, mask))
    px = cells * 256 + np.random.default_rng(0).integers(0, 256, cells.shape)  # any pixel inside the cell
    wrong = LongNetViT(wrong_offsets)
    wrong.load_state_dict(ref.state_dict())
    run = lambda model, b: model(torch.from_numpy(f[b][mask[b]]), torch.from_numpy(px[b][mask[b]]).float(), layer,
                                 global_pool).numpy()
    with torch.no_grad():
        want, off = np.stack([run(ref, b) for b in range(len(f))]), run(wrong.eval(), 0)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(got[0] - off).max() > 1e-3  # the wrong head offsets are told apart
    print(f"max |flax - reference| = {np.abs(got - want).max():.1e}, vs wrong offsets {np.abs(got[0] - off).max():.1e}")


def test_released_architecture_defaults():
    """Without options the layout builds the released model: 16 heads, LongNetViT's segment lengths for a
    262,144-px slide of 256-px tiles, dilations 1…16, layer 11 mean-pooled (TRIDENT)."""
    from mmfm.models.gigapath import GigaPathConfig, released_segment_lengths

    cfg = GigaPathConfig()
    assert cfg.segment_lengths == (1024, 5792, 32768, 185363, 1048576) == released_segment_lengths(262144, 256)
    assert (cfg.n_heads, cfg.dilation_ratios, cfg.layer, cfg.global_pool) == (16, (1, 2, 4, 8, 16), 11, True)


def test_dilated_attention_in_small_blocks_with_padded_rows():
    """The kernel path real bags take: many query and key blocks (skipped where no segment overlaps), rows padded
    past their length; each row equals the naive reference on its own tokens."""
    import jax

    from mmfm.models.dilated import dilated_attention

    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 50, ARCH["heads"], 4)).astype(np.float32) for _ in range(3))
    length = np.array([50, 23], np.int32)
    run = jax.jit(lambda q, k, v, n: dilated_attention(q, k, v, n, ARCH["segments"], ARCH["ratios"], block_q=8,
                                                      block_k=16))
    got = np.asarray(run(q, k, v, length))
    for b, n in enumerate(length):
        want = dilated_reference(*(torch.from_numpy(x[b, :n]) for x in (q, k, v)), ARCH["segments"], ARCH["ratios"],
                                 lattice_offsets).numpy()
        np.testing.assert_allclose(got[b, :n], want, atol=1e-5, rtol=0)
