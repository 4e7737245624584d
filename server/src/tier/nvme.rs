//! The NVMe tier: append-only segment files written and read through an
//! [`IoEngine`] (io_uring with O_DIRECT by default), indexed in RocksDB.
//!
//! - **Records**: a 64-byte header (magic, payload length, crc32c, key) and
//!   the chunk container, padded to 4096 bytes so every read and write is
//!   O_DIRECT-aligned.
//! - **Durability**: a put is acknowledged after its record is written and
//!   fdatasync'ed and its index entry is committed with a synced WAL. One
//!   writer task groups concurrent puts into one sync of each touched segment
//!   and one index batch (group commit).
//! - **Reads** check the record header and the payload's crc32c against the
//!   index; a torn, truncated or corrupted record is dropped and answered as
//!   a miss (counted in `kvault_nvme_corrupt_total`), never served.
//! - **Budget**: when a write would pass `capacity`, whole oldest segments are
//!   evicted (FIFO by write order, the coldest data for a cache fed by
//!   prefill). A compactor copies the live records of sealed segments that
//!   are mostly dead (after deletes and overwrites) forward, then deletes them.
//!   Reads never wait on it: they hold their own handle to the segment file.
//! - **Restart**: the index is the truth; segment files are only opened, never
//!   scanned. Entries that point into a missing segment are dropped.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kvault_proto::NamespaceId;
use prometheus::IntCounter;
use tokio::sync::{mpsc, oneshot};

use super::{ChunkId, StoredChunk, Tier, TierKind, TierStats};
use crate::error::{Result, ServerError};
use crate::index::{Index, IndexEntry};
use crate::io::{ALIGN, AlignedBuf, BufPool, EngineKind, IoEngine};
use crate::metrics::TierCounters;

const RECORD_MAGIC: [u8; 4] = *b"KVSR";
const HEADER: usize = 64;
/// Most puts folded into one group commit.
const MAX_GROUP: usize = 64;
/// Free space kept for the index (WAL, memtable flushes): RocksDB must never
/// meet a full disk, since it then refuses every later write.
const INDEX_HEADROOM: u64 = 1 << 20;

/// Settings of the NVMe tier.
#[derive(Debug, Clone)]
pub struct NvmeConfig {
    /// Directory of segment files and the index.
    pub dir: PathBuf,
    /// Byte budget for segment files.
    pub capacity: u64,
    /// Size at which a segment is sealed and a new one started.
    pub segment_bytes: u64,
    /// I/O engine.
    pub engine: EngineKind,
    /// io_uring queue depth.
    pub queue_depth: u32,
    /// How often the compactor looks for mostly-dead segments.
    pub compact_interval: Duration,
}

/// Counters specific to the NVMe tier.
#[derive(Clone)]
pub struct NvmeCounters {
    /// Records dropped because they failed their checks.
    pub corrupt: IntCounter,
    /// Bytes copied forward by the compactor.
    pub compacted_bytes: IntCounter,
}

fn aligned(n: u64) -> u64 {
    n.div_ceil(ALIGN as u64) * ALIGN as u64
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Segment {
    file: Arc<File>,
    /// Bytes appended (aligned), i.e. the file's useful length.
    written: u64,
    /// Aligned bytes of records the index still points to.
    live: u64,
}

struct State {
    map: HashMap<ChunkId, IndexEntry>,
    segments: BTreeMap<u32, Segment>,
    /// Segment new records go to; only the writer task changes it.
    active: u32,
}

impl State {
    fn total_written(&self) -> u64 {
        self.segments.values().map(|s| s.written).sum()
    }

    /// Forgets an entry, keeping the live-byte accounting right.
    fn drop_entry(&mut self, id: &ChunkId) -> Option<IndexEntry> {
        let e = self.map.remove(id)?;
        if let Some(s) = self.segments.get_mut(&e.segment) {
            s.live = s.live.saturating_sub(aligned(HEADER as u64 + e.len));
        }
        Some(e)
    }
}

struct WriteReq {
    id: ChunkId,
    chunk: StoredChunk,
    /// For compaction moves: apply only if the index still holds this entry.
    expect: Option<IndexEntry>,
    done: oneshot::Sender<Result<()>>,
}

struct Inner {
    cfg: NvmeConfig,
    pool: Arc<BufPool>,
    direct: bool,
    engine: Arc<dyn IoEngine>,
    index: Arc<dyn Index>,
    state: Mutex<State>,
    counters: TierCounters,
    nvme: NvmeCounters,
}

/// The NVMe tier.
pub struct NvmeTier {
    inner: Arc<Inner>,
    writes: mpsc::Sender<WriteReq>,
}

fn seg_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("seg-{id:08}.kvs"))
}

/// Opens a segment file with O_DIRECT, or buffered where the filesystem refuses it.
fn open_segment(path: &Path, create: bool, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(create);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

fn io_err(what: &str, e: std::io::Error) -> ServerError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        ServerError::NoSpace(format!("{what}: {e}"))
    } else {
        ServerError::Storage(format!("{what}: {e}"))
    }
}

/// Bytes available to us on the filesystem holding `dir`.
fn available_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a properly sized out-struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl NvmeTier {
    /// Opens the tier in `cfg.dir` with `index`, resuming what a previous run left.
    pub fn open(
        cfg: NvmeConfig,
        index: Arc<dyn Index>,
        engine: Arc<dyn IoEngine>,
        counters: TierCounters,
        nvme: NvmeCounters,
    ) -> Result<NvmeTier> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| io_err("nvme dir", e))?;
        // Probe O_DIRECT once: tmpfs and some overlay filesystems refuse it.
        let probe = cfg.dir.join(".direct-probe");
        let direct = match open_segment(&probe, true, true) {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(dir = %cfg.dir.display(), "filesystem refuses O_DIRECT, using buffered I/O");
                false
            }
            Err(e) => return Err(io_err("O_DIRECT probe", e)),
        };
        let _ = std::fs::remove_file(&probe);

        let mut segments = BTreeMap::new();
        let entries = std::fs::read_dir(&cfg.dir).map_err(|e| io_err("nvme dir", e))?;
        for ent in entries.flatten() {
            let name = ent.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_prefix("seg-"))
                .and_then(|n| n.strip_suffix(".kvs"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let file = open_segment(&ent.path(), false, direct).map_err(|e| io_err("open segment", e))?;
            // A crash may leave a torn tail: new records start past it, aligned.
            let len = file.metadata().map_err(|e| io_err("stat segment", e))?.len();
            segments.insert(
                id,
                Segment {
                    file: Arc::new(file),
                    written: aligned(len),
                    live: 0,
                },
            );
        }
        let mut map = HashMap::new();
        let mut orphans = Vec::new();
        for (id, e) in index.load_all()? {
            match segments.get_mut(&e.segment) {
                Some(s) if e.offset + aligned(HEADER as u64 + e.len) <= s.written => {
                    s.live += aligned(HEADER as u64 + e.len);
                    map.insert(id, e);
                }
                // Its segment is gone or shorter than the record: it cannot be served.
                _ => orphans.push(id),
            }
        }
        if !orphans.is_empty() {
            tracing::warn!(
                count = orphans.len(),
                "dropping index entries whose segment data is missing"
            );
            nvme.corrupt.inc_by(orphans.len() as u64);
            index.remove_batch(&orphans)?;
        }
        let active = match segments.keys().next_back() {
            Some(&id) => id,
            None => {
                let f = open_segment(&seg_path(&cfg.dir, 1), true, direct)
                    .map_err(|e| io_err("create segment", e))?;
                sync_dir(&cfg.dir).map_err(|e| io_err("sync nvme dir", e))?;
                segments.insert(
                    1,
                    Segment {
                        file: Arc::new(f),
                        written: 0,
                        live: 0,
                    },
                );
                1
            }
        };
        tracing::info!(chunks = map.len(), segments = segments.len(), direct, engine = ?engine.kind(), "nvme tier open");
        let inner = Arc::new(Inner {
            cfg,
            pool: Arc::new(BufPool::new(256 << 20)),
            direct,
            engine,
            index,
            state: Mutex::new(State {
                map,
                segments,
                active,
            }),
            counters,
            nvme,
        });
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(writer_loop(inner.clone(), rx));
        tokio::spawn(compactor_loop(inner.clone(), tx.downgrade()));
        Ok(NvmeTier { inner, writes: tx })
    }

    /// Number of segment files and the bytes their live records take.
    pub fn segment_fill(&self) -> (u64, u64) {
        let st = self.inner.lock();
        (
            st.segments.len() as u64,
            st.segments.values().map(|s| s.live).sum(),
        )
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation is a few map/tree operations with no await inside;
        // a poisoned lock only means a panic elsewhere, the state is consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn read_record(&self, id: &ChunkId) -> Result<Option<(IndexEntry, Bytes)>> {
        let (entry, file) = {
            let st = self.lock();
            let Some(e) = st.map.get(id).copied() else {
                return Ok(None);
            };
            match st.segments.get(&e.segment) {
                Some(s) => (e, s.file.clone()),
                None => return Ok(None),
            }
        };
        let rec = aligned(HEADER as u64 + entry.len) as usize;
        let verdict = match self.engine.read(file, entry.offset, self.pool.take(rec)).await {
            Ok(buf) => check_record(&buf, id, &entry).map(|()| buf),
            Err(e) => Err(format!("read failed: {e}")),
        };
        match verdict {
            Ok(buf) => {
                let end = HEADER + entry.len as usize;
                let owned = OwnedRecord {
                    buf: Some(buf),
                    pool: self.pool.clone(),
                };
                Ok(Some((entry, Bytes::from_owner(owned).slice(HEADER..end))))
            }
            Err(why) => {
                tracing::warn!(key = %id.key, segment = entry.segment, offset = entry.offset, why, "bad record on disk, dropping chunk");
                self.nvme.corrupt.inc();
                self.forget_if(id, &entry).await?;
                Ok(None)
            }
        }
    }

    /// Drops `id` if the index still holds exactly `entry` (not a newer copy).
    async fn forget_if(&self, id: &ChunkId, entry: &IndexEntry) -> Result<()> {
        let dropped = {
            let mut st = self.lock();
            if st.map.get(id) == Some(entry) {
                st.drop_entry(id);
                true
            } else {
                false
            }
        };
        if dropped {
            let (index, id) = (self.index.clone(), id.clone());
            tokio::task::spawn_blocking(move || index.remove_batch(&[id]))
                .await
                .map_err(|e| ServerError::Storage(format!("index task: {e}")))??;
        }
        Ok(())
    }
}

/// Keeps an aligned read buffer alive behind `Bytes` without copying it, and
/// hands it back to the pool when the last reader is done.
struct OwnedRecord {
    buf: Option<AlignedBuf>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for OwnedRecord {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or(&[])
    }
}

impl Drop for OwnedRecord {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give(b);
        }
    }
}

fn check_record(buf: &[u8], id: &ChunkId, e: &IndexEntry) -> std::result::Result<(), String> {
    let end = HEADER + e.len as usize;
    if buf.len() < end {
        return Err("record shorter than its index entry".into());
    }
    if buf[0..4] != RECORD_MAGIC {
        return Err("bad record magic".into());
    }
    let len = u64::from_le_bytes(buf[8..16].try_into().unwrap_or([0; 8]));
    let crc = u32::from_le_bytes(buf[16..20].try_into().unwrap_or([0; 4]));
    if len != e.len || crc != e.crc || buf[24..56] != id.key.0 {
        return Err("record header does not match the index".into());
    }
    let actual = crc32c::crc32c(&buf[HEADER..end]);
    if actual != e.crc {
        return Err(format!("payload checksum {actual:08x}, index has {:08x}", e.crc));
    }
    Ok(())
}

fn encode_record(pool: &BufPool, id: &ChunkId, blob: &[u8], crc: u32) -> AlignedBuf {
    let mut buf = pool.take(aligned((HEADER + blob.len()) as u64) as usize);
    // A recycled buffer holds stale bytes: clear the header and the padding.
    buf[..HEADER].fill(0);
    let tail = HEADER + blob.len();
    buf[tail..].fill(0);
    buf[0..4].copy_from_slice(&RECORD_MAGIC);
    buf[4] = 1; // record version
    buf[8..16].copy_from_slice(&(blob.len() as u64).to_le_bytes());
    buf[16..20].copy_from_slice(&crc.to_le_bytes());
    buf[24..56].copy_from_slice(&id.key.0);
    buf[HEADER..HEADER + blob.len()].copy_from_slice(blob);
    buf
}

/// The single appender: groups waiting puts into one commit.
async fn writer_loop(inner: Arc<Inner>, mut rx: mpsc::Receiver<WriteReq>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        commit(&inner, batch).await;
    }
}

/// Evicts oldest sealed segments until `incoming` more bytes fit the budget.
async fn make_room(inner: &Inner, incoming: u64) -> Result<()> {
    loop {
        let victim = {
            let st = inner.lock();
            if st.total_written() + incoming <= inner.cfg.capacity {
                return Ok(());
            }
            match st.segments.keys().next().copied() {
                Some(id) if id != st.active => id,
                _ => return Ok(()), // only the active segment is left
            }
        };
        let ids: Vec<ChunkId> = {
            let st = inner.lock();
            st.map
                .iter()
                .filter(|(_, e)| e.segment == victim)
                .map(|(k, _)| k.clone())
                .collect()
        };
        let index = inner.index.clone();
        let gone = ids.clone();
        tokio::task::spawn_blocking(move || index.remove_batch(&gone))
            .await
            .map_err(|e| ServerError::Storage(format!("index task: {e}")))??;
        {
            let mut st = inner.lock();
            for id in &ids {
                st.drop_entry(id);
            }
            st.segments.remove(&victim);
        }
        inner.counters.evictions.inc_by(ids.len() as u64);
        let path = seg_path(&inner.cfg.dir, victim);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
        tracing::debug!(segment = victim, chunks = ids.len(), "evicted oldest segment");
    }
}

/// Starts a new active segment.
async fn roll(inner: &Inner) -> Result<()> {
    let next = inner.lock().active + 1;
    let (dir, direct) = (inner.cfg.dir.clone(), inner.direct);
    let file = tokio::task::spawn_blocking(move || -> std::io::Result<File> {
        let f = open_segment(&seg_path(&dir, next), true, direct)?;
        sync_dir(&dir)?;
        Ok(f)
    })
    .await
    .map_err(|e| ServerError::Storage(format!("segment task: {e}")))?
    .map_err(|e| io_err("create segment", e))?;
    let mut st = inner.lock();
    st.segments.insert(
        next,
        Segment {
            file: Arc::new(file),
            written: 0,
            live: 0,
        },
    );
    st.active = next;
    Ok(())
}

async fn commit(inner: &Inner, batch: Vec<WriteReq>) {
    let incoming: u64 = batch
        .iter()
        .map(|r| aligned((HEADER + r.chunk.blob.len()) as u64))
        .sum();
    if let Err(e) = make_room(inner, incoming).await {
        for r in batch {
            let _ = r.done.send(Err(ServerError::Storage(e.to_string())));
        }
        return;
    }
    // Refuse up front when the disk cannot take the batch plus the index's
    // headroom: nothing is written, the store stays as it was.
    match available_bytes(&inner.cfg.dir) {
        Ok(free) if free < incoming + INDEX_HEADROOM => {
            for r in batch {
                let _ = r.done.send(Err(ServerError::NoSpace(format!(
                    "{} bytes free on the NVMe tier's filesystem, a put needs {} plus {INDEX_HEADROOM} for the index",
                    free,
                    aligned((HEADER + r.chunk.blob.len()) as u64)
                ))));
            }
            return;
        }
        _ => {}
    }
    // Place every record; roll segments as they fill.
    let mut plans = Vec::with_capacity(batch.len());
    for req in batch {
        let crc = crc32c::crc32c(&req.chunk.blob);
        let rec = encode_record(&inner.pool, &req.id, &req.chunk.blob, crc);
        let full = {
            let st = inner.lock();
            let a = &st.segments[&st.active];
            a.written > 0 && a.written + rec.len() as u64 > inner.cfg.segment_bytes
        };
        if full && let Err(e) = roll(inner).await {
            let _ = req.done.send(Err(e));
            continue;
        }
        let (seg, file, offset) = {
            let mut st = inner.lock();
            let active = st.active;
            let s = st.segments.get_mut(&active).expect("active segment exists");
            let off = s.written;
            s.written += rec.len() as u64;
            (active, s.file.clone(), off)
        };
        let entry = IndexEntry {
            segment: seg,
            offset,
            len: req.chunk.blob.len() as u64,
            crc,
            ns: req.chunk.ns,
            written_at: now_secs(),
        };
        plans.push((req, entry, file, rec));
    }
    let writes = plans.iter_mut().map(|(_, e, file, rec)| {
        let buf = std::mem::replace(rec, AlignedBuf::zeroed(0));
        inner.engine.write(file.clone(), e.offset, buf)
    });
    let results = futures::future::join_all(writes).await;
    let mut ok = Vec::new();
    for ((req, entry, file, _), r) in plans.into_iter().zip(results) {
        match r {
            Ok(buf) => {
                inner.pool.give(buf);
                ok.push((req, entry, file));
            }
            Err(e) => {
                let _ = req.done.send(Err(io_err("segment write", e)));
            }
        }
    }
    if ok.is_empty() {
        return;
    }
    // One fdatasync per touched segment, then one synced index batch.
    let mut synced: Vec<u32> = Vec::new();
    let mut sync_err = None;
    for (_, entry, file) in &ok {
        if !synced.contains(&entry.segment) {
            synced.push(entry.segment);
            if let Err(e) = inner.engine.sync(file.clone()).await {
                sync_err = Some(io_err("segment sync", e));
                break;
            }
        }
    }
    if let Some(e) = sync_err {
        for (req, _, _) in ok {
            let _ = req.done.send(Err(ServerError::Storage(e.to_string())));
        }
        return;
    }
    // Compaction moves apply only if the chunk was not deleted or replaced meanwhile.
    let apply: Vec<bool> = {
        let st = inner.lock();
        ok.iter()
            .map(|(r, _, _)| r.expect.is_none_or(|old| st.map.get(&r.id) == Some(&old)))
            .collect()
    };
    let entries: Vec<(ChunkId, IndexEntry)> = ok
        .iter()
        .zip(&apply)
        .filter(|(_, a)| **a)
        .map(|((r, e, _), _)| (r.id.clone(), *e))
        .collect();
    let index = inner.index.clone();
    let committed = tokio::task::spawn_blocking(move || index.put_batch(&entries))
        .await
        .map_err(|e| ServerError::Storage(format!("index task: {e}")))
        .and_then(|r| r);
    match committed {
        Ok(()) => {
            let mut st = inner.lock();
            for ((req, entry, _), a) in ok.into_iter().zip(apply) {
                if a {
                    st.drop_entry(&req.id);
                    if let Some(s) = st.segments.get_mut(&entry.segment) {
                        s.live += aligned(HEADER as u64 + entry.len);
                    }
                    st.map.insert(req.id.clone(), entry);
                }
                let _ = req.done.send(Ok(()));
            }
        }
        Err(e) => {
            for (req, _, _) in ok {
                let _ = req.done.send(Err(ServerError::Storage(e.to_string())));
            }
        }
    }
}

/// Copies live records of mostly-dead sealed segments forward and deletes
/// emptied segments.
async fn compactor_loop(inner: Arc<Inner>, writes: mpsc::WeakSender<WriteReq>) {
    loop {
        tokio::time::sleep(inner.cfg.compact_interval).await;
        let Some(tx) = writes.upgrade() else { return };
        let candidates: Vec<u32> = {
            let st = inner.lock();
            st.segments
                .iter()
                .filter(|(id, s)| **id != st.active && s.written > 0 && s.live * 2 < s.written)
                .map(|(id, _)| *id)
                .collect()
        };
        for seg in candidates {
            let live: Vec<(ChunkId, IndexEntry)> = {
                let st = inner.lock();
                st.map
                    .iter()
                    .filter(|(_, e)| e.segment == seg)
                    .map(|(k, e)| (k.clone(), *e))
                    .collect()
            };
            for (id, entry) in live {
                let Ok(Some((_, blob))) = inner.read_record(&id).await else {
                    continue;
                };
                let (done, rx) = oneshot::channel();
                let moved = blob.len() as u64;
                let req = WriteReq {
                    id,
                    chunk: StoredChunk { ns: entry.ns, blob },
                    expect: Some(entry),
                    done,
                };
                if tx.send(req).await.is_err() {
                    return;
                }
                if let Ok(Ok(())) = rx.await {
                    inner.nvme.compacted_bytes.inc_by(moved);
                }
            }
            let empty = {
                let mut st = inner.lock();
                let still_live = st.map.values().any(|e| e.segment == seg);
                if !still_live && st.active != seg {
                    st.segments.remove(&seg);
                    true
                } else {
                    false
                }
            };
            if empty {
                let path = seg_path(&inner.cfg.dir, seg);
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
                tracing::debug!(segment = seg, "compacted segment removed");
            }
        }
    }
}

#[async_trait]
impl Tier for NvmeTier {
    fn kind(&self) -> TierKind {
        TierKind::Nvme
    }

    async fn get(&self, id: &ChunkId) -> Result<Option<StoredChunk>> {
        match self.inner.read_record(id).await? {
            Some((e, blob)) => {
                self.inner.counters.hits.inc();
                Ok(Some(StoredChunk { ns: e.ns, blob }))
            }
            None => {
                self.inner.counters.misses.inc();
                Ok(None)
            }
        }
    }

    fn locate(&self, id: &ChunkId, ns: &NamespaceId) -> bool {
        self.inner.lock().map.get(id).is_some_and(|e| &e.ns == ns)
    }

    async fn insert(&self, id: ChunkId, chunk: StoredChunk) -> Result<()> {
        let (done, rx) = oneshot::channel();
        self.writes
            .send(WriteReq {
                id,
                chunk,
                expect: None,
                done,
            })
            .await
            .map_err(|_| ServerError::ShuttingDown)?;
        rx.await.map_err(|_| ServerError::ShuttingDown)?
    }

    async fn remove(&self, id: &ChunkId) -> Result<bool> {
        let Some(e) = self.inner.lock().map.get(id).copied() else {
            return Ok(false);
        };
        self.inner.forget_if(id, &e).await?;
        Ok(true)
    }

    fn max_chunk_bytes(&self) -> u64 {
        // A record must fit in one segment.
        self.inner
            .cfg
            .segment_bytes
            .min(self.inner.cfg.capacity)
            .saturating_sub(HEADER as u64 + ALIGN as u64)
    }

    fn stats(&self) -> TierStats {
        let st = self.inner.lock();
        TierStats {
            bytes: st.total_written(),
            capacity_bytes: self.inner.cfg.capacity,
            chunks: st.map.len() as u64,
            hits: self.inner.counters.hits.get(),
            misses: self.inner.counters.misses.get(),
            evictions: self.inner.counters.evictions.get(),
            segments: st.segments.len() as u64,
            live_bytes: st.segments.values().map(|s| s.live).sum(),
        }
    }
}
