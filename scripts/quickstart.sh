#!/usr/bin/env bash
# The main job, on the defaults: fetch the real sample scans, build medseg, describe the
# TotalSegmentator CT series and convert it to NIfTI with its exact geometry.
# (Training, segmentation and evaluation join this script as they land.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=datasets/cache/quickstart
mkdir -p "$out"

echo "== 1/3 fetch sample scans"
scripts/fetch-data.sh
echo "== 2/3 build medseg (release)"
cargo build --release --locked --quiet
medseg=target/release/medseg

echo "== 3/3 inspect and convert the CT series"
series=datasets/cache/totalsegmentator/example_ct_dicom
"$medseg" inspect "$series"
"$medseg" convert "$series" "$out/example_ct.nii.gz"
"$medseg" inspect "$out/example_ct.nii.gz"
echo "done: $out/example_ct.nii.gz lies on the grid of the series above"
