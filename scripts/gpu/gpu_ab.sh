#!/usr/bin/env bash
# Developer A/B on the GPU machine: builds this tree (B) and this tree with the files of
# $AB_BASE_DIR (default .ab-base/, same relative paths) copied over it (A), then runs
# scripts/gpu/ab_timing.py for each, interleaved A B A B. Optional: AB_TESTS="pytest args" runs the
# cuda tests on B first. Logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUTD=${OUT:-/tmp/gpu-ab}; mkdir -p "$OUTD"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
BASE=${AB_BASE_DIR:-.ab-base}
build() {  # site
  PANTHER_WITH_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
    python3 -m pip install --no-build-isolation --no-deps --target "$1" --upgrade . \
    > "$OUTD/build-$(basename $1).log" 2>&1 || { tail -60 "$OUTD/build-$(basename $1).log"; exit 1; }
}
t0=$SECONDS
build /tmp/site-B; echo "built B in $((SECONDS - t0)) s"
if [ -n "${AB_TESTS:-}" ]; then
  PYTHONPATH=/tmp/site-B timeout 300 python3 -m pytest -q -x -p no:cacheprovider $AB_TESTS 2>&1 | tail -15
fi
have_a=0
if [ -d "$BASE" ]; then
  rm -rf /tmp/ab-keep; mkdir -p /tmp/ab-keep
  (cd "$BASE" && find . -type f) | while read -r f; do mkdir -p "/tmp/ab-keep/$(dirname $f)"; cp "$f" "/tmp/ab-keep/$f"; cp "$BASE/$f" "$f"; done
  build /tmp/site-A; echo "built A in $((SECONDS - t0)) s"; have_a=1
  cp -r /tmp/ab-keep/. .  # the tree as it was (B's files)
fi
for r in 1 2; do
  [ $have_a = 1 ] && PYTHONPATH=/tmp/site-A python3 scripts/gpu/ab_timing.py A 2>&1 | grep -v Warning
  PYTHONPATH=/tmp/site-B python3 scripts/gpu/ab_timing.py B 2>&1 | grep -v Warning
done
if [ -n "${EXTRA:-}" ]; then PYTHONPATH=/tmp/site-B bash -c "$EXTRA"; fi
echo "total $((SECONDS - t0)) s"
