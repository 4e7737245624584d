//! Disk I/O for the NVMe tier: positioned reads, writes and syncs of segment
//! files, through io_uring (O_DIRECT, aligned buffers, batched submissions,
//! many reads in flight) or, where io_uring is unavailable, plain
//! `pread`/`pwrite` on blocking threads. Never blocking I/O on the async
//! runtime's threads.

pub mod buf;
pub mod psync;
pub mod uring;

use std::fs::File;
use std::sync::Arc;

use async_trait::async_trait;

pub use buf::{AlignedBuf, BufPool};

/// Alignment of offsets, lengths and buffers for O_DIRECT.
pub const ALIGN: usize = 4096;

/// Which engine performs I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// io_uring on a dedicated thread.
    Uring,
    /// pread/pwrite on tokio's blocking pool.
    Psync,
}

/// Positioned I/O on open files.
#[async_trait]
pub trait IoEngine: Send + Sync + 'static {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;
    /// Fills all of `buf` from `offset` (aligned when the file is O_DIRECT) and
    /// returns it. A short read (the file ends early) is an `UnexpectedEof` error.
    async fn read(&self, file: Arc<File>, offset: u64, buf: AlignedBuf) -> std::io::Result<AlignedBuf>;
    /// Writes all of `buf` at `offset`; returns the buffer for reuse.
    async fn write(&self, file: Arc<File>, offset: u64, buf: AlignedBuf) -> std::io::Result<AlignedBuf>;
    /// Makes written data durable (fdatasync).
    async fn sync(&self, file: Arc<File>) -> std::io::Result<()>;
}

/// Opens the engine asked for; io_uring falls back to psync (with a warning)
/// where the kernel or sandbox refuses it.
pub fn open_engine(kind: EngineKind, depth: u32) -> Arc<dyn IoEngine> {
    match kind {
        EngineKind::Psync => Arc::new(psync::PsyncEngine),
        EngineKind::Uring => match uring::UringEngine::new(depth) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable, falling back to pread/pwrite");
                Arc::new(psync::PsyncEngine)
            }
        },
    }
}
