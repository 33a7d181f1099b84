#!/usr/bin/env bash
# The README's real-data example of the expression study, with cellmorph
# alone: the real nucleus images of the shared data set (BBBC007, ExampleFly
# DNA channel, DSB2018) cut into 160×160 tiles whose targets come from the
# label masks (fractional nucleus count, foreground fraction, mean
# intensity); a VQ-VAE-2 made by `vqvae2 init` (k-means++ codebooks, no
# training) and the same network after `vqvae2 train`; profiles of every
# tile; and out-of-fold R² of the per-target linear SVR:
#   - pooled over the three data sets, folds grouped by source image;
#   - within BBBC007 and within ExampleFly, shuffled folds over the tiles;
#   - leave one data set out, without and with per-batch correction.
#
#   scripts/real-data-example.sh [DATA_DIR [OUT_DIR]]
#     DATA_DIR   the shared data folder   [default: ../shared/data]
#     OUT_DIR    the output folder        [default: real-data-example]
#   STEPS=N      training steps           [default: 300]
#   BATCH=N      patches per step         [default: 16]
#   CELLMORPH=…  the binary               [default: target/release/cellmorph, built if missing]
#
# Writes OUT_DIR/results.csv (weights, scheme, correction, target, pearson_r,
# R2, r2_score), OUT_DIR/codes.csv (weights, reconstruction MSE in 8-bit
# units over every tile, live codes per level over every tile) and
# OUT_DIR/categories.csv (weights, folds, accuracy of an RBF SVM on
# sparse/medium/dense tiles, nucleus-count tertiles), t-SNE and Ward plots
# of the profiles (tsne_*.png, clusters_*.png); prints the tables. Every
# intermediate file stays in OUT_DIR.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
data="$(cd "${1:-$root/../shared/data}" && pwd)"
out="${2:-real-data-example}"
steps="${STEPS:-300}"
batch="${BATCH:-16}"
bin="${CELLMORPH:-$root/target/release/cellmorph}"
if [ ! -x "$bin" ]; then
    (cd "$root" && cargo build --release --bin cellmorph)
fi
# Rerunning with the same OUT_DIR reuses the tiles and weights already there
# (a long run resumes where it stopped; training resumes from its checkpoint).
mkdir -p "$out"

# 1. The tile list (image, mask, batch) and the full-image training list.
"$root/scripts/real-data-images.sh" "$data" > "$out/images.csv"
{
    echo "sample,image"
    tail -n +2 "$out/images.csv" | while IFS=, read -r img _ _; do
        echo "$(basename "${img%.png}"),$img"
    done
} > "$out/train_images.csv"

# 2. Tiles with mask targets.
[ -f "$out/tiles/samples.csv" ] ||
    "$bin" expression tiles --images "$out/images.csv" --output-dir "$out/tiles"
samples="$out/tiles/samples.csv"
targets="$out/tiles/targets.csv"

# 3. Weights: k-means-seeded (untrained), then trained from them.
[ -f "$out/init.safetensors" ] ||
    "$bin" vqvae2 init --samples "$out/train_images.csv" --output "$out/init.safetensors"
if [ ! -f "$out/trained.done" ]; then
    resume=(--init "$out/init.safetensors")
    [ -f "$out/trained.checkpoint.safetensors" ] &&
        resume=(--resume "$out/trained.checkpoint.safetensors")
    "$bin" vqvae2 train "${resume[@]}" --samples "$out/train_images.csv" \
        --steps "$steps" --batch-size "$batch" --steps-per-epoch 50 \
        --output "$out/trained.safetensors"
    echo "$steps steps, batch $batch" > "$out/trained.done"
fi

echo "weights,scheme,correction,target,pearson_r,R2,r2_score" > "$out/results.csv"
echo "weights,mse_8bit,live_top,live_bottom,codes" > "$out/codes.csv"
echo "weights,folds,accuracy" > "$out/categories.csv"
# Density categories for the SVM: nucleus-count tertiles over all tiles.
tail -n +2 "$targets" | cut -d, -f2 | sort -g > "$out/nuclei_sorted.txt"
n_tiles=$(wc -l < "$out/nuclei_sorted.txt")
t1=$(sed -n "$((n_tiles / 3 + 1))p" "$out/nuclei_sorted.txt")
t2=$(sed -n "$((2 * n_tiles / 3 + 1))p" "$out/nuclei_sorted.txt")
awk -F, -v a="$t1" -v b="$t2" 'NR == 1 { print "sample,label"; next }
    { print $1 "," ($2 < a ? "sparse" : ($2 < b ? "medium" : "dense")) }' "$targets" > "$out/density.csv"
grid=(--c 0.001,0.01,0.1,1,10 --epsilon 0.01,0.1)
for w in init trained; do
    # 4. Profiles (and reconstruction MSE) of every tile.
    "$bin" profile --samples "$samples" --weights "$out/$w.safetensors" \
        --output "$out/profiles_$w.csv" --counts "$out/counts_$w.csv" --mse 2>&1 |
        tee "$out/profile_$w.log"
    mse=$(grep -o 'units): [0-9.]*' "$out/profile_$w.log" | grep -o '[0-9.]*$' | tail -n 1)
    awk -F, -v w="$w" -v mse="${mse:-NA}" '
        NR == 1 { for (i = 4; i <= NF; i++) name[i] = $i; next }
        { for (i = 4; i <= NF; i++) total[i] += $i }
        END {
            for (i in total) {
                if (name[i] ~ /^top/) { k++; if (total[i] > 0) t++ }
                else if (total[i] > 0) b++
            }
            printf "%s,%s,%d,%d,%d\n", w, mse, t, b, k
        }' "$out/counts_$w.csv" >> "$out/codes.csv"
    # Sparse/medium/dense tiles by an RBF SVM, stratified 5-fold accuracy.
    acc=$("$bin" svm grid --features "$out/profiles_$w.csv" --labels "$out/density.csv" \
        --c 0.1,1,10,100 --gamma scale,0.001,0.01,0.1,1 --folds 5 --output "$out/svm_$w.json" \
        --confusion "$out/confusion_$w.csv" --plot "$out/confusion_$w.png" 2>&1 |
        tee "$out/svm_$w.log" | grep -o 'mean cv accuracy [0-9.]*' | grep -o '[0-9.]*$' | tail -n 1)
    echo "$w,5,${acc:-NA}" >> "$out/categories.csv"
    # t-SNE of the profiles coloured by data set; Ward clusters of the tiles.
    "$bin" tsne --features "$out/profiles_$w.csv" --output "$out/tsne_$w.csv" \
        --plot "$out/tsne_$w.png" --color-by batch --labels "$samples" > /dev/null
    "$bin" cluster --features "$out/profiles_$w.csv" --k 3 --output "$out/clusters_$w.csv" \
        --plot "$out/clusters_$w.png" > /dev/null
    # 5. Out-of-fold predictions: pooled with folds grouped by image; leave
    #    one data set out without and with per-batch correction.
    run_cv() { # name, correction, cv flags…
        local name="$1" corr="$2"
        shift 2
        local extra=()
        [ "$corr" = none ] || extra=(--batch-correct "$corr" --batches "$samples" --batch-column batch)
        "$bin" svr cv --features "$out/profiles_$w.csv" --expression "$targets" "${grid[@]}" \
            "$@" "${extra[@]}" --output "$out/oof_${w}_${name}_$corr.csv" \
            --summary "$out/scores_${w}_${name}_$corr.csv" > /dev/null
        tail -n +2 "$out/scores_${w}_${name}_$corr.csv" |
            awk -F, -v w="$w" -v s="$name" -v c="$corr" \
                '{ printf "%s,%s,%s,%s,%.4f,%.4f,%.4f\n", w, s, c, $1, $3, $4, $5 }' \
                >> "$out/results.csv"
    }
    run_cv pooled_by_image none --groups "$samples" --group-column source --folds 5
    # Within one data set: shuffled 5-fold CV over its tiles (the usual
    # within-batch number; tiles of one image fall on both sides).
    for b in bbbc007 examplefly; do
        awk -F, -v b="$b" 'NR == FNR { if ($3 == b) keep[$1] = 1; next }
            FNR == 1 || keep[$1]' "$samples" "$targets" > "$out/targets_$b.csv"
        targets_all="$targets"
        targets="$out/targets_$b.csv"
        run_cv "within_$b" none --shuffle --seed 0 --folds 5
        targets="$targets_all"
    done
    for corr in none center standardize; do
        run_cv leave_one_dataset_out "$corr" --groups "$samples" --group-column batch \
            --leave-one-group-out
    done
done
for f in codes categories results; do
    echo "== $f"
    column -s, -t < "$out/$f.csv"
done
