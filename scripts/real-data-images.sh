#!/usr/bin/env bash
# Prints the image list of the real-data examples (CSV: image, labels,
# batch): the nucleus images of the shared data set with their label masks,
# BBBC007 (14 DNA-stain images), ExampleFly's DNA channel (3 fields) and the
# DSB2018 image.
#
#   scripts/real-data-images.sh DATA_DIR
set -euo pipefail
data="$1"
echo "image,labels,batch"
for f in "$data"/bbbc007/*/*.png; do
    case "$f" in *_labels.png) ;; *) echo "$f,${f%.png}_labels.png,bbbc007" ;; esac
done
for p in 002 076 218; do
    echo "$data/examplefly/01_POS${p}_D.png,$data/examplefly/nuclei_labels/01_POS${p}_nuclei.png,examplefly"
done
echo "$data/stardist_dsb2018/img2d.png,$data/stardist_dsb2018/mask2d.png,dsb2018"
