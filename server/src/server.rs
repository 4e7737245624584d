//! Wiring: binds the listeners, builds the store and services, serves until
//! shutdown, then drains in-flight requests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use kvault_membership::{NodeRecord, RegisterConfig, Registration};
use kvault_proto::MAX_MESSAGE_BYTES;
use kvault_proto::pb::kv_vault_server::KvVaultServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::attend::Attend;
use crate::auth::Auth;
use crate::config::Config;
use crate::error::ServerError;
use crate::index::Index;
use crate::index::rocks::RocksIndex;
use crate::metrics::Metrics;
use crate::namespace::NamespaceRegistry;
use crate::service::KvService;
use crate::store::Store;
use crate::tier::nvme::{NvmeConfig, NvmeCounters, NvmeTier};
use crate::tier::ram::RamTier;
use crate::tier::{Tier, TierKind};

/// A server with its listeners bound, ready to serve.
pub struct Server {
    grpc: TcpListener,
    metrics_listener: Option<TcpListener>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    auth: Arc<Auth>,
    /// The URL registered in etcd, when the server joins a cluster.
    advertise: Option<String>,
    config: Config,
}

fn startup(what: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::Storage(format!("{what}: {e}"))
}

/// Opens the NVMe tier under `--nvme-dir` (default DATA_DIR/nvme).
fn open_nvme(config: &Config, metrics: &Metrics) -> Result<Arc<dyn Tier>, ServerError> {
    let align = crate::io::ALIGN as u64;
    let cap = config.nvme_bytes.0;
    let seg = config.segment_bytes.map_or((256u64 << 20).min(cap / 8), |b| b.0);
    // Whole pages, and room for a few records per segment.
    let seg = seg.max(16 * align) / align * align;
    let dir = config
        .nvme_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("nvme"));
    let index: Arc<dyn Index> = Arc::new(RocksIndex::open(&dir.join("index"))?);
    let engine = crate::io::open_engine(config.io_engine, config.io_depth);
    let nvme = NvmeTier::open(
        NvmeConfig {
            dir,
            capacity: cap,
            segment_bytes: seg,
            engine: config.io_engine,
            queue_depth: config.io_depth,
            compact_interval: std::time::Duration::from_millis(config.compact_interval_ms.max(10)),
        },
        index,
        engine,
        metrics.tier_counters(TierKind::Nvme),
        NvmeCounters {
            corrupt: metrics.nvme_corrupt.clone(),
            compacted_bytes: metrics.nvme_compacted_bytes.clone(),
        },
    )?;
    Ok(Arc::new(nvme))
}

impl Server {
    /// Opens the data directory and binds the gRPC (and metrics) listeners.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| startup(&format!("data dir {}", config.data_dir.display()), e))?;
        let auth = match &config.tokens_file {
            Some(p) => Auth::from_file(p)?,
            None => Auth::Open,
        };
        let metrics = Arc::new(Metrics::new());
        let ram_bytes = config.ram_bytes.0;
        let max_chunk = config.max_chunk_bytes.0;
        let shards = match config.ram_shards {
            0 => RamTier::shards_for(ram_bytes, max_chunk),
            n => n,
        };
        let ram: Arc<dyn Tier> = Arc::new(RamTier::new(
            ram_bytes,
            shards,
            metrics.tier_counters(TierKind::Ram),
        ));
        let mut tiers = vec![ram];
        if config.nvme_bytes.0 > 0 {
            tiers.push(open_nvme(&config, &metrics)?);
        }
        let namespaces = NamespaceRegistry::open(&config.data_dir)?;
        let store = Arc::new(Store::new(tiers, namespaces, max_chunk));
        let grpc = TcpListener::bind(config.listen)
            .await
            .map_err(|e| startup(&format!("bind {}", config.listen), e))?;
        let metrics_listener = match config.metrics {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| startup(&format!("bind metrics {a}"), e))?,
            ),
            None => None,
        };
        let advertise = match (&config.etcd, &config.advertise) {
            (None, _) => None,
            (Some(_), Some(a)) => Some(a.clone()),
            (Some(_), None) => {
                let l = grpc
                    .local_addr()
                    .map_err(|e| startup("gRPC listener address", e))?;
                if l.ip().is_unspecified() {
                    return Err(ServerError::Config(format!(
                        "--listen {l} is not an address clients can reach: give --advertise URL with --etcd"
                    )));
                }
                Some(format!("http://{l}"))
            }
        };
        tracing::info!(ram_bytes, shards, max_chunk_bytes = max_chunk, "store ready");
        Ok(Server {
            grpc,
            metrics_listener,
            store,
            metrics,
            auth: Arc::new(auth),
            advertise,
            config,
        })
    }

    /// Address the gRPC service listens on.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.local_addr().ok()
    }

    /// Address of the metrics endpoint, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The cluster registration `--etcd` asks for: this server's record
    /// (advertised URL, capacity weight, join time and ramp) under a lease.
    fn register(&self) -> Result<Option<Registration>, ServerError> {
        let (Some(etcd), Some(addr)) = (&self.config.etcd, self.advertise.clone()) else {
            return Ok(None);
        };
        let c = &self.config;
        let weight = c.weight.unwrap_or((c.ram_bytes.0 + c.nvme_bytes.0) as f64);
        // A data directory that was a member under this id before is a
        // rejoin (a restart after a crash, a flapping node): its weight ramps
        // up. A new node takes its full share of new writes at once.
        let marker = c.data_dir.join("cluster-member");
        let rejoin = std::fs::read_to_string(&marker).is_ok_and(|id| id.trim() == addr);
        if !rejoin {
            std::fs::write(&marker, format!("{addr}\n")).map_err(|e| startup("writing cluster-member", e))?;
        }
        let record = NodeRecord {
            id: addr.clone(),
            addr,
            weight,
            registered_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            ramp_ms: if rejoin {
                c.join_ramp_secs.saturating_mul(1000)
            } else {
                0
            },
        };
        tracing::info!(id = %record.id, weight, rejoin, ramp_ms = record.ramp_ms, "joining the cluster");
        let r = Registration::start(RegisterConfig {
            etcd: etcd.clone(),
            prefix: c.etcd_prefix.clone(),
            record,
            ttl: std::time::Duration::from_secs(c.etcd_ttl_secs.max(1)),
        })
        .map_err(|e| ServerError::Config(format!("--etcd: {e}")))?;
        Ok(Some(r))
    }

    /// Serves until `shutdown` resolves, then stops accepting and drains
    /// in-flight requests.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        // Before the listeners move into their tasks: registering reads the bound address.
        let registration = self.register()?;
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<KvVaultServer<KvService>>().await;

        let metrics_task = self.metrics_listener.map(|listener| {
            let store = self.store.clone();
            let metrics = self.metrics.clone();
            let app = Router::new().route(
                "/metrics",
                get(move || {
                    let (store, metrics) = (store.clone(), metrics.clone());
                    async move { metrics.render(&store.stats()) }
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

        let attend = Arc::new(Attend::new(
            self.store.clone(),
            self.metrics.clone(),
            self.config.attend_bytes.0,
            std::time::Duration::from_secs(self.config.attend_idle_secs),
        ));
        // Idle sessions are dropped by a sweeper, not only when the next open needs room.
        let sweep_every = std::time::Duration::from_secs(self.config.attend_idle_secs.clamp(1, 30));
        let sweeper = {
            let attend = Arc::downgrade(&attend);
            let mut rx = stop_rx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(sweep_every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => match attend.upgrade() {
                            Some(a) => a.sweep(),
                            None => return,
                        },
                        _ = rx.wait_for(|s| *s) => return,
                    }
                }
            })
        };
        let svc = KvService::new(
            self.store.clone(),
            attend,
            self.auth.clone(),
            self.metrics.clone(),
            self.config.inflight_put_bytes.0,
        );
        let kv = KvVaultServer::new(svc)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);

        let mut rx = stop_rx.clone();
        let reporter = health_reporter.clone();
        tokio::spawn(async move {
            shutdown.await;
            // Leave first, so clients route around this server while it drains.
            if let Some(r) = registration {
                r.leave().await;
            }
            tracing::info!("shutting down: draining in-flight requests");
            reporter.set_not_serving::<KvVaultServer<KvService>>().await;
            let _ = stop_tx.send(true);
        });
        let incoming = tonic::transport::server::TcpIncoming::from(self.grpc).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            // Large windows and frames: chunk bodies are MiBs and loopback is fast;
            // the defaults (64 KiB windows, 16 KiB frames) cap throughput far below the link.
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(64 << 20))
            .max_frame_size(Some((1 << 20) - 1))
            .add_service(health_service)
            .add_service(kv)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .map_err(|e| ServerError::Storage(format!("grpc server: {e}")))?;
        sweeper.abort();
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}
