//! io_uring engine: one ring on a named thread, requests over a channel,
//! completions resolving oneshots.
//!
//! Unlike foyer's engine this loop never spins: with nothing in flight it
//! blocks on the request channel, and with I/O in flight it blocks in
//! `submit_and_wait(1)`. Short transfers are not taken for success: the rest
//! is resubmitted, and a read that hits the end of the file is an error.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};

use async_trait::async_trait;
use io_uring::{IoUring, opcode, types};
use tokio::sync::oneshot;

use super::{AlignedBuf, EngineKind, IoEngine};

enum OpKind {
    Read,
    Write,
    Sync,
}

struct Request {
    kind: OpKind,
    file: Arc<File>,
    offset: u64,
    buf: Option<AlignedBuf>,
    done: oneshot::Sender<std::io::Result<Option<AlignedBuf>>>,
}

/// A request being executed: `pos` bytes of it are done.
struct InFlight {
    req: Request,
    pos: usize,
}

/// io_uring on a dedicated thread.
pub struct UringEngine {
    tx: Sender<Request>,
}

impl UringEngine {
    /// Sets up a ring of `depth` entries and its thread.
    pub fn new(depth: u32) -> std::io::Result<UringEngine> {
        let ring = IoUring::new(depth.max(2))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("kvault-uring".into())
            .spawn(move || run(ring, rx, depth.max(2) as usize))?;
        Ok(UringEngine { tx })
    }

    async fn submit(
        &self,
        kind: OpKind,
        file: Arc<File>,
        offset: u64,
        buf: Option<AlignedBuf>,
    ) -> std::io::Result<Option<AlignedBuf>> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request {
                kind,
                file,
                offset,
                buf,
                done,
            })
            .map_err(|_| std::io::Error::other("io_uring thread is gone"))?;
        rx.await
            .map_err(|_| std::io::Error::other("io_uring request dropped"))?
    }
}

fn sqe_for(slot: usize, f: &InFlight) -> io_uring::squeue::Entry {
    let fd = types::Fd(f.req.file.as_raw_fd());
    let off = f.req.offset + f.pos as u64;
    match (&f.req.kind, &f.req.buf) {
        (OpKind::Read, Some(b)) => {
            // SAFETY (by construction): the buffer lives in the slab until its completion is reaped.
            let ptr = unsafe { b.as_ptr().add(f.pos) as *mut u8 };
            opcode::Read::new(fd, ptr, (b.len() - f.pos) as u32)
                .offset(off)
                .build()
        }
        (OpKind::Write, Some(b)) => {
            let ptr = unsafe { b.as_ptr().add(f.pos) };
            opcode::Write::new(fd, ptr, (b.len() - f.pos) as u32)
                .offset(off)
                .build()
        }
        _ => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
    }
    .user_data(slot as u64)
}

fn run(mut ring: IoUring, rx: Receiver<Request>, depth: usize) {
    let mut slab: Vec<Option<InFlight>> = (0..depth).map(|_| None).collect();
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut ready: Vec<usize> = Vec::new();
    let mut closed = false;
    loop {
        let inflight = depth - free.len();
        if inflight == 0 && ready.is_empty() {
            if closed {
                return;
            }
            // Idle: block for the next request instead of spinning.
            match rx.recv() {
                Ok(r) => {
                    let slot = free.pop().expect("idle ring has free slots");
                    slab[slot] = Some(InFlight { req: r, pos: 0 });
                    ready.push(slot);
                }
                Err(_) => return,
            }
        }
        // Batch every request already waiting, up to the ring's depth.
        while !free.is_empty() && !closed {
            match rx.try_recv() {
                Ok(r) => {
                    let slot = free.pop().expect("checked non-empty");
                    slab[slot] = Some(InFlight { req: r, pos: 0 });
                    ready.push(slot);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => closed = true,
            }
        }
        for slot in ready.drain(..) {
            let f = slab[slot].as_ref().expect("ready slot is filled");
            let sqe = sqe_for(slot, f);
            // SAFETY: the entry's buffer and fd stay alive in the slab until completion.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                // Cannot happen: at most `depth` entries are ever outstanding.
                if let Some(f) = slab[slot].take() {
                    let _ = f
                        .req
                        .done
                        .send(Err(std::io::Error::other("submission queue full")));
                }
                free.push(slot);
            }
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "io_uring submit failed");
            for (slot, entry) in slab.iter_mut().enumerate() {
                if let Some(f) = entry.take() {
                    let _ = f
                        .req
                        .done
                        .send(Err(std::io::Error::other(format!("io_uring submit: {e}"))));
                    free.push(slot);
                }
            }
            continue;
        }
        let completions: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (slot, res) in completions {
            let Some(mut f) = slab.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            let want = f.req.buf.as_ref().map_or(0, |b| b.len());
            let outcome = if res < 0 {
                Some(Err(std::io::Error::from_raw_os_error(-res)))
            } else if matches!(f.req.kind, OpKind::Sync) {
                Some(Ok(None))
            } else if res == 0 && f.pos < want {
                let what = if matches!(f.req.kind, OpKind::Read) {
                    "read past end of file"
                } else {
                    "write made no progress"
                };
                Some(Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what)))
            } else {
                f.pos += res as usize;
                if f.pos >= want {
                    Some(Ok(f.req.buf.take()))
                } else {
                    None
                }
            };
            match outcome {
                Some(r) => {
                    let _ = f.req.done.send(r);
                    free.push(slot);
                }
                None => {
                    // Short transfer: resubmit the rest.
                    slab[slot] = Some(f);
                    ready.push(slot);
                }
            }
        }
    }
}

#[async_trait]
impl IoEngine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    async fn read(&self, file: Arc<File>, offset: u64, buf: AlignedBuf) -> std::io::Result<AlignedBuf> {
        self.submit(OpKind::Read, file, offset, Some(buf))
            .await?
            .ok_or_else(|| std::io::Error::other("read completed without its buffer"))
    }

    async fn write(&self, file: Arc<File>, offset: u64, buf: AlignedBuf) -> std::io::Result<AlignedBuf> {
        self.submit(OpKind::Write, file, offset, Some(buf))
            .await?
            .ok_or_else(|| std::io::Error::other("write completed without its buffer"))
    }

    async fn sync(&self, file: Arc<File>) -> std::io::Result<()> {
        self.submit(OpKind::Sync, file, 0, None).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::psync::PsyncEngine;

    async fn round_trip(engine: &dyn IoEngine) {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("f"))
                .unwrap(),
        );
        let mut writes = Vec::new();
        for i in 0..16u8 {
            let mut b = AlignedBuf::zeroed(8192);
            b.fill(i);
            writes.push(engine.write(file.clone(), i as u64 * 8192, b));
        }
        for w in futures::future::join_all(writes).await {
            w.unwrap();
        }
        engine.sync(file.clone()).await.unwrap();
        let reads: Vec<_> = (0..16u64)
            .map(|i| engine.read(file.clone(), i * 8192, AlignedBuf::zeroed(8192)))
            .collect();
        for (i, r) in futures::future::join_all(reads).await.into_iter().enumerate() {
            assert!(r.unwrap().iter().all(|b| *b == i as u8));
        }
        // Reading past the end is an error, not a short success.
        let err = engine
            .read(file.clone(), 15 * 8192 + 4096, AlignedBuf::zeroed(8192))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn uring_round_trip_and_short_read() {
        match UringEngine::new(8) {
            Ok(e) => round_trip(&e).await,
            Err(e) => eprintln!("io_uring unavailable here ({e}); psync covers the same contract"),
        }
    }

    #[tokio::test]
    async fn psync_round_trip_and_short_read() {
        round_trip(&PsyncEngine).await;
    }
}
