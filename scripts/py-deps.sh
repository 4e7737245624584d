#!/usr/bin/env bash
# Installs the Python packages the sidecar's Python example (and its test)
# needs, once: grpcio, grpcio-tools (stubs from proto/ at run time), numpy.
set -euo pipefail
python3 -c "import grpc, grpc_tools, numpy" 2>/dev/null && exit 0
echo "installing Python packages: grpcio grpcio-tools numpy" >&2
python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools numpy \
  || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages grpcio grpcio-tools numpy
