#!/usr/bin/env bash
# The main job on embedded defaults: build, start a kvault-server in a temp
# dir, import a KV cache, export it back, check it bit for bit, print figures.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --quiet
exec target/release/kvault demo "$@"
