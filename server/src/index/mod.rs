//! The NVMe tier's index: chunk id → where its bytes live, and how to check
//! them. A trait (as TiKV's engine traits) with a RocksDB implementation and
//! an in-memory one for unit tests. After a restart the index is the truth:
//! segment data is never scanned to rebuild it.

pub mod memory;
pub mod rocks;

use kvault_proto::{ChunkKey, NamespaceId};

use crate::error::{Result, ServerError};
use crate::tier::{ChunkId, Tenant};

/// Location and checksum of one chunk on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Segment file number.
    pub segment: u32,
    /// Offset of the record (header) in the segment; a multiple of 4096.
    pub offset: u64,
    /// Payload bytes (the chunk container).
    pub len: u64,
    /// crc32c of the payload.
    pub crc: u32,
    /// Namespace the chunk was stored under.
    pub ns: NamespaceId,
    /// When it was written (unix seconds).
    pub written_at: u64,
}

const ENTRY_BYTES: usize = 4 + 8 + 8 + 4 + 32 + 8;

impl IndexEntry {
    /// Fixed-size little-endian encoding.
    pub fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        b[0..4].copy_from_slice(&self.segment.to_le_bytes());
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..24].copy_from_slice(&self.crc.to_le_bytes());
        b[24..56].copy_from_slice(&self.ns.0);
        b[56..64].copy_from_slice(&self.written_at.to_le_bytes());
        b
    }

    /// Parses an encoded entry; a malformed one is a storage error.
    pub fn decode(b: &[u8]) -> Result<IndexEntry> {
        if b.len() != ENTRY_BYTES {
            return Err(ServerError::Storage(format!(
                "index entry of {} bytes, expected {ENTRY_BYTES}",
                b.len()
            )));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        let mut ns = [0u8; 32];
        ns.copy_from_slice(&b[24..56]);
        Ok(IndexEntry {
            segment: u32_at(0),
            offset: u64_at(4),
            len: u64_at(12),
            crc: u32_at(20),
            ns: NamespaceId(ns),
            written_at: u64_at(56),
        })
    }
}

/// Index key of a chunk: tenant length, tenant, chunk key.
pub fn encode_id(id: &ChunkId) -> Vec<u8> {
    let t = id.tenant.as_str().as_bytes();
    let mut k = Vec::with_capacity(1 + t.len() + 32);
    k.push(t.len() as u8);
    k.extend_from_slice(t);
    k.extend_from_slice(&id.key.0);
    k
}

/// Inverse of [`encode_id`].
pub fn decode_id(b: &[u8]) -> Result<ChunkId> {
    let bad = || ServerError::Storage("malformed index key".into());
    let n = *b.first().ok_or_else(bad)? as usize;
    if b.len() != 1 + n + 32 {
        return Err(bad());
    }
    let tenant = std::str::from_utf8(&b[1..1 + n]).map_err(|_| bad())?;
    let key = ChunkKey::from_slice(&b[1 + n..]).map_err(|_| bad())?;
    Ok(ChunkId {
        tenant: Tenant::new(tenant),
        key,
    })
}

/// Durable chunk index.
pub trait Index: Send + Sync + 'static {
    /// Every entry (startup).
    fn load_all(&self) -> Result<Vec<(ChunkId, IndexEntry)>>;
    /// Inserts or replaces entries; durable when it returns.
    fn put_batch(&self, entries: &[(ChunkId, IndexEntry)]) -> Result<()>;
    /// Removes entries; durable when it returns.
    fn remove_batch(&self, ids: &[ChunkId]) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_and_id_round_trip() {
        let e = IndexEntry {
            segment: 7,
            offset: 8192,
            len: 12345,
            crc: 0xdead_beef,
            ns: NamespaceId([3; 32]),
            written_at: 99,
        };
        assert_eq!(IndexEntry::decode(&e.encode()).unwrap(), e);
        assert!(IndexEntry::decode(&[0; 10]).is_err());
        let id = ChunkId {
            tenant: Tenant::new("alice"),
            key: ChunkKey([9; 32]),
        };
        assert_eq!(decode_id(&encode_id(&id)).unwrap(), id);
        assert!(decode_id(&[5, b'a']).is_err());
    }
}
