#!/usr/bin/env bash
# Install amfor with its test extras, build the extension against the installed torch, and run the test suite.
# The CUDA sources are compiled whenever a CUDA toolkit is found (setup.py); a CUDA compile error turns into a build
# warning and then fails tests/test_build.py, so it fails here even without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch>=2.5,<2.15" "torchvision>=0.20" setuptools wheel ninja
python -m pip install -q -e ".[test]" --no-build-isolation
python -m pytest tests -q -ra "$@"
