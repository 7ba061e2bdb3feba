#!/usr/bin/env bash
# Copies this machine's Google Benchmark (Debian libbenchmark-dev: headers + shared library)
# into .carry/benchmark/{include,lib}, so the GPU machine, which has no package manager, can
# build bench/cpp: carry the ignored path .carry/benchmark along with the working tree;
# scripts/gpu/gpu_check.sh picks it up (PANTHER_BENCHMARK_ROOT). Plain files only (no symlinks).
set -euo pipefail
cd "$(dirname "$0")/../.."
inc=/usr/include/benchmark
lib=$(ls /usr/lib/x86_64-linux-gnu/libbenchmark.so.[0-9]*.[0-9]* 2>/dev/null | head -1 || true)
if [ ! -f "$inc/benchmark.h" ] || [ -z "$lib" ]; then
  echo "Google Benchmark not installed here (apt-get install libbenchmark-dev)"; exit 1
fi
soname=$(readelf -d "$lib" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')
dst=.carry/benchmark
rm -rf "$dst"; mkdir -p "$dst/include" "$dst/lib"
cp -r "$inc" "$dst/include/"
cp "$lib" "$dst/lib/libbenchmark.so"            # link-time name
[ -n "$soname" ] && cp "$lib" "$dst/lib/$soname"  # run-time name (the SONAME)
du -sh "$dst"; find "$dst" -type f
