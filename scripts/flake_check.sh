#!/usr/bin/env bash
# Rerun each process-level test (signals, kills, requeue, several JAX processes, forked and worker children) N times
# in a row, with the compilation cache cold (a fresh JAX_COMPILATION_CACHE_DIR per run) and warm (one cache kept
# across runs), and print pass counts and seconds per run. A test that decides its outcome by timing shows up here.
#
#   scripts/flake_check.sh [-n N_WARM] [--cold N_COLD] [--suite] [--logs DIR] [TEST_ID ...]
#
# Defaults: 20 warm and 20 cold runs of each test below; --suite also runs the whole suite twice (make test's
# command). PY picks the interpreter (default .venv/bin/python, else python3). Exit 1 if any run failed; the
# failing runs' output stays under --logs (default a fresh temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."

warm=20 cold="" suite=0 logs="" tests=()
while (($#)); do
  case $1 in
    -n) warm=$2; shift 2 ;;
    --cold) cold=$2; shift 2 ;;
    --suite) suite=1; shift ;;
    --logs) logs=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) tests+=("$1"); shift ;;
  esac
done
cold=${cold:-$warm}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
logs=${logs:-$(mktemp -d -t mmfm-flake-XXXX)}
mkdir -p "$logs"
((${#tests[@]})) || tests=(
  tests/test_launch.py::test_launch_local_two_processes_match_one_process_through_a_requeue
  tests/test_launch.py::test_two_srun_tasks_initialise_jax_distributed_from_slurm_variables_alone
  tests/test_preemption.py::test_sigterm_checkpoints_exits_75_and_resume_auto_reproduces_the_curve
  tests/test_train_loop.py::test_sigkill_and_resume_reproduces_the_uninterrupted_curve
  tests/test_train_multiprocess.py::test_two_processes_match_one_process_with_two_devices
  tests/test_faults.py
  tests/test_cohort_ahead.py
  tests/test_drawing.py
)
export XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
failed=0
echo "flake check: $warm warm + $cold cold runs per test; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); logs $logs"

run() {  # run LABEL CACHE_DIR PYTEST_ARGS... → prints seconds, returns pytest's status
  local label=$1 cache=$2 t0 rc
  shift 2
  t0=$EPOCHREALTIME
  JAX_COMPILATION_CACHE_DIR=$cache "$PY" -m pytest -q -x -p no:cacheprovider "$@" >"$logs/$label.log" 2>&1
  rc=$?
  awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
  [ $rc -eq 0 ] && rm -f "$logs/$label.log"
  return $rc
}

for t in "${tests[@]}"; do
  name=$(echo "$t" | sed 's/.*:://; s/[^A-Za-z0-9_.-]/_/g')
  cache=""
  for mode in cold warm; do
    n=$([ $mode = cold ] && echo "$cold" || echo "$warm")
    pass=0 secs=()
    for ((i = 1; i <= n; i++)); do
      if [ $mode = cold ] || [ -z "$cache" ]; then  # warm: the cache of the last cold run, kept
        rm -rf "$cache"
        cache=$(mktemp -d -t mmfm-jit-XXXX)
      fi
      s=$(run "$name-$mode-$i" "$cache" "$t") && pass=$((pass + 1)) || failed=1
      secs+=("$s")
    done
    echo "$t  $mode: $pass/$n passed; seconds per run: ${secs[*]}"
  done
  rm -rf "$cache"
done

if ((suite)); then
  for i in 1 2; do
    cache=$(mktemp -d -t mmfm-jit-XXXX)
    s=$(run "suite-$i" "$cache" -n 2 --dist loadfile --no-loadscope-reorder tests) && r=passed || { r=FAILED; failed=1; }
    echo "whole suite run $i: $r in ${s}s"
    rm -rf "$cache"
  done
fi
exit $failed
