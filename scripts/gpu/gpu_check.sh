#!/usr/bin/env bash
# The one command for the GPU machine (H100 or H200, torch + CUDA in plain python3, nvcc, cmake, ninja,
# nanobind, scikit-build-core, pytest; no network). In order:
#   1. versions (nvidia-smi, torch, nvcc, cmake) and the commit measured;
#   2. build + install Panther with CUDA kernels (sm_90) into a private target dir (no network);
#   3. the cuda-marked tests (PANTHER_GPU_PYTEST_ARGS="" runs the whole suite);
#   4. the Python benchmarks (bench_linear.py, bench_attention.py) on CUDA;
#   5. the C++ microbenchmarks (CUDA cases) when Google Benchmark is available: system-wide, or a
#      copy carried in .carry/benchmark (scripts/gpu/pack_benchmark_carry.sh makes one), or
#      PANTHER_BENCHMARK_ROOT; built with the package in step 2; skipped with a message otherwise;
#   6. a summary, then the benchmark tables (printed last).
# One failing stage does not stop the others; the exit status is non-zero when any stage failed.
# Logs and tables go to $OUT when set (the device tool copies back its files: at most 8, kept
# flat here), else to /tmp/panther-gpu-check:
#   gpu-check.log  pytest.log  deploy.log  TAG-linear.md  TAG-attention.md  TAG-cpp.md/.json
#   (TAG: the GPU model in lower case, h100 or h200, from nvidia-smi; else "gpu")
#   (CSV copies of the Python tables stay in /tmp: the device returns at most 8 files)
# Time: the whole run aims to fit PANTHER_GPU_CHECK_BUDGET seconds (default 540); each stage gets
# a timeout that leaves room for the stages after it. Stages can be switched off to split the
# check over two calls of a device with a per-command limit: PANTHER_GPU_TESTS=0 (pytest),
# PANTHER_GPU_BENCH=0 (Python benchmarks; PANTHER_GPU_BENCH_LINEAR=0 only bench_linear.py,
# PANTHER_GPU_BENCH_ATTENTION=0 only bench_attention.py),
# PANTHER_GPU_DEPLOY=0 (scripts/deploy_check.sh cuda:
# TorchScript and AOTInductor models exported for CUDA, loaded and run from C++).
set -u -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-python3}
RES=${OUT:-/tmp/panther-gpu-check}
mkdir -p "$RES"
exec > >(tee -a "$RES/gpu-check.log") 2>&1

BUDGET=${PANTHER_GPU_CHECK_BUDGET:-540}
T0=$SECONDS
SITE=${PANTHER_SITE:-/tmp/panther-site}
declare -A STATUS=()
ORDER=()
record() { STATUS[$1]=$2; ORDER+=("$1"); }
stage() { echo; echo "==== $* [$(date -u +%H:%M:%S), $((SECONDS - T0)) s since start]"; }
# limit WANTED RESERVE [FLOOR]: seconds for a stage, leaving RESERVE for later stages, but at
# least FLOOR (default 30: the build gets 180, since a small budget once left it 30 s and
# failed every stage after it; the tests 200).
limit() {
  local left=$(( BUDGET - (SECONDS - T0) - $2 )) want=$1 floor=${3:-30}
  (( left < want )) && want=$left
  (( want < floor )) && want=$floor
  echo "$want"
}

# ------------------------------------------------------------------ 1. versions, commit
stage "versions"
TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o -E 'H[0-9]{3}' | tr 'H' 'h')
TAG=${TAG:-gpu}
echo "result files: $TAG-*.md"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
"$PY" - <<'EOF' 2>&1 || echo "python3 cannot import torch"
import sys, torch
print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, cc {p.major}.{p.minor}")
for m in ("nanobind", "scikit_build_core", "pytest", "triton"):
    try:
        mod = __import__(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{m}: not importable ({e})")
EOF
nvcc --version 2>&1 | tail -2 || echo "nvcc not found"
cmake --version 2>&1 | head -1 || echo "cmake not found"
echo "ninja $(ninja --version 2>&1 || echo 'not found')"

# A carried COMMIT file wins: the device's copy of .git can be older than the tree it received.
if [ -f COMMIT ]; then
  COMMIT=$(head -1 COMMIT)
elif COMMIT=$(git rev-parse --verify -q HEAD 2>/dev/null) && [ -n "$COMMIT" ]; then
  git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT-dirty"
else
  COMMIT=unknown
fi
export PANTHER_COMMIT=$COMMIT
echo "commit: $PANTHER_COMMIT"

# ------------------------------------------------------------------ 2. build + install (CUDA)
# Google Benchmark: system-wide, PANTHER_BENCHMARK_ROOT, or a carried copy in .carry/benchmark.
# When there is one, the C++ benchmark is built in the same CMake tree as the package (no second
# compile of the op library); if that build fails, the package is rebuilt without it.
BENCH_ROOT=${PANTHER_BENCHMARK_ROOT:-}
if [ -z "$BENCH_ROOT" ] && [ -f "$ROOT/.carry/benchmark/include/benchmark/benchmark.h" ]; then
  BENCH_ROOT=$ROOT/.carry/benchmark
fi
HAVE_GBENCH=0
if [ -n "$BENCH_ROOT" ] || [ -f /usr/include/benchmark/benchmark.h ] || [ -f /usr/local/include/benchmark/benchmark.h ]; then
  HAVE_GBENCH=1
fi
BUILD_LOG=/tmp/panther-gpu-build.log
build_package() {  # build_package BENCH(ON|OFF) TIMEOUT
  rm -rf "$SITE"
  PANTHER_WITH_CUDA=ON PANTHER_BUILD_BENCH=$1 \
    CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 ${BENCH_ROOT:+-DPANTHER_BENCHMARK_ROOT=$BENCH_ROOT} ${CMAKE_ARGS:-}" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} PIP_NO_INDEX=1 \
    timeout "$2" "$PY" -m pip install -v --no-build-isolation --no-deps --no-index \
      --disable-pip-version-check --target "$SITE" . >"$BUILD_LOG" 2>&1
}
if [ $HAVE_GBENCH = 1 ]; then
  stage "build: pip install --no-build-isolation --target $SITE (PANTHER_WITH_CUDA=ON, sm_90, with panther_bench)"
  build_package ON "$(limit 300 240 180)"
  rc=$?
  if [ $rc -ne 0 ] && grep -q -E "FAILED: bench/cpp|CMake Error at bench/cpp" "$BUILD_LOG"; then
    echo "the C++ benchmark did not build (rc $rc); last lines:"; tail -40 "$BUILD_LOG"
    echo "rebuilding without the C++ benchmark"
    HAVE_GBENCH=0
    build_package OFF "$(limit 300 240 180)"
    rc=$?
  fi
else
  stage "build: pip install --no-build-isolation --target $SITE (PANTHER_WITH_CUDA=ON, sm_90)"
  build_package OFF "$(limit 300 240 180)"
  rc=$?
fi
if [ $rc -eq 0 ]; then
  grep -E "Panther:" "$BUILD_LOG" | head -5
  tail -2 "$BUILD_LOG"
else
  echo "BUILD FAILED (rc $rc; 124 = timeout); last lines of $BUILD_LOG:"
  tail -80 "$BUILD_LOG"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "
import torch, panther
info = panther.build_info()
print('import panther:', info)
print('ops:', [n for n in ('sketched_linear', 'favor_attention') if hasattr(torch.ops.panther, n)])
assert info['with_cuda'], 'panther was built without CUDA kernels'
" 2>&1
rc2=$?
if [ $rc -eq 0 ] && [ $rc2 -eq 0 ]; then record build ok; else record build "FAILED (pip rc $rc, import rc $rc2)"; fi

# ------------------------------------------------------------------ 3. tests
if [ "${PANTHER_GPU_TESTS:-1}" = 1 ]; then
# The whole suite runs on the CPU in CI (make test); here the GPU-specific part by default:
# every cuda-marked test. PANTHER_GPU_PYTEST_ARGS overrides (e.g. "" for the whole suite, which
# does not fit one 10-minute device command).
PYTEST_ARGS=${PANTHER_GPU_PYTEST_ARGS--m cuda}
stage "tests: python3 -m pytest -q -ra $PYTEST_ARGS"
# (at least 200 s: the cuda tests take ~170 s on an H100 (about 610 tests), and a short budget
# once left them 120 s; the benchmarks after them are cut instead)
timeout "$(limit 260 200 200)" "$PY" -m pytest -q -ra -p no:cacheprovider $PYTEST_ARGS 2>&1 | tee "$RES/pytest.log" | tail -60
rc=${PIPESTATUS[0]}
if [ $rc -eq 0 ]; then record tests ok; else record tests "FAILED (rc $rc; 124 = timeout; see pytest.log)"; fi
fi

if [ "${PANTHER_GPU_DEPLOY:-1}" = 1 ]; then
stage "deploy: scripts/deploy_check.sh (CUDA: TorchScript + AOTInductor from C++, C++ training)"
timeout "$(limit 300 30)" bash scripts/deploy_check.sh "$PY" cuda 2>&1 | tee "$RES/deploy.log" | tail -25
rc=${PIPESTATUS[0]}
if [ $rc -eq 0 ]; then record deploy ok; else record deploy "FAILED (rc $rc; 124 = timeout; see deploy.log)"; fi
fi

# ------------------------------------------------------------------ 4. Python benchmarks
if [ "${PANTHER_GPU_BENCH:-1}" = 1 ]; then
if [ "${PANTHER_GPU_BENCH_LINEAR:-1}" = 1 ]; then
stage "bench_linear.py --device cuda"
timeout "$(limit 120 110)" "$PY" bench/python/bench_linear.py --device cuda \
  --markdown "$RES/$TAG-linear.md" --csv /tmp/panther-$TAG-linear.csv >/tmp/panther-bench-linear.out 2>&1
rc=$?
grep -E "^(done|FAILED)|Error|error" /tmp/panther-bench-linear.out | tail -20
if [ $rc -eq 0 ]; then record bench_linear ok; else
  tail -20 /tmp/panther-bench-linear.out; record bench_linear "FAILED (rc $rc; 124 = timeout)"; fi
fi

if [ "${PANTHER_GPU_BENCH_ATTENTION:-1}" = 1 ]; then
stage "bench_attention.py --device cuda"
# --quick: every length a target names (12 x 64: 1k-64k; 16 x 128: 4k, 16k), fewer repetitions.
timeout "$(limit 170 40)" "$PY" bench/python/bench_attention.py --device cuda --quick \
  --markdown "$RES/$TAG-attention.md" --csv /tmp/panther-$TAG-attention.csv >/tmp/panther-bench-attention.out 2>&1
rc=$?
grep -E "^(done|FAILED|bench_attention)|Error|error" /tmp/panther-bench-attention.out | tail -40
if [ $rc -eq 0 ]; then
  if grep -q "nothing to benchmark" /tmp/panther-bench-attention.out; then
    record bench_attention "skipped (no favor_attention op)"
  else
    record bench_attention ok
  fi
else
  tail -20 /tmp/panther-bench-attention.out; record bench_attention "FAILED (rc $rc; 124 = timeout)"
fi
fi
fi

# ------------------------------------------------------------------ 5. C++ microbenchmarks
stage "C++ benchmarks (panther_bench, CUDA cases)"
BENCH_BIN=$(ls -t build/*/bench/cpp/panther_bench 2>/dev/null | head -1)
if [ $HAVE_GBENCH = 0 ]; then
  echo "skipped: no usable Google Benchmark here (carry one: scripts/gpu/pack_benchmark_carry.sh, then .carry/benchmark)"
  record bench_cpp "skipped (no Google Benchmark)"
elif [ -z "$BENCH_BIN" ]; then
  echo "panther_bench was not built; configure output:"; grep -E "Panther:|benchmark" "$BUILD_LOG" | head
  record bench_cpp "FAILED (not built)"
else
  timeout "$(limit 120 5)" "$BENCH_BIN" --benchmark_filter=/cuda/ --benchmark_min_time=0.05 \
    --benchmark_out="$RES/$TAG-cpp.json" --benchmark_out_format=json >/tmp/panther-bench-cpp.out 2>&1
  rc=$?
  head -3 /tmp/panther-bench-cpp.out
  "$PY" bench/cpp/results_to_markdown.py "$RES/$TAG-cpp.json" "$RES/$TAG-cpp.md" \
    "C++ microbenchmarks (panther_bench, CUDA)" 2>&1 || echo "could not convert $RES/$TAG-cpp.json"
  if [ $rc -eq 0 ]; then record bench_cpp ok; else
    tail -20 /tmp/panther-bench-cpp.out; record bench_cpp "FAILED (rc $rc; 124 = timeout)"; fi
fi

# ------------------------------------------------------------------ 6. summary, tables last
stage "summary (commit $PANTHER_COMMIT, $((SECONDS - T0)) s)"
fail=0
for s in "${ORDER[@]}"; do
  printf '  %-16s %s\n' "$s" "${STATUS[$s]}"
  case "${STATUS[$s]}" in FAILED*) fail=1 ;; esac
done
echo "  results in $RES: $(cd "$RES" && ls | tr '\n' ' ')"
for f in $TAG-cpp.md $TAG-attention.md $TAG-linear.md; do
  if [ -f "$RES/$f" ]; then
    echo; echo "==== $f"; cat "$RES/$f"
  fi
done
exit $fail
