#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, one command runs the CUDA-marked tests (tests/test_cuda.py:
# every method on CUDA = CPU, the out-of-memory fallbacks, GPU slots, the frozen copy off on CUDA,
# Score-CAM's batches and autocast), then the benchmark on CUDA (python -m benchmarks.run --gpu: resnet50,
# every method at batch 1, 16 and 64, the peers side by side, Score-CAM under bf16 / fp16 autocast against
# fp32) and writes one markdown report. Tests and benchmark have their own time limits, 7.5 minutes
# together (the benchmark gets what the tests leave, at least GPU_CHECK_BENCH_S); setting up a Python that sees the GPU comes first and is timed apart (on a fresh machine it
# downloads torch, a few GB, from the package registries: nothing else is reached).
#
#   bash scripts/gpu-check.sh              # on the GPU machine; prints where the report is
#   bash scripts/gpu-check.sh --dry-run    # anywhere: the same stages on the CPU at small sizes
#
# Which Python: requirements.txt pins torch==2.15.0 / torchvision==0.29.2. From PyPI on Linux x86-64 that
# pair is the CUDA 13.2 build (2.15.0+cu132, seen on the development machine), which needs a driver for
# CUDA >= 13.2. The script uses .venv (made by scripts/setup.sh) when its torch sees the GPU; otherwise
# .venv-gpu: the same torch/torchvision pair from the PyTorch index of the newest CUDA the driver supports
# (cu130, cu128 or cu126; assumed to publish 2.15.0), then requirements.txt (already satisfied for torch)
# and the peers (requirements-bench.txt, optional).
#
# Environment: GPU_CHECK_OUT (report folder, default results/gpu-check-<time>), GPU_CHECK_TESTS_S (180),
# GPU_CHECK_BENCH_S (270), GPU_CHECK_TOTAL_S (450: tests + benchmark), GPU_CHECK_PYTHON (a Python to use as it is, no set-up), PYTHON (python3, for
# a new venv).
# Exit status: 0 all passed; 1 a CUDA test failed or timed out; 2 the benchmark failed; 3 no Python here
# sees a CUDA GPU (the reason is printed).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/gpu-check.sh [--dry-run]" >&2; exit 64
fi
STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="${GPU_CHECK_OUT:-results/gpu-check-$STAMP}"
TESTS_S="${GPU_CHECK_TESTS_S:-180}"
BENCH_S="${GPU_CHECK_BENCH_S:-270}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-450}"
TORCH_PAIR=(torch==2.15.0 torchvision==0.29.2)  # keep in step with requirements.txt
PYPI_TORCH_CUDA=13.2                             # the CUDA of that pair's PyPI wheel
mkdir -p "$OUT"
LOG="$OUT/log.txt"

log() { printf '[gpu-check %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$LOG" >&2; }
sees_cuda() { [ -x "$1" ] && timeout 120 "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }  # $1 >= $2
driver_cuda() { nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | awk '{print $3}' | head -n1; }

# --------------------------------------------------------------------------------------------------
# 1. A Python whose torch sees the GPU

make_gpu_venv() {  # .venv-gpu with the torch pair from the PyTorch index for the driver's CUDA
  local driver="$1" cu
  [ -x .venv-gpu/bin/python ] || "${PYTHON:-python3}" -m venv .venv-gpu
  .venv-gpu/bin/python -m pip install -q --upgrade pip
  for cu in 130 128 126; do
    version_ge "$driver" "${cu:0:2}.${cu:2}" || continue
    log "installing ${TORCH_PAIR[*]} for CUDA ${cu:0:2}.${cu:2} into .venv-gpu"
    if .venv-gpu/bin/python -m pip install -q --force-reinstall "${TORCH_PAIR[@]}" \
         --index-url "https://download.pytorch.org/whl/cu$cu" && sees_cuda .venv-gpu/bin/python; then
      .venv-gpu/bin/python -m pip install -q -r requirements.txt
      return 0
    fi
    log "the cu$cu build does not install or does not see the GPU"
  done
  return 1
}

setup_python() {
  if [ "$DRY" = 1 ]; then
    bash scripts/setup.sh >&2
    PY=.venv/bin/python
    return
  fi
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    log "no NVIDIA driver here (nvidia-smi not found): nothing to check"; exit 3
  fi
  if sees_cuda .venv/bin/python; then PY=.venv/bin/python; return; fi
  if sees_cuda .venv-gpu/bin/python; then PY=.venv-gpu/bin/python; return; fi
  local driver
  driver="$(driver_cuda)"
  log "driver supports CUDA ${driver:-unknown}"
  if [ -n "$driver" ] && version_ge "$driver" "$PYPI_TORCH_CUDA"; then
    bash scripts/setup.sh >&2
    if sees_cuda .venv/bin/python; then PY=.venv/bin/python; return; fi
    log ".venv's torch (CUDA $PYPI_TORCH_CUDA) does not see the GPU"
  fi
  if [ -n "$driver" ] && make_gpu_venv "$driver"; then PY=.venv-gpu/bin/python; return; fi
  log "no torch ${TORCH_PAIR[0]#torch==} build sees the GPU (driver CUDA ${driver:-unknown}); see $LOG"
  exit 3
}

SECONDS=0
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then  # a Python chosen by hand (it must see the GPU unless --dry-run)
  PY="$GPU_CHECK_PYTHON"
  if [ "$DRY" = 0 ] && ! sees_cuda "$PY"; then log "$PY does not see a CUDA GPU"; exit 3; fi
else
  setup_python
fi
if ! "$PY" -c 'import torchcam, pytorch_grad_cam, captum' 2>/dev/null; then
  log "installing the peer libraries (requirements-bench.txt)"
  "$PY" -m pip install -q -r requirements-bench.txt || log "peers not installed: the benchmark runs without them"
fi
SETUP_TOOK=$SECONDS
log "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())'))"

# --------------------------------------------------------------------------------------------------
# 2. The CUDA-marked tests

SECONDS=0
TEST_ENV=()
if [ "$DRY" = 1 ]; then TEST_ENV=(VISLIB_CUDA_DRY_RUN=1); fi
log "CUDA tests (limit ${TESTS_S} s)"
set +e
env ${TEST_ENV[@]+"${TEST_ENV[@]}"} timeout -k 20 -s INT "$TESTS_S" "$PY" -m pytest -m cuda tests/test_cuda.py -q -rA \
  -p no:cacheprovider --junitxml "$OUT/tests.xml" 2>&1 | tee "$OUT/tests.txt" >&2
TESTS_RC=${PIPESTATUS[0]}
set -e
TESTS_TOOK=$SECONDS
log "tests: exit $TESTS_RC after ${TESTS_TOOK} s"

# --------------------------------------------------------------------------------------------------
# 3. The benchmark on CUDA (its deadline leaves time to write the results before the limit)

LEFT=$((TOTAL_S - TESTS_TOOK))
if [ "$LEFT" -gt "$BENCH_S" ]; then BENCH_S=$LEFT; fi
SECONDS=0
BENCH_ARGS=(--gpu)
if [ "$DRY" = 1 ]; then
  BENCH_ARGS+=(--devices cpu --models resnet18@64 --batches 1,2 --budget 2 --repeats 1 --warmup 0
               --scaling-model resnet18 --scaling-batches 1,2 --scaling-sizes 64)
fi
log "benchmark (limit ${BENCH_S} s): python -m benchmarks.run ${BENCH_ARGS[*]}"
set +e
timeout -k 20 -s INT "$BENCH_S" "$PY" -m benchmarks.run "${BENCH_ARGS[@]}" --deadline "$((BENCH_S - 60))" \
  --out "$OUT/bench" > "$OUT/bench.md" 2> "$OUT/bench.log"
BENCH_RC=$?
set -e
BENCH_TOOK=$SECONDS
log "benchmark: exit $BENCH_RC after ${BENCH_TOOK} s"

# --------------------------------------------------------------------------------------------------
# 4. One report

REPORT="$OUT/report.md"
{
  echo "# vislib GPU check ($STAMP)$([ "$DRY" = 1 ] && echo ' — DRY RUN on the CPU')"
  echo
  GPU="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1 || true)"
  echo "- GPU: ${GPU:-none}"
  echo "- Python: \`$PY\`, $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"
  echo "- set-up ${SETUP_TOOK} s; CUDA tests ${TESTS_TOOK} s (exit $TESTS_RC); benchmark ${BENCH_TOOK} s (exit $BENCH_RC)"
  echo
  echo "## CUDA tests"
  echo
  if [ "$TESTS_RC" = 124 ]; then echo "**Timed out after ${TESTS_S} s** (GPU_CHECK_TESTS_S); the end of tests.txt:"; echo; fi
  if ! grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) |[0-9]+ (passed|failed|skipped|errors?)|no tests ran|^Score-CAM ' \
      "$OUT/tests.txt" | sed 's/^/    /'; then
    tail -n 15 "$OUT/tests.txt" | sed 's/^/    /'
  fi
  echo
  if [ -f "$OUT/bench/results.md" ]; then
    sed -e 's/^# /## /' "$OUT/bench/results.md"
  else
    echo "## Benchmark"
    echo
    echo "No results (exit $BENCH_RC). The end of bench.log:"
    echo
    tail -n 20 "$OUT/bench.log" | sed 's/^/    /'
  fi
} > "$REPORT"
log "report: $REPORT"
echo "$REPORT"
if [ "$TESTS_RC" != 0 ]; then exit 1; fi
if [ "$BENCH_RC" != 0 ]; then exit 2; fi
exit 0
