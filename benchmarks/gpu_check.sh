#!/usr/bin/env bash
# The GPU checks of focal in one go, on a bare GPU machine with its own python3, torch, nvcc, ninja,
# pytest and hypothesis (no venv is made, nothing is downloaded):
#
#   bash benchmarks/gpu_check.sh [--no-gpu-ok] [OUTDIR]      (make gpu-check [OUTDIR=...])
#
# Steps, in this order, each logged to OUTDIR/<step>.log and timed; a failing step does not stop
# the others:
#   detect     the visible GPU's compute capability (torch), card, driver, versions, commit
#   build      focal built for exactly that architecture (TORCH_CUDA_ARCH_LIST)
#   sass       benchmarks/sass_count.py --roofline on the built extension for that architecture
#   tests      pytest: tests/test_cuda.py and every test parametrised with device=cuda (-k cuda; the
#              emulated-CUDA tests, a CPU proof, are left to `make test`)
#   bench      benchmarks/bench.py --device cuda, headline and paper shapes, fp32/bf16/fp16, fwd+bwd
#   tune       benchmarks/gpu_tune.py --no-build (make gpu-tune on the build above): every variant of
#              every hot path against its floor, OUTDIR/tune/gpu_tune.{json,md}, this GPU's table line
#   family     benchmarks/bench.py --device cuda --losses star quality varifocal: headline shape, fp32/bf16
#   softmax    benchmarks/bench.py --device cuda --losses softmax: the softmax focal loss, headline and voc
#   profile    benchmarks/profile_kernels.py: each kernel's device time in a fwd+bwd step, headline shape
#   detectors  benchmarks/bench_detectors.py --device cuda: torchvision RetinaNet / FCOS loss path and
#              training step (stock, one-line swap, fused), 512 px, batch 2 and 8
#   memcheck   compute-sanitizer memcheck on benchmarks/sanitize_cases.py
#   racecheck  compute-sanitizer racecheck on the same cases
#   ncu        Nsight Compute on one float32 launch of the class-id and the float-target loss kernels
# The whole run keeps within GPU_CHECK_BUDGET_S seconds (default 600): each step gets at most its own
# cap and what is left. Prints a summary, writes OUTDIR/summary.json (and the console to
# OUTDIR/gpu-check.log), exits 1 if any step failed.
#
# Environment: PYTHON (default python3), CUDA_HOME, GPU_CHECK_BUDGET_S, GPU_CHECK_BUILD=pip|inplace
# (pip: `pip install --no-build-isolation --no-deps -e .`, the default; inplace: `setup.py build_ext
# --inplace`, which leaves the Python environment as it is), GPU_CHECK_ARCH (with --no-gpu-ok and no
# GPU: the architecture to build, default 9.0), GIT_COMMIT (when the tree has no .git).
# --no-gpu-ok: without a visible GPU, build and count SASS anyway and mark the GPU steps SKIP (a dry
# run); without it, a missing GPU fails the check.

set -u
set -o pipefail

NO_GPU_OK=0
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --no-gpu-ok) NO_GPU_OK=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "error: unknown option $arg" >&2; exit 2 ;;
    *) OUTDIR="$arg" ;;
  esac
done
OUTDIR="${OUTDIR:-outputs/gpu-check}"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-600}"
BUILD_MODE="${GPU_CHECK_BUILD:-pip}"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
START=$(date +%s)
exec > >(tee "$OUTDIR/gpu-check.log") 2>&1  # the console, also kept with the step logs

STEP_NAMES=()
STEP_STATUS=()
STEP_SECONDS=()
STEP_NOTES=()

json_escape() {  # a string as a JSON string literal
  local s="$1"
  s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//$'\n'/\\n}"; s="${s//$'\r'/}"; s="${s//$'\t'/ }"
  printf '"%s"' "$s"
}

record() {  # name status seconds note
  STEP_NAMES+=("$1"); STEP_STATUS+=("$2"); STEP_SECONDS+=("$3"); STEP_NOTES+=("$4")
  printf '%-10s %-5s %5ss  %s\n' "$1" "$2" "$3" "$4"
}

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND with a timeout of min(CAP, time left), its
# output into OUTDIR/NAME.log, and records PASS / FAIL (exit status) / TIMEOUT.
run_step() {
  local name="$1" cap="$2"; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  local log="$OUTDIR/$name.log"
  if (( limit < 5 )); then
    echo "not run: the ${BUDGET_S} s budget was spent" >"$log"
    record "$name" FAIL 0 "not run: time budget spent"
    return 1
  fi
  echo "== $name (at most ${limit} s): $*"
  local t0=$(date +%s) rc
  { echo "\$ $*"; echo; } >"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 15 "$log" | sed 's/^/    /'
  if (( rc == 0 )); then
    record "$name" PASS "$dt" ""
  elif (( rc == 124 || rc == 137 )); then
    record "$name" FAIL "$dt" "timed out after ${limit} s (see $name.log)"
  else
    record "$name" FAIL "$dt" "exit status $rc (see $name.log)"
  fi
  return "$rc"
}

skip_step() {  # name reason
  echo "skipped: $2" >"$OUTDIR/$1.log"
  record "$1" SKIP 0 "$2"
}

find_ncu() {
  local home="${CUDA_HOME:-/usr/local/cuda}" c
  for c in "$home/bin/ncu" /opt/nvidia/nsight-compute/*/ncu; do
    [[ -x "$c" ]] && { echo "$c"; return 0; }
  done
  command -v ncu
}

find_sanitizer() {
  local home="${CUDA_HOME:-/usr/local/cuda}" c
  for c in "$home/bin/compute-sanitizer" "$home/compute-sanitizer/compute-sanitizer"; do
    [[ -x "$c" ]] && { echo "$c"; return 0; }
  done
  command -v compute-sanitizer
}

# ---------------------------------------------------------------------------------------------------
# detect: what this machine is

INFO_PY='
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "gpu_visible": torch.cuda.is_available()}
if info["gpu_visible"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", gpu_count=torch.cuda.device_count(),
                gpu_memory_gib=round(p.total_memory / 2**30, 1))
print(json.dumps(info))
'
t0=$(date +%s)
INFO_JSON="$("$PY" -c "$INFO_PY" 2>"$OUTDIR/detect.log")" || INFO_JSON=""
field() { [[ -n "$INFO_JSON" ]] && "$PY" -c "import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print('' if v is None else v)" "$INFO_JSON" "$1"; }
TORCH_VERSION="$(field torch)"
# Not CC: that is the C compiler, and an exported CC is what torch hands nvcc as -ccbin.
CAPABILITY="$(field compute_capability)"
GPU_NAME="$(field gpu)"
DRIVER=""
if command -v nvidia-smi >/dev/null 2>&1; then
  SMI="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  DRIVER="${SMI##*, }"
  [[ -z "$GPU_NAME" ]] && GPU_NAME="${SMI%%, *}"
fi
if [[ -z "$DRIVER" && -r /proc/driver/nvidia/version ]]; then
  DRIVER="$(sed -n 's/.*Kernel Module  *\([0-9][0-9.]*\).*/\1/p' /proc/driver/nvidia/version | head -n 1)"
fi
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
[[ -x "$NVCC" ]] || NVCC="$(command -v nvcc || true)"
NVCC_VERSION="$([[ -n "$NVCC" ]] && "$NVCC" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
COMMIT="${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
DIRTY="$(git status --porcelain --untracked-files=no 2>/dev/null | head -c1 | wc -c)"
[[ "$COMMIT" != unknown && "$DIRTY" != 0 && -z "${GIT_COMMIT:-}" ]] && COMMIT="$COMMIT (modified)"

echo "gpu-check of focal, $(date '+%Y-%m-%d %H:%M:%S %Z') on $(uname -n)"
echo "  card:    ${GPU_NAME:-none visible}${CAPABILITY:+ (compute capability $CAPABILITY)}"
echo "  driver:  ${DRIVER:-unknown}"
echo "  torch:   ${TORCH_VERSION:-not importable} (CUDA $(field torch_cuda)), python $(field python)"
echo "  nvcc:    ${NVCC_VERSION:-not found}"
echo "  commit:  $COMMIT"
echo "  output:  $OUTDIR (budget ${BUDGET_S} s)"
echo "$INFO_JSON" >>"$OUTDIR/detect.log"

HAVE_GPU=0
if [[ -n "$CAPABILITY" ]]; then
  HAVE_GPU=1
  record detect PASS $(( $(date +%s) - t0 )) "$GPU_NAME, sm_${CAPABILITY/./}"
elif (( NO_GPU_OK )); then
  CAPABILITY="${GPU_CHECK_ARCH:-9.0}"
  record detect SKIP $(( $(date +%s) - t0 )) "no GPU visible (--no-gpu-ok): building for $CAPABILITY"
else
  record detect FAIL $(( $(date +%s) - t0 )) "no GPU visible to torch (see detect.log)"
  CAPABILITY="${GPU_CHECK_ARCH:-9.0}"
fi
ARCH="sm_${CAPABILITY/./}"

# ---------------------------------------------------------------------------------------------------
# build, sass

export TORCH_CUDA_ARCH_LIST="$CAPABILITY" FOCAL_WITH_CUDA=1
if [[ "$BUILD_MODE" == inplace ]]; then
  run_step build 300 "$PY" setup.py build_ext --inplace
else
  run_step build 300 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
BUILD_RC=$?

if (( BUILD_RC != 0 )); then
  skip_step sass "the build failed"
else
  # The extension the interpreter loads, wherever the build put it.
  SO="$("$PY" -c 'import importlib.util as u; s = u.find_spec("focal._C"); print(s.origin if s else "")' 2>/dev/null)"
  # The roofline budgets of every launch shape, for this architecture's register file, recorded
  # (tests/test_sass_count.py checks them on sm_90, with the misses it knows, in `make test`).
  SASS_ARGS=(benchmarks/sass_count.py --arch "$ARCH" --roofline --json "$OUTDIR/sass.json")
  [[ -n "$SO" ]] && SASS_ARGS+=(--binary "$SO")
  run_step sass 60 "$PY" "${SASS_ARGS[@]}"
fi

# ---------------------------------------------------------------------------------------------------
# tests, bench, sanitizers

if (( BUILD_RC != 0 )); then
  for s in tests bench tune family softmax profile detectors memcheck racecheck ncu; do skip_step "$s" "the build failed"; done
else
  # Test files that import torchvision cannot be collected without it; none of them is CUDA-specific
  # but for one device=cuda case, so they are left out (and said so) rather than failing the step.
  PYTEST_IGNORE=()
  if ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
    for f in tests/retinanet $(grep -l -E '^(import|from) torchvision' tests/*.py); do PYTEST_IGNORE+=(--ignore "$f"); done
    echo "note: torchvision is not installed: not collected: ${PYTEST_IGNORE[*]}"
  fi
  run_step tests 150 "$PY" -m pytest tests ${PYTEST_IGNORE[@]+"${PYTEST_IGNORE[@]}"} -k "cuda and not emulated" -q -rs -p no:cacheprovider \
    --junitxml "$OUTDIR/tests.xml"
  if (( ! HAVE_GPU && NO_GPU_OK )); then
    for s in bench tune family softmax profile detectors memcheck racecheck ncu; do skip_step "$s" "no GPU visible (--no-gpu-ok)"; done
  else
    run_step bench 170 "$PY" benchmarks/bench.py --device cuda --shapes headline paper \
      --dtype float32 bfloat16 float16 --modes fwdbwd --impls fused_ids fused_float tv tv_compile \
      --budget 0.3 --require-fused --json "$OUTDIR/bench.json" --plot "$OUTDIR/bench.png"
    # The tuner on this build, in the same run, so that one command on a lent GPU does both.
    run_step tune 170 "$PY" benchmarks/gpu_tune.py --no-build --out "$OUTDIR/tune" --budget-s 140
    run_step family 60 "$PY" benchmarks/bench.py --device cuda --losses star quality varifocal --shapes headline \
      --dtype float32 bfloat16 --modes fwdbwd --impls fused_ids fused_float reference --budget 0.3 \
      --json "$OUTDIR/family.json" --plot "$OUTDIR/family.png"
    run_step softmax 60 "$PY" benchmarks/bench.py --device cuda --losses softmax --shapes headline voc \
      --dtype float32 bfloat16 --modes fwdbwd --budget 0.3 --json "$OUTDIR/softmax.json"
    run_step profile 60 "$PY" benchmarks/profile_kernels.py --device cuda --dtype float32 bfloat16 --steps 20
    run_step detectors 120 "$PY" benchmarks/bench_detectors.py --device cuda --sizes 512 --batches 2 8 \
      --parts loss step --json "$OUTDIR/detectors.json" --markdown "$OUTDIR/detectors.md"
    SANITIZER="$(find_sanitizer)"
    if [[ -z "$SANITIZER" ]]; then
      for s in memcheck racecheck; do
        echo "compute-sanitizer not found under \$CUDA_HOME/bin or on PATH" >"$OUTDIR/$s.log"
        record "$s" FAIL 0 "compute-sanitizer not found"
      done
    else
      # Without the caching allocator every tensor is its own allocation, so memcheck sees its bounds.
      run_step memcheck 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool memcheck --report-api-errors no --error-exitcode 3 "$PY" benchmarks/sanitize_cases.py
      run_step racecheck 120 "$SANITIZER" --tool racecheck --report-api-errors no --error-exitcode 3 \
        "$PY" benchmarks/sanitize_cases.py
    fi
    NCU="$(find_ncu)"
    if [[ -z "$NCU" ]]; then
      skip_step ncu "ncu not found under \$CUDA_HOME/bin, /opt/nvidia/nsight-compute or on PATH"
    else
      # The clocks as they are (--clock-control none); the launch after profile_kernels.py's
      # WARMUP_STEPS (3) warm-up steps.
      # A kernel name that matches no launch leaves ncu's exit status 0: that fails the step too.
      ncu_kernel() {  # kernel-regex impl
        local out rc
        out="$("$NCU" --clock-control none --kernel-name "regex:$1" --launch-skip 3 --launch-count 1 \
          --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
          "$PY" benchmarks/profile_kernels.py --device cuda --dtype float32 --plain --steps 1 --impls "$2" 2>&1)"
        rc=$?
        echo "$out"
        (( rc == 0 )) && ! grep -q "No kernels were profiled" <<<"$out"
      }
      # The benchmark's float targets carry an (N, 1) keep weight: focal_kernel, not focal_float_kernel.
      ncu_both() { ncu_kernel focal_ids_kernel fused_ids && ncu_kernel "focal_(float_)?kernel" fused_float; }
      export -f ncu_kernel ncu_both
      export NCU PY
      run_step ncu 90 bash -c ncu_both
    fi
  fi
fi

# ---------------------------------------------------------------------------------------------------
# summary

TOTAL=$(( $(date +%s) - START ))
FAILED=0
{
  echo "{"
  echo "  \"machine\": {\"gpu\": $(json_escape "$GPU_NAME"), \"compute_capability\": $(json_escape "$CAPABILITY"),"
  echo "              \"arch_built\": $(json_escape "$ARCH"), \"driver\": $(json_escape "$DRIVER"),"
  echo "              \"torch\": $(json_escape "$TORCH_VERSION"), \"nvcc\": $(json_escape "$NVCC_VERSION"),"
  echo "              \"git_commit\": $(json_escape "$COMMIT"), \"host\": $(json_escape "$(uname -n)"),"
  echo "              \"date\": $(json_escape "$(date '+%Y-%m-%d %H:%M:%S %Z')"), \"details\": ${INFO_JSON:-null}},"
  echo "  \"budget_s\": $BUDGET_S, \"total_s\": $TOTAL, \"no_gpu_ok\": $( (( NO_GPU_OK )) && echo true || echo false ),"
  echo "  \"steps\": ["
  for i in "${!STEP_NAMES[@]}"; do
    sep=","; (( i == ${#STEP_NAMES[@]} - 1 )) && sep=""
    echo "    {\"name\": $(json_escape "${STEP_NAMES[$i]}"), \"status\": $(json_escape "${STEP_STATUS[$i]}"), \"seconds\": ${STEP_SECONDS[$i]}, \"log\": $(json_escape "${STEP_NAMES[$i]}.log"), \"note\": $(json_escape "${STEP_NOTES[$i]}")}$sep"
    [[ "${STEP_STATUS[$i]}" == FAIL ]] && FAILED=$(( FAILED + 1 ))
  done
  echo "  ],"
  echo "  \"ok\": $( (( FAILED == 0 )) && echo true || echo false )"
  echo "}"
} >"$OUTDIR/summary.json"

echo
echo "== summary (${TOTAL} s of ${BUDGET_S} s; logs in $OUTDIR) =="
for i in "${!STEP_NAMES[@]}"; do
  printf '  %-5s %-10s %5ss  %s\n' "${STEP_STATUS[$i]}" "${STEP_NAMES[$i]}" "${STEP_SECONDS[$i]}" "${STEP_NOTES[$i]}"
done
if (( FAILED )); then
  echo "gpu-check: $FAILED step(s) failed"
  exit 1
fi
echo "gpu-check: all steps passed"
