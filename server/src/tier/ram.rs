//! The RAM tier: a byte-budgeted, sharded map of encoded chunks.
//!
//! Eviction is foyer's in-memory S3-FIFO: new chunks enter a small FIFO and
//! only those read again graduate to the main queue, so a one-pass scan over
//! cold prefixes cannot flush the hot set (plain LRU would). Values are
//! `Bytes`, so a read hands out the stored buffer without copying it.

use std::sync::Arc;

use async_trait::async_trait;
use foyer_common::event::{Event, EventListener};
use foyer_memory::{Cache, CacheBuilder, S3FifoConfig};
use kvault_proto::NamespaceId;

use super::{ChunkId, StoredChunk, Tier, TierKind, TierStats};
use crate::error::Result;
use crate::metrics::TierCounters;

/// Bookkeeping bytes charged per chunk on top of its body, so that many tiny
/// chunks cannot overrun the budget through their map entries.
const ENTRY_OVERHEAD: usize = 128;

/// Host-RAM tier.
pub struct RamTier {
    cache: Cache<ChunkId, StoredChunk>,
    counters: TierCounters,
    shard_capacity: u64,
}

struct EvictionCounter(TierCounters);

impl EventListener for EvictionCounter {
    type Key = ChunkId;
    type Value = StoredChunk;

    fn on_leave(&self, reason: Event, _key: &ChunkId, _value: &StoredChunk) {
        if matches!(reason, Event::Evict) {
            self.0.evictions.inc();
        }
    }
}

impl RamTier {
    /// A tier holding at most `capacity` bytes over `shards` shards. Each
    /// shard has `capacity / shards` bytes, which bounds the largest chunk.
    pub fn new(capacity: u64, shards: usize, counters: TierCounters) -> RamTier {
        let shards = shards.max(1);
        let cache = CacheBuilder::new(capacity as usize)
            .with_name("kvault-ram")
            .with_shards(shards)
            .with_eviction_config(S3FifoConfig::default())
            .with_weighter(|_k: &ChunkId, v: &StoredChunk| v.blob.len() + ENTRY_OVERHEAD)
            .with_event_listener(Arc::new(EvictionCounter(counters.clone())))
            .build();
        RamTier {
            cache,
            counters,
            shard_capacity: capacity / shards as u64,
        }
    }

    /// Shard count that keeps room for at least four of the largest chunks
    /// in every shard, capped so small budgets still shard a little.
    pub fn shards_for(capacity: u64, max_chunk: u64) -> usize {
        let by_size = capacity / (4 * max_chunk.max(1));
        by_size.clamp(1, 64) as usize
    }
}

#[async_trait]
impl Tier for RamTier {
    fn kind(&self) -> TierKind {
        TierKind::Ram
    }

    async fn get(&self, id: &ChunkId) -> Result<Option<StoredChunk>> {
        // Hot path: a hash lookup and a refcount bump, no copy.
        match self.cache.get(id) {
            Some(e) => {
                self.counters.hits.inc();
                Ok(Some(e.value().clone()))
            }
            None => {
                self.counters.misses.inc();
                Ok(None)
            }
        }
    }

    fn locate(&self, id: &ChunkId, ns: &NamespaceId) -> bool {
        self.cache.get(id).is_some_and(|e| &e.value().ns == ns)
    }

    async fn insert(&self, id: ChunkId, chunk: StoredChunk) -> Result<()> {
        self.cache.insert(id, chunk);
        Ok(())
    }

    async fn remove(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.cache.remove(id).is_some())
    }

    fn max_chunk_bytes(&self) -> u64 {
        self.shard_capacity.saturating_sub(ENTRY_OVERHEAD as u64)
    }

    fn stats(&self) -> TierStats {
        TierStats {
            bytes: self.cache.usage() as u64,
            capacity_bytes: self.cache.capacity() as u64,
            chunks: self.cache.entries() as u64,
            hits: self.counters.hits.get(),
            misses: self.counters.misses.get(),
            evictions: self.counters.evictions.get(),
            segments: 0,
            live_bytes: self.cache.usage() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::tier::Tenant;
    use bytes::Bytes;
    use kvault_proto::ChunkKey;

    fn id(i: u32) -> ChunkId {
        ChunkId {
            tenant: Tenant::new("t"),
            key: ChunkKey::derive(&NamespaceId([0; 32]), None, &[i]),
        }
    }

    fn chunk(len: usize) -> StoredChunk {
        StoredChunk {
            ns: NamespaceId([0; 32]),
            blob: Bytes::from(vec![7u8; len]),
        }
    }

    #[tokio::test]
    async fn budget_holds_and_evictions_are_counted() {
        let m = Metrics::new();
        let tier = RamTier::new(64 * 1024, 2, m.tier_counters(TierKind::Ram));
        for i in 0..100 {
            tier.insert(id(i), chunk(4000)).await.unwrap();
            assert!(tier.stats().bytes <= 64 * 1024);
        }
        let s = tier.stats();
        assert!(s.evictions > 0);
        assert_eq!(s.chunks + s.evictions, 100);
    }

    #[tokio::test]
    async fn scan_does_not_flush_hot_chunks() {
        let m = Metrics::new();
        let tier = RamTier::new(100 * 1024, 1, m.tier_counters(TierKind::Ram));
        // A hot set read several times...
        for i in 0..10 {
            tier.insert(id(i), chunk(4000)).await.unwrap();
        }
        for _ in 0..3 {
            for i in 0..10 {
                assert!(tier.get(&id(i)).await.unwrap().is_some());
            }
        }
        // ...then a one-pass scan of four times the budget.
        for i in 1000..1100 {
            tier.insert(id(i), chunk(4000)).await.unwrap();
        }
        let survivors = (0..10)
            .filter(|i| tier.locate(&id(*i), &NamespaceId([0; 32])))
            .count();
        assert!(
            survivors >= 8,
            "only {survivors} of 10 hot chunks survived a scan"
        );
    }

    #[test]
    fn shard_count_leaves_room_for_large_chunks() {
        assert_eq!(RamTier::shards_for(64 << 20, 64 << 20), 1);
        assert_eq!(RamTier::shards_for(4 << 30, 64 << 20), 16);
        assert_eq!(RamTier::shards_for(1 << 40, 1 << 20), 64);
    }
}
