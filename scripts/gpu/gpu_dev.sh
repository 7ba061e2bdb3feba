#!/usr/bin/env bash
# Developer loop on the GPU machine (shorter than scripts/gpu/gpu_check.sh): build with CUDA into
# $SITE, run the cuda-marked tests of the given files, time the attention op against SDPA at a few
# lengths, then optional extra commands. Logs go to $OUT when set.
#   scripts/gpu/gpu_dev.sh [pytest files...]   env: LENGTHS (default 1024,8192,16384), EXTRA (a command)
set -uo pipefail
cd "$(dirname "$0")/../.."
SITE=${PANTHER_SITE:-/tmp/panther-site}
OUTD=${OUT:-/tmp/gpu-dev}
mkdir -p "$OUTD"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
t0=$SECONDS
PANTHER_WITH_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
  python3 -m pip install --no-build-isolation --no-deps --target "$SITE" --upgrade . \
  > "$OUTD/build.log" 2>&1 || { tail -60 "$OUTD/build.log"; exit 1; }
echo "build ok in $((SECONDS - t0)) s"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
files=${*:-tests/test_favor_attention.py}
timeout 240 python3 -m pytest -q -x -m cuda -p no:cacheprovider $files 2>&1 | tail -25 | tee "$OUTD/pytest.log"
timeout 200 python3 bench/python/bench_attention.py --device cuda --lengths "${LENGTHS:-1024,8192,16384}" \
  --markdown "$OUTD/attention.md" 2>&1 | tail -40
if [ -n "${EXTRA:-}" ]; then bash -c "$EXTRA"; fi
echo "total $((SECONDS - t0)) s"
