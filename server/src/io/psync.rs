//! pread/pwrite on tokio's blocking pool: the fallback engine.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use async_trait::async_trait;

use super::{AlignedBuf, EngineKind, IoEngine};

/// Blocking positioned I/O, off the async threads.
pub struct PsyncEngine;

fn joined<T>(r: Result<std::io::Result<T>, tokio::task::JoinError>) -> std::io::Result<T> {
    r.map_err(|e| std::io::Error::other(format!("io task failed: {e}")))?
}

#[async_trait]
impl IoEngine for PsyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Psync
    }

    async fn read(&self, file: Arc<File>, offset: u64, mut buf: AlignedBuf) -> std::io::Result<AlignedBuf> {
        joined(
            tokio::task::spawn_blocking(move || {
                file.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            })
            .await,
        )
    }

    async fn write(&self, file: Arc<File>, offset: u64, buf: AlignedBuf) -> std::io::Result<AlignedBuf> {
        joined(
            tokio::task::spawn_blocking(move || {
                file.write_all_at(&buf, offset)?;
                Ok(buf)
            })
            .await,
        )
    }

    async fn sync(&self, file: Arc<File>) -> std::io::Result<()> {
        joined(tokio::task::spawn_blocking(move || file.sync_data()).await)
    }
}
