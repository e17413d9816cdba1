"""Model FLOPs utilisation of `bench_train.py`'s step: model FLOPs per step ÷ (step time × devices × peak bf16 FLOP/s).

    python scripts/bench_train.py --json out/bench_train.json && python scripts/mfu.py --bench out/bench_train.json

Model FLOPs are the analytic matmul count of one training step (`step_flops_analytic`: forward + backward, no
rematerialisation), so the figure is comparable across compilers; `hfu` uses XLA's own count of the compiled
step (`step_flops_xla`, recomputation included). The peak is the vendor's dense (no sparsity) bf16 tensor-core
figure for the device JAX reports, looked up below; --peak overrides it, --device-kind names another device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# dense bf16 peak FLOP/s per device (datasheets); the first substring of the device kind that matches wins
PEAK_BF16 = (
    ("GH200", 989e12), ("H200 NVL", 835e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12),
    ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A40", 150e12), ("A10", 125e12), ("A6000", 155e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)


def peak_bf16(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device from JAX's `device_kind` (e.g. 'NVIDIA H100 80GB HBM3'); None if unknown."""
    return next((peak for name, peak in PEAK_BF16 if name.lower() in device_kind.lower()), None)


def mfu(bench: dict, peak: float) -> dict:
    """MFU and HFU of a bench_train.py result on `bench['devices']` devices of `peak` FLOP/s each."""
    step_s, devices = bench["jax_step_s"], bench.get("devices", 1)
    return {"mfu": bench["step_flops_analytic"] / (step_s * devices * peak),
            "hfu": bench["step_flops_xla"] / (step_s * devices * peak) if bench.get("step_flops_xla") else None,
            "model_flops_per_step": bench["step_flops_analytic"], "step_s": step_s, "devices": devices}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, required=True, help="bench_train.py --json output")
    ap.add_argument("--json", type=Path, help="write the result here too")
    ap.add_argument("--device-kind", help="default: jax.devices()[0].device_kind of this machine")
    ap.add_argument("--peak", type=float, help="peak bf16 FLOP/s per device (overrides the table)")
    a = ap.parse_args(argv)
    kind = a.device_kind
    if kind is None:
        import jax

        kind = jax.devices()[0].device_kind
    peak = a.peak or peak_bf16(kind)
    if peak is None:
        print(f"mfu.py: no peak bf16 FLOP/s known for {kind!r}; pass --peak", file=sys.stderr)
        return 2
    out = {"device_kind": kind, "peak_bf16_flop_s": peak, **mfu(json.loads(a.bench.read_text()), peak)}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
