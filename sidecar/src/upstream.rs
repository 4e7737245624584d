//! The upstream servers: one lazy connection and one circuit breaker each,
//! keys spread over them by the client library's rendezvous placement.
//!
//! Every call carries its own deadline and goes through the owner's breaker:
//! a down upstream costs a failed admission (microseconds), not a connect
//! timeout, and a refusal of the request itself (bad layout, too large)
//! proves the upstream is up and passes through to the caller unchanged.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use kvault_client::{Client, ClientConfig, ClientError, Placement, RetryPolicy, Tier};
use kvault_proto::{ChunkKey, Layout};
use thiserror::Error;
use tonic::Status;

use crate::breaker::{Admit, Breaker};
use crate::metrics::Metrics;

/// Why an upstream call did not produce an answer.
#[derive(Debug, Error)]
pub enum UpstreamError {
    /// The breaker is open: the upstream failed recently and is not tried.
    #[error("upstream {0} is down (circuit open)")]
    Down(String),
    /// The upstream could not be reached.
    #[error("upstream {url} unreachable: {message}")]
    Unreachable {
        /// The upstream.
        url: String,
        /// Transport error.
        message: String,
    },
    /// No answer within the deadline.
    #[error("upstream {url} did not answer within {ms} ms")]
    Timeout {
        /// The upstream.
        url: String,
        /// The deadline.
        ms: u64,
    },
    /// The upstream answered with a refusal, passed on to the caller.
    #[error(transparent)]
    Refused(ClientError),
}

impl UpstreamError {
    /// Whether the upstream is (treated as) unavailable, as opposed to
    /// having refused the request: such errors turn reads into misses.
    pub fn is_unavailable(&self) -> bool {
        !matches!(self, UpstreamError::Refused(_))
    }
}

impl From<UpstreamError> for Status {
    fn from(e: UpstreamError) -> Status {
        match e {
            UpstreamError::Down(_) | UpstreamError::Unreachable { .. } => Status::unavailable(e.to_string()),
            UpstreamError::Timeout { .. } => Status::deadline_exceeded(e.to_string()),
            UpstreamError::Refused(c) => client_status(c),
        }
    }
}

/// The gRPC status a client error came from (for passing refusals through).
pub fn client_status(e: ClientError) -> Status {
    match e {
        ClientError::Server { code, message } => Status::new(code, message),
        e => Status::new(client_status_code(&e), e.to_string()),
    }
}

struct Node {
    url: String,
    client: Client,
    breaker: Breaker,
}

/// The upstream set.
pub struct Upstreams {
    placement: Placement,
    nodes: Vec<Node>,
    metrics: std::sync::Arc<Metrics>,
    /// Deadline of a chunk transfer (Get, Put) to one upstream.
    pub transfer_timeout: Duration,
}

/// How to reach the upstreams.
pub struct UpstreamConfig {
    /// Server URLs, each a node of the placement (weight 1).
    pub urls: Vec<String>,
    /// Bearer token for servers with a tokens file.
    pub token: Option<String>,
    /// Failures in a row that open a breaker.
    pub breaker_failures: u32,
    /// How long a breaker stays open before a probe.
    pub breaker_cool_down: Duration,
    /// Deadline of a chunk transfer.
    pub transfer_timeout: Duration,
}

impl Upstreams {
    /// Lazy connections to every upstream: the sidecar starts (and serves
    /// local hits) while upstreams are down.
    pub async fn new(
        cfg: UpstreamConfig,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Upstreams, ClientError> {
        let placement =
            Placement::uniform(cfg.urls.iter().cloned()).map_err(|e| ClientError::InvalidEndpoint {
                endpoint: cfg.urls.join(","),
                reason: e.to_string(),
            })?;
        let mut nodes = Vec::with_capacity(cfg.urls.len());
        for url in &cfg.urls {
            let mut c = ClientConfig::new(url.clone());
            c.lazy = true;
            c.token = cfg.token.clone();
            c.connect_timeout = Duration::from_secs(1);
            c.request_timeout = cfg.transfer_timeout;
            // The breaker and the caller's deadline replace retries.
            c.retry = RetryPolicy::none();
            let client = Client::connect_with(c).await?;
            metrics.breaker_state.with_label_values(&[url.as_str()]).set(0);
            nodes.push(Node {
                url: url.clone(),
                client,
                breaker: Breaker::new(cfg.breaker_failures, cfg.breaker_cool_down),
            });
        }
        Ok(Upstreams {
            placement,
            nodes,
            metrics,
            transfer_timeout: cfg.transfer_timeout,
        })
    }

    /// Number of upstreams.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never true: at least one upstream is required.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// URL of upstream `i`.
    pub fn url(&self, i: usize) -> &str {
        &self.nodes[i].url
    }

    /// Index of the upstream owning `key`.
    pub fn owner(&self, key: &ChunkKey) -> usize {
        self.placement.owner(key)
    }

    /// Runs one call on upstream `i` for `tenant` through its breaker, under `deadline`.
    async fn call<T, F, Fut>(
        &self,
        i: usize,
        op: &str,
        tenant: &str,
        deadline: Duration,
        f: F,
    ) -> Result<T, UpstreamError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let node = &self.nodes[i];
        let count = |outcome: &str| {
            self.metrics
                .upstream_calls
                .with_label_values(&[node.url.as_str(), op, outcome])
                .inc();
        };
        if node.breaker.admit() == Admit::No {
            count("breaker_open");
            return Err(UpstreamError::Down(node.url.clone()));
        }
        let client = node.client.for_tenant(tenant).map_err(UpstreamError::Refused)?;
        let r = tokio::time::timeout(deadline, f(client)).await;
        let out = match r {
            Ok(Ok(v)) => {
                count("ok");
                Ok(v)
            }
            // A connection torn down mid-call surfaces as these codes, not
            // as Unavailable: the upstream is gone all the same.
            Ok(Err(e))
                if e.is_transient()
                    || matches!(
                        &e,
                        ClientError::Server {
                            code: tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Aborted,
                            ..
                        }
                    ) =>
            {
                count("unavailable");
                Err(UpstreamError::Unreachable {
                    url: node.url.clone(),
                    message: e.to_string(),
                })
            }
            Ok(Err(ClientError::DeadlineExceeded(_))) | Err(_) => {
                count("timeout");
                Err(UpstreamError::Timeout {
                    url: node.url.clone(),
                    ms: deadline.as_millis() as u64,
                })
            }
            Ok(Err(e)) => {
                count("refused");
                Err(UpstreamError::Refused(e))
            }
        };
        let gauge = self.metrics.breaker_state.with_label_values(&[node.url.as_str()]);
        match &out {
            Err(e) if e.is_unavailable() => {
                if node.breaker.failure() {
                    self.metrics
                        .breaker_opened
                        .with_label_values(&[node.url.as_str()])
                        .inc();
                    tracing::warn!(upstream = %node.url, error = %e, "upstream down: circuit opened");
                }
            }
            _ => node.breaker.success(),
        }
        gauge.set(node.breaker.state().as_gauge());
        out
    }

    /// Tier of each key at its owner; `None` where the owner did not answer
    /// in time (or is down).
    pub async fn exists(
        &self,
        tenant: &str,
        layout: &Layout,
        keys: &[ChunkKey],
        deadline: Duration,
    ) -> Vec<Option<Tier>> {
        let groups = self.placement.group(keys);
        let calls = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .map(|(i, g)| {
                let ks: Vec<ChunkKey> = g.iter().map(|&p| keys[p]).collect();
                async move {
                    let r = self
                        .call(i, "exists", tenant, deadline, |c| async move {
                            c.exists(layout, &ks).await
                        })
                        .await;
                    (g, r)
                }
            });
        let mut out = vec![None; keys.len()];
        for (g, r) in join_all(calls).await {
            if let Ok(tiers) = r {
                for (&p, t) in g.iter().zip(tiers) {
                    out[p] = Some(t);
                }
            }
        }
        out
    }

    /// Fetches chunks from their owners, in parallel across owners.
    /// Per key: the body, `None` when the owner does not hold it, or why the
    /// owner could not answer.
    pub async fn get(
        &self,
        tenant: &str,
        layout: &Layout,
        keys: &[ChunkKey],
    ) -> Vec<Result<Option<Bytes>, UpstreamError>> {
        let groups = self.placement.group(keys);
        let deadline = self.transfer_timeout;
        let calls = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .map(|(i, g)| {
                let ks: Vec<ChunkKey> = g.iter().map(|&p| keys[p]).collect();
                async move {
                    let r = self
                        .call(i, "get", tenant, deadline, |c| async move {
                            c.get_many(layout, &ks, None).await
                        })
                        .await;
                    (g, r)
                }
            });
        let mut out: Vec<Option<Result<Option<Bytes>, UpstreamError>>> =
            (0..keys.len()).map(|_| None).collect();
        for (g, r) in join_all(calls).await {
            match r {
                Ok(v) => {
                    for (&p, f) in g.iter().zip(v) {
                        out[p] = Some(Ok(f.map(|f| f.blob)));
                    }
                }
                Err(e) => {
                    for &p in g {
                        out[p] = Some(Err(dup(&e)));
                    }
                }
            }
        }
        out.into_iter().map(|o| o.unwrap_or(Ok(None))).collect()
    }

    /// Stores a chunk at its owner (write-through).
    pub async fn put(
        &self,
        tenant: &str,
        layout: &Layout,
        key: &ChunkKey,
        blob: Bytes,
    ) -> Result<bool, UpstreamError> {
        let i = self.owner(key);
        self.call(i, "put", tenant, self.transfer_timeout, |c| async move {
            c.put(layout, key, blob).await
        })
        .await
    }

    /// Deletes keys at their owners; the count of keys that were stored.
    pub async fn delete(
        &self,
        tenant: &str,
        layout: &Layout,
        keys: &[ChunkKey],
    ) -> Result<u32, UpstreamError> {
        let groups = self.placement.group(keys);
        let mut deleted = 0;
        for (i, g) in groups.iter().enumerate().filter(|(_, g)| !g.is_empty()) {
            let ks: Vec<ChunkKey> = g.iter().map(|&p| keys[p]).collect();
            deleted += self
                .call(i, "delete", tenant, self.transfer_timeout, |c| async move {
                    c.delete(layout, &ks).await
                })
                .await?;
        }
        Ok(deleted)
    }

    /// The layout a model id is bound to, from the first upstream that knows it.
    pub async fn describe_model(
        &self,
        tenant: &str,
        model_id: &str,
        deadline: Duration,
    ) -> Result<Layout, UpstreamError> {
        let mut last = None;
        for i in 0..self.nodes.len() {
            match self
                .call(i, "describe_model", tenant, deadline, |c| async move {
                    c.describe_model(model_id).await
                })
                .await
            {
                Ok(l) => return Ok(l),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| UpstreamError::Down("none".into())))
    }
}

/// A copy of an upstream error for each key of a failed group.
fn dup(e: &UpstreamError) -> UpstreamError {
    match e {
        UpstreamError::Down(u) => UpstreamError::Down(u.clone()),
        UpstreamError::Unreachable { url, message } => UpstreamError::Unreachable {
            url: url.clone(),
            message: message.clone(),
        },
        UpstreamError::Timeout { url, ms } => UpstreamError::Timeout {
            url: url.clone(),
            ms: *ms,
        },
        UpstreamError::Refused(c) => UpstreamError::Refused(ClientError::Server {
            code: client_status_code(c),
            message: c.to_string(),
        }),
    }
}

fn client_status_code(c: &ClientError) -> tonic::Code {
    match c {
        ClientError::InvalidArgument(_) | ClientError::Model(_) => tonic::Code::InvalidArgument,
        ClientError::LayoutMismatch(_) => tonic::Code::FailedPrecondition,
        ClientError::TooLarge(_) => tonic::Code::ResourceExhausted,
        ClientError::Unauthenticated(_) => tonic::Code::Unauthenticated,
        ClientError::NotFound(_) => tonic::Code::NotFound,
        ClientError::DeadlineExceeded(_) => tonic::Code::DeadlineExceeded,
        ClientError::Unavailable(_) | ClientError::InvalidEndpoint { .. } => tonic::Code::Unavailable,
        ClientError::Server { code, .. } => *code,
        ClientError::Protocol(_) | ClientError::Codec(_) => tonic::Code::DataLoss,
        // Not produced by the calls the sidecar makes upstream (GPU decode is local).
        ClientError::Gpu(_) => tonic::Code::Internal,
    }
}
