//! In-memory index for unit tests of the NVMe tier (no durability).

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Index, IndexEntry};
use crate::error::Result;
use crate::tier::ChunkId;

/// A HashMap behind a mutex.
#[derive(Default)]
pub struct MemoryIndex {
    map: Mutex<HashMap<ChunkId, IndexEntry>>,
}

impl Index for MemoryIndex {
    fn load_all(&self) -> Result<Vec<(ChunkId, IndexEntry)>> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Ok(m.iter().map(|(k, v)| (k.clone(), *v)).collect())
    }

    fn put_batch(&self, entries: &[(ChunkId, IndexEntry)]) -> Result<()> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in entries {
            m.insert(k.clone(), *v);
        }
        Ok(())
    }

    fn remove_batch(&self, ids: &[ChunkId]) -> Result<()> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for k in ids {
            m.remove(k);
        }
        Ok(())
    }
}
