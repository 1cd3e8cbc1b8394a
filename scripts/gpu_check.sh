#!/usr/bin/env bash
# On a lent GPU machine, in one call: install the wheels it lacks, then build, test, train and benchmark with
# `python3 -m benchmarks.gpu_report`, into benchmarks/results/<date>-<gpu>[-quick].{json,md} (and $OUT when set).
#   bash scripts/gpu_wheels.sh                                        # first, on a machine with PyPI: .whl/
#   AMFOR_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_check.sh --quick  # on the GPU machine, .whl/ carried along
# --quick ends within QUICK_TOTAL_S (benchmarks/gpu_report.py: 400 s) of its start by construction: each phase has a
# fixed budget under a timeout, their sum fits, and the report is written as each phase ends; a backstop `timeout`
# ends the report itself at the deadline. Without --quick the phases get the long budgets and no deadline.
# Needs python3, no network, no ninja (the wheel brings one; without it the build is serial) and no git.
# Environment: AMFOR_GPU_WHEEL_DIR (default .whl), AMFOR_GPU_SITE (where the wheels go, default
# $TMPDIR/amfor-gpu-site), AMFOR_GPU_WORKDIR (logs and training runs, default $TMPDIR/amfor-gpu-check),
# AMFOR_GPU_RESULTS (where the report goes, default benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    *) echo "gpu_check: unknown argument '$arg' (usage: bash scripts/gpu_check.sh [--quick])" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
tmp="${TMPDIR:-/tmp}"
wheel_dir="${AMFOR_GPU_WHEEL_DIR:-.whl}"
site="${AMFOR_GPU_SITE:-$tmp/amfor-gpu-site}"
workdir="${AMFOR_GPU_WORKDIR:-$tmp/amfor-gpu-check}"
rm -rf "${workdir:?}" && mkdir -p "$workdir"
setup_log="$workdir/setup.log"
say() { echo "$*" | tee -a "$setup_log"; }

# CUDA_HOME only where nvcc really is (a CUDA_HOME without nvcc makes torch try, and fail, a CUDA build).
if [ -n "${CUDA_HOME:-}" ] && [ ! -x "$CUDA_HOME/bin/nvcc" ]; then unset CUDA_HOME; fi
if [ -z "${CUDA_HOME:-}" ]; then
  for dir in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /none/bin/nvcc)")")"; do
    if [ -x "$dir/bin/nvcc" ]; then export CUDA_HOME="$dir"; break; fi
  done
fi
say "CUDA_HOME=${CUDA_HOME:-<none: nvcc not found, the CUDA kernels are not built>}"
gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
say "nvidia-smi: ${gpu:-<no GPU visible>}"

# amfor.kernels is kernels/ (setup.py maps it; a git-ignored link in a checkout, which a copied tree may lack)
if [ ! -e amfor/kernels ]; then ln -s ../kernels amfor/kernels && say "amfor/kernels: linked to kernels/"; fi

# The wheels of scripts/gpu_wheels.sh, those whose distribution is not installed already, into $site.
rm -rf "${site:?}"
if ls "$wheel_dir"/*.whl >/dev/null 2>&1; then
  mapfile -t plan < <(timeout 60 python3 - "$wheel_dir" <<'EOF'
import sys
from importlib import metadata
from pathlib import Path

for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    dist = whl.name.split("-")[0]
    try:
        print(f"have {dist}=={metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        print(f"install {whl}")
EOF
  )
  missing=(); have=()
  for line in "${plan[@]}"; do
    case "$line" in install\ *) missing+=("${line#install }") ;; have\ *) have+=("${line#have }") ;; esac
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    mkdir -p "$site"
    if python3 -m pip --version >/dev/null 2>&1; then
      how="pip install --no-index --no-deps --target"
      timeout 90 python3 -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$site" \
        "${missing[@]}" >"$workdir/wheels.log" 2>&1
      rc=$?
    else  # no pip: a wheel is a zip laid out for site-packages, its scripts under <name>.data/scripts
      how="unzip (no pip) into"
      timeout 90 python3 - "$site" "${missing[@]}" >"$workdir/wheels.log" 2>&1 <<'EOF'
import os, sys, zipfile
site = sys.argv[1]
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.infolist():
            parts = member.filename.split("/")
            if not (parts[0].endswith(".data") and len(parts) > 2):
                zf.extract(member, site)
                continue
            kind, rest = parts[1], parts[2:]
            if member.is_dir() or kind not in ("scripts", "purelib", "platlib"):
                continue
            target = os.path.join(site, "bin" if kind == "scripts" else "", *rest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as dst:
                dst.write(src.read())
            if kind == "scripts":
                os.chmod(target, 0o755)
EOF
      rc=$?
    fi
    names="$(for w in "${missing[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
    if [ "$rc" -eq 0 ]; then
      say "wheels: ${#missing[@]} installed from $wheel_dir ($how $site): $names"
    else
      say "wheels: FAILED to install from $wheel_dir (exit $rc, see wheels.log): $names"
    fi
  fi
  [ "${#have[@]}" -gt 0 ] && say "wheels: already installed here, left as they are: ${have[*]}"
else
  say "wheels: no $wheel_dir/*.whl (scripts/gpu_wheels.sh makes them): what needs open_clip, omegaconf, scipy or" \
      "matplotlib fails if the machine lacks them"
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$site/bin:$PATH"
if [ -d "$site" ]; then  # what python3 now finds there
  say "wheels: $(timeout 60 python3 -c 'import os, sys
from importlib import metadata
site = os.path.realpath(sys.argv[1])
found = sorted(f"{d.name}=={d.version}" for d in metadata.distributions(path=[site]))
where = "on" if site in map(os.path.realpath, sys.path) else "NOT on"
print(f"{site} is {where} sys.path, with", " ".join(found))' "$site")"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
say "ninja: $(command -v ninja || echo '<none: the extension compiles one source at a time>')"

args=(--setup-log "$setup_log" --workdir "$workdir" --out "${AMFOR_GPU_RESULTS:-benchmarks/results}")
status=0
if [ "$quick" = 1 ]; then
  total=$(sed -n 's/^QUICK_TOTAL_S = \([0-9]*\).*/\1/p' benchmarks/gpu_report.py)
  deadline=$((start + total))
  left=$((deadline - $(date +%s)))
  [ "$left" -lt 1 ] && left=1  # (timeout 0 would mean no limit)
  timeout -k 5 "$left" python3 -m benchmarks.gpu_report --quick --deadline "$deadline" "${args[@]}" || status=$?
  [ "$status" -eq 124 ] && echo "gpu_check: the report was ended at its deadline ($total s): see the phases written"
else
  python3 -m benchmarks.gpu_report "${args[@]}" || status=$?
fi
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  mkdir -p "$OUT/logs" && cp "$workdir"/*.log "$OUT/logs/" 2>/dev/null
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s (exit $status)"
exit "$status"
