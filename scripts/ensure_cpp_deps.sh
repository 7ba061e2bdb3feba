#!/usr/bin/env bash
# Installs the system packages the C++ tests and benchmarks need (GoogleTest, Google Benchmark)
# when they are missing. Where no package manager can install them, says what to install; the
# Python side builds and tests without them (the C++ targets are then skipped).
set -u
have() { [ -f "$1" ]; }
missing=()
have /usr/include/gtest/gtest.h || missing+=(libgtest-dev)
have /usr/include/benchmark/benchmark.h || missing+=(libbenchmark-dev)
[ ${#missing[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing ${missing[*]} (C++ tests and benchmarks)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/tmp/panther-apt.log 2>&1 \
    || echo "setup: could not install ${missing[*]} (see /tmp/panther-apt.log); C++ tests/benchmarks will be skipped"
else
  echo "setup: ${missing[*]} not installed; install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) to build the C++ tests and benchmarks"
fi
exit 0
