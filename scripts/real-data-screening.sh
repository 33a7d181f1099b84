#!/usr/bin/env bash
# The README's real-data example of the screening model, with cellmorph
# alone: the 160×160 nucleus tiles of scripts/real-data-example.sh (BBBC007,
# ExampleFly DNA channel, DSB2018, from their label masks) labelled "high"
# when their nucleus count is above the median of their data set, split by
# source image (every third image of each data set, in name order, is held
# out: no image has tiles on both sides), and two DenseNet-121 models:
#   - frozen: the seeded (random) backbone kept frozen, Kim's head trained on
#     its pooled features (stage 1 only): the baseline;
#   - scratch: the same, then every layer trained (stage 2, --unfreeze all).
# Both are scored on the held-out tiles (ROC AUC, F1, accuracy), with
# Grad-CAM++ overlays of the held-out tiles.
#
#   scripts/real-data-screening.sh [DATA_DIR [OUT_DIR]]
#     DATA_DIR   the shared data folder      [default: ../shared/data]
#     OUT_DIR    the output folder           [default: real-data-screening]
#   EPOCHS=N     head epochs (stage 1)       [default: 30]
#   FT_EPOCHS=N  all-layer epochs (stage 2)  [default: 5]
#   FT_LR=X      stage-2 learning rate       [default: 0.0003]
#   CELLMORPH=…  the binary                  [default: target/release/cellmorph, built if missing]
#
# Writes OUT_DIR/results.csv (model, tiles, auc, f1, accuracy, training
# seconds and images/s) and prints it; every intermediate file stays in
# OUT_DIR, and a rerun reuses what a finished step left there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
data="$(cd "${1:-$root/../shared/data}" && pwd)"
out="${2:-real-data-screening}"
epochs="${EPOCHS:-30}"
ft_epochs="${FT_EPOCHS:-5}"
ft_lr="${FT_LR:-0.0003}"
bin="${CELLMORPH:-$root/target/release/cellmorph}"
if [ ! -x "$bin" ]; then
    (cd "$root" && cargo build --release --bin cellmorph)
fi
mkdir -p "$out"

# 1. Tiles with their nucleus counts (as the expression example makes them).
"$root/scripts/real-data-images.sh" "$data" > "$out/images.csv"
[ -f "$out/tiles/samples.csv" ] ||
    "$bin" expression tiles --images "$out/images.csv" --output-dir "$out/tiles"

# 2. Labels (above the data set's median nucleus count) and the split by
#    source image. Paths in the lists are relative to tiles/, as in samples.csv.
awk -F, -v dir="$out/tiles" '
    function sort(a, n, i, j, t) { # insertion sort of a[1..n] (POSIX awk has none)
        for (i = 2; i <= n; i++) {
            t = a[i]
            for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]
            a[j + 1] = t
        }
    }
    FNR == 1 { next }
    FILENAME ~ /targets.csv$/ { nuclei[$1] = $2; next }
    { img[$1] = $2; batch[$1] = $3; src[$1] = $4; order[++n] = $1 }
    END {
        for (i = 1; i <= n; i++) {
            s = order[i]; b = batch[s]
            vals[b] = vals[b] " " nuclei[s]
            if (!((b, src[s]) in seen)) { seen[b, src[s]] = 1; srcs[b] = srcs[b] "\n" src[s] }
        }
        for (b in vals) {
            m = split(substr(vals[b], 2), v, " ")
            for (j = 1; j <= m; j++) v[j] += 0
            sort(v, m)
            median[b] = (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
            k = split(substr(srcs[b], 2), ss, "\n")
            sort(ss, k)
            for (j = 1; j <= k; j++) held[b, ss[j]] = (j % 3 == 0)
        }
        print "image,label,sample,batch,nuclei" > (dir "/train.csv")
        print "image,label,sample,batch,nuclei" > (dir "/test.csv")
        for (i = 1; i <= n; i++) {
            s = order[i]; b = batch[s]
            line = img[s] "," (nuclei[s] > median[b] ? "high" : "low") "," s "," b "," nuclei[s]
            print line > (dir (held[b, src[s]] ? "/test.csv" : "/train.csv"))
        }
    }' "$out/tiles/targets.csv" "$out/tiles/samples.csv"
train="$out/tiles/train.csv"
test="$out/tiles/test.csv"
echo "tiles: $(($(wc -l < "$train") - 1)) training, $(($(wc -l < "$test") - 1)) held out"

# 3. The two models. The summary JSON screen train prints holds the timing.
train_model() { # name, extra flags…
    local name="$1"
    shift
    [ -f "$out/$name.done" ] && return 0
    local t0 t1
    t0=$(date +%s.%N)
    "$bin" screen train --images "$train" --labels "$train" --output "$out/$name.safetensors" \
        --epochs "$epochs" --seed 0 "$@" | tee "$out/$name.log"
    t1=$(date +%s.%N)
    echo "$t0 $t1" > "$out/$name.done"
}
train_model frozen
train_model scratch --unfreeze all --unfreeze-epochs "$ft_epochs" --unfreeze-lr "$ft_lr"

# 4. Held-out scores and Grad-CAM++ overlays.
n_train=$(($(wc -l < "$train") - 1))
echo "model,train_tiles,test_tiles,auc,f1,accuracy,train_seconds" > "$out/results.csv"
for name in frozen scratch; do
    "$bin" screen predict --weights "$out/$name.safetensors" --images "$test" \
        --output "$out/$name.predictions.csv" --saliency gradcampp \
        --saliency-dir "$out/$name.saliency" --force
    "$bin" screen evaluate --predictions "$out/$name.predictions.csv" --labels "$test" \
        --output "$out/$name.report.json"
    read -r t0 t1 < "$out/$name.done"
    field() { grep -o "\"$1\": [0-9.e-]*" "$out/$name.report.json" | head -n 1 | sed 's/.*: //'; }
    awk -v name="$name" -v n="$n_train" -v nt="$(field n)" -v auc="$(field roc_auc)" \
        -v f1="$(field f1)" -v acc="$(field accuracy)" -v t0="$t0" -v t1="$t1" \
        'BEGIN { printf "%s,%d,%d,%.3f,%.3f,%.3f,%.0f\n", name, n, nt, auc, f1, acc, t1 - t0 }' \
        >> "$out/results.csv"
done
column -s, -t < "$out/results.csv"
