#!/usr/bin/env bash
# Runs every program in examples/ on the data in the repository, each as a
# tool builder would start it. The examples are built by `cargo test`
# (scripts/test.sh); this reuses those binaries (the test profile) and
# builds them if they are missing. A failing example fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
list="$(cargo test --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if (m.get("reason") == "compiler-artifact" and "example" in m["target"]["kind"]
            and not m["profile"]["test"] and m.get("executable")):
        print(m["target"]["name"], m["executable"])
')"
[ -n "$list" ] || { echo "no examples were built"; exit 1; }
while read -r name exe; do
  echo "-- example $name"
  "$exe"
done <<<"$list"
