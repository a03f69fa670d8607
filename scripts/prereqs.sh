#!/usr/bin/env bash
# Checks, in seconds, everything the quickstart and the tests need before any download or build:
# Rust (cargo and rustc 1.85+), cmake and a C++ compiler (they build the JPEG-LS codec), python3
# with pip and unzip (they fetch the sample scans), and dpkg-deb (it unpacks the two Debian data
# packages). Prints every missing one with the command that installs it, and exits 1. Run by
# scripts/quickstart.sh and scripts/test.sh; callable on its own.
set -uo pipefail

missing=()
fix=()
need() { # need TOOL HINT
    if ! command -v "$1" >/dev/null 2>&1; then
        missing+=("$1")
        fix+=("$2")
    fi
}

need cargo "curl https://sh.rustup.rs -sSf | sh -s -- -y   (then: . \"\$HOME/.cargo/env\")"
need rustc "curl https://sh.rustup.rs -sSf | sh -s -- -y"
need cmake "apt-get install -y cmake   (macOS: brew install cmake)"
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 \
    && ! command -v clang++ >/dev/null 2>&1; then
    missing+=("a C++ compiler (c++, g++ or clang++)")
    fix+=("apt-get install -y g++   (macOS: xcode-select --install)")
fi
need python3 "apt-get install -y python3 python3-pip"
if command -v python3 >/dev/null 2>&1 && ! python3 -m pip --version >/dev/null 2>&1; then
    missing+=("pip for python3")
    fix+=("apt-get install -y python3-pip   (or: python3 -m ensurepip --upgrade)")
fi
need unzip "apt-get install -y unzip"
need dpkg-deb "apt-get install -y dpkg   (a Debian or Ubuntu tool; elsewhere see DATA.md)"

if command -v rustc >/dev/null 2>&1; then
    version="$(rustc --version 2>/dev/null | awk '{print $2}')"
    major="${version%%.*}"
    rest="${version#*.}"
    minor="${rest%%.*}"
    if [ -n "$major" ] && [ -n "$minor" ] && { [ "$major" -lt 1 ] || { [ "$major" -eq 1 ] && [ "$minor" -lt 85 ]; }; }; then
        missing+=("Rust 1.85 or newer (found $version)")
        fix+=("rustup update stable")
    fi
fi

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "medseg needs what is missing below; nothing was downloaded or built." >&2
for i in "${!missing[@]}"; do
    echo "  missing: ${missing[$i]}" >&2
    echo "    install: ${fix[$i]}" >&2
done
exit 1
