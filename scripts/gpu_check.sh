#!/usr/bin/env bash
# The GPU check: everything a lent GPU machine should tell us, in one call of at most
# 6 minutes, from the repository root.
#
#   OUT=/some/dir bash scripts/gpu_check.sh [--data DIR]     on the GPU machine
#   OUT=/some/dir bash scripts/gpu_check.sh --dry-run --data DIR    on a CPU (CI)
#
# Stages, each capped in time (the caps add up to 360 s; x3 in a dry run) so that a
# hang costs one stage, not the run; outputs are NaN-filled in the tests and the
# memcheck only, and the timed stages launch the first fitting configurations; their
# files land in $OUT (10 at most) and summary.txt says what each stage did:
#   environment   nvidia-smi, Python, torch, Triton, nvcc versions   -> environment.txt
#   install       pip install --no-build-isolation --no-deps -e . (offline)
#   cuda-build    python -m fastnl.backends._cuda_build, ptxas report      -> cuda-build.log
#   tests         pytest -m gpu in parallel, FASTNL_TRITON_CONFIGS=first, outputs
#                 NaN-filled; then the autotuning test with every configuration
#                                                          -> gpu-tests.xml, gpu-tests.log
#   sweep         benchmarks/gpu_sweep.py: fastnl vs SDPA per backend vs reference
#                                                          -> sweep.json
#   memory        benchmarks/memory_picture.py on CUDA: one block's peak memory and
#                 time, fastnl vs materialised vs SDPA     -> memory-gpu.json, .png
#   train         PreResNet-20 baseline and proposed-3 on a CIFAR subset, images/s
#                 and peak memory                          -> train.log
#   sanitizer     compute-sanitizer memcheck of one ragged forward+backward
#                                                          -> sanitizer.log
# --data DIR: an ImageFolder tree (train/, test/) or the folder holding
# cifar10-jpeg.tar.gz (unpacked and cut to 500 + 100 images per class); default .gpu-data.
# --dry-run: the parts that need no GPU (collection instead of the GPU tests, the
# sweep's and the memory picture's CPU plumbing, a few CPU training steps); install and sanitizer are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
DRY=0
DATA=.gpu-data
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --data) DATA="$2"; shift ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK="$(mktemp -d)"  # training runs and the decoded-image cache: not results
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

# stage NAME SECONDS COMMAND...: run with a time cap, note status and time in the summary
stage() {
  local name=$1 limit=$(($2 * (DRY ? 3 : 1))) start=$SECONDS status  # a CPU is slower, often shared
  shift 2
  echo "== $name (at most ${limit} s)"
  # a fresh bash, so that the stage functions below (exported) run under the cap too
  timeout --kill-after=10 "$limit" bash -c 'set -o pipefail; "$@"' stage "$@"
  status=$?
  local took=$((SECONDS - start)) verdict=ok
  if [ $status -eq 124 ] || [ $status -eq 137 ]; then verdict="TIMED OUT"; FAILED=1
  elif [ $status -ne 0 ]; then verdict="FAILED (exit $status)"; FAILED=1; fi
  printf '%-12s %-20s %4d s\n' "$name" "$verdict" "$took" | tee -a "$SUMMARY"
}

skip() { printf '%-12s %-20s\n' "$1" "skipped ($2)" | tee -a "$SUMMARY"; }

environment() {
  { date -u; uname -a
    if [ $DRY -eq 0 ]; then nvidia-smi; fi
    command -v nvcc >/dev/null && nvcc --version | tail -2
    $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    $PY -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
  } > "$OUT/environment.txt" 2>&1
  cat "$OUT/environment.txt"
}

gpu_tests() {
  if [ $DRY -eq 1 ]; then
    $PY -m pytest -m gpu --collect-only -q -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
    local status=$?
    tail -3 "$OUT/gpu-tests.log"
    return $status
  fi
  local parallel=() timeouts=()  # pytest-xdist and pytest-timeout, where the image has them
  $PY -c "import xdist" 2>/dev/null && parallel=(-n 8)
  $PY -c "import pytest_timeout" 2>/dev/null && timeouts=(--timeout 60)
  FASTNL_TRITON_CONFIGS=first FASTNL_TRITON_FILL_NAN=1 $PY -m pytest -m gpu "${parallel[@]}" "${timeouts[@]}" \
    -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" -k "not second_call_after_tuning" \
    > "$OUT/gpu-tests.log" 2>&1
  local status=$?
  # autotuning over every configuration, then the second call alone
  FASTNL_TRITON_FILL_NAN=1 $PY -m pytest -m gpu "${timeouts[@]}" -q -p no:cacheprovider -k second_call_after_tuning \
    >> "$OUT/gpu-tests.log" 2>&1 || status=1
  tail -5 "$OUT/gpu-tests.log"
  return $status
}

prepare_data() {
  if [ -f "$DATA/cifar10-jpeg.tar.gz" ] && [ ! -d "$DATA/cifar10-jpeg/train" ]; then
    tar xzf "$DATA/cifar10-jpeg.tar.gz" -C "$DATA" || return 1
    for folder in "$DATA"/cifar10-jpeg/train/* "$DATA"/cifar10-jpeg/test/*; do
      keep=500; case "$folder" in */test/*) keep=100 ;; esac
      find "$folder" -type f | sort | tail -n +$((keep + 1)) | xargs -r rm
    done
  fi
  if [ -d "$DATA/cifar10-jpeg/train" ]; then DATA="$DATA/cifar10-jpeg"; fi
  [ -d "$DATA/train" ] && [ -d "$DATA/test" ]
}

train() {
  local device=cuda steps=()
  if [ $DRY -eq 1 ]; then device=cpu; steps=(--max-steps 2 --batch-size 8); fi
  : > "$OUT/train.log"
  for preset in baseline proposed-3; do
    # two epochs, the second's images/s reported: the first includes compiling the kernels
    FASTNL_TRITON_CONFIGS=first $PY scripts/gpu_train_probe.py --device "$device" --data-dir "$DATA" \
      --cache-dir "$WORK/cache" --preset "$preset" --epochs 2 "${steps[@]}" --out "$WORK/$preset" 2>>"$OUT/train.log" \
      | tail -1 | sed "s/^/$preset: /" | tee -a "$OUT/train.log" || return 1
  done
}

sanitizer() {
  FASTNL_TRITON_CONFIGS=first FASTNL_TRITON_FILL_NAN=1 compute-sanitizer --tool memcheck --error-exitcode 1 $PY -c "
import torch, fastnl
for backend in ('triton', 'cuda'):
    q, k = torch.randn(2, 333, 8, device='cuda'), torch.randn(2, 333, 8, device='cuda')
    v = torch.randn(2, 333, 48, device='cuda', requires_grad=True)
    fastnl.nonlocal_diffuse(q, k, v, v, backend=backend).sum().backward()
torch.cuda.synchronize()
print('memcheck run finished')" > "$OUT/sanitizer.log" 2>&1
  local status=$?
  tail -3 "$OUT/sanitizer.log"
  return $status
}

export -f environment gpu_tests train sanitizer
export DRY DATA PY OUT WORK
stage environment 15 environment
if [ $DRY -eq 1 ]; then skip install "dry run"; skip cuda-build "dry run"
else
  stage install 30 $PY -m pip install -q --no-build-isolation --no-deps -e .
  # the CUDA kernels once, verbosely (ptxas's registers and spills), before any test needs them
  stage cuda-build 80 bash -c "$PY -m fastnl.backends._cuda_build > '$OUT/cuda-build.log' 2>&1"
fi
stage tests 85 gpu_tests
SWEEP=(--out "$OUT/sweep.json" --time-limit 30)
if [ $DRY -eq 1 ]; then SWEEP+=(--dry-run); fi
stage sweep 40 env FASTNL_TRITON_CONFIGS=first $PY benchmarks/gpu_sweep.py "${SWEEP[@]}"
MEMORY=(--device cuda)
if [ $DRY -eq 1 ]; then MEMORY=(--dry-run); fi
stage memory 60 bash -c "FASTNL_TRITON_CONFIGS=first $PY benchmarks/memory_picture.py measure '$OUT/memory-gpu.json' \
  ${MEMORY[*]} && $PY benchmarks/memory_picture.py plot '$OUT/memory-gpu.json' '$OUT/memory-gpu.png'"
if prepare_data; then stage train 30 train
else skip train "no CIFAR data at $DATA"; fi
if [ $DRY -eq 1 ]; then skip sanitizer "dry run"
else stage sanitizer 20 sanitizer; fi

echo "== summary"
cat "$SUMMARY"
grep -h "images_per_s" "$OUT/train.log" 2>/dev/null
exit $FAILED
