#!/usr/bin/env bash
# A batch at archive scale (not in CI): 1,000 small cases, 5 % corrupt in assorted ways (truncated
# gzip, wrong dims, NaN voxels, garbage DICOM), segmented with --skip-existing, killed (SIGKILL)
# twice and restarted. Reports: every good case done exactly once, every bad one reported with its
# reason, no torn or temporary files, peak RSS over the first and the last 100 cases, cases/minute.
#
#   scripts/soak.sh [MODEL_RUN] [CASES]      (defaults: a 2-epoch liver model, 1000 cases)
#
# Needs a release build (cargo build --release) and the sample scans (scripts/fetch-data.sh).
# Works in target/soak/; exits 1 when a check fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
medseg=target/release/medseg
[ -x "$medseg" ] || { echo "no release build: cargo build --release" >&2; exit 1; }
work=target/soak
rm -rf "$work"
mkdir -p "$work/cases" "$work/out"
n="${2:-1000}"
model="${1:-}"
if [ -z "$model" ]; then
    model="$work/model"
    "$medseg" train --config configs/liver-ct-2d.toml --quiet \
        --set train.epochs=2 --set validate.every=0 --set "output.dir=\"$model\""
fi

# The cases: copies of TotalSegmentator's small CT and MR, every 20th one corrupt.
"$medseg" convert datasets/cache/totalsegmentator/example_ct_sm.nii.gz "$work/float.nii.gz" \
    --dtype float32 2>/dev/null
python3 - "$work" "$n" <<'EOF'
import gzip, os, random, shutil, struct, sys
work, n = sys.argv[1], int(sys.argv[2])
ts = "datasets/cache/totalsegmentator"
sources = [f"{ts}/example_ct_sm.nii.gz", f"{ts}/example_mr_sm.nii.gz"]
float_ct = gzip.decompress(open(f"{work}/float.nii.gz", "rb").read())
rng = random.Random(7)
kinds = ["truncated-gzip", "wrong-dims", "nan-voxels", "garbage-dicom"]
bad = {}
for i in range(n):
    name = f"case{i:04d}"
    if i % 20 != 19:
        shutil.copy(sources[i % 2], f"{work}/cases/{name}.nii.gz")
        continue
    kind = kinds[(i // 20) % len(kinds)]
    bad[name] = kind
    if kind == "truncated-gzip":
        data = open(sources[0], "rb").read()
        open(f"{work}/cases/{name}.nii.gz", "wb").write(data[: len(data) // 2])
    elif kind == "wrong-dims":
        raw = bytearray(gzip.decompress(open(sources[0], "rb").read()))
        struct.pack_into("<h", raw, 42, 4000)  # dim[1]: far more voxels than the file holds
        open(f"{work}/cases/{name}.nii.gz", "wb").write(gzip.compress(bytes(raw)))
    elif kind == "nan-voxels":
        raw = bytearray(float_ct)
        offset = int(struct.unpack_from("<f", raw, 108)[0])
        for _ in range(5):
            struct.pack_into("<I", raw, offset + 4 * rng.randrange(1000, 100000), 0x7FC00000)
        open(f"{work}/cases/{name}.nii.gz", "wb").write(gzip.compress(bytes(raw)))
    else:
        body = b"\0" * 128 + b"DICM" + bytes(rng.randrange(256) for _ in range(2000))
        open(f"{work}/cases/{name}.dcm", "wb").write(body)
with open(f"{work}/bad.txt", "w") as f:
    for name, kind in sorted(bad.items()):
        f.write(f"{name}\t{kind}\n")
EOF
total=$(ls "$work/cases" | wc -l)
bad=$(wc -l < "$work/bad.txt")
echo "soak: $total cases ($bad corrupt) in $work/cases"

# One run, optionally killed once `kill_at` masks exist; samples RSS and progress every 0.5 s.
run() { # run LABEL KILL_AT
    local label="$1" kill_at="$2"
    "$medseg" segment --model "$model" "$work/cases" --output "$work/out" --skip-existing \
        >"$work/$label.log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        local done_now rss
        done_now=$(find "$work/out" -maxdepth 1 -name 'case*.nii.gz' | wc -l)
        rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        echo "$label $done_now ${rss:-0}" >>"$work/rss.txt"
        if [ "$kill_at" -gt 0 ] && [ "$done_now" -ge "$kill_at" ]; then
            kill -9 "$pid"
            echo "soak: $label killed (SIGKILL) at $done_now masks"
        fi
        sleep 0.5
    done
    wait "$pid" || true
}
start=$(date +%s)
run first $((n * 3 / 10))
run second $((n * 6 / 10))
run third 0
seconds=$(( $(date +%s) - start ))

python3 - "$work" "$seconds" <<'EOF'
import glob, gzip, json, os, re, sys
work, seconds = sys.argv[1], int(sys.argv[2])
bad = dict(line.split("\t") for line in open(f"{work}/bad.txt").read().splitlines())
cases = sorted(os.path.splitext(os.path.splitext(f)[0])[0] if f.endswith(".gz") else os.path.splitext(f)[0]
               for f in os.listdir(f"{work}/cases"))
good = [c for c in cases if c not in bad]
problems = []
# Done exactly once: a mask for every good case, none for a bad one, no case segmented twice.
logged = {}
for label in ["first", "second", "third"]:
    for line in open(f"{work}/{label}.log", errors="replace"):
        m = re.match(r"(case\d+): \d+ lesion", line)
        if m:
            logged[m.group(1)] = logged.get(m.group(1), 0) + 1
twice = [c for c, k in logged.items() if k > 1]
if twice:
    problems.append(f"segmented more than once: {twice[:5]}")
missing = [c for c in good if not os.path.exists(f"{work}/out/{c}.nii.gz")]
if missing:
    problems.append(f"good cases without a mask: {missing[:5]}")
# No torn or temporary files: every output complete, nothing half-written left behind.
torn = []
for f in glob.glob(f"{work}/out/*"):
    name = os.path.basename(f)
    if name.startswith(".") or ".tmp" in name:
        torn.append(name)
    elif name.endswith(".gz"):
        try:
            gzip.decompress(open(f, "rb").read())
        except Exception:
            torn.append(name)
    elif name.endswith(".json"):
        try:
            json.load(open(f))
        except Exception:
            torn.append(name)
if torn:
    problems.append(f"torn or temporary files: {torn[:5]}")
# Every bad case reported, with a reason that fits its corruption.
summary = json.load(open(f"{work}/out/batch_summary.json"))
failed = {c["case"]: c.get("reason", "") for c in summary["cases"] if c["status"] == "failed"}
expect = {"truncated-gzip": "gzip", "wrong-dims": "", "nan-voxels": "NaN", "garbage-dicom": ""}
for name, kind in bad.items():
    reason = failed.get(name)
    if reason is None:
        problems.append(f"{name} ({kind}) not reported as failed")
    elif expect[kind] and expect[kind] not in reason:
        problems.append(f"{name} ({kind}): unexpected reason {reason!r}")
extra = set(failed) - set(bad)
if extra:
    problems.append(f"good cases failed: {sorted(extra)[:5]}")
# Peak RSS over the first and the last 100 cases (all runs, by masks present when sampled).
samples = [l.split() for l in open(f"{work}/rss.txt")]
n = len(cases)
first = [int(r) for _, d, r in samples if int(d) <= 100 and int(r) > 0]
last = [int(r) for _, d, r in samples if int(d) >= len(good) - 100 and int(r) > 0]
print(f"soak: {len(good)} good cases, {len(bad)} corrupt; {len(failed)} reported failed")
print(f"soak: segmented once each: {sum(1 for c in good if logged.get(c) == 1)}; "
      f"finished just before a kill (then skipped): {sum(1 for c in good if c not in logged)}")
if first and last:
    print(f"soak: peak RSS first 100 cases {max(first) / 1024:.0f} MiB, last 100 {max(last) / 1024:.0f} MiB")
print(f"soak: {n} cases in {seconds} s over three runs: {60 * n / max(seconds, 1):.0f} cases/minute")
for kind in sorted(set(bad.values())):
    example = next(failed.get(c, "") for c, k in bad.items() if k == kind)
    print(f"soak: {kind}: e.g. {example[:150]}")
for p in problems:
    print("soak: FAIL:", p)
sys.exit(1 if problems else 0)
EOF
