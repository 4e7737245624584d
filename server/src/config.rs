//! Server configuration and its command-line form.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;

/// A byte count written as `4GiB`, `512MiB`, `64KiB`, `1000000` (also GB/MB/KB as powers of ten).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a byte size like 4GiB"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            u => return Err(format!("unknown unit {u:?} in {s:?} (use B, KiB, MiB, GiB, TiB)")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} overflows"))
    }
}

/// `kvault-server`: stores LLM KV-cache chunks and serves them over gRPC.
#[derive(Debug, Clone, Parser)]
#[command(name = "kvault-server", version, about)]
pub struct Config {
    /// Address for the gRPC service (`kvault.v1.KvVault` and gRPC health). Port 0 picks a free port;
    /// the bound address is printed on stdout as `kvault-server listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:7070", env = "KVAULT_LISTEN")]
    pub listen: SocketAddr,

    /// Directory for persistent state (model layout registry; NVMe segments later). Created if missing.
    #[arg(long, default_value = "./kvault-data", env = "KVAULT_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Byte budget of the RAM tier (chunk bodies plus a small per-chunk overhead), e.g. 4GiB.
    #[arg(long, default_value = "4GiB", env = "KVAULT_RAM_BYTES")]
    pub ram_bytes: ByteSize,

    /// RAM tier shards (0 = automatic: as many as leave room for four of the largest chunks per shard, at most 64).
    #[arg(long, default_value_t = 0)]
    pub ram_shards: usize,

    /// Largest chunk body accepted by Put (a 256-token Llama-3-8B chunk in fp16 is 32 MiB).
    #[arg(long, default_value = "128MiB")]
    pub max_chunk_bytes: ByteSize,

    /// Upper bound on Put bodies buffered at once across all clients; further puts wait.
    #[arg(long, default_value = "1GiB")]
    pub inflight_put_bytes: ByteSize,

    /// Address for Prometheus metrics over HTTP (`GET /metrics`). Off when not given.
    #[arg(long, env = "KVAULT_METRICS")]
    pub metrics: Option<SocketAddr>,

    /// Byte budget of the NVMe tier (segment files). 0 turns the tier off (RAM only).
    #[arg(long, default_value = "0", env = "KVAULT_NVME_BYTES")]
    pub nvme_bytes: ByteSize,

    /// Directory of the NVMe tier's segments and RocksDB index (default: DATA_DIR/nvme).
    #[arg(long)]
    pub nvme_dir: Option<PathBuf>,

    /// Segment file size (default: 256MiB, or an eighth of --nvme-bytes when that is smaller).
    #[arg(long)]
    pub segment_bytes: Option<ByteSize>,

    /// I/O engine of the NVMe tier: io_uring (falls back to psync where unavailable) or pread/pwrite.
    #[arg(long, value_enum, default_value = "uring")]
    pub io_engine: crate::io::EngineKind,

    /// io_uring queue depth (reads and writes in flight).
    #[arg(long, default_value_t = 64)]
    pub io_depth: u32,

    /// Milliseconds between compactor passes over mostly-dead segments.
    #[arg(long, default_value_t = 2000)]
    pub compact_interval_ms: u64,

    /// Memory for attention sessions (prefixes decoded for `Attend`); opens past it are refused.
    #[arg(long, default_value = "2GiB", env = "KVAULT_ATTEND_BYTES")]
    pub attend_bytes: ByteSize,

    /// Seconds an attention session may sit unused before it is dropped.
    #[arg(long, default_value_t = 300)]
    pub attend_idle_secs: u64,

    /// File of `<token> <tenant>` lines. When given, every request needs `authorization: Bearer <token>`
    /// and acts for that token's tenant; otherwise the tenant comes from `x-kvault-tenant` (default `default`).
    #[arg(long)]
    pub tokens_file: Option<PathBuf>,
    /// etcd endpoints (comma-separated): join the cluster there, registering this server's address and
    /// capacity under a lease that is kept alive (and revoked on shutdown).
    #[arg(long, env = "KVAULT_ETCD")]
    pub etcd: Option<String>,
    /// The cluster's key prefix in etcd.
    #[arg(long, env = "KVAULT_ETCD_PREFIX", default_value = "/kvault")]
    pub etcd_prefix: String,
    /// URL clients reach this server at, registered in etcd and used as its placement id
    /// (default: http://LISTEN, which needs a concrete --listen address).
    #[arg(long, env = "KVAULT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Seconds the etcd lease lives without a refresh: how long a crashed server stays listed.
    #[arg(long, default_value_t = 10)]
    pub etcd_ttl_secs: u64,
    /// Seconds over which this server's placement weight ramps up when it rejoins (its data
    /// directory was a member under the same id before: a restart, a flapping node), so that it
    /// takes its share of keys, and the misses and copies they bring, gradually (0: at once).
    /// A new node takes its full share at once.
    #[arg(long, default_value_t = 30)]
    pub join_ramp_secs: u64,
    /// Placement weight to register (default: the RAM + NVMe byte budgets).
    #[arg(long)]
    pub weight: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!("4GiB".parse::<ByteSize>().unwrap().0, 4 << 30);
        assert_eq!("512 MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("1000".parse::<ByteSize>().unwrap().0, 1000);
        assert_eq!("2GB".parse::<ByteSize>().unwrap().0, 2_000_000_000);
        assert!("12XB".parse::<ByteSize>().is_err());
        assert!("GiB".parse::<ByteSize>().is_err());
        assert!("99999999999999TiB".parse::<ByteSize>().is_err());
    }
}
