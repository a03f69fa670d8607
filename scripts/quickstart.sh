#!/usr/bin/env bash
# The main job, on the defaults in configs/: fetch the real sample scans, build medseg, insert
# synthetic brain tumours into real T1 MR scans (Colin27 and MNI152 for training, ITK's T1 for
# testing), train the `tiny` model, segment the test scans and evaluate against their tumour labels.
# A second run reuses the fetched scans, the synthetic dataset, the preprocessed cases, the trained
# model and the masks already written.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data=datasets/cache/brain-mr
run=runs/quickstart-brain-mr
out=runs/quickstart-brain-mr/test
started=$SECONDS

echo "== 1/6 fetch the sample scans"
scripts/fetch-data.sh
echo "== 2/6 build medseg (release)"
cargo build --release --locked
medseg=target/release/medseg
stage=$SECONDS

echo "== 3/6 insert synthetic brain tumours into the sample MRs (configs/synth-brain-mr.toml)"
"$medseg" synth --config configs/synth-brain-mr.toml --output "$data"

echo "== 4/6 train the tiny model (configs/quickstart-brain-mr.toml)"
if [ -f "$run/checkpoints/last/state.json" ]; then
  "$medseg" train --resume "$run"
else
  "$medseg" train --config configs/quickstart-brain-mr.toml
fi

echo "== 5/6 segment the test scans (a host the model never saw)"
"$medseg" segment --model "$run" "$data/imagesTs" --output "$out/masks" --overlay --skip-existing

echo "== 6/6 evaluate against the inserted tumours"
"$medseg" evaluate --pred "$out/masks" --truth "$data/labelsTs" --images "$data/imagesTs" \
  --output "$out/evaluation" | tee "$out/summary.txt"

cat <<EOF | tee -a "$out/summary.txt"

quickstart done in $((SECONDS - started)) s ($((SECONDS - stage)) s after the build)
  synthetic dataset  $data (dataset.json, lesions.json)
  model              $run/checkpoints/best (training curve $run/training_curve.png)
  masks              $out/masks (NAME.nii.gz, NAME_lesions.csv, NAME_overlay.png)
  report             $out/evaluation/report.md
EOF
