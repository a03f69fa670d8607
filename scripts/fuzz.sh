#!/usr/bin/env bash
# Runs the cargo-fuzz targets for a bounded time each (not part of CI).
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 300)
# Seeds the corpora with the real sample scans (run scripts/fetch-data.sh first). Needs cargo-fuzz
# (`cargo install cargo-fuzz`); on a stable toolchain RUSTC_BOOTSTRAP=1 unlocks the sanitizer flags.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-300}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
mkdir -p fuzz/corpus/nifti_header fuzz/corpus/dicom_object
# Small real files only: libFuzzer's default max input is 4 KB for generated inputs anyway.
for f in datasets/cache/nibabel/*.nii datasets/cache/dipy/small_64D.nii; do
    [ -f "$f" ] && head -c 65536 "$f" > "fuzz/corpus/nifti_header/$(basename "$f")"
done
for f in datasets/cache/pydicom/*.dcm; do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 200000 ] && cp "$f" fuzz/corpus/dicom_object/
done
# Inputs are capped at 16 KB: headers and element structure are what can go wrong, and large
# compressed images under AddressSanitizer run at a few executions per second.
for target in nifti_header dicom_object; do
    echo "== $target for ${secs}s"
    cargo fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$secs" -max_len=16384 -rss_limit_mb=4096 -print_final_stats=1 2>&1 | tail -n 25
done
