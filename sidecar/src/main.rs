//! `kvault-sidecar` binary: parses flags, installs logging and signal
//! handling, and runs [`kvault_sidecar::Sidecar`].

use anyhow::Context;
use clap::Parser;
use kvault_sidecar::{Config, Sidecar};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let config = Config::parse();
    let sidecar = Sidecar::bind(config).await.context("starting kvault-sidecar")?;
    // Scripts and tests read these lines to find the endpoints.
    println!("kvault-sidecar socket {}", sidecar.socket().display());
    if let Some(a) = sidecar.tcp_addr() {
        println!("kvault-sidecar listening on {a}");
    }
    if let Some(p) = sidecar.region_path() {
        println!("kvault-sidecar region {}", p.display());
    }
    if let Some(a) = sidecar.metrics_addr() {
        println!("kvault-sidecar metrics on http://{a}/metrics");
    }
    sidecar.serve(shutdown_signal()).await.context("serving")?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
