//! Storage tiers. Each tier stores verified chunk containers under a
//! [`ChunkId`]; the [`Store`](crate::store::Store) stacks them fast to slow.
//!
//! The trait is small on purpose: the NVMe tier and test tiers plug in beside
//! the RAM tier without the store knowing how they keep bytes.

pub mod nvme;
pub mod ram;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use kvault_proto::{ChunkKey, NamespaceId, pb};

use crate::error::Result;

/// Which tier a chunk lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TierKind {
    /// Host RAM.
    Ram,
    /// NVMe segment files.
    Nvme,
}

impl TierKind {
    /// Label used in metrics and `kvault stat`.
    pub fn name(self) -> &'static str {
        match self {
            TierKind::Ram => "ram",
            TierKind::Nvme => "nvme",
        }
    }

    /// Wire enum of the tier.
    pub fn to_proto(self) -> pb::Tier {
        match self {
            TierKind::Ram => pb::Tier::Ram,
            TierKind::Nvme => pb::Tier::Nvme,
        }
    }
}

/// A tenant name, validated at the edge and shared cheaply.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(Arc<str>);

impl Tenant {
    /// Wraps an already validated tenant name.
    pub fn new(name: &str) -> Tenant {
        Tenant(Arc::from(name))
    }

    /// The tenant's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tenant({})", &*self.0)
    }
}

/// Where a chunk is stored: a tenant sees only its own keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChunkId {
    /// Owner of the chunk.
    pub tenant: Tenant,
    /// The chained chunk key.
    pub key: ChunkKey,
}

/// A verified chunk container and the namespace it was stored under.
#[derive(Debug, Clone)]
pub struct StoredChunk {
    /// Namespace of the chunk; a read under another namespace is a miss.
    pub ns: NamespaceId,
    /// The container bytes, shared without copying.
    pub blob: Bytes,
}

/// Counters and gauges of one tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Bytes held (as the tier accounts them).
    pub bytes: u64,
    /// Byte budget.
    pub capacity_bytes: u64,
    /// Chunks held.
    pub chunks: u64,
    /// Reads answered.
    pub hits: u64,
    /// Reads not answered.
    pub misses: u64,
    /// Chunks dropped to stay in budget.
    pub evictions: u64,
    /// Segment files (NVMe tier; 0 elsewhere).
    pub segments: u64,
    /// Bytes of live chunks; `bytes - live_bytes` is dead space awaiting reclamation.
    pub live_bytes: u64,
}

/// One storage tier.
#[async_trait]
pub trait Tier: Send + Sync + 'static {
    /// Which tier this is.
    fn kind(&self) -> TierKind;

    /// Reads a chunk, counting a hit or a miss.
    async fn get(&self, id: &ChunkId) -> Result<Option<StoredChunk>>;

    /// Whether the chunk is held under `ns`, without counting a hit or miss.
    fn locate(&self, id: &ChunkId, ns: &NamespaceId) -> bool;

    /// Stores a verified chunk, replacing any copy under the same id.
    async fn insert(&self, id: ChunkId, chunk: StoredChunk) -> Result<()>;

    /// Removes a chunk; true when it was there.
    async fn remove(&self, id: &ChunkId) -> Result<bool>;

    /// Largest chunk the tier can hold at all.
    fn max_chunk_bytes(&self) -> u64;

    /// Current counters.
    fn stats(&self) -> TierStats;
}
