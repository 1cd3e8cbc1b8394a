#!/usr/bin/env bash
# On a GPU machine, in one call: build amfor._C with its CUDA kernels, run every test (the GPU tier included)
# and every benchmark, and write benchmarks/results/<date>-<gpu>.{json,md} (copied to $OUT when it is set).
#   AMFOR_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python -m pip install -q -e . --no-build-isolation --no-deps
status=0
python -m benchmarks.gpu_report "$@" || status=$?
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json benchmarks/results/*.md "$OUT"/ 2>/dev/null || true; fi
exit "$status"
