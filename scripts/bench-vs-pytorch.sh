#!/usr/bin/env bash
# medseg against its PyTorch and MONAI twins in one run, interleaved, median of ROUNDS (default 3):
#  1. the model step (forward, soft Dice + CE, backward; batch 1) of `tiny` and `small` in 2D 224²
#     and 3D 96³: medseg on its own kernels, medseg on burn's ops (`--kernels burn`, the path
#     before issue 12) and scripts/reference/torch_model_bench.py;
#  2. `medseg segment` of a 512×512×300 CT with and without mirror TTA against
#     scripts/reference/monai_segment_bench.py, seconds and peak RSS.
# Prints one table of times and ratios (medseg / PyTorch: below 1 is faster), and GFLOP/s as a share
# of this machine's fp32 peak (PEAK_GFLOPS, default 350: 2 cores, AVX-512, 2 FMA ports; a Zen 4
# runs AVX-512 as two 256-bit halves, so there it is 2 x 8 x 2 FLOP per cycle per core: 166 at 2.6 GHz).
#
# Usage: scripts/bench-vs-pytorch.sh [ROUNDS]      after scripts/fetch-data.sh
# PyTorch, MONAI and nibabel go into target/bench-venv (BENCH_PYTHON to use another interpreter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-3}
peak=${PEAK_GFLOPS:-350}
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
py=${BENCH_PYTHON:-target/bench-venv/bin/python}
if ! "$py" -c 'import torch, monai, nibabel' 2>/dev/null; then
  echo "installing torch, monai and nibabel into target/bench-venv" >&2
  python3 -m venv target/bench-venv
  py=target/bench-venv/bin/python
  "$py" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || "$py" -m pip install -q torch
  "$py" -m pip install -q numpy monai nibabel
fi
[ -f datasets/cache/totalsegmentator/aorta_example_ct.nii.gz ] || {
  echo "bench-vs-pytorch: run scripts/fetch-data.sh first (needs the TotalSegmentator sample CT)" >&2
  exit 2
}
cargo build --release --locked --quiet
medseg=target/release/medseg
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }

# 1. Model step. Each call: one warm-up step, then STEPS timed steps.
configs="tiny:2 small:2 tiny:3 small:3"
for r in $(seq "$rounds"); do
  for c in $configs; do
    preset=${c%:*} dims=${c#*:}
    if [ "$dims" = 2 ]; then size=224,224 steps=5; else size=96,96,96 steps=2; fi
    for k in medseg burn; do
      "$medseg" model --preset "$preset" --dims "$dims" --size "$size" --time "$steps" --kernels "$k" \
        | awk -v f="$tmp/step-$c-$k" '/training step/ {print $3 >> f; print $7 >> (f ".gflops")}'
    done
    "$py" scripts/reference/torch_model_bench.py "$preset" "$dims" "$steps" \
      | sed -n 's/.*forward_backward=\([0-9.]*\) ms.*/\1/p' >> "$tmp/step-$c-torch"
  done
done

# 2. Segment: the models of scripts/bench-segment.sh (liver, 2D, trained once and cached).
work=datasets/cache/bench
mkdir -p "$work"
ct="$work/ct_512x512x300.nii.gz"
[ -f "$ct" ] || "$medseg" convert datasets/cache/totalsegmentator/aorta_example_ct.nii.gz "$ct" \
  --spacing 0.68262,0.48926,0.955 > /dev/null
for preset in tiny small; do
  run="$work/model-$preset"
  [ -f "$run/checkpoints/last/state.json" ] || "$medseg" train --config configs/liver-ct-2d.toml --quiet \
    --set "model.preset=\"$preset\"" --set "output.dir=\"$run\"" > /dev/null
done
for r in $(seq "$rounds"); do
  for preset in tiny small; do
    for tta in no yes; do
      flag=; [ "$tta" = yes ] && flag=--tta
      out="$tmp/seg"
      rm -rf "$out"
      /usr/bin/time -v "$medseg" segment --model "$work/model-$preset" "$ct" --output "$out" --quiet $flag \
        2> "$tmp/time" > /dev/null
      grep -o '"seconds": [0-9.]*' "$out/batch_summary.json" | awk '{print $2}' >> "$tmp/seg-$preset-$tta-medseg"
      awk '/Maximum resident/ {printf "%.0f\n", $6/1024}' "$tmp/time" >> "$tmp/rss-$preset-$tta-medseg"
      "$py" scripts/reference/monai_segment_bench.py "$ct" "$preset" $flag > "$tmp/monai"
      sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' "$tmp/monai" >> "$tmp/seg-$preset-$tta-monai"
      sed -n 's/.*peak_rss_MiB=\([0-9]*\).*/\1/p' "$tmp/monai" >> "$tmp/rss-$preset-$tta-monai"
    done
  done
done

echo "medseg $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, RAYON_NUM_THREADS=2, torch threads 2, median of $rounds"
printf '%-22s %12s %12s %12s %10s %10s %9s\n' "train step (ms)" medseg "burn ops" PyTorch ratio "ratio(burn)" "% peak"
for c in $configs; do
  preset=${c%:*} dims=${c#*:}
  m=$(median < "$tmp/step-$c-medseg") b=$(median < "$tmp/step-$c-burn") t=$(median < "$tmp/step-$c-torch")
  g=$(median < "$tmp/step-$c-medseg.gflops")
  printf '%-22s %12.1f %12.1f %12.1f %10.2f %10.2f %8.1f%%\n' "$preset ${dims}D" "$m" "$b" "$t" \
    "$(echo "$m / $t" | bc -l)" "$(echo "$b / $t" | bc -l)" \
    "$(echo "$g / $peak * 100" | bc -l)"
done
printf '%-22s %12s %12s %12s %10s %12s %12s\n' "segment 512²×300" "medseg s" "MONAI s" ratio "" "medseg MiB" "MONAI MiB"
for preset in tiny small; do
  for tta in no yes; do
    m=$(median < "$tmp/seg-$preset-$tta-medseg") t=$(median < "$tmp/seg-$preset-$tta-monai")
    mr=$(median < "$tmp/rss-$preset-$tta-medseg") tr=$(median < "$tmp/rss-$preset-$tta-monai")
    printf '%-22s %12.1f %12.1f %12.2f %10s %12s %12s\n' "$preset tta=$tta" "$m" "$t" \
      "$(echo "$m / $t" | bc -l)" "" "$mr" "$tr"
  done
done
