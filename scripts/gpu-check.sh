#!/usr/bin/env bash
# The one command for a machine with a GPU: build medseg with a GPU backend, check that training
# and segmentation on the GPU agree with the CPU path (examples/device_check.rs, on TotalSegmentator's
# sample CT), and time a training step and `medseg segment` there.
#
#   scripts/gpu-check.sh [wgpu|cuda]      (default wgpu; after scripts/fetch-data.sh)
#
# MEDSEG_GPU_BIN=DIR runs the binaries already in DIR (`medseg` and `device_check`, built elsewhere
# with the same feature) instead of building: for a GPU machine without Rust or internet access.
#
# wgpu runs on Vulkan (NVIDIA's driver, or Mesa's software lavapipe where there is no GPU, which
# this script installs with apt when no Vulkan driver is present: correct, not fast).
# cuda needs the CUDA toolkit and, at build time, internet access: cubecl downloads an LLVM bundle.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
backend=${1:-wgpu}
case "$backend" in wgpu | cuda) ;; *) echo "gpu-check: choose wgpu or cuda, not $backend" >&2; exit 2 ;; esac
bin=${MEDSEG_GPU_BIN:-}
if [ -n "$bin" ]; then
  [ -x "$bin/medseg" ] && [ -x "$bin/device_check" ] \
    || { echo "gpu-check: MEDSEG_GPU_BIN=$bin lacks medseg or device_check" >&2; exit 2; }
else
  command -v cargo > /dev/null || { echo "gpu-check: cargo is missing; install Rust from https://rustup.rs" >&2; exit 2; }
fi
ct=datasets/cache/totalsegmentator/example_ct.nii.gz
[ -f "$ct" ] || { echo "gpu-check: $ct is missing; run scripts/fetch-data.sh first" >&2; exit 2; }
if [ "$backend" = wgpu ] && [ -z "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ]; then
  # NVIDIA's container runtime mounts its driver, with its Vulkan manifest, under /usr/local/nvidia.
  nvidia_icd=$(ls /usr/local/nvidia/share/vulkan/icd.d/*.json /usr/share/vulkan/icd.d/nvidia*.json \
    2> /dev/null | head -1 || true)
  if [ -n "$nvidia_icd" ]; then
    export VK_DRIVER_FILES=$nvidia_icd
  elif ! ls /usr/share/vulkan/icd.d/*.json > /dev/null 2>&1 \
    && ! ls /etc/vulkan/icd.d/*.json > /dev/null 2>&1; then
    echo "gpu-check: no Vulkan driver; installing Mesa's (software) one" >&2
    if command -v apt-get > /dev/null; then
      sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
      $sudo apt-get install -y -q mesa-vulkan-drivers libvulkan1 > /dev/null
    else
      echo "gpu-check: install a Vulkan driver (NVIDIA's, or Mesa's mesa-vulkan-drivers)" >&2
      exit 2
    fi
  fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2> /dev/null || true

if [ -z "$bin" ]; then
  # A separate target directory: switching features in target/ would rebuild the CPU binary.
  export CARGO_TARGET_DIR=target/gpu-$backend
  echo "== build with --features $backend"
  cargo build --release --locked --features "$backend" --example device_check --bin medseg
  bin=$CARGO_TARGET_DIR/release
  check=$bin/examples/device_check
else
  check=$bin/device_check
fi

echo "== correctness: two training steps and a sliding-window prediction, $backend against cpu"
"$check" "$backend" datasets/cache

echo "== timing: training step (forward + backward, batch 1) on $backend"
for preset in tiny small; do
  "$bin/medseg" model --preset $preset --dims 2 --size 224,224 --time 10 --device "$backend" | tail -1
  "$bin/medseg" model --preset $preset --dims 3 --size 96,96,96 --time 5 --device "$backend" | tail -1
done

if python3 -c 'import torch; assert torch.cuda.is_available()' 2> /dev/null; then
  echo "== the same steps in the PyTorch twin on CUDA, for comparison (median of 10 after a warm-up)"
  for preset in tiny small; do
    for dims in 2 3; do
      TORCH_BENCH_DEVICE=cuda python3 scripts/reference/torch_model_bench.py $preset $dims 10
    done
  done
fi

echo "== timing: medseg segment on $backend (a liver model trained for 1 epoch; speed only)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$bin/medseg" train --config configs/liver-ct-2d.toml --quiet --set train.epochs=1 \
  --set "train.device=\"$backend\"" --set "output.dir=\"$tmp/run\"" > /dev/null
for tta in "" --tta; do
  /usr/bin/time -f "segment ${tta:-(no TTA)}: %e s wall, peak RSS %M KiB" \
    "$bin/medseg" segment --model "$tmp/run" "$ct" --output "$tmp/out" --device "$backend" --quiet $tta > /dev/null
done
