//! The store: tiers stacked fast to slow, chunk verification, and the
//! namespace registry. The gRPC layer talks only to this.

use std::sync::Arc;

use bytes::Bytes;
use kvault_codec::Container;
use kvault_proto::{Layout, NamespaceId};

use crate::error::{Result, ServerError};
use crate::namespace::NamespaceRegistry;
use crate::tier::{ChunkId, StoredChunk, Tier, TierKind, TierStats};

/// Tiers plus the registry that binds model ids to layouts.
pub struct Store {
    tiers: Vec<Arc<dyn Tier>>,
    namespaces: NamespaceRegistry,
    max_chunk_bytes: u64,
}

/// Checks that `blob` is a valid container (checksum included) holding a
/// whole chunk of `layout`. CPU-bound (a checksum over the whole body): call
/// it off the async runtime's threads for large bodies.
pub fn verify_chunk(layout: &Layout, blob: &[u8]) -> Result<()> {
    let c = Container::parse(blob)?;
    let h = c.header();
    let mismatch = |what: &str, got: String, want: String| {
        Err(ServerError::ChunkShape(format!(
            "{what} is {got}, namespace has {want}"
        )))
    };
    if h.total_layers != layout.layers || h.layer_start != 0 || h.layer_count != layout.layers {
        return mismatch(
            "layers",
            format!(
                "{}..{} of {}",
                h.layer_start,
                h.layer_start + h.layer_count,
                h.total_layers
            ),
            layout.layers.to_string(),
        );
    }
    if h.kv_heads != layout.kv_heads {
        return mismatch("kv_heads", h.kv_heads.to_string(), layout.kv_heads.to_string());
    }
    if h.head_dim != layout.head_dim {
        return mismatch("head_dim", h.head_dim.to_string(), layout.head_dim.to_string());
    }
    if h.dtype != layout.dtype {
        return mismatch("dtype", h.dtype.to_string(), layout.dtype.to_string());
    }
    if h.tokens == 0 || h.tokens > layout.chunk_tokens {
        return mismatch(
            "tokens",
            h.tokens.to_string(),
            format!("chunk_tokens={}", layout.chunk_tokens),
        );
    }
    Ok(())
}

impl Store {
    /// A store over `tiers` (fastest first). `max_chunk_bytes` caps one body.
    pub fn new(tiers: Vec<Arc<dyn Tier>>, namespaces: NamespaceRegistry, max_chunk_bytes: u64) -> Store {
        Store {
            tiers,
            namespaces,
            max_chunk_bytes,
        }
    }

    /// The registry of model layouts.
    pub fn namespaces(&self) -> &NamespaceRegistry {
        &self.namespaces
    }

    /// Largest chunk body accepted: the configured cap, and what the largest tier can hold.
    pub fn max_chunk_bytes(&self) -> u64 {
        let tier_max = self.tiers.iter().map(|t| t.max_chunk_bytes()).max().unwrap_or(0);
        self.max_chunk_bytes.min(tier_max)
    }

    /// Reads a chunk from the fastest tier holding it under `ns`; a hit in a
    /// slower tier is promoted into the faster ones (S3-FIFO in the RAM tier
    /// keeps such one-off reads from displacing its hot set).
    pub async fn get(&self, id: &ChunkId, ns: &NamespaceId) -> Result<Option<(TierKind, StoredChunk)>> {
        for (i, tier) in self.tiers.iter().enumerate() {
            if let Some(chunk) = tier.get(id).await? {
                // Same key stored under another namespace: not this caller's chunk.
                if &chunk.ns != ns {
                    continue;
                }
                for faster in &self.tiers[..i] {
                    if faster.max_chunk_bytes() >= chunk.blob.len() as u64 {
                        faster.insert(id.clone(), chunk.clone()).await?;
                    }
                }
                return Ok(Some((tier.kind(), chunk)));
            }
        }
        Ok(None)
    }

    /// The fastest tier holding the chunk under `ns`, without counting a read.
    pub fn locate(&self, id: &ChunkId, ns: &NamespaceId) -> Option<TierKind> {
        self.tiers.iter().find(|t| t.locate(id, ns)).map(|t| t.kind())
    }

    /// Stores a verified chunk in every tier that can hold it, slowest
    /// (durable) first: when an NVMe tier is configured the put returns only
    /// after the chunk and its index entry are durable there, and a failed
    /// durable write leaves no copy anywhere. Returns false, doing nothing,
    /// when the key is already stored under `ns`.
    pub async fn put(&self, id: ChunkId, ns: NamespaceId, blob: Bytes) -> Result<bool> {
        if self.locate(&id, &ns).is_some() {
            return Ok(false);
        }
        let len = blob.len() as u64;
        let targets: Vec<&Arc<dyn Tier>> = self.tiers.iter().filter(|t| t.max_chunk_bytes() >= len).collect();
        if targets.is_empty() {
            return Err(ServerError::TooLarge(format!(
                "chunk of {len} bytes exceeds what any tier holds ({} bytes)",
                self.max_chunk_bytes()
            )));
        }
        let chunk = StoredChunk { ns, blob };
        for tier in targets.iter().rev() {
            tier.insert(id.clone(), chunk.clone()).await?;
        }
        Ok(true)
    }

    /// Removes a chunk from every tier; true when any held it.
    pub async fn delete(&self, id: &ChunkId) -> Result<bool> {
        let mut any = false;
        for tier in &self.tiers {
            any |= tier.remove(id).await?;
        }
        Ok(any)
    }

    /// Counters of every tier, fastest first.
    pub fn stats(&self) -> Vec<(TierKind, TierStats)> {
        self.tiers.iter().map(|t| (t.kind(), t.stats())).collect()
    }
}
