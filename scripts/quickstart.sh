#!/usr/bin/env bash
# The main job, on the defaults in configs/: fetch the real sample scans, build medseg, synthesise
# domain-randomised focal brain lesions in real MR hosts (Colin27 and MNI152 for training, ITK's T1
# for testing), train the `tiny` model (its stem doubled) to find the brain and its lesions, segment
# the test scans (lesions outside the brain dropped) and evaluate; then do the same on a shifted
# test set (ITK's T1 in 5-7 mm slices with redrawn contrasts). A second run reuses the fetched
# scans, the synthetic datasets, the preprocessed cases, the trained model and the masks already
# written.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data=datasets/cache/brain-mr
shifted=datasets/cache/brain-mr-shifted
run=runs/quickstart-brain-mr
out=runs/quickstart-brain-mr/test
out_shifted=runs/quickstart-brain-mr/test-shifted
started=$SECONDS

# Every prerequisite first, so a missing one stops the run in seconds, not after the build.
scripts/prereqs.sh
echo "== 1/7 fetch the sample scans (and NiiVue, the review page's viewer)"
scripts/fetch-data.sh
scripts/fetch-viewer.sh
echo "== 2/7 build medseg (release)"
cargo build --release --locked
medseg=target/release/medseg
stage=$SECONDS

echo "== 3/7 synthesise randomised brain lesions in the sample MRs (configs/synth-brain-mr*.toml)"
"$medseg" synth --config configs/synth-brain-mr.toml --output "$data"
"$medseg" synth --config configs/synth-brain-mr-shifted.toml --output "$shifted"

echo "== 4/7 train the model (configs/quickstart-brain-mr.toml)"
if [ -f "$run/checkpoints/last/state.json" ]; then
  "$medseg" train --resume "$run"
else
  "$medseg" train --config configs/quickstart-brain-mr.toml
fi

# --uncertainty runs the 4 mirrored passes as an ensemble (test-time augmentation): an
# uncertainty map and per-lesion agreement beside every mask; the overlays also show attention.
echo "== 5/7 segment the test scans (a host the model never saw), and its shifted versions"
"$medseg" segment --model "$run" "$data/imagesTs" --output "$out/masks" --skip-existing \
  --overlay --uncertainty --attention --save-probabilities
"$medseg" segment --model "$run" "$shifted/imagesTs" --output "$out_shifted/masks" --skip-existing \
  --overlay --uncertainty --save-probabilities
# Two more passes over the test scans serve three checks on the real model. In the first,
# out-of-brain findings are only flagged and nothing else changes, so it must not have fewer false
# positives than the run that drops them. The second keeps every finding (no confidence cut-off),
# with per-pass agreement for the uncertainty trend below, and its probabilities are not
# temperature-scaled: the main report compares their calibration.
"$medseg" segment --model "$run" "$data/imagesTs" --output "$out/masks-roi-off" --skip-existing --tta \
  --set segment.roi.drop_outside=false --quiet >/dev/null
"$medseg" segment --model "$run" "$data/imagesTs" --output "$out/masks-all" --skip-existing \
  --uncertainty --save-probabilities --set segment.min_confidence=0 --set segment.temperature=1 \
  --quiet >/dev/null

# Lesion-wise scores for the lesion class only; the brain (label 2) gets Dice and surface metrics.
echo "== 6/7 evaluate against the inserted lesions"
"$medseg" evaluate --pred "$out/masks" --truth "$data/labelsTs" --images "$data/imagesTs" \
  --set "evaluate.lesion_classes=[1]" --output "$out/evaluation" --review \
  --compare-calibration "$out/masks-all" | tee "$out/summary.txt"

echo "== 7/7 evaluate on the shifted test set (5-7 mm slices, redrawn contrasts, every polarity)"
"$medseg" evaluate --pred "$out_shifted/masks" --truth "$shifted/labelsTs" --images "$shifted/imagesTs" \
  --set "evaluate.lesion_classes=[1]" --output "$out_shifted/evaluation" | tee "$out_shifted/summary.txt"

# The region-of-interest stage on the real model: flagging only must not give fewer false positives.
"$medseg" evaluate --pred "$out/masks-roi-off" --truth "$data/labelsTs" --images "$data/imagesTs" \
  --set "evaluate.lesion_classes=[1]" --output "$out/evaluation-roi-off" >"$out/summary-roi-off.txt"

fp() { sed -n 's/.*TP, \([0-9]*\) FP.*/\1/p' "$1" | head -n 1; }
fp_on=$(fp "$out/summary.txt")
fp_off=$(fp "$out/summary-roi-off.txt")
echo "ROI stage: $fp_on false positives with out-of-brain findings dropped, $fp_off without" | tee -a "$out/summary.txt"
if [ -z "$fp_on" ] || [ -z "$fp_off" ] || [ "$fp_on" -gt "$fp_off" ]; then
  echo "error: the ROI stage did not lower the false positives ($fp_on vs $fp_off)" >&2
  exit 1
fi

# Uncertainty on the real model: lesions that every mirrored pass finds are more confident than
# those some passes miss (a trend over the test split, not a per-lesion rule), on the pass that
# keeps every finding: the operating point drops most of the latter.
python3 - "$out/masks-all" <<'PY' | tee -a "$out/summary.txt"
import glob, json, sys
rows = [l for f in glob.glob(sys.argv[1] + "/*_lesions.json")
        for l in json.load(open(f))["lesions"]
        if l["class"] == 1 and l.get("detection_agreement") is not None]
every = [l["confidence"] for l in rows if l["detection_agreement"] >= 1.0]
some = [l["confidence"] for l in rows if l["detection_agreement"] < 1.0]
mean = lambda v: sum(v) / len(v)
if every and some:
    print(f"uncertainty: lesions found by every pass have mean confidence {mean(every):.3f} ({len(every)}), "
          f"by some passes only {mean(some):.3f} ({len(some)})")
    if mean(every) <= mean(some):
        sys.exit("error: lesions every pass found are not more confident than the others")
else:
    print(f"uncertainty: {len(every)} lesions found by every pass, {len(some)} by some only: no comparison")
PY

cat <<EOF | tee -a "$out/summary.txt"

quickstart done in $((SECONDS - started)) s ($((SECONDS - stage)) s after the build)
  synthetic datasets $data, $shifted (dataset.json, lesions.json)
  model              $run/checkpoints/best (training curve $run/training_curve.png)
  masks              $out/masks (NAME.nii.gz, NAME_lesions.csv, NAME_overlay.png,
                     NAME_uncertainty.nii.gz, NAME_attention.nii.gz, NAME_probabilities.nii.gz)
  reports            $out/evaluation/report.md, $out_shifted/evaluation/report.md
  review page        $out/evaluation/review/index.html (open it in a browser; no server needed)
EOF
