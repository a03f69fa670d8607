#!/usr/bin/env bash
# The test command: fetch the real sample scans (idempotent, offline once cached), then run every
# test (unit, integration on real scans, CLI on the real binary, doc tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/prereqs.sh
scripts/fetch-data.sh
cargo test --locked "$@"
