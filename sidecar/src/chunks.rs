//! Where the sidecar's chunks come from: the local RAM cache (the server's
//! RAM tier code) in front of the upstreams.
//!
//! A read takes what the cache holds, fetches the rest from the owning
//! upstreams in one call per upstream, and keeps what it fetched. An
//! upstream that is down or slow makes its keys misses, never an error or a
//! hang: the engine recomputes those, and the breaker keeps the next miss fast.

use std::sync::Arc;

use bytes::Bytes;
use kvault_proto::{ChunkKey, Layout, NamespaceId};
use kvault_server::tier::ram::RamTier;
use kvault_server::tier::{ChunkId, StoredChunk, Tenant, Tier, TierStats};
use tonic::Status;

use crate::metrics::Metrics;
use crate::upstream::{UpstreamError, Upstreams};

/// A chunk body and where it came from.
#[derive(Debug, Clone)]
pub struct Got {
    /// The container bytes.
    pub blob: Bytes,
    /// Served by the local cache (false: fetched from upstream just now).
    pub local: bool,
}

/// The local cache and the upstreams behind it.
pub struct Chunks {
    ram: RamTier,
    /// The upstream set.
    pub upstreams: Upstreams,
    metrics: Arc<Metrics>,
}

fn id(tenant: &Tenant, key: ChunkKey) -> ChunkId {
    ChunkId {
        tenant: tenant.clone(),
        key,
    }
}

impl Chunks {
    /// A cache of `ram_bytes` in front of `upstreams`.
    pub fn new(ram_bytes: u64, max_chunk: u64, upstreams: Upstreams, metrics: Arc<Metrics>) -> Chunks {
        let shards = RamTier::shards_for(ram_bytes, max_chunk);
        Chunks {
            ram: RamTier::new(ram_bytes, shards, metrics.local.clone()),
            upstreams,
            metrics,
        }
    }

    /// Local cache counters.
    pub fn local_stats(&self) -> TierStats {
        self.ram.stats()
    }

    /// Whether the local cache holds the chunk under `ns` (no hit counted).
    pub fn is_local(&self, tenant: &Tenant, ns: &NamespaceId, key: ChunkKey) -> bool {
        self.ram.locate(&id(tenant, key), ns)
    }

    /// Keeps a chunk locally (when it fits the cache at all).
    pub async fn keep(&self, tenant: &Tenant, ns: NamespaceId, key: ChunkKey, blob: Bytes) {
        if blob.len() as u64 <= self.ram.max_chunk_bytes() {
            // The RAM tier's insert cannot fail.
            let _ = self.ram.insert(id(tenant, key), StoredChunk { ns, blob }).await;
        }
    }

    /// Drops a chunk from the local cache.
    pub async fn forget(&self, tenant: &Tenant, key: ChunkKey) {
        let _ = self.ram.remove(&id(tenant, key)).await;
    }

    /// Local chunk, counting a hit or miss.
    async fn local(&self, tenant: &Tenant, ns: &NamespaceId, key: ChunkKey) -> Option<Bytes> {
        match self.ram.get(&id(tenant, key)).await {
            Ok(Some(c)) if &c.ns == ns => Some(c.blob),
            _ => None,
        }
    }

    /// Reads chunks: local ones at once, the rest from upstream (kept
    /// locally afterwards). `None` for chunks nobody holds and for chunks
    /// whose upstream is down or slow. Refusals by an upstream (its layout
    /// for the model differs, say) are errors.
    pub async fn get(
        &self,
        tenant: &Tenant,
        layout: &Layout,
        keys: &[ChunkKey],
    ) -> Result<Vec<Option<Got>>, Status> {
        let ns = layout.namespace_id();
        let mut out: Vec<Option<Got>> = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            match self.local(tenant, &ns, *k).await {
                Some(blob) => out.push(Some(Got { blob, local: true })),
                None => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let want: Vec<ChunkKey> = missing.iter().map(|&i| keys[i]).collect();
        let fetched = self.upstreams.get(tenant.as_str(), layout, &want).await;
        for (&i, r) in missing.iter().zip(fetched) {
            match r {
                Ok(Some(blob)) => {
                    self.metrics.fetched_chunks.inc();
                    self.metrics.fetched_bytes.inc_by(blob.len() as u64);
                    self.keep(tenant, ns, keys[i], blob.clone()).await;
                    out[i] = Some(Got { blob, local: false });
                }
                Ok(None) => {}
                Err(e) if e.is_unavailable() => {
                    self.metrics.upstream_misses.inc();
                    tracing::debug!(key = %keys[i], error = %e, "upstream unavailable: answering a miss");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Stores a verified chunk upstream (write-through), then locally.
    pub async fn put(
        &self,
        tenant: &Tenant,
        layout: &Layout,
        key: ChunkKey,
        blob: Bytes,
    ) -> Result<bool, UpstreamError> {
        let stored = self
            .upstreams
            .put(tenant.as_str(), layout, &key, blob.clone())
            .await?;
        self.keep(tenant, layout.namespace_id(), key, blob).await;
        Ok(stored)
    }
}
