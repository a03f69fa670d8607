#!/usr/bin/env bash
# The main job, on the defaults: fetch the real sample scans, build medseg, describe the
# TotalSegmentator CT series and convert it to NIfTI with its exact geometry, then train the `tiny`
# model on the liver of the two sample CTs (configs/liver-ct-2d.toml) and segment the held-out one.
# (Synthetic lesions, segmentation and evaluation join this script as they land.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=datasets/cache/quickstart
mkdir -p "$out"

echo "== 1/5 fetch sample scans"
scripts/fetch-data.sh
echo "== 2/5 build medseg (release)"
cargo build --release --locked --quiet
medseg=target/release/medseg

echo "== 3/5 inspect and convert the CT series"
series=datasets/cache/totalsegmentator/example_ct_dicom
"$medseg" inspect "$series"
"$medseg" convert "$series" "$out/example_ct.nii.gz"
"$medseg" inspect "$out/example_ct.nii.gz"
echo "$out/example_ct.nii.gz lies on the grid of the series above"

echo "== 4/5 train the liver model (2D, tiny)"
run=runs/quickstart-liver-ct-2d
if [ -f "$run/checkpoints/last/state.json" ]; then
  "$medseg" train --resume "$run"
else
  "$medseg" train --config configs/liver-ct-2d.toml --set "output.dir=\"$run\""
fi
echo "metrics in $run/metrics.csv, curve in $run/training_curve.png, model in $run/checkpoints/best"

echo "== 5/5 segment the held-out DICOM series with the trained model"
"$medseg" segment --model "$run" "$series" --output "$out/segment" --overlay --skip-existing
echo "done: masks, lesion tables and overlays in $out/segment"
