#!/usr/bin/env bash
# GPU verification in two steps, because the GPU machines have no Rust toolchain.
#
#   scripts/gpu-check.sh stage   # here: build release test and bench binaries
#                                # with the kernels compiled, copy them and the
#                                # fixtures into gpu-stage/ (git-ignored)
#   scripts/gpu-check.sh run [PARTS]
#                                # there (repo root, gpu-stage/ carried along):
#                                # PARTS (comma-separated, default all):
#                                #   tests      every test binary with --include-ignored
#                                #   sanitizer  compute-sanitizer memcheck + racecheck
#                                #              over the tests that name cuda
#                                #   benches    the criterion benches (short)
#                                #   compare    benches/compare/compare.py: side by
#                                #              side with PyTorch (and scikit-learn)
#                                # then a summary table; logs in $OUT or gpu-stage/logs
#
# With the device tool: stage here, then run with carry=["gpu-stage"] and the
# command `scripts/gpu-check.sh run` (or one part per call, since a call is
# limited to 10 minutes). Record the result in BENCHMARKS.md.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
stage="$root/gpu-stage"
mode="${1:-}"

stage_binaries() {
  set -e
  cd "$root"
  NVCC="$(scripts/install-cuda-toolchain.sh)"
  export NVCC CELLMORPH_REQUIRE_NVCC=1 CELLMORPH_DENY_SPILLS=1
  rm -rf "$stage"
  mkdir -p "$stage/tests" "$stage/benches" "$stage/bin" "$stage/shared/fixtures"
  cargo build --release --bin cellmorph
  cp target/release/cellmorph "$stage/bin/cellmorph"
  list_executables() {
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
'
  }
  cargo test --release --no-run --message-format=json 2>/dev/null | list_executables |
    while read -r name exe; do cp "$exe" "$stage/tests/$name"; done
  cargo bench --no-run --message-format=json 2>/dev/null | list_executables |
    while read -r name exe; do cp "$exe" "$stage/benches/$name"; done
  cp "$root"/../shared/fixtures/*.safetensors "$root"/../shared/fixtures/*.json \
    "$root"/../shared/fixtures/*.csv "$stage/shared/fixtures/" 2>/dev/null || true
  du -sh "$stage"
  ls "$stage/tests" "$stage/benches" "$stage/bin"
}

# Whether PARTS (comma-separated, or "all") includes $1.
wants() {
  [ "$parts" = all ] || [[ ",$parts," == *",$1,"* ]]
}

run_checks() {
  cd "$root"
  [ -d "$stage/tests" ] || { echo "no $stage/tests: run '$0 stage' on the build machine first"; exit 2; }
  logs="${OUT:-$stage/logs}"
  mkdir -p "$logs"
  # The binaries were built at /work/main with ../shared beside it; recreate those paths.
  if [ "$root" != /work/main ]; then
    mkdir -p /work && ln -sfn "$root" /work/main
  fi
  [ -e /work/shared ] || ln -sfn "$stage/shared" /work/shared
  export CARGO_MANIFEST_DIR=/work/main
  summary=()
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$logs/gpu.txt"
  wants tests && for t in "$stage"/tests/*; do
    name="$(basename "$t")"
    if "$t" --include-ignored --test-threads=1 >"$logs/test-$name.log" 2>&1; then status=pass; else status=FAIL; fi
    skipped=$(grep -c "skipped: no CUDA device" "$logs/test-$name.log")
    result=$(grep -E "^test result:" "$logs/test-$name.log" | tail -n 1)
    summary+=("test      $name: $status ($result; cuda skips: $skipped)")
  done
  if ! wants sanitizer; then
    :
  elif command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
      for t in "$stage"/tests/*; do
        name="$(basename "$t")"
        grep -q cuda <("$t" --list 2>/dev/null) || continue
        if compute-sanitizer --tool "$tool" --error-exitcode 99 "$t" cuda --include-ignored --test-threads=1 \
          >"$logs/$tool-$name.log" 2>&1; then status=pass; else status=FAIL; fi
        summary+=("$tool $name: $status ($(grep -E 'ERROR SUMMARY' "$logs/$tool-$name.log" | tail -n 1))")
      done
    done
  else
    summary+=("compute-sanitizer: not found")
  fi
  wants benches && for b in "$stage"/benches/*; do
    name="$(basename "$b")"
    if "$b" --bench --warm-up-time 1 --measurement-time 3 >"$logs/bench-$name.log" 2>&1; then status=pass; else status=FAIL; fi
    summary+=("bench     $name: $status")
  done
  if wants compare; then
    if python3 benches/compare/compare.py --cellmorph "$stage/bin/cellmorph" --device cuda \
      --workdir "$logs/compare-work" --json-out "$logs/compare.json" --append "$logs/compare-section.md" \
      >"$logs/compare.log" 2>&1; then
      status=pass
    else
      status="FAIL (rows failed or harness error; see compare.log)"
    fi
    summary+=("compare   benches/compare/compare.py: $status")
    rm -rf "$logs/compare-work"
  fi
  echo
  echo "== summary"
  printf '%s\n' "${summary[@]}" | tee "$logs/summary.txt"
}

case "$mode" in
  stage) stage_binaries ;;
  run)
    parts="${2:-all}"
    run_checks
    ;;
  *) echo "usage: $0 stage|run"; exit 2 ;;
esac
