#!/usr/bin/env bash
# Fetches NVRTC (the CUDA run-time compiler) from the PyPI wheel
# `nvidia-cuda-nvrtc`, so that a machine without the CUDA toolkit or a GPU can
# compile kvault's kernels to PTX (CI does, so a kernel that does not compile
# fails the build). Prints the folder to put on LD_LIBRARY_PATH.
# Idempotent: a cached copy is reused. Cache: target/nvrtc (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE="nvidia-cuda-nvrtc==13.5.37"
SHA256="86b4d68058807988b7d9af5b44917a0601e9c337f35ccd657bfb3c759ff8d8bc"
dir="target/nvrtc"
lib="$dir/nvidia/cu13/lib"

if [ ! -f "$lib/libnvrtc.so.13" ]; then
    mkdir -p "$dir"
    tmp="$(mktemp -d "$dir/.fetch.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --no-input --disable-pip-version-check \
        --only-binary=:all: --platform manylinux_2_12_x86_64 "$PACKAGE" -d "$tmp" >&2
    wheel="$(ls "$tmp"/*.whl)"
    if [ "$(sha256sum "$wheel" | cut -d' ' -f1)" != "$SHA256" ]; then
        echo "fetch-nvrtc: $wheel does not have the expected sha256" >&2
        exit 1
    fi
    python3 - "$wheel" "$dir" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for m in z.namelist():
        if m.startswith("nvidia/cu13/lib/"):
            z.extract(m, sys.argv[2])
PY
fi
echo "$(pwd)/$lib"
