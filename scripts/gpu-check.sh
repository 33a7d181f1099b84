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
#                                #   densenet121  (not in "all") the DenseNet121
#                                #              fixture tests; carry gpu-stage-dn too
#                                # then a summary table; logs in $OUT or gpu-stage/logs
#
# With the device tool: stage here, then run with carry=["gpu-stage"] and the
# command `scripts/gpu-check.sh run` (or one part per call, since a call is
# limited to 10 minutes). Record the result in BENCHMARKS.md.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
stage="$root/gpu-stage"
mode="${1:-}"

# The device tool uploads at most 64 MiB (the working tree plus carried
# folders), so the stage holds only what runs there: the test binaries that
# have CUDA tests (their #[ignore]d tests), the benches and the cellmorph
# binary, stripped and xz-compressed (~2 MiB each), and the shared fixtures
# except DenseNet121's 30 MiB, which go to gpu-stage-dn/ with the two test
# binaries that read them, for a call of its own: carry ["gpu-stage-dn"]
# alone and run `scripts/gpu-check.sh run densenet121`.
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
  rm -rf "$stage" "$stage-dn"
  mkdir -p "$stage/tests" "$stage/benches" "$stage/bin" "$stage/shared/fixtures" "$stage-dn/shared/fixtures"
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
  mkdir -p "$stage-dn/tests"
  cargo test --release --no-run --message-format=json 2>/dev/null | list_executables lib test |
    while read -r name exe; do
      # Only binaries with ignored (= CUDA) tests need the GPU.
      if "$exe" --list --ignored 2>/dev/null | grep -q ': test$'; then
        pack "$exe" "$stage/tests/$name"
        # The DenseNet121 fixture tests run from gpu-stage-dn alone.
        case "$name" in densenet | precision_models) cp "$stage/tests/$name.xz" "$stage-dn/tests/" ;; esac
      fi
    done
  cargo bench --no-run --message-format=json 2>/dev/null | list_executables bench |
    while read -r name exe; do pack "$exe" "$stage/benches/$name"; done
  for f in "$root"/../shared/fixtures/*; do
    case "$(basename "$f")" in
      densenet121_kimhead.*) cp "$f" "$stage-dn/shared/fixtures/" ;;
      *) cp "$f" "$stage/shared/fixtures/" ;;
    esac
  done
  ls "$stage/tests" "$stage/benches" "$stage/bin"
  local tree stage_kib dn_kib
  tree=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -n 1 | cut -f1)
  stage_kib=$(du -sk "$stage" | cut -f1)
  dn_kib=$(du -sk "$stage-dn" | cut -f1)
  echo "upload: tree $((tree / 1024)) MiB + gpu-stage $((stage_kib / 1024)) MiB; gpu-stage-dn $((dn_kib / 1024)) MiB (carried alone)"
  if [ $(((tree + stage_kib) / 1024)) -gt "$stage_limit_mib" ] || [ $(((tree + dn_kib) / 1024)) -gt "$stage_limit_mib" ]; then
    echo "stage too large for the device upload (limit 64 MiB)"; exit 1
  fi
}

# Unpacks the staged binaries into $bin_dir (once per machine).
unpack() {
  bin_dir=/tmp/gpu-bin
  mkdir -p "$bin_dir/tests" "$bin_dir/benches" "$bin_dir/bin"
  for f in "$stage"/tests/*.xz "$stage"/benches/*.xz "$stage"/bin/*.xz "$stage"-dn/tests/*.xz; do
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

run_checks() {
  cd "$root"
  [ -d "$stage/tests" ] || [ -d "$stage-dn/tests" ] || { echo "no $stage/tests: run '$0 stage' on the build machine first"; exit 2; }
  logs="${OUT:-$stage/logs}"
  mkdir -p "$logs"
  # The binaries were built at /work/main with ../shared beside it; recreate those paths.
  if [ "$root" != /work/main ]; then
    mkdir -p /work && ln -sfn "$root" /work/main
  fi
  if [ ! -e /work/shared/fixtures ]; then
    mkdir -p /work/shared/fixtures
  fi
  for f in "$stage"/shared/fixtures/* "$stage"-dn/shared/fixtures/*; do
    # Never replace a real fixture (on the build machine they are the originals).
    [ -e "$f" ] && [ ! -e "/work/shared/fixtures/$(basename "$f")" ] && ln -s "$f" "/work/shared/fixtures/$(basename "$f")"
  done
  export CARGO_MANIFEST_DIR=/work/main
  unpack
  # Without the DenseNet121 fixture (carried separately), skip its tests.
  skip=()
  [ -e /work/shared/fixtures/densenet121_kimhead.weights.safetensors ] || skip=(--skip densenet121)
  summary=()
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$logs/gpu.txt"
  wants tests && for t in "$bin_dir"/tests/*; do
    name="$(basename "$t")"
    if "$t" --include-ignored --test-threads=1 "${skip[@]}" >"$logs/test-$name.log" 2>&1; then status=pass; else status=FAIL; fi
    skipped=$(grep -c "skipped: no CUDA device" "$logs/test-$name.log")
    result=$(grep -E "^test result:" "$logs/test-$name.log" | tail -n 1)
    summary+=("test      $name: $status ($result; cuda skips: $skipped)")
  done
  if ! wants sanitizer; then
    :
  elif command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
      for t in "$bin_dir"/tests/*; do
        name="$(basename "$t")"
        grep -q cuda <("$t" --list 2>/dev/null) || continue
        if compute-sanitizer --tool "$tool" --error-exitcode 99 "$t" cuda --include-ignored --test-threads=1 "${skip[@]}" \
          >"$logs/$tool-$name.log" 2>&1; then status=pass; else status=FAIL; fi
        summary+=("$tool $name: $status ($(grep -E 'ERROR SUMMARY' "$logs/$tool-$name.log" | tail -n 1))")
      done
    done
  else
    summary+=("compute-sanitizer: not found")
  fi
  wants benches && for b in "$bin_dir"/benches/*; do
    name="$(basename "$b")"
    if "$b" --bench --warm-up-time 1 --measurement-time 3 >"$logs/bench-$name.log" 2>&1; then status=pass; else status=FAIL; fi
    summary+=("bench     $name: $status")
  done
  if [[ ",$parts," == *",densenet121,"* ]]; then
    for t in "$bin_dir"/tests/densenet "$bin_dir"/tests/precision_models; do
      name="$(basename "$t")"
      if "$t" --include-ignored --test-threads=1 densenet121 >"$logs/test-dn-$name.log" 2>&1; then status=pass; else status=FAIL; fi
      summary+=("test      $name densenet121: $status ($(grep -E '^test result:' "$logs/test-dn-$name.log" | tail -n 1))")
    done
  fi
  if wants compare; then
    if python3 benches/compare/compare.py --cellmorph "$bin_dir/bin/cellmorph" --device cuda --fixtures /work/shared/fixtures \
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
