//! Subcommands of `kvault` and the flags they share.

#[cfg(feature = "model")]
mod ask;
mod bench_attend;
mod bench_cluster;
#[cfg(feature = "model")]
mod bench_codec;
mod bench_get;
mod bench_sidecar;
#[cfg(feature = "model")]
mod bench_ttft;
#[cfg(feature = "model")]
mod codec_eval;
#[cfg(feature = "model")]
mod demo;
mod replicas;
mod sidecar;
mod stat;
mod transfer;
#[cfg(feature = "model")]
mod warmup;

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use kvault_client::{
    ChunkKey, ChunkStore, Client, ClientConfig, Cluster, ClusterConfig, Fetched, Layout, Lookup, Membership,
    Tier,
};
use kvault_proto::LayerSpan;

/// kvault: store and fetch LLM KV caches.
#[derive(Debug, Parser)]
#[command(name = "kvault", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Split a KV cache file (safetensors: `kv`, `ids`) into chunks, encode and store them.
    Import(transfer::ImportArgs),
    /// Fetch the longest cached prefix of the token ids in a file and write it as safetensors.
    Export(transfer::ExportArgs),
    /// Delete the chunks of a prefix (token ids from a file) or given keys.
    Rm(transfer::RmArgs),
    /// List codec profiles, one per line, name first.
    Profiles,
    /// Show per-tier bytes, chunk counts and hit rates of a server.
    Stat(stat::StatArgs),
    /// Show or set a namespace's replication factor in the cluster's etcd.
    Replicas(replicas::ReplicasArgs),
    /// Run a sidecar beside a serving engine: local cache, Unix socket, shared-memory hand-off.
    Sidecar(sidecar::SidecarArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Prefill documents with a GGUF model and store their KV caches (skips what is stored).
    #[cfg(feature = "model")]
    Warmup(warmup::WarmupArgs),
    /// Answer a question about a document, with its KV cache from kvault when stored; print the TTFT split.
    #[cfg(feature = "model")]
    Ask(ask::AskArgs),
    /// Every codec profile on real KV caches of a model: size, error and perplexity change.
    #[cfg(feature = "model")]
    CodecEval(codec_eval::CodecEvalArgs),
    /// The main job: start a server, ask SmolLM2 about a bundled text cold, warm it up, ask again from kvault, print TTFT.
    #[cfg(feature = "model")]
    Demo(demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Attention workers: GB/s of KV read beside memory bandwidth, wire bytes vs KV bytes, loopback step latency.
    Attend(bench_attend::BenchAttendArgs),
    /// Get throughput from the RAM tier over loopback, beside raw TCP and Redis.
    Get(bench_get::BenchGetArgs),
    /// Several servers as one store: Get throughput with 1-3 servers, lookup of a prefix over 3, time to route around a dead server.
    Cluster(bench_cluster::BenchClusterArgs),
    /// One chunk through a local sidecar (shared memory, socket) beside a direct upstream Get: p50/p99, ops/s.
    Sidecar(bench_sidecar::BenchSidecarArgs),
    /// Codec profiles side by side on a real KV cache: ratio, error, Δppl, encode/decode GB/s.
    #[cfg(feature = "model")]
    Codec(bench_codec::BenchCodecArgs),
    /// Time to first token with a prefix recomputed vs loaded from kvault (512, 2048, 8192 tokens).
    #[cfg(feature = "model")]
    Ttft(bench_ttft::BenchTtftArgs),
}

/// How to reach the store: one server, several (a static cluster), the
/// cluster registered in etcd, or a local sidecar.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Server URL, or several comma-separated: a cluster with a static node set
    /// (every client must list the same servers). `--nodes` is the same flag.
    #[arg(
        long,
        alias = "nodes",
        env = "KVAULT_SERVER",
        default_value = "http://127.0.0.1:7070"
    )]
    pub server: String,
    /// etcd endpoints (comma-separated): use the cluster whose servers registered
    /// there, following joins and leaves (wins over --server).
    #[arg(long, env = "KVAULT_ETCD")]
    pub etcd: Option<String>,
    /// The cluster's key prefix in etcd.
    #[arg(long, env = "KVAULT_ETCD_PREFIX", default_value = "/kvault")]
    pub etcd_prefix: String,
    /// Replication factor for namespaces that etcd sets none for (clusters only;
    /// every client must use the same).
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Use a local sidecar's Unix socket instead of a direct server connection (wins over --server).
    #[arg(long, env = "KVAULT_SIDECAR")]
    pub sidecar: Option<std::path::PathBuf>,
    /// Tenant to act for (servers without tokens).
    #[arg(long, env = "KVAULT_TENANT")]
    pub tenant: Option<String>,
    /// Bearer token (servers with a tokens file).
    #[arg(long, env = "KVAULT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Deadline of each call, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

impl ServerArgs {
    /// One server at `url`, calls bounded by `timeout_s`.
    pub fn url(url: String, timeout_s: u64) -> ServerArgs {
        ServerArgs {
            server: url,
            etcd: None,
            etcd_prefix: "/kvault".into(),
            replicas: 1,
            sidecar: None,
            tenant: None,
            token: None,
            timeout: timeout_s,
        }
    }

    fn client_config(&self, endpoint: String) -> ClientConfig {
        let mut cfg = ClientConfig::new(endpoint);
        cfg.tenant = self.tenant.clone();
        cfg.token = self.token.clone();
        cfg.request_timeout = Duration::from_secs(self.timeout);
        cfg
    }

    /// The membership source these flags describe, if they describe a cluster.
    pub fn membership(&self) -> Option<Membership> {
        if self.sidecar.is_some() {
            return None;
        }
        match &self.etcd {
            Some(e) => Some(Membership::Etcd {
                endpoints: e.clone(),
                prefix: self.etcd_prefix.clone(),
            }),
            None if self.server.contains(',') => Some(Membership::from_list(&self.server)),
            None => None,
        }
    }

    /// Connects to the store: a sidecar, one server, or a cluster.
    pub async fn connect(&self) -> anyhow::Result<Store> {
        if let Some(m) = self.membership() {
            return Ok(Store::Cluster(self.connect_cluster(m).await?));
        }
        let endpoint = match &self.sidecar {
            Some(p) => format!("unix:{}", p.display()),
            None => self.server.clone(),
        };
        Client::connect_with(self.client_config(endpoint.clone()))
            .await
            .map(|c| Store::One(Box::new(c)))
            .with_context(|| format!("connecting to {endpoint}"))
    }

    /// A cluster handle, even for a single --server URL (for `stat --cluster`).
    pub async fn connect_cluster(&self, m: Membership) -> anyhow::Result<Cluster> {
        let what = match &m {
            Membership::Static(u) => u.join(","),
            Membership::Etcd { endpoints, prefix } => format!("etcd {endpoints} (prefix {prefix})"),
        };
        let mut cfg = ClusterConfig::new(m);
        cfg.nodes.client = self.client_config(String::new());
        cfg.replicas = self.replicas;
        Cluster::connect(cfg)
            .await
            .with_context(|| format!("connecting to the cluster at {what}"))
    }
}

/// What a command talks to: one server (or a sidecar), or a cluster.
#[derive(Clone)]
pub enum Store {
    /// One server or a sidecar (boxed: a client is ten times a cluster handle).
    One(Box<Client>),
    /// Several servers.
    Cluster(Cluster),
}

impl ChunkStore for Store {
    async fn lookup(&self, layout: &Layout, keys: &[ChunkKey]) -> kvault_client::Result<Lookup> {
        match self {
            Store::One(c) => c.lookup(layout, keys).await,
            Store::Cluster(c) => ChunkStore::lookup(c, layout, keys).await,
        }
    }

    async fn exists(&self, layout: &Layout, keys: &[ChunkKey]) -> kvault_client::Result<Vec<Tier>> {
        match self {
            Store::One(c) => c.exists(layout, keys).await,
            Store::Cluster(c) => ChunkStore::exists(c, layout, keys).await,
        }
    }

    async fn put(&self, layout: &Layout, key: &ChunkKey, blob: Bytes) -> kvault_client::Result<bool> {
        match self {
            Store::One(c) => c.put(layout, key, blob).await,
            Store::Cluster(c) => ChunkStore::put(c, layout, key, blob).await,
        }
    }

    async fn get_many(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
        layers: Option<LayerSpan>,
    ) -> kvault_client::Result<Vec<Option<Fetched>>> {
        match self {
            Store::One(c) => c.get_many(layout, keys, layers).await,
            Store::Cluster(c) => ChunkStore::get_many(c, layout, keys, layers).await,
        }
    }

    async fn delete(&self, layout: &Layout, keys: &[ChunkKey]) -> kvault_client::Result<u32> {
        match self {
            Store::One(c) => c.delete(layout, keys).await,
            Store::Cluster(c) => ChunkStore::delete(c, layout, keys).await,
        }
    }

    async fn describe_model(&self, model_id: &str) -> kvault_client::Result<Layout> {
        match self {
            Store::One(c) => c.describe_model(model_id).await,
            Store::Cluster(c) => ChunkStore::describe_model(c, model_id).await,
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self, Store::Cluster(_))
    }
}

impl Store {
    /// Connections and shards for offloading attention over `keys`: each
    /// run of consecutive chunks with the same owner is one shard.
    pub fn attend_shards(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
    ) -> anyhow::Result<(Vec<Client>, Vec<kvault_client::attend::Shard>)> {
        use kvault_client::attend::Shard;
        match self {
            Store::One(c) => Ok((
                vec![(**c).clone()],
                vec![Shard {
                    server: 0,
                    chunks: 0..keys.len(),
                }],
            )),
            Store::Cluster(c) => Ok(c.attend_shards(layout, keys)?),
        }
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Import(a) => transfer::import(a).await,
        Command::Export(a) => transfer::export(a).await,
        Command::Rm(a) => transfer::rm(a).await,
        Command::Profiles => {
            for p in kvault_codec::Profile::ALL {
                println!("{:<18} {}", p.name(), p.description());
            }
            Ok(())
        }
        Command::Stat(a) => stat::stat(a).await,
        Command::Sidecar(a) => sidecar::run(a),
        Command::Replicas(a) => replicas::run(a).await,
        Command::Bench(BenchCommand::Get(a)) => bench_get::run(a).await,
        Command::Bench(BenchCommand::Cluster(a)) => bench_cluster::run(a).await,
        Command::Bench(BenchCommand::Sidecar(a)) => bench_sidecar::run(a).await,
        Command::Bench(BenchCommand::Attend(a)) => bench_attend::run(a).await,
        // CPU-bound for minutes: off the async runtime.
        #[cfg(feature = "model")]
        Command::Bench(BenchCommand::Codec(a)) => {
            tokio::task::spawn_blocking(move || bench_codec::run(a)).await?
        }
        #[cfg(feature = "model")]
        Command::CodecEval(a) => tokio::task::spawn_blocking(move || codec_eval::run(a)).await?,
        #[cfg(feature = "model")]
        Command::Bench(BenchCommand::Ttft(a)) => bench_ttft::run(a).await,
        #[cfg(feature = "model")]
        Command::Demo(a) => demo::run(a).await,
        #[cfg(feature = "model")]
        Command::Warmup(a) => warmup::run(a).await,
        #[cfg(feature = "model")]
        Command::Ask(a) => ask::run(a).await,
    }
}
