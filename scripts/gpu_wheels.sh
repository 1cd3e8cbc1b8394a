#!/usr/bin/env bash
# Download, on a CPU machine with PyPI, the wheels that the full GPU report needs and the lent GPU image lacks, so
# that they travel with the working tree (the GPU machine has no network):
#   bash scripts/gpu_wheels.sh [DIR]        # DIR: default .whl/ (git-ignored); then carry it to the GPU machine
# The lent machine has Python 3.12, torch 2.11, Triton 3.6, timm (so torchvision, numpy, pillow, pyyaml, safetensors,
# huggingface_hub, tqdm), pytest and onnxruntime. Missing there, and fetched here (one pinned version each, the ones
# this project is developed against, Python 3.12 manylinux x86-64 or pure-Python wheels, no dependencies resolved):
# - open_clip_torch, with ftfy, wcwidth and regex: the text tower and its tokenizer;
# - omegaconf: the run configuration. 2.4 vendors its ANTLR runtime (omegaconf.vendor.antlr4), so no
#   antlr4-python3-runtime is needed (omegaconf 2.3 wanted antlr4-python3-runtime 4.9.*, of which PyPI has no wheel);
# - scipy (re-ranking) and matplotlib with contourpy, cycler, fonttools, kiwisolver, pyparsing, python-dateutil, six
#   (the pictures of a training run);
# - ninja: the extension builds in parallel (without it torch compiles the sources one after another).
# AMFOR_GPU_WHEELS="name==version ..." replaces the list. A package without a wheel for that platform is built into
# one here when it is pure Python (py3-none-any), else the script stops. DIR is replaced only once every wheel is in
# (a failed run leaves the previous DIR as it was). scripts/gpu_check.sh installs from DIR when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
default_wheels="open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 regex==2026.5.9 omegaconf==2.4.0 scipy==1.17.1
  matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.69.1 kiwisolver==1.5.1 pyparsing==3.3.2
  python-dateutil==2.9.0.post0 six==1.17.0 ninja==1.13.2"
set -f  # the list is split on white space, never globbed
wheels=(${AMFOR_GPU_WHEELS:-$default_wheels})
set +f
if [ "${#wheels[@]}" -eq 0 ]; then
  echo "gpu_wheels: AMFOR_GPU_WHEELS names no package" >&2
  exit 2
fi
limit_mib=60  # the working tree carries at most 64 MiB of ignored paths to the GPU machine, this folder included
python="${PYTHON:-python3}"
for spec in "${wheels[@]}"; do
  if [[ ! "$spec" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!-]+$ ]]; then
    echo "gpu_wheels: '$spec' is not name==version (one pinned version of each package)" >&2
    exit 2
  fi
done
tmp="$(mktemp -d "${TMPDIR:-/tmp}/amfor-wheels.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
target=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
for spec in "${wheels[@]}"; do
  if "$python" -m pip download -q --no-deps --only-binary=:all: "${target[@]}" -d "$tmp" "$spec" >"$tmp/pip.log" 2>&1
  then
    continue
  fi
  # no wheel for Python 3.12 on x86-64 Linux: build one here, good only if it is pure Python
  mkdir -p "$tmp/built"
  if ! "$python" -m pip wheel -q --no-deps -w "$tmp/built" "$spec" >>"$tmp/pip.log" 2>&1; then
    echo "gpu_wheels: no wheel of $spec could be downloaded or built:" >&2
    tail -5 "$tmp/pip.log" >&2
    exit 2
  fi
  for whl in "$tmp"/built/*.whl; do
    case "$(basename "$whl")" in
      *-py3-none-any.whl | *-py2.py3-none-any.whl) mv "$whl" "$tmp"/ ;;
      *) echo "gpu_wheels: $spec has no Python 3.12 manylinux x86-64 wheel and builds only for this machine" \
              "($(basename "$whl")): it cannot travel to the GPU machine" >&2
         exit 2 ;;
    esac
  done
done
rm -rf "$tmp/built" "$tmp/pip.log"
count=$(find "$tmp" -maxdepth 1 -name '*.whl' | wc -l)
if [ "$count" -ne "${#wheels[@]}" ]; then
  echo "gpu_wheels: ${#wheels[@]} packages asked for, $count wheels downloaded:" >&2
  ls "$tmp" >&2
  exit 1
fi
size_kib=$(du -sk "$tmp" | cut -f1)
if [ "$size_kib" -gt $((limit_mib * 1024)) ]; then
  echo "gpu_wheels: the wheels take $((size_kib / 1024)) MiB, over the ${limit_mib} MiB that can travel with the tree" >&2
  exit 1
fi
rm -rf "$dir"
mkdir -p "$(dirname "$dir")"
cp -r "$tmp" "$dir"
chmod 755 "$dir"
echo "gpu_wheels: $count wheels, $((size_kib / 1024)) MiB in $dir:"
ls -1 "$dir"
