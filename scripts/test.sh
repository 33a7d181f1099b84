#!/usr/bin/env bash
# The test command: installs nvcc if needed, builds with every kernel compiled
# by nvcc (fatal if one fails or spills registers) and compiled as host C++
# for the emulated device, then runs all tests (unit, integration, doctests).
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="$(scripts/install-cuda-toolchain.sh)"
export NVCC
export CELLMORPH_REQUIRE_NVCC=1 CELLMORPH_DENY_SPILLS=1
exec cargo test "$@"
