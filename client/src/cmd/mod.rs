//! Subcommands of `kvault` and the flags they share.

#[cfg(feature = "model")]
mod ask;
mod bench_attend;
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
mod sidecar;
mod stat;
mod transfer;
#[cfg(feature = "model")]
mod warmup;

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kvault_client::{Client, ClientConfig};

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
    /// One chunk through a local sidecar (shared memory, socket) beside a direct upstream Get: p50/p99, ops/s.
    Sidecar(bench_sidecar::BenchSidecarArgs),
    /// Codec profiles side by side on a real KV cache: ratio, error, Δppl, encode/decode GB/s.
    #[cfg(feature = "model")]
    Codec(bench_codec::BenchCodecArgs),
    /// Time to first token with a prefix recomputed vs loaded from kvault (512, 2048, 8192 tokens).
    #[cfg(feature = "model")]
    Ttft(bench_ttft::BenchTtftArgs),
}

/// How to reach the server.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Server URL.
    #[arg(long, env = "KVAULT_SERVER", default_value = "http://127.0.0.1:7070")]
    pub server: String,
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
    /// Connects to the server.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let endpoint = match &self.sidecar {
            Some(p) => format!("unix:{}", p.display()),
            None => self.server.clone(),
        };
        let mut cfg = ClientConfig::new(endpoint.clone());
        cfg.tenant = self.tenant.clone();
        cfg.token = self.token.clone();
        cfg.request_timeout = Duration::from_secs(self.timeout);
        Client::connect_with(cfg)
            .await
            .with_context(|| format!("connecting to {endpoint}"))
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
        Command::Bench(BenchCommand::Get(a)) => bench_get::run(a).await,
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
