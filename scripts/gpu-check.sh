#!/usr/bin/env bash
# GPU verification in two steps, because the GPU machines have no Rust toolchain.
#
#   scripts/gpu-check.sh stage   # here: build release test and bench binaries
#                                # with the kernels compiled, pack them into
#                                # gpu-stage/ (git-ignored, well under the
#                                # device's 64 MiB upload)
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
# One device call does it all: stage here, then run with carry=["gpu-stage"],
# timeout_s=600 and the command `scripts/gpu-check.sh run`. Each part has a
# time budget (GPU_CHECK_BUDGET seconds in all, default 540, split
# tests 25 %, sanitizer 35 %, benches 15 %, compare 25 %); a part that runs
# out is stopped and reported as TIMEOUT, never as passed. Every fixture the
# tests and the comparison read is in the repository (tests/fixtures, the
# paper-size ones seeded). Record the result in BENCHMARKS.md.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
stage="$root/gpu-stage"
mode="${1:-}"

# The device tool uploads at most 64 MiB (the working tree plus carried
# folders), so the stage holds only what runs there: the test binaries that
# have CUDA tests (their #[ignore]d tests), the benches and the cellmorph
# binary, stripped and xz-compressed (~2 MiB each).
stage_limit_mib=60

pack() {  # pack SRC DEST: strip a copy of SRC and xz it to DEST.xz
  cp "$1" "$2"
  strip --strip-debug "$2" 2>/dev/null || true
  xz -T0 -9 -f "$2"
}

stage_binaries() {
  set -e
  cd "$root"
  NVCC="$(scripts/install-cuda-toolchain.sh)"
  export NVCC CELLMORPH_REQUIRE_NVCC=1 CELLMORPH_DENY_SPILLS=1
  rm -rf "$stage"
  mkdir -p "$stage/tests" "$stage/benches" "$stage/bin"
  cargo build --release --bin cellmorph
  pack target/release/cellmorph "$stage/bin/cellmorph"
  list_executables() {
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kind = m["target"]["kind"][0]
        name = m["target"]["name"] if kind != "lib" else "lib"
        if kind in sys.argv[1:]:
            print(name, m["executable"])
' "$@"
  }
  cargo test --release --no-run --message-format=json 2>/dev/null | list_executables lib test |
    while read -r name exe; do
      # Only binaries with ignored (= CUDA) tests need the GPU.
      if "$exe" --list --ignored 2>/dev/null | grep -q ': test$'; then
        pack "$exe" "$stage/tests/$name"
      fi
    done
  cargo bench --no-run --message-format=json 2>/dev/null | list_executables bench |
    while read -r name exe; do pack "$exe" "$stage/benches/$name"; done
  ls "$stage/tests" "$stage/benches" "$stage/bin"
  local tree stage_kib
  tree=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -n 1 | cut -f1)
  stage_kib=$(du -sk "$stage" | cut -f1)
  echo "upload: tree $((tree / 1024)) MiB + gpu-stage $((stage_kib / 1024)) MiB"
  if [ $(((tree + stage_kib) / 1024)) -gt "$stage_limit_mib" ]; then
    echo "stage too large for the device upload (limit 64 MiB)"; exit 1
  fi
}

# Unpacks the staged binaries into $bin_dir (once per machine).
unpack() {
  bin_dir=/tmp/gpu-bin
  mkdir -p "$bin_dir/tests" "$bin_dir/benches" "$bin_dir/bin"
  for f in "$stage"/tests/*.xz "$stage"/benches/*.xz "$stage"/bin/*.xz; do
    [ -e "$f" ] || continue
    out="$bin_dir/$(basename "$(dirname "$f")")/$(basename "$f" .xz)"
    [ -x "$out" ] && continue
    if command -v xz >/dev/null; then
      xz -dc "$f" >"$out"
    else
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$out"
    fi
    chmod +x "$out"
  done
}

# Whether PARTS (comma-separated, or "all") includes $1.
wants() {
  [ "$parts" = all ] || [[ ",$parts," == *",$1,"* ]]
}

# timed LIMIT CMD…: runs CMD for at most LIMIT seconds; sets $status to
# pass, FAIL or TIMEOUT.
timed() {
  local limit=$1; shift
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  case $? in
    0) status=pass ;;
    124 | 137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
}

# part_budget PERCENT: that share of the budget, in seconds.
part_budget() {
  local share=$1
  echo $((budget * share / 100))
}

run_checks() {
  cd "$root"
  [ -d "$stage/tests" ] || { echo "no $stage/tests: run '$0 stage' on the build machine first"; exit 2; }
  logs="${OUT:-$stage/logs}"
  mkdir -p "$logs"
  budget="${GPU_CHECK_BUDGET:-540}"
  # The binaries were built at /work/main: their fixture paths point there.
  if [ "$root" != /work/main ]; then
    mkdir -p /work && ln -sfn "$root" /work/main
  fi
  export CARGO_MANIFEST_DIR=/work/main
  unpack
  # The CLI tests run the binary cargo built them against
  # (/work/main/target/release/cellmorph, compiled into them): the staged one.
  if [ ! -x /work/main/target/release/cellmorph ]; then
    mkdir -p /work/main/target/release
    ln -sfn "$bin_dir/bin/cellmorph" /work/main/target/release/cellmorph
  fi
  summary=()
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$logs/gpu.txt"
  if wants tests; then
    end=$((SECONDS + $(part_budget 25)))
    for t in "$bin_dir"/tests/*; do
      name="$(basename "$t")"
      left=$((end - SECONDS))
      if [ "$left" -le 0 ]; then summary+=("test      $name: TIMEOUT (not started)"); continue; fi
      timed "$left" "$t" --include-ignored --test-threads=1 >"$logs/test-$name.log" 2>&1
      skipped=$(grep -c "skipped: no CUDA device" "$logs/test-$name.log")
      result=$(grep -E "^test result:" "$logs/test-$name.log" | tail -n 1)
      summary+=("test      $name: $status ($result; cuda skips: $skipped)")
    done
  fi
  if ! wants sanitizer; then
    :
  elif command -v compute-sanitizer >/dev/null; then
    end=$((SECONDS + $(part_budget 35)))
    for tool in memcheck racecheck; do
      for t in "$bin_dir"/tests/*; do
        name="$(basename "$t")"
        grep -q cuda <("$t" --list 2>/dev/null) || continue
        left=$((end - SECONDS))
        if [ "$left" -le 0 ]; then summary+=("$tool $name: TIMEOUT (not started)"); continue; fi
        timed "$left" compute-sanitizer --tool "$tool" --error-exitcode 99 "$t" cuda --include-ignored --test-threads=1 \
          >"$logs/$tool-$name.log" 2>&1
        summary+=("$tool $name: $status ($(grep -E 'ERROR SUMMARY' "$logs/$tool-$name.log" | tail -n 1))")
      done
    done
  else
    summary+=("compute-sanitizer: not found")
  fi
  if wants benches; then
    end=$((SECONDS + $(part_budget 15)))
    for b in "$bin_dir"/benches/*; do
      name="$(basename "$b")"
      left=$((end - SECONDS))
      if [ "$left" -le 0 ]; then summary+=("bench     $name: TIMEOUT (not started)"); continue; fi
      timed "$left" "$b" --bench --warm-up-time 1 --measurement-time 2 >"$logs/bench-$name.log" 2>&1
      summary+=("bench     $name: $status")
    done
  fi
  if wants compare; then
    timed "$(part_budget 25)" python3 benches/compare/compare.py --cellmorph "$bin_dir/bin/cellmorph" --device cuda \
      --workdir "$logs/compare-work" --json-out "$logs/compare.json" --append "$logs/compare-section.md" \
      >"$logs/compare.log" 2>&1
    [ "$status" = FAIL ] && status="FAIL (rows failed or harness error; see compare.log)"
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
