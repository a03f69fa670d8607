#!/usr/bin/env bash
# Runs the cargo-fuzz targets (not part of CI):
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      (default 300 s, all four targets)
# Inputs are held to 1 GiB and 10 s each (inputs are at most 128 KB: more is a runaway).
# Environment: FUZZ_ARGS adds libFuzzer options (`-fork=1 -ignore_ooms=1 -ignore_timeouts=1`
# goes on past findings, collecting them all); FUZZ_RUNS caps the inputs per target (default: no
# cap); FUZZ_SANITIZER=address
# builds with AddressSanitizer (default: none, several times the throughput; Rust code is memory
# safe, and the C decoders are still checked for panics and aborts).
# Seeds are the small real sample files (run scripts/fetch-data.sh first), plus header mutations
# made here (no preamble, wrong group length, trailing bytes, truncation) and a token dictionary per
# format (fuzz/*.dict). Crashes land in fuzz/artifacts/TARGET/; each one found so far is kept in
# tests/data/fuzz/ (named after its target) and replayed by tests/it/bad_input.rs.
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); RUSTC_BOOTSTRAP=1 lets the stable
# toolchain take its nightly flags.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(nifti_header nifti_volume dicom_object dicom_series)
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2; exit 1; }
ls datasets/cache/pydicom/MR_small.dcm >/dev/null 2>&1 || { echo "no sample files: run scripts/fetch-data.sh first" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-none}
runs=${FUZZ_RUNS:--1}

seed() { # TARGET NAME < bytes
    mkdir -p "fuzz/corpus/$1" && cat > "fuzz/corpus/$1/$2"
}
small_dicom() {
    for f in datasets/cache/pydicom/*.dcm; do
        [ "$(stat -c %s "$f")" -lt 64000 ] && echo "$f"
    done
}
for f in datasets/cache/nibabel/*.nii datasets/cache/dipy/small_64D.nii; do
    [ -f "$f" ] || continue
    head -c 65536 "$f" | seed nifti_header "$(basename "$f")"
    if [ "$(stat -c %s "$f")" -lt 65536 ]; then
        { printf '\0'; cat "$f"; } | seed nifti_volume "plain-$(basename "$f")"
        { printf '\1'; cat "$f"; } | seed nifti_volume "gzip-$(basename "$f")"
    fi
done
for f in $(small_dicom); do
    b=$(basename "$f" .dcm)
    seed dicom_object "$b.dcm" < "$f"
    # The header mutations real archives hold: no preamble and magic, a wrong file-meta group
    # length, zero padding after the last element, a truncated pixel data element.
    tail -c +133 "$f" | seed dicom_object "$b-no-preamble.dcm"
    { head -c 140 "$f"; printf '\xff\x00\x00\x00'; tail -c +145 "$f"; } | seed dicom_object "$b-group-length.dcm"
    { cat "$f"; head -c 64 /dev/zero; } | seed dicom_object "$b-padded.dcm"
    head -c $(( $(stat -c %s "$f") - 100 )) "$f" | seed dicom_object "$b-truncated.dcm"
    # Series: 2-5 copies with same, regular, reversed, tiny, huge or NaN steps; and mixed files.
    for control in 1 5 9 14 19 31 38 61; do
        { printf "\\x$(printf %02x $control)"; cat "$f"; } | seed dicom_series "$b-$control.dcm"
    done
done
{ printf '\0'; cat datasets/cache/pydicom/MR_small.dcm; printf 'SLICE|'; cat datasets/cache/pydicom/MR_small_implicit.dcm; printf 'SLICE|'; cat datasets/cache/pydicom/CT_small.dcm; } \
    | seed dicom_series mixed.dcm

for target in "${targets[@]}"; do
    case $target in
        nifti_*) dict=fuzz/nifti.dict ;;
        *) dict=fuzz/dicom.dict ;;
    esac
    case $target in
        dicom_object | nifti_header) max_len=16384 ;;
        *) max_len=131072 ;;
    esac
    echo "== $target for ${secs}s (sanitizer $sanitizer, runs $runs)"
    cargo fuzz run --fuzz-dir fuzz -s "$sanitizer" -a "$target" "fuzz/corpus/$target" -- \
        -dict="$dict" -max_total_time="$secs" -runs="$runs" -max_len="$max_len" \
        -rss_limit_mb=1024 -malloc_limit_mb=1024 -timeout=10 -print_final_stats=1 ${FUZZ_ARGS:-} 2>&1 | tail -n 25 \
        || echo "== $target stopped at a finding: see fuzz/artifacts/$target/"
done
