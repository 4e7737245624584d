#!/usr/bin/env python3
"""Read a cached prefix's decoded KV from a kvault sidecar into numpy arrays.

This is what a serving engine (vLLM, SGLang) does next to a GPU: it asks the
local sidecar how much of a prefix is cached (Lookup), has the sidecar decode
those chunks straight into its shared-memory region (GetInto), and views the
tensors in place with numpy: no copy over the socket, no kvault code in the
engine, only gRPC stubs generated from proto/ at run time.

Usage:
  sidecar_numpy.py --socket /run/kvault.sock --proto-dir proto \
      --model-id M --layers 30 --kv-heads 3 --head-dim 64 --dtype f16 \
      --chunk-tokens 256 --keys HEX[,HEX...] [--out kv.npy]

Keys are the prefix's chained 32-byte chunk keys (hex), first chunk first:
the engine's own block hashes, or kvault's (blake3, see proto/kvault.proto).
Prints one JSON line: prefix_chunks, tokens, shape, and where chunks came from.

Needs: grpcio, grpcio-tools, numpy (pip install grpcio grpcio-tools numpy).
"""

import argparse
import json
import mmap
import os
import sys
import tempfile


def load_stubs(proto_dir):
    """Generates Python stubs for kvault.proto and sidecar.proto into a temp dir."""
    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix="kvault-stubs-")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main([
        "protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(proto_dir, "kvault.proto"),
        os.path.join(proto_dir, "sidecar.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed on {proto_dir} (exit {rc})")
    sys.path.insert(0, out)
    import kvault_pb2, kvault_pb2_grpc, sidecar_pb2, sidecar_pb2_grpc  # noqa: E401

    return kvault_pb2, kvault_pb2_grpc, sidecar_pb2, sidecar_pb2_grpc


DTYPES = {"f16": ("DTYPE_F16", "float16"), "bf16": ("DTYPE_BF16", None), "f32": ("DTYPE_F32", "float32")}


def view(np, region, p, a, np_name):
    """The decoded chunk at placement p, as a [layers, 2, tokens, kv_heads, head_dim] view of the region."""
    shape = (p.layer_count, 2, p.tokens, a.kv_heads, a.head_dim)
    item = np.dtype(np_name).itemsize
    return np.frombuffer(region, dtype=np_name, count=p.length // item, offset=p.offset).reshape(shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--model-id", required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, required=True)
    ap.add_argument("--head-dim", type=int, required=True)
    ap.add_argument("--dtype", choices=DTYPES, default="f16")
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--keys", required=True, help="comma-separated hex chunk keys")
    ap.add_argument("--out", help="write the prefix KV [layers, 2, tokens, kv_heads, head_dim] as .npy")
    a = ap.parse_args()

    import grpc
    import numpy as np

    kv_pb, kv_grpc, sc_pb, sc_grpc = load_stubs(a.proto_dir)
    wire_dtype, np_name = DTYPES[a.dtype]
    if np_name is None:
        raise SystemExit("numpy has no bfloat16: decode to f16 or f32 instead (GetInto out_dtype)")
    ns = kv_pb.Namespace(
        model_id=a.model_id,
        layers=a.layers,
        kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        dtype=kv_pb.Dtype.Value(wire_dtype),
        chunk_tokens=a.chunk_tokens,
    )
    keys = [bytes.fromhex(k) for k in a.keys.split(",") if k]

    # gRPC core would send the socket path as :authority, which an HTTP/2
    # server rightly refuses; any plain host name will do.
    channel = grpc.insecure_channel(
        f"unix:{os.path.abspath(a.socket)}", options=[("grpc.default_authority", "localhost")]
    )
    kv = kv_grpc.KvVaultStub(channel)
    sc = sc_grpc.SidecarStub(channel)

    # How much of the prefix is cached: answered within the sidecar's
    # lookup deadline even when upstream is slow.
    look = kv.Lookup(kv_pb.LookupRequest(namespace=ns, keys=keys), timeout=5)
    n = look.prefix_chunks
    result = {"prefix_chunks": n, "tokens": 0, "shape": None, "local": []}
    if n > 0:
        info = sc.RegionInfo(sc_pb.RegionInfoRequest(), timeout=5)
        got = sc.GetInto(
            sc_pb.GetIntoRequest(namespace=ns, keys=keys[:n], prefix_only=True, lease_ms=30_000),
            timeout=60,
        )
        with open(info.path, "rb") as f:
            region = mmap.mmap(f.fileno(), info.region_bytes, prot=mmap.PROT_READ)
        try:
            found = [p for p in got.chunks[:n] if p.found]
            # Views into the shared region (no copy) joined along the token axis.
            prefix = np.concatenate([view(np, region, p, a, np_name) for p in found], axis=2)
            result["local"] = [bool(p.local) for p in found]
            # Done with the slots: give them back at once rather than at expiry.
            sc.Release(sc_pb.ReleaseRequest(lease_id=got.lease.lease_id), timeout=5)
        finally:
            region.close()
        result["tokens"] = int(prefix.shape[2])
        result["shape"] = list(prefix.shape)
        if a.out:
            np.save(a.out, prefix)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
