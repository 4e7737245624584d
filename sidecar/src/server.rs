//! Wiring: the region, the cache and upstreams, the Unix socket (and
//! optional TCP) listeners, the metrics endpoint and the lease reaper.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use kvault_client::Membership;
use kvault_proto::MAX_MESSAGE_BYTES;
use kvault_proto::pb::kv_vault_server::KvVaultServer;
use kvault_proto::pb::sidecar_server::SidecarServer;
use kvault_server::auth::Auth;
use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};
use tokio_stream::wrappers::UnixListenerStream;

use crate::chunks::Chunks;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::region::Region;
use crate::service::{Shared, SidecarKv};
use crate::shm::RunMeta;
use crate::shm::SidecarShm;
use crate::upstream::{UpstreamConfig, Upstreams};

/// Why the sidecar could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum SidecarError {
    /// A listener, the region or an upstream address could not be set up.
    #[error("{what}: {message}")]
    Startup {
        /// What was being set up.
        what: String,
        /// Why it failed.
        message: String,
    },
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Serve(String),
}

fn startup(what: impl Into<String>, e: impl std::fmt::Display) -> SidecarError {
    SidecarError::Startup {
        what: what.into(),
        message: e.to_string(),
    }
}

/// A sidecar with its listeners bound, ready to serve.
pub struct Sidecar {
    socket_path: PathBuf,
    uds: UnixListener,
    tcp: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    shared: Arc<Shared>,
    region: Option<Arc<Region<RunMeta>>>,
}

impl Sidecar {
    /// Creates the region, opens connections to the upstreams (a start while
    /// they are down still succeeds) and binds the listeners.
    pub async fn bind(config: Config) -> Result<Sidecar, SidecarError> {
        let metrics = Arc::new(Metrics::new());
        let membership = match &config.etcd {
            Some(e) => Membership::Etcd {
                endpoints: e.clone(),
                prefix: config.etcd_prefix.clone(),
            },
            None => Membership::Static(config.upstream.clone()),
        };
        let upstreams = Upstreams::new(
            UpstreamConfig {
                membership,
                replicas: config.replicas,
                token: config.token.clone(),
                breaker_failures: config.breaker_failures,
                breaker_cool_down: Duration::from_millis(config.breaker_cool_down_ms),
                transfer_timeout: Duration::from_millis(config.transfer_timeout_ms.max(1)),
            },
            &metrics,
        )
        .await
        .map_err(|e| startup("upstreams", e))?;
        // Connections are opened here, not on the first Lookup: its deadline
        // (tens of milliseconds) would otherwise go on TCP and HTTP/2 set-up
        // and the node would prefill what kvault holds. Bounded, so a hung
        // upstream delays start by at most a second.
        let warm = tokio::time::timeout(Duration::from_secs(1), upstreams.cluster().warm()).await;
        tracing::debug!(healthy = ?warm.ok(), "upstream connections opened");
        let max_chunk = config.max_chunk_bytes.0;
        let chunks = Chunks::new(config.ram_bytes.0, max_chunk, upstreams, metrics.clone());
        let region = if config.shm_bytes.0 > 0 {
            let path = config
                .shm
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("/dev/shm/kvault-sidecar-{}", std::process::id())));
            let r = Region::<RunMeta>::create(
                &path,
                config.shm_bytes.0,
                config.slot_bytes.0,
                Duration::from_millis(config.lease_ms.max(1) as u64),
                Duration::from_millis(config.max_lease_ms as u64),
            )
            .map_err(|e| startup("shared region", e))?;
            Some(Arc::new(r))
        } else {
            None
        };
        // A stale socket from a previous run would make bind fail.
        match std::fs::remove_file(&config.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(startup(format!("socket {}", config.socket.display()), e)),
        }
        let uds = UnixListener::bind(&config.socket)
            .map_err(|e| startup(format!("bind {}", config.socket.display()), e))?;
        let tcp = match config.listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| startup(format!("bind {a}"), e))?,
            ),
            None => None,
        };
        let metrics_listener = match config.metrics {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| startup(format!("bind metrics {a}"), e))?,
            ),
            None => None,
        };
        let kib = (1u64 << 30) / 1024;
        let shared = Arc::new(Shared {
            chunks,
            metrics,
            lookup_deadline: Duration::from_millis(config.lookup_deadline_ms.max(1)),
            max_chunk_bytes: max_chunk,
            put_budget: Semaphore::new(kib as usize),
            put_budget_kib: kib as u32,
            auth: Auth::Open,
            started: Instant::now(),
            region: region.clone(),
        });
        tracing::info!(
            upstreams = %config.etcd.as_ref().map_or_else(|| config.upstream.join(","), |e| format!("etcd {e}")),
            ram_bytes = config.ram_bytes.0,
            shm_bytes = region.as_ref().map_or(0, |r| r.len()),
            "sidecar ready"
        );
        Ok(Sidecar {
            socket_path: config.socket,
            uds,
            tcp,
            metrics_listener,
            shared,
            region,
        })
    }

    /// The Unix socket served on.
    pub fn socket(&self) -> &Path {
        &self.socket_path
    }

    /// The TCP address served on, when enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The region file, when shared memory is on.
    pub fn region_path(&self) -> Option<&Path> {
        self.region.as_ref().map(|r| r.path())
    }

    /// The metrics endpoint, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests and
    /// removes the socket and the region file.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), SidecarError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<KvVaultServer<SidecarKv>>().await;
        let kv = Arc::new(SidecarKv::new(self.shared.clone()));
        let shm = Arc::new(SidecarShm::new(self.shared.clone(), self.region.clone()));

        // Expired leases are freed even when nobody calls: a crashed engine's slots come back.
        let reaper = self.region.clone().map(|r| {
            let metrics = self.shared.metrics.clone();
            let mut rx = stop_rx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let n = r.reap();
                            if n > 0 {
                                metrics.leases_expired.inc_by(n as u64);
                                tracing::debug!(expired = n, "leases expired");
                            }
                        }
                        _ = rx.wait_for(|s| *s) => return,
                    }
                }
            })
        });

        let metrics_task = self.metrics_listener.map(|listener| {
            let shared = self.shared.clone();
            let region = self.region.clone();
            let app = Router::new().route(
                "/metrics",
                get(move || {
                    let (shared, region) = (shared.clone(), region.clone());
                    async move {
                        shared
                            .metrics
                            .render(shared.chunks.local_stats(), region.as_ref().map(|r| r.stats()))
                    }
                }),
            );
            let mut rx = stop_rx.clone();
            tokio::spawn(async move {
                let r = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "metrics endpoint failed");
                }
            })
        });

        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight requests");
            reporter.set_not_serving::<KvVaultServer<SidecarKv>>().await;
            let _ = stop_tx.send(true);
        });

        let tcp_task = self.tcp.map(|l| {
            let router = Self::router_static(&kv, &shm, health.clone());
            let mut rx = stop_rx.clone();
            let incoming = tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true));
            tokio::spawn(async move {
                router
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })
                    .await
            })
        });
        let mut rx = stop_rx.clone();
        let r = Self::router_static(&kv, &shm, health)
            .serve_with_incoming_shutdown(UnixListenerStream::new(self.uds), async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
        let _ = std::fs::remove_file(&self.socket_path);
        if let Some(t) = tcp_task
            && let Ok(Err(e)) = t.await
        {
            tracing::error!(error = %e, "tcp listener failed");
        }
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        if let Some(t) = reaper {
            let _ = t.await;
        }
        r.map_err(|e| SidecarError::Serve(e.to_string()))?;
        tracing::info!("stopped");
        Ok(())
    }

    fn router_static(
        kv: &Arc<SidecarKv>,
        shm: &Arc<SidecarShm>,
        health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) -> tonic::transport::server::Router {
        let kv = KvVaultServer::from_arc(kv.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let shm = SidecarServer::from_arc(shm.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        tonic::transport::Server::builder()
            // Chunk bodies are MiBs: small HTTP/2 windows and frames would cap throughput.
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(64 << 20))
            .max_frame_size(Some((1 << 20) - 1))
            .add_service(health)
            .add_service(kv)
            .add_service(shm)
    }
}
