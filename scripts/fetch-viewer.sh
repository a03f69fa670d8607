#!/usr/bin/env bash
# Fetch NiiVue, the browser viewer of medseg's review pages (`segment --review`,
# `evaluate --review`): npm's @niivue/niivue, BSD-2-Clause, pinned and checked against its SHA-256.
#
# The package's bundled build (build/index.min.js) holds the whole viewer as one URL-encoded ES
# module. Browsers refuse module scripts on file:// pages, so it is rewritten as a classic script
# that sets `window.niivue` (the module's exports), and written with a notice of the package's
# licence (its package.json's `license` and `repository`; the tarball has no licence file) to
#   datasets/cache/niivue/niivue-0.69.0.js, datasets/cache/niivue/NOTICE
# where medseg finds it (or set MEDSEG_NIIVUE to the file). Nothing of it is committed.
#
# Usage: scripts/fetch-viewer.sh      (idempotent: does nothing when the file is there)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VER=0.69.0
SHA=6e9a6a471b428eb3b258a0086beca9187d95e43a781a39e8a519c6da246af485
URL="https://registry.npmjs.org/@niivue/niivue/-/niivue-$VER.tgz"
OUT=datasets/cache/niivue
DL=datasets/cache/downloads
TGZ="$DL/niivue-$VER.tgz"

[ -f "$OUT/niivue-$VER.js" ] && exit 0
command -v python3 >/dev/null 2>&1 || { echo "fetch-viewer: python3 is needed" >&2; exit 1; }
mkdir -p "$DL" "$OUT"
if [ ! -f "$TGZ" ]; then
    python3 - "$URL" "$TGZ.part" <<'PY' || { echo "fetch-viewer: download of $URL failed" >&2; exit 1; }
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=120) as r, open(sys.argv[2], "wb") as f:
    f.write(r.read())
PY
    mv "$TGZ.part" "$TGZ"
fi
got="$(sha256sum "$TGZ" | cut -d' ' -f1)"
if [ "$got" != "$SHA" ]; then
    echo "fetch-viewer: $TGZ has SHA-256 $got, expected $SHA; removed" >&2
    rm -f "$TGZ"
    exit 1
fi
python3 - "$TGZ" "$OUT" "$VER" <<'PY'
import json, os, re, sys, tarfile, urllib.parse
tgz, out, ver = sys.argv[1:]
with tarfile.open(tgz) as t:
    bundle = t.extractfile("package/build/index.min.js").read().decode()
    meta = json.load(t.extractfile("package/package.json"))
repo = meta.get("repository")
repo = repo.get("url") if isinstance(repo, dict) else repo
notice = (f"{meta['name']} {meta['version']} from the npm registry, licence {meta.get('license')}, "
          f"source {repo}.\nRewritten as a classic script by medseg's scripts/fetch-viewer.sh.\n").encode()
m = re.fullmatch(r'export const esm = "(.*)";?\s*', bundle, re.S)
if not m:
    sys.exit("fetch-viewer: build/index.min.js is not the expected `export const esm` bundle")
esm = urllib.parse.unquote(m.group(1))
tail = re.search(r'export\s*\{([^}]*)\};?\s*$', esm)
if not tail or re.search(r'^\s*import\s', esm, re.M) or "import.meta" in esm:
    sys.exit("fetch-viewer: the bundle has imports or no single export list; it cannot run as a classic script")
pairs = []
for part in tail.group(1).split(","):
    local, _, public = part.strip().partition(" as ")
    pairs.append(f"{(public or local).strip()}:{local.strip()}")
script = ('/* NiiVue ' + ver + ' (npm @niivue/niivue, BSD-2-Clause), rewritten by medseg\'s '
          'scripts/fetch-viewer.sh as a classic script that sets window.niivue; see NOTICE. */\n'
          '(function(){"use strict";\n' + esm[:tail.start()] +
          '\nglobalThis.niivue={' + ",".join(pairs) + '};\n})();\n')
for name, data in ((f"niivue-{ver}.js", script.encode()), ("NOTICE", notice)):
    tmp = os.path.join(out, "." + name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(out, name))
PY
echo "niivue: $OUT/niivue-$VER.js (from $TGZ, sha256 ok)"
