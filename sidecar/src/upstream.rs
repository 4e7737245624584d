//! The upstream servers, as a cluster handle of the client library: the
//! node set is a static list or follows etcd, keys are placed by the same
//! rendezvous hashing every client uses, and each node has a connection
//! (opened when the sidecar starts or the node joins, re-opened on demand)
//! and a circuit breaker ([`kvault_client::cluster`]).
//!
//! Every call carries its own deadline and goes through the node's breaker:
//! a down upstream costs a failed admission (microseconds), not a connect
//! timeout, and a refusal of the request itself (bad layout, too large)
//! proves the upstream is up and passes through to the caller unchanged.
//! Keys that moved when the node set changed are still read from their
//! previous owner during the cluster's grace period.

use std::time::Duration;

use bytes::Bytes;
use kvault_client::cluster::{NodeSettings, Routes};
use kvault_client::{ClientConfig, ClientError, Cluster, ClusterConfig, Membership, Tier};
use kvault_proto::{ChunkKey, Layout};
use tonic::Status;

use crate::metrics::Metrics;

/// Why an upstream call did not produce an answer.
pub use kvault_client::cluster::NodeError as UpstreamError;

/// The gRPC status a client error came from (for passing refusals through).
pub fn client_status(e: ClientError) -> Status {
    match e {
        ClientError::Server { code, message } => Status::new(code, message),
        e => Status::new(e.code(), e.to_string()),
    }
}

/// The upstream set.
pub struct Upstreams {
    cluster: Cluster,
    /// Deadline of a chunk transfer (Get, Put) to one upstream.
    pub transfer_timeout: Duration,
}

/// How to reach the upstreams.
pub struct UpstreamConfig {
    /// Where the node set comes from (a static list or etcd).
    pub membership: Membership,
    /// Replication factor of namespaces etcd sets none for.
    pub replicas: u32,
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
    /// local hits) while upstreams, or etcd, are down.
    pub async fn new(cfg: UpstreamConfig, metrics: &Metrics) -> Result<Upstreams, ClientError> {
        let mut client = ClientConfig::new("");
        client.token = cfg.token.clone();
        client.connect_timeout = Duration::from_secs(1);
        client.request_timeout = cfg.transfer_timeout;
        let mut c = ClusterConfig::new(cfg.membership);
        c.nodes = NodeSettings {
            client,
            breaker_failures: cfg.breaker_failures,
            breaker_cool_down: cfg.breaker_cool_down,
        };
        c.replicas = cfg.replicas;
        c.registry = Some(metrics.registry().clone());
        c.metrics_stem = "upstream".into();
        c.require_etcd_at_start = false;
        Ok(Upstreams {
            cluster: Cluster::connect(c).await?,
            transfer_timeout: cfg.transfer_timeout,
        })
    }

    /// The cluster handle.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The routing in force.
    pub fn routes(&self) -> std::sync::Arc<Routes> {
        self.cluster.routes()
    }

    /// Tier of each key where it is found; `None` where no node that may
    /// hold it answered in time (or all are down).
    pub async fn exists(
        &self,
        tenant: &str,
        layout: &Layout,
        keys: &[ChunkKey],
        deadline: Duration,
    ) -> Vec<Option<Tier>> {
        self.cluster
            .for_tenant(tenant)
            .with_deadline(deadline)
            .exists_each(layout, keys)
            .await
            .into_iter()
            .map(Result::ok)
            .collect()
    }

    /// Fetches chunks from where they live, in parallel across nodes. Per
    /// key: the body, `None` when no node that answered holds it, or why no
    /// node could answer.
    pub async fn get(
        &self,
        tenant: &str,
        layout: &Layout,
        keys: &[ChunkKey],
    ) -> Vec<Result<Option<Bytes>, UpstreamError>> {
        self.cluster
            .for_tenant(tenant)
            .with_deadline(self.transfer_timeout)
            .get_each(layout, keys, None)
            .await
            .into_iter()
            .map(|r| r.map(|f| f.map(|f| f.blob)))
            .collect()
    }

    /// Stores a chunk at its owners (write-through).
    pub async fn put(
        &self,
        tenant: &str,
        layout: &Layout,
        key: &ChunkKey,
        blob: Bytes,
    ) -> Result<bool, UpstreamError> {
        self.cluster
            .for_tenant(tenant)
            .with_deadline(self.transfer_timeout)
            .put_owners(layout, key, blob)
            .await
    }

    /// Deletes keys wherever they may be; the count of keys that were stored.
    pub async fn delete(
        &self,
        tenant: &str,
        layout: &Layout,
        keys: &[ChunkKey],
    ) -> Result<u32, UpstreamError> {
        self.cluster
            .for_tenant(tenant)
            .with_deadline(self.transfer_timeout)
            .delete_all(layout, keys)
            .await
    }

    /// The layout a model id is bound to, from the first upstream that knows it.
    pub async fn describe_model(
        &self,
        tenant: &str,
        model_id: &str,
        deadline: Duration,
    ) -> Result<Layout, UpstreamError> {
        self.cluster
            .for_tenant(tenant)
            .with_deadline(deadline)
            .describe(model_id)
            .await
    }
}
