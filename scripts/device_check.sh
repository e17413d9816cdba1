#!/usr/bin/env bash
# Accelerator checks on one GPU, under 8 minutes: the GPU tests (pytest -m gpu: cuDNN attention == blockwise in
# value and gradient, a bf16 step finite and close to fp32, extraction on CUDA == CPU), then bench_train.py with
# its MFU (scripts/mfu.py: model FLOPs per step ÷ step time × the device's peak bf16 FLOP/s), bench_loop.py,
# bench_slide_encoders.py up to 100k tiles and bench_extract.py on CUDA. Figures land in OUT (JSON) and a summary
# is printed at the end. CI never runs this.
#
#   bash scripts/device_check.sh [OUT]                          # default OUT=out/device_check
#   MMFM_DEVICE_CHECK_ON_CPU=1 bash scripts/device_check.sh     # the same steps on CPU with small shapes: checks
#                                                               # the script and its Python paths, no GPU figures
# Needs the project installed with a CUDA jax and torch (pip install -e '.[dev]' 'jax[cuda12]'); PY=python to use
# another interpreter than .venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-out/device_check}
CPU=${MMFM_DEVICE_CHECK_ON_CPU:-0}
mkdir -p "$OUT"
T0=$(date +%s)

SLOW=1  # time limits below are for one GPU; the CPU dry run gets SLOW times more
if [ "$CPU" = 1 ]; then
    export JAX_PLATFORMS=cpu MMFM_GPU_CHECKS_ON_CPU=1 XLA_FLAGS=--xla_force_host_platform_device_count=1
    SLOW=5
    TRAIN=(--batch 4 --tiles 128 --dim 64 --genes 128 --steps 2 --matmul 256)
    MFU=(--peak 1e12)
    LOOP=(--steps 30 --log-every 5 --batch 8 --tiles 64 --dim 32 --genes 64 --width 32 --cases 40)
    SLIDES=(--n 1000 --alternate-max-n 1000 --dense-n 1000 --series local alternate dense --width 96 --depth 2
            --dim 64 --region 500)
    EXTRACT=(--copies 1 --workers 0 --batch-size 16)
else
    "$PY" - <<'EOF' || { echo "device_check: JAX sees no GPU (install jax[cuda12]); MMFM_DEVICE_CHECK_ON_CPU=1 dry-runs on CPU" >&2; exit 2; }
import jax, sys
sys.exit(0 if jax.default_backend() == "gpu" else 1)
EOF
    TRAIN=()
    MFU=()
    LOOP=(--steps 120 --batch 32 --tiles 1024 --dim 256 --width 256 --cases 96)
    SLIDES=(--n 16000 100000 --alternate-max-n 100000 --dense-n 4000 --series local alternate dense)
    EXTRACT=(--copies 4 --workers 4 --batch-size 64)
fi

step() {  # name, time limit (s), command...
    local name=$1 limit=$2 t
    shift 2
    t=$(date +%s)
    echo "== $name"
    timeout $(( limit * SLOW )) "$@"
    echo "   $name: $(( $(date +%s) - t )) s"
}

step "gpu tests" 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
step "bench_train + MFU" 150 "$PY" scripts/bench_train.py --json "$OUT/bench_train.json" "${TRAIN[@]}"
"$PY" scripts/mfu.py --bench "$OUT/bench_train.json" --json "$OUT/mfu.json" "${MFU[@]}"
step "bench_loop" 120 "$PY" scripts/bench_loop.py --json "$OUT/bench_loop.json" "${LOOP[@]}"
step "bench_slide_encoders" 150 "$PY" scripts/bench_slide_encoders.py --json "$OUT/bench_slide_encoders.json" \
    "${SLIDES[@]}"
step "bench_extract" 120 "$PY" scripts/bench_extract.py --json "$OUT/bench_extract.json" "${EXTRACT[@]}"

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
read = lambda name: json.loads((out / name).read_text())
m, loop, train = read("mfu.json"), read("bench_loop.json"), read("bench_train.json")
print(f"device: {m['device_kind']}  backend: {train['backend']}")
print(f"train step {m['step_s'] * 1e3:.1f} ms  MFU {m['mfu']:.1%}  HFU {m['hfu'] or 0:.1%} "
      f"(peak bf16 {m['peak_bf16_flop_s'] / 1e12:.0f} TFLOP/s)  torch eager {train['torch_step_s'] * 1e3:.1f} ms")
print(f"loop / raw step: {loop['ratio']:.3f}  ({loop['loop_steps_per_s']:.2f} vs {loop['raw_steps_per_s']:.2f} steps/s)")
rows = read("bench_slide_encoders.json")
rows = rows["rows"] if isinstance(rows, dict) else rows
for r in rows:
    print("slide encoder", {k: r[k] for k in r if k in ("layers", "n_tiles", "seconds", "compile_seconds", "error")})
ex = read("bench_extract.json")
print("extract", {k: v for k, v in ex.items() if not isinstance(v, (list, dict))})
EOF
echo "device_check: done in $(( $(date +%s) - T0 )) s, figures in $OUT"
