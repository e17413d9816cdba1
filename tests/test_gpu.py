"""Accelerator checks (pytest -m gpu; `scripts/device_check.sh` runs them): cuDNN attention against the blockwise
kernel in value and gradient, a bf16 training step against fp32, tile extraction on CUDA against CPU.

Skipped without a GPU. MMFM_GPU_CHECKS_ON_CPU=1 runs the same code on CPU with CPU stand-ins (XLA attention for
cuDNN, CPU for CUDA) so the checks themselves are exercised where no GPU is; it proves nothing about a GPU.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("MMFM_GPU_CHECKS_ON_CPU") == "1"


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.fixture(scope="module")
def device():
    if _has_gpu():
        return jax.devices("gpu")[0]
    if ON_CPU:
        return jax.devices("cpu")[0]
    pytest.skip("no GPU (MMFM_GPU_CHECKS_ON_CPU=1 runs these checks' code on CPU)")


def test_cudnn_attention_equals_blockwise_in_value_and_gradient(device):
    from mmfm.models.attention import attention

    impl = "cudnn" if device.platform == "gpu" else "xla"
    b, n, h, d = 2, 1000, 4, 64  # N not a multiple of the blocks; padding and two fragments per bag
    k = jax.random.split(jax.random.key(0), 4)
    q, kk, v = (jax.random.normal(k[i], (b, n, h, d), jnp.float32) for i in range(3))
    valid = jnp.arange(n)[None, :] < jnp.array([[n], [n - 137]])
    seg = (jnp.arange(n)[None, :] >= jnp.array([[400], [700]])).astype(jnp.int32)
    w = jax.random.normal(k[3], (b, n, h, d), jnp.float32)
    # cuDNN computes in bf16: compare with the blockwise kernel on the same bf16-rounded inputs
    q, kk, v = (x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, kk, v))
    q, kk, v, w, valid, seg = jax.device_put((q, kk, v, w, valid, seg), device)

    def loss(impl):
        def f(q, kk, v):
            out = attention(q, kk, v, valid, seg, seg, impl=impl, block_q=128, block_k=256)
            return jnp.sum(jnp.where(valid[..., None, None], out, 0) * w), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, ref), gref = loss("blockwise")(q, kk, v)
    (_, got), ggot = loss(impl)(q, kk, v)
    m = np.asarray(valid)[..., None, None]
    np.testing.assert_allclose(np.where(m, got, 0), np.where(m, ref, 0), atol=2e-2, rtol=2e-2)
    for a, r in zip(ggot, gref):
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(r) / scale, atol=3e-2)


def test_bf16_step_is_finite_and_close_to_fp32(device):
    from mmfm.data.batch import BatchShapes, random_batch
    from mmfm.models import ModelConfig, SlideConfig
    from mmfm.models.abmil import ABMILConfig
    from mmfm.models.omics import OmicsConfig
    from mmfm.objectives import ObjectiveConfig
    from mmfm.train import config as tconfig, loop, optim, sharding

    shapes = BatchShapes(batch_size=16, tiles_per_slide=256, feature_dim=128, n_genes=256)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1), [device])
    host = {k: v for k, v in random_batch(shapes, seed=0).items() if k.startswith(("slide/", "rna/", "case_index"))}
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = ModelConfig(embed_dim=64, compute_dtype=dtype, rna=OmicsConfig(hidden=128, dropout=0.0),
                            slide=SlideConfig(abmil=ABMILConfig(hidden=128, attn_dim=64, dropout=0.0,
                                                                attn_dropout=0.0)))
        cfg = tconfig.RunConfig(data=tconfig.DataConfig(modalities=("slide", "rna")),
                                train=tconfig.TrainConfig(steps=10, warmup=0, lr=1e-3), model=model,
                                objective=ObjectiveConfig(kind="siglip", pairs=(("slide", "rna"),)))
        ts = loop.init_state(loop.build_module(cfg, shapes, ("slide", "rna")), optim.make_optimizer(cfg.train),
                             mesh, cfg.train.axis_rules, cfg.train.shard_min_size)
        step = loop.make_train_step(ts, loop.objective_loss(cfg, mesh), mesh, lr_schedule=optim.schedule(cfg.train))
        batch = sharding.global_batch(host, sharding.batch_sharding(mesh))
        state, losses = ts.state, []
        for _ in range(3):
            state, m = step(state, batch)
            losses.append(m)
        out[dtype] = jax.device_get(losses)
    for a, b in zip(out["float32"], out["bfloat16"]):
        assert np.isfinite(b["loss"]) and np.isfinite(b["grad_norm"])
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-2)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-1)
    assert out["float32"][2]["loss"] < out["float32"][0]["loss"]  # the steps train


def test_extraction_on_cuda_equals_cpu_features(device, wsi_dir, tmp_path):
    torch = pytest.importorskip("torch")
    import h5py
    from safetensors.torch import save_file

    from mmfm.bridges.encoders import REGISTRY, build_model
    from mmfm.bridges.extract import ExtractConfig, extract

    accel = "cuda" if device.platform == "gpu" else "cpu"
    if accel == "cuda" and not torch.cuda.is_available():
        pytest.fail("JAX sees a GPU but torch has no CUDA: install the CUDA build of torch")
    torch.manual_seed(0)
    weights = tmp_path / "vit-test.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(REGISTRY["vit-test"]).state_dict().items()}, weights)
    slides = tmp_path / "wsi"
    slides.mkdir()
    (slides / "CMU-1-Small-Region.svs").symlink_to(wsi_dir / "CMU-1-Small-Region.svs")
    feats = {}
    for dev in ("cpu", accel):
        out = tmp_path / dev
        extract(ExtractConfig(wsi_dir=slides, out=out, encoder="vit-test", weights=weights, mag=20, patch_size=256,
                              device=dev, precision="fp32", workers=0, batch_size=32, progress=False))
        with h5py.File(out / "bags" / "CMU-1-Small-Region.h5", "r") as f:
            feats[dev] = (f["coords"][:], f["features"][:])
    (c_cpu, f_cpu), (c_acc, f_acc) = feats["cpu"], feats[accel]
    assert len(c_cpu) > 10 and np.array_equal(c_cpu, c_acc)
    scale = np.abs(f_cpu).max()
    np.testing.assert_allclose(f_acc / scale, f_cpu / scale, atol=1e-2)  # TF32 convolutions on the GPU
