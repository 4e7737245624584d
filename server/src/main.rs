//! `kvault-server` binary: parses flags, installs logging and signal
//! handling, and runs [`kvault_server::Server`].

use anyhow::Context;
use clap::Parser;
use kvault_server::{Config, Server};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let config = Config::parse();
    let server = Server::bind(config).await.context("starting kvault-server")?;
    // Scripts and tests read these lines to find the ports (port 0 binds a free one).
    if let Some(a) = server.grpc_addr() {
        println!("kvault-server listening on {a}");
    }
    if let Some(a) = server.metrics_addr() {
        println!("kvault-server metrics on http://{a}/metrics");
    }
    server.serve(shutdown_signal()).await.context("serving")?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
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
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
