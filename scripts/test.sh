#!/usr/bin/env bash
# Install amfor with its test extras, build the extension against the installed torch, and run both test tiers:
# the fast tier (`pytest`, everything not marked slow) and then the slow tier (`pytest -m slow`), each timed.
# The CUDA sources are compiled whenever a CUDA toolkit is found (setup.py); a CUDA compile error turns into a build
# warning and then fails tests/test_build.py, so it fails here even without a GPU.
# Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch>=2.5,<2.15" "torchvision>=0.20" setuptools wheel ninja
python -m pip install -q -e ".[test]" --no-build-isolation

status=0
for tier in "not slow" "slow"; do
  start=$(date +%s)
  python -m pytest tests -q -ra -m "$tier" "$@" || status=$?
  echo "test tier '$tier': $(( $(date +%s) - start )) s"
done
exit "$status"
