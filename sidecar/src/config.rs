//! Sidecar configuration and its command-line form.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use kvault_server::config::ByteSize;

/// `kvault-sidecar`: a local kvault beside a serving engine: RAM cache in
/// front of the upstream servers, the kvault.v1 API on a Unix socket, and
/// decoded KV handed over in shared memory.
#[derive(Debug, Clone, Parser)]
#[command(name = "kvault-sidecar", version, about)]
pub struct Config {
    /// Upstream server URLs, comma-separated; keys are spread over them by
    /// rendezvous placement (as the client library places them).
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "etcd",
        env = "KVAULT_UPSTREAM"
    )]
    pub upstream: Vec<String>,

    /// etcd endpoints (comma-separated): the upstreams are the servers registered
    /// there, followed as they join and leave (instead of --upstream).
    #[arg(long, env = "KVAULT_ETCD", conflicts_with = "upstream")]
    pub etcd: Option<String>,

    /// The cluster's key prefix in etcd.
    #[arg(long, env = "KVAULT_ETCD_PREFIX", default_value = "/kvault")]
    pub etcd_prefix: String,

    /// Replication factor of namespaces that etcd sets none for.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,

    /// Unix socket to serve on (kvault.v1.KvVault and kvault.v1.Sidecar). Replaced if it exists.
    #[arg(long, env = "KVAULT_SIDECAR_SOCKET")]
    pub socket: PathBuf,

    /// Also serve on this TCP address (e.g. 127.0.0.1:0).
    #[arg(long)]
    pub listen: Option<SocketAddr>,

    /// Byte budget of the local RAM cache.
    #[arg(long, default_value = "1GiB")]
    pub ram_bytes: ByteSize,

    /// Largest chunk accepted by Put.
    #[arg(long, default_value = "128MiB")]
    pub max_chunk_bytes: ByteSize,

    /// Path of the shared region file (default: /dev/shm/kvault-sidecar-PID).
    #[arg(long)]
    pub shm: Option<PathBuf>,

    /// Size of the shared region; 0 turns the shared-memory path off.
    #[arg(long, default_value = "0")]
    pub shm_bytes: ByteSize,

    /// Size of one slot of the region (leases hold whole slots).
    #[arg(long, default_value = "1MiB")]
    pub slot_bytes: ByteSize,

    /// Lease lifetime when a request names none, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub lease_ms: u32,

    /// Longest lease granted, in milliseconds.
    #[arg(long, default_value_t = 300_000)]
    pub max_lease_ms: u32,

    /// Longest a Lookup or Exists waits on upstream before answering from local knowledge, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub lookup_deadline_ms: u64,

    /// Deadline of one chunk transfer to or from an upstream, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub transfer_timeout_ms: u64,

    /// Consecutive failures that open an upstream's circuit breaker.
    #[arg(long, default_value_t = 3)]
    pub breaker_failures: u32,

    /// Milliseconds an open breaker waits before probing the upstream again.
    #[arg(long, default_value_t = 1000)]
    pub breaker_cool_down_ms: u64,

    /// Bearer token for upstream servers that require one.
    #[arg(long, env = "KVAULT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Address for Prometheus metrics over HTTP (`GET /metrics`). Off when not given.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
}
