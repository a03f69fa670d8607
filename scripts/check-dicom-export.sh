#!/usr/bin/env bash
# Validates medseg's DICOM-SEG and RTSTRUCT outputs with tools medseg did not write, on real
# series: the TotalSegmentator CT series (anonymised, JPEG 2000) and the enhanced multi-frame,
# oblique Siemens MR object from heudiconv.
#   - dciodvfy (Debian dicom3tools): no errors on any object; warnings are printed.
#   - highdicom.seg.segread + its own geometry: the SEG equals the NIfTI mask exactly.
#   - pydicom + matplotlib even-odd rasterisation, and rt-utils on the CT series: every ROI
#     re-rasterised gives Dice >= 0.98 against the mask.
#
#   scripts/check-dicom-export.sh [MODEL_RUN]
#
# Without MODEL_RUN a liver model is trained briefly (2 epochs, about a minute). Uses
# target/debug/medseg when it exists (the tests build it), else target/release/medseg; the Python
# validators go into a venv in target/dicom-validators (created on first use, ~150 MB).
# Run by .ci/run after the tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v dciodvfy >/dev/null 2>&1; then
    echo "dciodvfy is missing: apt-get install -y dicom3tools" >&2
    exit 1
fi
medseg="${MEDSEG:-}"
if [ -z "$medseg" ]; then
    for m in target/debug/medseg target/release/medseg; do
        if [ -x "$m" ]; then medseg="$m"; break; fi
    done
fi
if [ -z "$medseg" ]; then
    echo "no medseg binary: run cargo build (or scripts/test.sh) first" >&2
    exit 1
fi
venv=target/dicom-validators
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import highdicom, rt_utils, nibabel, matplotlib" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "highdicom==0.28.*" "rt-utils==1.2.*" "nibabel==5.*" matplotlib
fi

work=target/tmp/dicom-check
rm -rf "$work"
mkdir -p "$work"
model="${1:-}"
if [ -z "$model" ]; then
    model="$work/model"
    "$medseg" train --config configs/liver-ct-2d.toml --quiet \
        --set train.epochs=2 --set validate.every=0 --set "output.dir=\"$model\""
fi

ct=datasets/cache/totalsegmentator/example_ct_dicom
mr=datasets/cache/heudiconv
"$medseg" segment --model "$model" --quiet "$ct" --output "$work/ct" \
    --format nifti,dicom-seg,rtstruct
"$medseg" segment --model "$model" --quiet "$ct" --output "$work/ct-lesions" \
    --format nifti,dicom-seg,rtstruct --set segment.rtstruct_rois=lesion
# A CT liver model on MR finds little: a low threshold gives the objects something to hold.
"$medseg" segment --model "$model" --quiet "$mr" --output "$work/mr" \
    --format nifti,dicom-seg,rtstruct --set segment.threshold=0.05

status=0
for f in "$work"/*/*.dcm; do
    report="$(dciodvfy "$f" 2>&1 || true)"
    if grep -q "^Error" <<<"$report"; then
        echo "dciodvfy: $f: ERRORS" >&2
        status=1
    fi
    grep -E "^(Error|Warning)" <<<"$report" | sed "s|^|dciodvfy: $(basename "$f"): |" || true
done
"$venv/bin/python" scripts/reference/dicom_export_check.py "$work/ct" --series "$ct" \
    --expect liver=SCT:10200004 || status=1
"$venv/bin/python" scripts/reference/dicom_export_check.py "$work/ct-lesions" --series "$ct" || status=1
"$venv/bin/python" scripts/reference/dicom_export_check.py "$work/mr" || status=1
if [ $status -eq 0 ]; then
    echo "DICOM export: dciodvfy, highdicom, rt-utils and the even-odd rasteriser agree"
fi
exit $status
