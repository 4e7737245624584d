#!/usr/bin/env bash
# Get throughput of the RAM tier vs raw loopback TCP vs Redis (installs redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh redis-server
scripts/deps.sh librocksdb-dev libclang-dev
cargo build --release --bins --quiet
exec target/release/kvault bench get "$@"
