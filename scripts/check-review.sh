#!/usr/bin/env bash
# Checks medseg's review page in headless Chromium (Debian `chromium`, driven by npm's
# playwright-core), offline from the file system; see scripts/check-review.js for the checks.
#
#   scripts/check-review.sh                      # builds cases, runs evaluate --review, checks it
#   scripts/check-review.sh REVIEW_DIR [TRUTH_DIR]  # checks an existing review (e.g. the quickstart's)
#
# Without arguments: a real brain scan (mricron's ch2bet) gets spherical truth and predicted
# lesions (one found, one missed, one false), on its own grid, on an oblique, anisotropic grid
# (same voxels, rotated affine), and with a header whose qform (code 2) differs from its sform
# (code 1), which NiiVue and nibabel read differently; nibabel places the lesions in world mm,
# and the page must put NiiVue's crosshair on each within one voxel. A second review without the
# viewer checks the fallback. Screenshots: target/tmp/review-check/shots/ (or $SHOTS).
# Needs: chromium, node/npm, python3; the viewer (scripts/fetch-viewer.sh, run here when missing).
# Run by .ci/run after the tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for tool in node npm python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "check-review: $tool is missing (apt-get install -y nodejs npm python3)" >&2; exit 1; }
done
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || { echo "check-review: chromium is missing: apt-get install -y chromium" >&2; exit 1; }
work=target/tmp/review-check
shots="${SHOTS:-$work/shots}"
tools=target/review-check-tools
# playwright-core drives the system Chromium (it downloads no browser of its own); pinned.
if [ ! -f "$tools/node_modules/playwright-core/package.json" ]; then
    mkdir -p "$tools"
    npm install --silent --no-audit --no-fund --prefix "$tools" playwright-core@1.57.0 >/dev/null
fi
export NODE_PATH="$PWD/$tools/node_modules"

if [ $# -ge 1 ]; then
    list=()
    if [ $# -ge 2 ]; then
        for f in "$2"/*.nii.gz "$2"/*.nii; do
            [ -e "$f" ] || continue
            b="$(basename "$f")"; b="${b%.gz}"; list+=("${b%.nii}")
        done
    fi
    cases="$(IFS=,; echo "${list[*]:-}")"
    node scripts/check-review.js "$1" "$shots" ${cases:+--cases "$cases"} --max-pages 12
    exit
fi

medseg="${MEDSEG:-}"
if [ -z "$medseg" ]; then
    for m in target/debug/medseg target/release/medseg; do
        if [ -x "$m" ]; then medseg="$m"; break; fi
    done
fi
[ -n "$medseg" ] || { echo "check-review: no medseg binary: run cargo build (or scripts/test.sh) first" >&2; exit 1; }
scripts/fetch-viewer.sh
[ -f datasets/cache/mricron/ch2bet.nii.gz ] || scripts/fetch-data.sh --only mricron
venv=target/review-check-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import nibabel" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "nibabel==5.*"
fi
rm -rf "$work"
mkdir -p "$work/images" "$work/truth" "$work/pred"
"$venv/bin/python" - "$work" <<'PY'
import json, sys
import numpy as np, nibabel as nib
work = sys.argv[1]
host = nib.load("datasets/cache/mricron/ch2bet.nii.gz")
# Every other voxel (2 mm): the debug build CI uses writes the pages in seconds, not minutes.
scan = np.ascontiguousarray(np.asanyarray(host.dataobj)[::2, ::2, ::2])
host_affine = host.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
shape = scan.shape[:3]
def ball(centre, r):
    g = np.indices(shape).astype(float)
    return sum((g[a] - centre[a]) ** 2 for a in range(3)) <= r * r
found, missed, false = (30, 60, 40), (60, 47, 35), (47, 75, 52)
truth = (ball(found, 4) | ball(missed, 3)).astype(np.uint8)
pred = (ball((31, 60, 40), 4) | ball(false, 3)).astype(np.uint8)
theta, phi = np.radians(25), np.radians(15)
rz = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
rx = np.array([[1, 0, 0], [0, np.cos(phi), -np.sin(phi)], [0, np.sin(phi), np.cos(phi)]])
oblique = np.eye(4)
oblique[:3, :3] = rz @ rx @ np.diag([1.8, 2.2, 3.2])
oblique[:3, 3] = [-80.0, -110.0, -60.0]
# nibabel (and medseg) place by the sform; NiiVue would take this qform, 40 mm and 10° away.
qform = oblique.copy()
qform[:3, :3] = rx.T @ oblique[:3, :3]
qform[:3, 3] += [40.0, 0.0, 0.0]
expect = {}
for name, affine, q in (("brain", host_affine, None), ("brain_oblique", oblique, None),
                        ("brain_qform", oblique, qform)):
    def save(data, path):
        img = nib.Nifti1Image(data, affine)
        if q is None:
            img.set_qform(affine, code=1)
        else:
            img.set_qform(q, code=2)
        img.set_sform(affine, code=1)
        nib.save(img, path)
    save(scan, f"{work}/images/{name}_0000.nii.gz")
    save(truth, f"{work}/truth/{name}.nii.gz")
    save(pred, f"{work}/pred/{name}.nii.gz")
    world = lambda v: nib.affines.apply_affine(affine, v).tolist()
    expect[name] = [{"finding": "TP", "centroid_mm": world((31, 60, 40))},
                    {"finding": "FP", "centroid_mm": world(false)},
                    {"finding": "FN", "centroid_mm": world(missed)}]
json.dump(expect, open(f"{work}/expect.json", "w"), indent=1)
PY
"$medseg" evaluate --pred "$work/pred" --truth "$work/truth" --images "$work/images" \
    --output "$work/eval" --review >/dev/null
MEDSEG_NIIVUE= "$medseg" evaluate --pred "$work/pred" --truth "$work/truth" --images "$work/images" \
    --output "$work/eval-no-viewer" --review >"$work/no-viewer.log" 2>&1 \
    || { cat "$work/no-viewer.log" >&2; exit 1; }
node scripts/check-review.js "$work/eval/review" "$shots" --cases brain,brain_oblique,brain_qform \
    --expect "$work/expect.json" --fallback "$work/eval-no-viewer/review"
echo "screenshots in $shots"
