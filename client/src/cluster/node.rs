//! The cluster's nodes as connections: one lazy client and one circuit
//! breaker per node, and the one way calls reach a node — through its
//! breaker, under a deadline, with the outcome classified and counted.
//!
//! A refusal of the request itself (bad layout, too large) proves the node
//! is up and passes through to the caller; an unreachable node, a torn
//! connection or a missed deadline count against the breaker, and reads
//! turn them into misses.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use super::breaker::{Admit, Breaker};
use super::metrics::ClusterMetrics;
use crate::{Client, ClientConfig, ClientError, RetryPolicy};

/// Why a node did not produce an answer.
#[derive(Debug, Error)]
pub enum NodeError {
    /// The breaker is open: the node failed recently and is not tried.
    #[error("node {0} is down (circuit open)")]
    Down(String),
    /// The node could not be reached.
    #[error("node {node} unreachable: {message}")]
    Unreachable {
        /// The node.
        node: String,
        /// Transport error.
        message: String,
    },
    /// No answer within the deadline.
    #[error("node {node} did not answer within {ms} ms")]
    Timeout {
        /// The node.
        node: String,
        /// The deadline.
        ms: u64,
    },
    /// The node answered with a refusal, passed on to the caller.
    #[error(transparent)]
    Refused(ClientError),
}

impl NodeError {
    /// Whether the node is (treated as) unavailable, as opposed to having
    /// refused the request: such errors turn reads into misses.
    pub fn is_unavailable(&self) -> bool {
        !matches!(self, NodeError::Refused(_))
    }

    /// A copy, for each key of a group that failed together.
    pub fn duplicate(&self) -> NodeError {
        match self {
            NodeError::Down(n) => NodeError::Down(n.clone()),
            NodeError::Unreachable { node, message } => NodeError::Unreachable {
                node: node.clone(),
                message: message.clone(),
            },
            NodeError::Timeout { node, ms } => NodeError::Timeout {
                node: node.clone(),
                ms: *ms,
            },
            NodeError::Refused(c) => NodeError::Refused(ClientError::Server {
                code: c.code(),
                message: c.to_string(),
            }),
        }
    }
}

impl From<NodeError> for ClientError {
    fn from(e: NodeError) -> ClientError {
        match e {
            NodeError::Refused(c) => c,
            NodeError::Timeout { .. } => ClientError::DeadlineExceeded(e.to_string()),
            e => ClientError::Unavailable(e.to_string()),
        }
    }
}

/// How a process that serves the kvault API (the sidecar) answers for a
/// node's failure: unavailable, deadline exceeded, or the node's own refusal.
impl From<NodeError> for tonic::Status {
    fn from(e: NodeError) -> tonic::Status {
        match e {
            NodeError::Down(_) | NodeError::Unreachable { .. } => tonic::Status::unavailable(e.to_string()),
            NodeError::Timeout { .. } => tonic::Status::deadline_exceeded(e.to_string()),
            NodeError::Refused(ClientError::Server { code, message }) => tonic::Status::new(code, message),
            NodeError::Refused(c) => tonic::Status::new(c.code(), c.to_string()),
        }
    }
}

/// One node's connection and breaker.
pub(crate) struct NodeConn {
    pub id: String,
    pub client: Client,
    pub breaker: Breaker,
}

/// How nodes are reached.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Tenant, token and timeouts of every node connection (the endpoint
    /// is replaced by each node's address).
    pub client: ClientConfig,
    /// Failures in a row that open a node's breaker.
    pub breaker_failures: u32,
    /// How long a breaker stays open before a probe.
    pub breaker_cool_down: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        let mut client = ClientConfig::new("");
        client.connect_timeout = Duration::from_secs(1);
        NodeSettings {
            client,
            breaker_failures: 3,
            breaker_cool_down: Duration::from_secs(1),
        }
    }
}

/// Connections to every node seen, by node id. Nodes are connected lazily
/// (`Cluster::warm` opens them ahead; an etcd-following handle does so for
/// nodes that join), and kept after they leave the node set (reads of moved
/// keys may still go to them during the grace period).
pub(crate) struct NodePool {
    settings: NodeSettings,
    nodes: Mutex<HashMap<String, Arc<NodeConn>>>,
    pub metrics: Arc<ClusterMetrics>,
}

impl NodePool {
    pub fn new(settings: NodeSettings, metrics: Arc<ClusterMetrics>) -> NodePool {
        NodePool {
            settings,
            nodes: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The connection to node `id` at `addr` (made on first use; an address
    /// change for the same id makes a new one).
    pub fn get(&self, id: &str, addr: &str) -> Result<Arc<NodeConn>, ClientError> {
        let mut g = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get(id)
            && n.client.endpoint() == addr
        {
            return Ok(n.clone());
        }
        let mut cfg = self.settings.client.clone();
        cfg.endpoint = addr.to_string();
        cfg.lazy = true;
        // The breaker and the caller's deadline replace retries.
        cfg.retry = RetryPolicy::none();
        let n = Arc::new(NodeConn {
            id: id.to_string(),
            client: Client::connect_lazy(cfg)?,
            breaker: Breaker::new(self.settings.breaker_failures, self.settings.breaker_cool_down),
        });
        self.metrics.breaker_state.with_label_values(&[id]).set(0);
        g.insert(id.to_string(), n.clone());
        Ok(n)
    }

    /// Drops the connections of nodes for which `keep` is false.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut g = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|id, _| keep(id));
    }

    /// The request deadline of node calls.
    pub fn request_timeout(&self) -> Duration {
        self.settings.client.request_timeout
    }

    /// Runs one call on `node` (as `tenant` when given) through its
    /// breaker, under `deadline`.
    pub async fn call<T, F, Fut>(
        &self,
        node: &NodeConn,
        op: &str,
        tenant: Option<&str>,
        deadline: Duration,
        f: F,
    ) -> Result<T, NodeError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let id = node.id.as_str();
        let count = |outcome: &str| {
            self.metrics.calls.with_label_values(&[id, op, outcome]).inc();
        };
        if node.breaker.admit() == Admit::No {
            count("breaker_open");
            return Err(NodeError::Down(id.to_string()));
        }
        let client = match tenant {
            Some(t) => node.client.for_tenant(t).map_err(NodeError::Refused)?,
            None => node.client.clone(),
        };
        let out = match tokio::time::timeout(deadline, f(client)).await {
            Ok(Ok(v)) => {
                count("ok");
                Ok(v)
            }
            // A connection torn down mid-call surfaces as these codes, not
            // as Unavailable: the node is gone all the same.
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
                Err(NodeError::Unreachable {
                    node: id.to_string(),
                    message: e.to_string(),
                })
            }
            Ok(Err(ClientError::DeadlineExceeded(_))) | Err(_) => {
                count("timeout");
                Err(NodeError::Timeout {
                    node: id.to_string(),
                    ms: deadline.as_millis() as u64,
                })
            }
            Ok(Err(e)) => {
                count("refused");
                Err(NodeError::Refused(e))
            }
        };
        match &out {
            Err(e) if e.is_unavailable() => {
                if node.breaker.failure() {
                    self.metrics.breaker_opened.with_label_values(&[id]).inc();
                    tracing::warn!(node = %id, error = %e, "node down: circuit opened");
                }
            }
            _ => node.breaker.success(),
        }
        self.metrics
            .breaker_state
            .with_label_values(&[id])
            .set(node.breaker.state().as_gauge());
        out
    }
}
