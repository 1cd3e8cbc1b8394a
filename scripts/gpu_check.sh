#!/usr/bin/env bash
# On a GPU machine, in one call: build amfor._C with its CUDA kernels, run the op tests on CUDA (report written
# at once), the other tests and the benchmarks, into benchmarks/results/<date>-<gpu>.{json,md} (and $OUT if set).
#   AMFOR_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_check.sh [--quick]
# Made for a short loan of a bare machine: no network needed, every phase under a timeout, a failed build still
# runs the tests (the backends that were not built are skipped, with the reason). --quick: ~8 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# CUDA_HOME only where nvcc really is (a CUDA_HOME without nvcc makes torch try, and fail, a CUDA build).
if [ -n "${CUDA_HOME:-}" ] && [ ! -x "$CUDA_HOME/bin/nvcc" ]; then unset CUDA_HOME; fi
if [ -z "${CUDA_HOME:-}" ]; then
  for dir in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /none/bin/nvcc)")")"; do
    if [ -x "$dir/bin/nvcc" ]; then export CUDA_HOME="$dir"; break; fi
  done
fi
echo "CUDA_HOME=${CUDA_HOME:-<none: the CUDA kernels are not built>}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
quick=0
for arg in "$@"; do [ "$arg" = "--quick" ] && quick=1; done
build_timeout=$([ "$quick" = 1 ] && echo 240 || echo 900)
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
mkdir -p benchmarks/results
log=benchmarks/results/build.log
start=$(date +%s)
if timeout "$build_timeout" python -m pip install -q -e . --no-build-isolation --no-deps >"$log" 2>&1; then
  echo "build: ok in $(( $(date +%s) - start )) s" | tee -a "$log"
else
  echo "build: FAILED or timed out after $(( $(date +%s) - start )) s (see build.log); testing what exists" | tee -a "$log"
fi
status=0
python -m benchmarks.gpu_report --build-log "$log" "$@" || status=$?
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json benchmarks/results/*.md "$log" "$OUT"/ 2>/dev/null || true; fi
exit "$status"
