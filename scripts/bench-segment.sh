#!/usr/bin/env bash
# Seconds per case and peak RSS of `medseg segment` on a CT-sized volume (512×512×300), with the
# `tiny` and `small` presets (PRESETS="tiny" for one), on CPU: plain, mirror TTA, --uncertainty
# (the mirrored passes as members), --attention, and both.
# The volume is TotalSegmentator's 1.5 mm aorta CT resampled to 512×512×300 (0.68×0.49×0.96 mm);
# the models are configs/liver-ct-2d.toml trained in full with each preset (about 1 and 3 minutes).
# Usage: [PRESETS="tiny small"] scripts/bench-segment.sh   (after scripts/fetch-data.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --locked --quiet
medseg=target/release/medseg
work=datasets/cache/bench
mkdir -p "$work"
ct="$work/ct_512x512x300.nii.gz"
[ -f "$ct" ] || "$medseg" convert datasets/cache/totalsegmentator/aorta_example_ct.nii.gz "$ct" \
  --spacing 0.68262,0.48926,0.955
presets=${PRESETS:-tiny small}
for preset in $presets; do
  run="$work/model-$preset"
  [ -f "$run/checkpoints/last/state.json" ] || "$medseg" train --config configs/liver-ct-2d.toml --quiet \
    --set "model.preset=\"$preset\"" --set "output.dir=\"$run\"" > /dev/null
done
printf '%-6s %-28s %10s %12s\n' preset flags seconds peak_rss_MiB
for preset in $presets; do
  for flags in "" "--tta" "--uncertainty" "--attention" "--uncertainty --attention"; do
    out="$work/out-$preset$(echo "$flags" | tr -d ' ')"
    rm -rf "$out"
    # shellcheck disable=SC2086 # the flags are words
    /usr/bin/time -v "$medseg" segment --model "$work/model-$preset" "$ct" --output "$out" --quiet $flags \
      2> "$out.time" > /dev/null
    secs=$(grep -o '"seconds": [0-9.]*' "$out/batch_summary.json" | awk '{print $2}')
    rss=$(awk '/Maximum resident/ {printf "%.0f", $6/1024}' "$out.time")
    printf '%-6s %-28s %10.1f %12s\n' "$preset" "${flags:-(none)}" "$secs" "$rss"
  done
done
