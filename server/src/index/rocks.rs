//! The index in RocksDB: column family `chunks` (id → entry). Writes are
//! batched and synced (WAL fsync) before a put is acknowledged.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch, WriteOptions};

use super::{Index, IndexEntry, decode_id, encode_id};
use crate::error::{Result, ServerError};
use crate::tier::ChunkId;

const CF_CHUNKS: &str = "chunks";

/// RocksDB-backed index.
pub struct RocksIndex {
    db: DB,
}

fn db_err(e: rocksdb::Error) -> ServerError {
    ServerError::Storage(format!("index: {e}"))
}

impl RocksIndex {
    /// Opens (or creates) the index under `dir`.
    pub fn open(dir: &Path) -> Result<RocksIndex> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = vec![ColumnFamilyDescriptor::new(CF_CHUNKS, Options::default())];
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(db_err)?;
        Ok(RocksIndex { db })
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(db_err)
    }

    fn cf(&self) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(CF_CHUNKS)
            .ok_or_else(|| ServerError::Storage("index: missing column family".into()))
    }
}

impl Index for RocksIndex {
    fn load_all(&self) -> Result<Vec<(ChunkId, IndexEntry)>> {
        let cf = self.cf()?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            match (decode_id(&k), IndexEntry::decode(&v)) {
                (Ok(id), Ok(e)) => out.push((id, e)),
                _ => tracing::warn!("skipping malformed index record"),
            }
        }
        Ok(out)
    }

    fn put_batch(&self, entries: &[(ChunkId, IndexEntry)]) -> Result<()> {
        let cf = self.cf()?;
        let mut b = WriteBatch::default();
        for (id, e) in entries {
            b.put_cf(cf, encode_id(id), e.encode());
        }
        self.write(b)
    }

    fn remove_batch(&self, ids: &[ChunkId]) -> Result<()> {
        let cf = self.cf()?;
        let mut b = WriteBatch::default();
        for id in ids {
            b.delete_cf(cf, encode_id(id));
        }
        self.write(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::Tenant;
    use kvault_proto::{ChunkKey, NamespaceId};

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = ChunkId {
            tenant: Tenant::new("t"),
            key: ChunkKey([1; 32]),
        };
        let e = IndexEntry {
            segment: 1,
            offset: 0,
            len: 10,
            crc: 5,
            ns: NamespaceId([2; 32]),
            written_at: 1,
        };
        {
            let idx = RocksIndex::open(dir.path()).unwrap();
            idx.put_batch(&[(id.clone(), e)]).unwrap();
        }
        let idx = RocksIndex::open(dir.path()).unwrap();
        assert_eq!(idx.load_all().unwrap(), vec![(id.clone(), e)]);
        idx.remove_batch(&[id]).unwrap();
        assert!(idx.load_all().unwrap().is_empty());
    }
}
