//! Many kvault servers as one store.
//!
//! A [`Cluster`] places every chunk key on the live nodes by weighted
//! rendezvous hashing ([`crate::placement`]), so every client and sidecar
//! with the same node set agrees on owners without talking to each other.
//! The node set comes from a static list or from etcd ([`Membership`]),
//! where each server registers under a lease ([`kvault_membership`]).
//!
//! - **Reads** (`lookup`, `exists`, `get_many`) group keys by node and ask
//!   the nodes in parallel, then stitch the answers in key order: the
//!   longest-prefix answer is exact across nodes. A key missing at its
//!   current owner is looked for at its owners under the placements of the
//!   last grace period ([`routes`]); a hit there is served and copied
//!   forward to the current owner in the background, at a bounded rate. A
//!   node that does not answer turns its keys into misses, never errors.
//! - **Writes** go to every replica of the key (the namespace's replication
//!   factor, 1 by default); reads use any replica.
//! - **Joins** are gradual: a node's weight ramps up over the ramp time its
//!   record states, in steps, so a (re)joining node takes its share of keys,
//!   and the misses and copies that come with them, a step at a time.
//! - When etcd cannot be read the last known node set stays in use, and the
//!   `STEM_membership_stale` gauge says so.

pub mod breaker;
mod copy;
pub mod metrics;
pub mod node;
pub mod routes;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use kvault_membership::{Follower, Members, View};
use kvault_proto::{ChunkKey, LayerSpan, Layout, pb};
use prometheus::Registry;
use tokio::sync::watch;

use crate::client::{Fetched, Tier};
use crate::error::{ClientError, Result};
use copy::{Copier, CopyJob};
pub use metrics::ClusterMetrics;
use node::{NodeConn, NodePool};
pub use node::{NodeError, NodeSettings};
pub use routes::{Member, Routes};

/// Where the node set comes from.
#[derive(Debug, Clone)]
pub enum Membership {
    /// A fixed list of server URLs (each its own id, weight 1). Every client
    /// must be given the same list to place keys the same way.
    Static(Vec<String>),
    /// Node records in etcd, followed as they change.
    Etcd {
        /// etcd endpoints, comma-separated.
        endpoints: String,
        /// The cluster's key prefix in etcd.
        prefix: String,
    },
}

impl Membership {
    /// A static list from comma-separated URLs.
    pub fn from_list(list: &str) -> Membership {
        Membership::Static(
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        )
    }
}

/// How a cluster handle behaves.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The node set's source.
    pub membership: Membership,
    /// Connections, credentials, deadlines and breakers of node calls.
    pub nodes: NodeSettings,
    /// Replication factor of namespaces that etcd sets none for.
    pub replicas: u32,
    /// How long keys that moved are still looked for at their previous owners.
    pub grace: Duration,
    /// Steps in which a joining node's weight ramps up.
    pub ramp_steps: u32,
    /// Bytes per second this handle copies forward at most.
    pub copy_forward_bytes_per_sec: u64,
    /// Copies waiting at most; more are dropped (and counted).
    pub copy_forward_queue: usize,
    /// How long [`Cluster::connect`] waits for etcd's first answer.
    pub sync_timeout: Duration,
    /// Whether [`Cluster::connect`] fails when etcd did not answer within
    /// `sync_timeout` (a command-line tool should); a long-lived process
    /// (the sidecar) instead starts with no nodes and follows once etcd answers.
    pub require_etcd_at_start: bool,
    /// Registry for the handle's metrics (a private one when `None`).
    pub registry: Option<Registry>,
    /// Metric name stem (`STEM_calls_total`, ...).
    pub metrics_stem: String,
}

impl ClusterConfig {
    /// Defaults for a membership source: one replica, 2 minutes of grace,
    /// 8 ramp steps, 64 MiB/s of copy-forward.
    pub fn new(membership: Membership) -> ClusterConfig {
        ClusterConfig {
            membership,
            nodes: NodeSettings::default(),
            replicas: 1,
            grace: Duration::from_secs(120),
            ramp_steps: 8,
            copy_forward_bytes_per_sec: 64 << 20,
            copy_forward_queue: 256,
            sync_timeout: Duration::from_secs(3),
            require_etcd_at_start: true,
            registry: None,
            metrics_stem: "kvault_cluster".into(),
        }
    }
}

/// What `stat` learned of one node.
#[derive(Debug, Clone)]
pub struct NodeStat {
    /// Node id.
    pub id: String,
    /// Address.
    pub addr: String,
    /// Effective placement weight now.
    pub weight: f64,
    /// Expected share of keys (weight over total weight).
    pub share: f64,
    /// Whether the node answered health checks as serving.
    pub healthy: bool,
    /// Its counters, or why it did not answer.
    pub stat: std::result::Result<pb::StatResponse, String>,
}

struct Inner {
    routes: RwLock<Arc<Routes>>,
    pool: NodePool,
    metrics: Arc<ClusterMetrics>,
    registry: Registry,
    copier: Copier,
    salt: usize,
    membership: Membership,
    /// Bumped at every routing change (tests and tools wait on it).
    changes: watch::Sender<u64>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    _follower: Option<Follower>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
    }
}

/// A handle on a cluster. Cheap to clone; clones share connections,
/// routing and metrics.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
    tenant: Option<Arc<str>>,
    deadline: Option<Duration>,
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Members with their ramped weights at `now_ms`, and when that next changes.
fn ramped(members: &Members, now_ms: u64, steps: u32) -> (Vec<Member>, Option<u64>) {
    let mut next: Option<u64> = None;
    let list = members
        .nodes
        .values()
        .map(|r| {
            if let Some(t) = r.next_ramp_change(now_ms, steps) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
            Member {
                id: r.id.clone(),
                addr: r.addr.clone(),
                weight: r.weight * r.ramp_fraction(now_ms, steps),
            }
        })
        .collect();
    (list, next)
}

impl Cluster {
    /// A handle on the cluster `cfg` describes. With etcd, waits up to
    /// `cfg.sync_timeout` for the first read of the node set and fails if
    /// etcd never answered (a running handle instead keeps its last set).
    pub async fn connect(cfg: ClusterConfig) -> Result<Cluster> {
        let registry = cfg.registry.clone().unwrap_or_default();
        let metrics = Arc::new(ClusterMetrics::new(&registry, &cfg.metrics_stem));
        let pool = NodePool::new(cfg.nodes.clone(), metrics.clone());
        let (changes, _) = watch::channel(0u64);
        let (routes, follower) = match &cfg.membership {
            Membership::Static(urls) => {
                let members = static_members(urls)?;
                let r = Routes::new(members, BTreeMap::new(), cfg.replicas, cfg.grace);
                (r, None)
            }
            Membership::Etcd { endpoints, prefix } => {
                let f = Follower::start(endpoints, prefix).map_err(|e| ClientError::InvalidEndpoint {
                    endpoint: endpoints.clone(),
                    reason: e.to_string(),
                })?;
                let mut rx = f.subscribe();
                let synced = tokio::time::timeout(cfg.sync_timeout, rx.wait_for(|v| v.synced)).await;
                if !matches!(synced, Ok(Ok(_))) && cfg.require_etcd_at_start {
                    let why = f.view().stale.unwrap_or_else(|| "no answer".into());
                    return Err(ClientError::Unavailable(format!(
                        "etcd at {endpoints} (cluster prefix {prefix}): {why}"
                    )));
                }
                let v = f.view();
                let (members, _) = ramped(&v.members, now_unix_ms(), cfg.ramp_steps);
                let r = Routes::new(members, v.members.replicas.clone(), cfg.replicas, cfg.grace);
                (r, Some(f))
            }
        };
        metrics.nodes.set(routes.members().len() as i64);
        let (copier, copies) = Copier::new(cfg.copy_forward_queue);
        let views = follower.as_ref().map(Follower::subscribe);
        let inner = Arc::new(Inner {
            routes: RwLock::new(Arc::new(routes)),
            pool,
            metrics,
            registry,
            copier,
            salt: rand::random::<u32>() as usize,
            membership: cfg.membership.clone(),
            changes,
            tasks: std::sync::Mutex::new(Vec::new()),
            _follower: follower,
        });
        {
            // The tasks hold weak references: they end when the last handle goes.
            let weak = Arc::downgrade(&inner);
            let mut t = inner.tasks.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(rx) = views {
                t.push(tokio::spawn(follow(weak.clone(), rx, cfg.ramp_steps)));
            }
            t.push(tokio::spawn(copy::run(
                weak,
                copies,
                cfg.copy_forward_bytes_per_sec,
            )));
        }
        Ok(Cluster {
            inner,
            tenant: None,
            deadline: None,
        })
    }

    /// A handle on a static list of server URLs with default settings.
    pub async fn connect_static(urls: &[String]) -> Result<Cluster> {
        Cluster::connect(ClusterConfig::new(Membership::Static(urls.to_vec()))).await
    }

    /// The same cluster acting for `tenant` (servers without tokens).
    pub fn for_tenant(&self, tenant: &str) -> Cluster {
        Cluster {
            tenant: Some(tenant.into()),
            ..self.clone()
        }
    }

    /// The same cluster with another deadline for every node call.
    pub fn with_deadline(&self, deadline: Duration) -> Cluster {
        Cluster {
            deadline: Some(deadline),
            ..self.clone()
        }
    }

    /// The routing snapshot in force.
    pub fn routes(&self) -> Arc<Routes> {
        self.inner
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Where the node set comes from.
    pub fn membership(&self) -> &Membership {
        &self.inner.membership
    }

    /// The handle's metrics registry (to export, or to read in tests).
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The handle's metrics in Prometheus' text format.
    pub fn render_metrics(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = prometheus::TextEncoder::new().encode(&self.inner.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The handle's metrics.
    pub fn metrics(&self) -> &ClusterMetrics {
        &self.inner.metrics
    }

    /// Whether the node set is the last known one because etcd cannot be read.
    pub fn is_stale(&self) -> bool {
        self.inner.metrics.membership_stale.get() > 0
    }

    /// Waits until `pred` holds for the routing in force, or `timeout`.
    pub async fn wait_routes(&self, timeout: Duration, pred: impl Fn(&Routes) -> bool) -> bool {
        let mut rx = self.inner.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.routes()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return pred(&self.routes());
            }
        }
    }

    fn deadline(&self) -> Duration {
        self.deadline.unwrap_or_else(|| self.inner.pool.request_timeout())
    }

    /// The connection to node `id`. An address that cannot be used (a broken
    /// record in etcd) makes the node unreachable, so its keys read as misses.
    fn node(&self, routes: &Routes, id: &str) -> std::result::Result<Arc<NodeConn>, NodeError> {
        let addr = routes.addr(id).unwrap_or(id);
        self.inner.pool.get(id, addr).map_err(|e| NodeError::Unreachable {
            node: id.to_string(),
            message: e.to_string(),
        })
    }

    /// Read preference among a key's replicas (spreads readers and keys).
    fn prefer(&self, key: &ChunkKey) -> usize {
        self.inner.salt.wrapping_add(key.0[0] as usize)
    }

    /// Runs a read over every key: each key's candidates are asked in turn
    /// (current owners first), all keys of one round that go to one node in
    /// one call, until each key is found, refused, or out of candidates.
    async fn read<T, F, Fut>(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
        op: &'static str,
        call: F,
        hit: fn(&T) -> bool,
    ) -> Vec<ReadOutcome<T>>
    where
        F: Fn(crate::Client, Vec<ChunkKey>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<T>>>,
    {
        let routes = self.routes();
        let now = Instant::now();
        let model = layout.model_id.as_str();
        let mut probes: Vec<Probe<T>> = keys
            .iter()
            .map(|k| Probe {
                cands: routes
                    .candidates(k, model, self.prefer(k), now)
                    .into_iter()
                    .map(String::from)
                    .collect(),
                owners: routes.owners(k, model).into_iter().map(String::from).collect(),
                next: 0,
                found: None,
                missed_owners: Vec::new(),
                answered: false,
                error: None,
            })
            .collect();
        // The deadline bounds the whole read, fallback rounds included.
        let end = Instant::now() + self.deadline();
        let tenant = self.tenant.as_deref();
        loop {
            let deadline = end.saturating_duration_since(Instant::now());
            if deadline.is_zero() {
                break;
            }
            // Node id -> positions asked of it this round.
            let mut round: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
            for (pos, p) in probes.iter().enumerate() {
                if p.found.is_none()
                    && !matches!(p.error, Some(NodeError::Refused(_)))
                    && let Some(id) = p.cands.get(p.next)
                {
                    round.entry(id.as_str()).or_default().push(pos);
                }
            }
            if round.is_empty() {
                break;
            }
            let calls = round.into_iter().map(|(id, pos)| {
                let ks: Vec<ChunkKey> = pos.iter().map(|&p| keys[p]).collect();
                let node = self.node(&routes, id);
                let call = &call;
                let id = id.to_string();
                async move {
                    let r = match node {
                        Ok(n) => {
                            self.inner
                                .pool
                                .call(&n, op, tenant, deadline, |c| call(c, ks))
                                .await
                        }
                        Err(e) => Err(e),
                    };
                    (id, pos, r)
                }
            });
            let results = join_all(calls).await;
            for (id, pos, r) in results {
                match r {
                    Ok(vals) if vals.len() == pos.len() => {
                        for (&p, v) in pos.iter().zip(vals) {
                            let pr = &mut probes[p];
                            pr.answered = true;
                            if hit(&v) {
                                pr.found = Some((v, pr.next));
                            } else {
                                if pr.owners.contains(&id) {
                                    pr.missed_owners.push(id.clone());
                                }
                                pr.next += 1;
                            }
                        }
                    }
                    Ok(vals) => {
                        let e = NodeError::Refused(ClientError::Protocol(format!(
                            "node {id} answered {} of {} keys",
                            vals.len(),
                            pos.len()
                        )));
                        for &p in &pos {
                            probes[p].error = Some(e.duplicate());
                            probes[p].next += 1;
                        }
                    }
                    Err(e) => {
                        for &p in &pos {
                            probes[p].error = Some(e.duplicate());
                            probes[p].next += 1;
                        }
                    }
                }
            }
        }
        probes
            .into_iter()
            .map(|p| {
                let went_past_first = p.next > 0 || p.found.as_ref().is_some_and(|(_, i)| *i > 0);
                if went_past_first {
                    let outcome = if p.found.is_some() { "hit" } else { "miss" };
                    self.inner
                        .metrics
                        .fallback_reads
                        .with_label_values(&[outcome])
                        .inc();
                }
                let out_of_time = p.found.is_none() && p.next < p.cands.len() && p.error.is_none();
                let error = match p.error {
                    None if out_of_time && !p.answered => Some(NodeError::Timeout {
                        node: p.cands[p.next].clone(),
                        ms: self.deadline().as_millis() as u64,
                    }),
                    e => e,
                };
                match (p.found, error) {
                    (Some((v, _)), _) => ReadOutcome::Found {
                        value: v,
                        missed_owners: p.missed_owners,
                    },
                    (None, Some(e @ NodeError::Refused(_))) => ReadOutcome::Failed(e),
                    (None, _) if p.answered => ReadOutcome::Missing,
                    (None, Some(e)) => ReadOutcome::Failed(e),
                    // No candidate at all: an empty cluster.
                    (None, None) => ReadOutcome::Missing,
                }
            })
            .collect()
    }

    /// Tier of each key wherever it is found; `Err` for keys no candidate
    /// node could answer for (down) or that a node refused.
    pub async fn exists_each(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
    ) -> Vec<std::result::Result<Tier, NodeError>> {
        let out = self
            .read(
                layout,
                keys,
                "exists",
                |c, ks| async move { c.exists(layout, &ks).await },
                |t: &Tier| *t != Tier::None,
            )
            .await;
        out.into_iter()
            .map(|o| match o {
                ReadOutcome::Found { value, .. } => Ok(value),
                ReadOutcome::Missing => Ok(Tier::None),
                ReadOutcome::Failed(e) => Err(e),
            })
            .collect()
    }

    /// Fetches each key from wherever it is found (`Ok(None)` where no node
    /// that answered holds it). Whole chunks found away from a current owner
    /// are copied forward to the owners that missed them.
    pub async fn get_each(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
        layers: Option<LayerSpan>,
    ) -> Vec<std::result::Result<Option<Fetched>, NodeError>> {
        let out = self
            .read(
                layout,
                keys,
                "get",
                |c, ks| async move { c.get_many(layout, &ks, layers).await },
                |f: &Option<Fetched>| f.is_some(),
            )
            .await;
        out.into_iter()
            .zip(keys)
            .map(|(o, key)| match o {
                ReadOutcome::Found { value, missed_owners } => {
                    // Only whole chunks move: a layer range is a partial container.
                    if layers.is_none()
                        && !missed_owners.is_empty()
                        && let Some(f) = &value
                    {
                        self.copy_forward(layout, key, f.blob.clone(), missed_owners);
                    }
                    Ok(value)
                }
                ReadOutcome::Missing => Ok(None),
                ReadOutcome::Failed(e) => Err(e),
            })
            .collect()
    }

    fn copy_forward(&self, layout: &Layout, key: &ChunkKey, blob: Bytes, targets: Vec<String>) {
        let job = CopyJob {
            layout: layout.clone(),
            key: *key,
            blob,
            targets,
            tenant: self.tenant.as_deref().map(String::from),
        };
        if !self.inner.copier.offer(job) {
            self.inner
                .metrics
                .copy_forward
                .with_label_values(&["dropped"])
                .inc();
        }
    }

    /// Stores a chunk at every current owner (replica) of its key. True when
    /// some owner stored it anew; `Err` when no owner could take it.
    pub async fn put_owners(
        &self,
        layout: &Layout,
        key: &ChunkKey,
        blob: Bytes,
    ) -> std::result::Result<bool, NodeError> {
        let routes = self.routes();
        let owners: Vec<String> = routes
            .owners(key, &layout.model_id)
            .into_iter()
            .map(String::from)
            .collect();
        self.put_at(&routes, layout, key, blob, &owners, "put").await
    }

    async fn put_at(
        &self,
        routes: &Routes,
        layout: &Layout,
        key: &ChunkKey,
        blob: Bytes,
        ids: &[String],
        op: &'static str,
    ) -> std::result::Result<bool, NodeError> {
        if ids.is_empty() {
            return Err(NodeError::Down("no nodes in the cluster".into()));
        }
        let deadline = self.deadline();
        let tenant = self.tenant.as_deref();
        let calls = ids.iter().map(|id| {
            let node = self.node(routes, id);
            let blob = blob.clone();
            async move {
                let n = node?;
                self.inner
                    .pool
                    .call(&n, op, tenant, deadline, |c| async move {
                        c.put(layout, key, blob).await
                    })
                    .await
            }
        });
        let mut stored = None;
        let mut down = None;
        for r in join_all(calls).await {
            match r {
                Ok(s) => stored = Some(stored.unwrap_or(false) | s),
                Err(e) if e.is_unavailable() => {
                    self.inner.metrics.writes_unavailable.inc();
                    down = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        match (stored, down) {
            (Some(s), _) => Ok(s),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(false),
        }
    }

    /// Deletes keys at every node that may hold them (current owners and
    /// those of the grace period). Returns how many keys were found stored.
    pub async fn delete_all(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
    ) -> std::result::Result<u32, NodeError> {
        let found = self.exists_each(layout, keys).await;
        let mut stored = 0;
        for r in &found {
            match r {
                Ok(t) if *t != Tier::None => stored += 1,
                Err(e) if !e.is_unavailable() => return Err(e.duplicate()),
                _ => {}
            }
        }
        let routes = self.routes();
        let now = Instant::now();
        let mut by_node: BTreeMap<String, Vec<ChunkKey>> = BTreeMap::new();
        for k in keys {
            for id in routes.candidates(k, &layout.model_id, 0, now) {
                by_node.entry(id.to_string()).or_default().push(*k);
            }
        }
        let deadline = self.deadline();
        let tenant = self.tenant.as_deref();
        let calls = by_node.into_iter().map(|(id, ks)| {
            let node = self.node(&routes, &id);
            async move {
                let n = node?;
                self.inner
                    .pool
                    .call(&n, "delete", tenant, deadline, |c| async move {
                        c.delete(layout, &ks).await
                    })
                    .await
            }
        });
        for r in join_all(calls).await {
            match r {
                Err(e) if !e.is_unavailable() => return Err(e),
                _ => {}
            }
        }
        Ok(stored)
    }

    /// The layout `model_id` is bound to, from the first node that knows it.
    pub async fn describe(&self, model_id: &str) -> std::result::Result<Layout, NodeError> {
        let routes = self.routes();
        let mut last = None;
        for m in routes.members() {
            let node = match self.node(&routes, &m.id) {
                Ok(n) => n,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let r = self
                .inner
                .pool
                .call(
                    &node,
                    "describe_model",
                    self.tenant.as_deref(),
                    self.deadline(),
                    |c| async move { c.describe_model(model_id).await },
                )
                .await;
            match r {
                Ok(l) => return Ok(l),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| NodeError::Down("no nodes in the cluster".into())))
    }

    /// The connection to node `id` (for calls the cluster does not route,
    /// such as attention sessions).
    pub fn client_of(&self, id: &str) -> Result<crate::Client> {
        let routes = self.routes();
        let addr = routes.addr(id).unwrap_or(id);
        let c = self.inner.pool.get(id, addr)?.client.clone();
        match &self.tenant {
            Some(t) => c.for_tenant(t),
            None => Ok(c),
        }
    }

    /// Connections and shards for offloading attention over the prefix
    /// `keys`: each run of consecutive chunks with the same (first) current
    /// owner is one shard on that node, so every server computes over the
    /// chunks it holds and the client merges the partials.
    pub fn attend_shards(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
    ) -> Result<(Vec<crate::Client>, Vec<crate::attend::Shard>)> {
        let routes = self.routes();
        let mut ids: Vec<String> = Vec::new();
        let mut shards: Vec<crate::attend::Shard> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let Some(owner) = routes.owners(k, &layout.model_id).first().map(|s| s.to_string()) else {
                return Err(ClientError::Unavailable("no nodes in the cluster".into()));
            };
            let n = match ids.iter().position(|x| *x == owner) {
                Some(n) => n,
                None => {
                    ids.push(owner);
                    ids.len() - 1
                }
            };
            match shards.last_mut() {
                Some(s) if s.server == n && s.chunks.end == i => s.chunks.end = i + 1,
                _ => shards.push(crate::attend::Shard {
                    server: n,
                    chunks: i..i + 1,
                }),
            }
        }
        let clients = ids
            .iter()
            .map(|id| self.client_of(id))
            .collect::<Result<Vec<_>>>()?;
        Ok((clients, shards))
    }

    /// Opens the connection to every current node (a health call each, in
    /// parallel) so the first request a caller times tightly does not pay
    /// TCP and HTTP/2 set-up. Returns how many nodes answered healthy.
    pub async fn warm(&self) -> usize {
        let routes = self.routes();
        let deadline = self.deadline().min(Duration::from_secs(5));
        let calls = routes.members().iter().map(|m| {
            let node = self.node(&routes, &m.id);
            async move {
                let Ok(n) = node else { return false };
                matches!(self.health(&n, deadline).await, Ok(true))
            }
        });
        join_all(calls).await.into_iter().filter(|&up| up).count()
    }

    /// One health call to `node`, through its breaker.
    async fn health(&self, node: &NodeConn, deadline: Duration) -> std::result::Result<bool, NodeError> {
        self.inner
            .pool
            .call(
                node,
                "health",
                None,
                deadline,
                |c| async move { c.health().await },
            )
            .await
    }

    /// Every current node's weight, share, health and counters, asked in parallel.
    pub async fn node_stats(&self) -> Vec<NodeStat> {
        let routes = self.routes();
        let shares: BTreeMap<String, f64> = routes.shares().into_iter().collect();
        let deadline = self.deadline().min(Duration::from_secs(5));
        let calls = routes.members().iter().map(|m| {
            let node = self.node(&routes, &m.id);
            let share = shares.get(&m.id).copied().unwrap_or(0.0);
            async move {
                let (healthy, stat) = match node {
                    Err(e) => (false, Err(e.to_string())),
                    Ok(n) => {
                        let h = self.health(&n, deadline).await;
                        let s = self
                            .inner
                            .pool
                            .call(&n, "stat", None, deadline, |c| async move { c.stat().await })
                            .await;
                        (matches!(h, Ok(true)), s.map_err(|e| e.to_string()))
                    }
                };
                NodeStat {
                    id: m.id.clone(),
                    addr: m.addr.clone(),
                    weight: m.weight,
                    share,
                    healthy,
                    stat,
                }
            }
        });
        join_all(calls).await
    }
}

/// Where a key's read ended.
enum ReadOutcome<T> {
    Found { value: T, missed_owners: Vec<String> },
    Missing,
    Failed(NodeError),
}

struct Probe<T> {
    cands: Vec<String>,
    owners: Vec<String>,
    next: usize,
    /// The value and the candidate index it came from.
    found: Option<(T, usize)>,
    /// Current owners that answered "not here".
    missed_owners: Vec<String>,
    /// Whether any candidate answered at all.
    answered: bool,
    error: Option<NodeError>,
}

fn static_members(urls: &[String]) -> Result<Vec<Member>> {
    if urls.is_empty() {
        return Err(ClientError::InvalidEndpoint {
            endpoint: String::new(),
            reason: "a cluster needs at least one server URL".into(),
        });
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(urls.len());
    for u in urls {
        if !seen.insert(u.as_str()) {
            return Err(ClientError::InvalidEndpoint {
                endpoint: u.clone(),
                reason: "listed twice".into(),
            });
        }
        // A URL tonic cannot use is refused now, not at the first call.
        crate::Client::connect_lazy(crate::ClientConfig::new(u.clone()))?;
        out.push(Member {
            id: u.clone(),
            addr: u.clone(),
            weight: 1.0,
        });
    }
    Ok(out)
}

/// Keeps routing in step with the follower's view and with ramping nodes.
async fn follow(inner: std::sync::Weak<Inner>, mut rx: watch::Receiver<View>, steps: u32) {
    let mut errors_seen = 0;
    loop {
        let view = rx.borrow_and_update().clone();
        let Some(me) = inner.upgrade() else { return };
        let m = &me.metrics;
        m.membership_stale.set(i64::from(view.stale.is_some()));
        if view.errors > errors_seen {
            m.membership_errors.inc_by(view.errors - errors_seen);
            errors_seen = view.errors;
        }
        let now_ms = now_unix_ms();
        let (members, next_ramp) = ramped(&view.members, now_ms, steps);
        let changed = {
            let mut g = me.routes.write().unwrap_or_else(|p| p.into_inner());
            let changed = !g.same(&members, &view.members.replicas);
            if changed {
                tracing::info!(
                    nodes = members.len(),
                    stale = view.stale.is_some(),
                    "cluster node set changed"
                );
                let next = g.next(members, view.members.replicas.clone(), Instant::now());
                m.nodes.set(next.members().len() as i64);
                // Connections to nodes no placement in grace mentions are closed.
                me.pool.retain(|id| next.addr(id).is_some());
                *g = Arc::new(next);
                m.membership_changes.inc();
                me.changes.send_modify(|c| *c += 1);
            }
            changed
        };
        if changed {
            // A joining node's connection is opened now, not inside the
            // deadline of the first request routed to it. Every member is
            // asked, not only new ones: a rejoining node's breaker may still
            // be open from its outage, and a later step of its ramp probes it.
            let c = Cluster {
                inner: me.clone(),
                tenant: None,
                deadline: None,
            };
            tokio::spawn(async move { c.warm().await });
        }
        drop(me);
        let wait = next_ramp.map(|t| Duration::from_millis(t.saturating_sub(now_ms).max(1)));
        match wait {
            Some(d) => {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(d) => {}
                }
            }
            None => {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}
