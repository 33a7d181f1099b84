#!/usr/bin/env bash
# Builds tests/emulation/driver.cpp with the emulation runtime and
# kernels/selftest.cu (as build.rs compiles kernels) and runs it, once with the
# default context switch and once (without timings) with the ucontext fallback.
# Usage: tests/emulation/run.sh [--no-timings]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${TMPDIR:-/tmp}/cellmorph-emulation"
mkdir -p "$out"
flags=(-std=c++17 -O2 -Wall -Wextra -Werror -DCELLMORPH_EMULATION -I"$root/kernels")
for variant in default ucontext; do
  extra=()
  args=("$@")
  if [ "$variant" = ucontext ]; then
    extra=(-DCM_EMU_UCONTEXT)
    args=(--no-timings)
  fi
  g++ "${flags[@]}" "${extra[@]}" -o "$out/driver-$variant" \
    "$root/tests/emulation/driver.cpp" "$root/kernels/emulation/cuda_emu.cpp" \
    -x c++ "$root/kernels/selftest.cu" -pthread
  echo "== $variant context switch"
  "$out/driver-$variant" "${args[@]}"
done
