//! The shared-memory region: a file under `/dev/shm` mapped by the sidecar
//! (read-write) and by the engine (read-only), cut into fixed-size slots.
//!
//! Slot ownership is explicit: a lease holds a contiguous run of slots until
//! it is released or its time runs out, so an engine that dies without
//! releasing cannot leak the region. The sidecar writes into a lease only
//! while it holds that lease's single write permit ([`WriteGuard`]); a lease
//! released or expired during a write is freed when the write ends, so two
//! writers never share bytes.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memmap2::MmapRaw;
use thiserror::Error;

/// Expired lease ids remembered, so a late caller hears "expired" rather than "unknown".
const EXPIRED_MEMORY: usize = 4096;

/// Why a region call was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RegionError {
    /// A slot index past the end of the region.
    #[error("slot {slot} is outside the region's {slots} slots")]
    SlotOutOfRange {
        /// The slot asked for.
        slot: u32,
        /// Slots in the region.
        slots: u32,
    },
    /// A slot inside the region but not inside the caller's lease.
    #[error("slot {slot} is not held by lease {lease} (it holds slots {first}..{end})")]
    NotInLease {
        /// The slot asked for.
        slot: u32,
        /// The lease.
        lease: u64,
        /// First slot of the lease.
        first: u32,
        /// End (exclusive) of the lease.
        end: u32,
    },
    /// The lease ran out of time; its slots are free again.
    #[error("lease {0} expired; take a new one")]
    Expired(u64),
    /// No such lease (never granted, or released).
    #[error("lease {0} is unknown (never granted, or released)")]
    UnknownLease(u64),
    /// More bytes than the whole region holds.
    #[error("request needs {bytes} bytes but the region holds {region} bytes")]
    TooLarge {
        /// Bytes asked for.
        bytes: u64,
        /// Region size.
        region: u64,
    },
    /// The region could hold it, but not now (leased slots are in the way).
    #[error(
        "no {slots} contiguous free slots for {bytes} bytes ({free} slots free); release leases or retry"
    )]
    NoSpace {
        /// Bytes asked for.
        bytes: u64,
        /// Slots needed.
        slots: u32,
        /// Slots free now.
        free: u32,
    },
    /// The lease (from the given slot on) is smaller than the data.
    #[error("lease {lease} holds {have} bytes from slot {slot}, the data needs {need}")]
    DoesNotFit {
        /// The lease.
        lease: u64,
        /// First slot written.
        slot: u32,
        /// Bytes available from there.
        have: u64,
        /// Bytes needed.
        need: u64,
    },
    /// Another request is writing into the lease.
    #[error("lease {0} is being written by another request")]
    Busy(u64),
    /// The lease reads a shared decoded run; only leases from `Lease` take writes.
    #[error("lease {0} is a read-only lease on shared decoded data; write into a lease from Lease")]
    ReadOnly(u64),
    /// A lease of zero bytes.
    #[error("a lease must hold at least one byte")]
    Empty,
}

/// Creating or mapping the region file failed.
#[derive(Debug, Error)]
#[error("shared region {path}: {source}")]
pub struct RegionIoError {
    /// The file.
    pub path: PathBuf,
    /// What failed.
    pub source: std::io::Error,
}

/// What a lease holds, as the wire reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Id the caller quotes.
    pub id: u64,
    /// First slot.
    pub first_slot: u32,
    /// Slots held.
    pub slot_count: u32,
    /// Byte offset of the first slot.
    pub offset: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Time left.
    pub expires_in: Duration,
}

struct Lease {
    first: u32,
    count: u32,
    expires: Instant,
    writing: bool,
    // Released or expired while a write was running: freed when it ends.
    doomed: bool,
    // A read-only lease on a cached decoded run: releasing it unpins the
    // run, whose slots stay with the cache.
    run: Option<RunKey>,
}

/// Names one decoded run (a GetInto's chunks, layers and dtype, for one
/// tenant); the caller derives it, the region only compares it.
pub type RunKey = [u8; 32];

/// A decoded run kept in the region after its first GetInto, so the same
/// request again is answered with offsets alone: no fetch, no decode, no copy.
struct Run<M> {
    first: u32,
    count: u32,
    // Leases reading it; only an unpinned run may be evicted.
    pins: u32,
    // Last use, for least-recently-used eviction.
    tick: u64,
    // Dropped from the index (a Delete) but still pinned: freed at the last unpin.
    stale: bool,
    meta: Arc<M>,
}

struct State<M> {
    // One flag per slot: true when a lease or a cached run holds it.
    used: Vec<bool>,
    free: u32,
    leases: HashMap<u64, Lease>,
    expired: VecDeque<u64>,
    runs: HashMap<RunKey, Run<M>>,
    tick: u64,
}

/// Counters the region reports to metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RegionStats {
    /// Slots in the region.
    pub slots: u32,
    /// Slots not leased.
    pub free_slots: u32,
    /// Live leases.
    pub leases: u32,
    /// Decoded runs kept for reuse.
    pub runs: u32,
}

/// The mapped region and its slot table. `M` is what the caller keeps with
/// each cached decoded run (where its chunks lie).
pub struct Region<M = ()> {
    path: PathBuf,
    map: MmapRaw,
    slot_bytes: u64,
    slots: u32,
    default_lease: Duration,
    max_lease: Duration,
    state: Mutex<State<M>>,
    // Removes the file on drop when the sidecar created it.
    owns_file: bool,
}

impl<M> Region<M> {
    /// Creates (or truncates) `path`, sizes it to `bytes` rounded down to
    /// whole slots, and maps it. The file is readable by the owner only: the
    /// engine runs as the same user.
    pub fn create(
        path: &Path,
        bytes: u64,
        slot_bytes: u64,
        default_lease: Duration,
        max_lease: Duration,
    ) -> Result<Region<M>, RegionIoError> {
        let io = |source| RegionIoError {
            path: path.to_path_buf(),
            source,
        };
        let slot_bytes = slot_bytes.max(4096);
        let slots = (bytes / slot_bytes).min(u32::MAX as u64) as u32;
        if slots == 0 {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{bytes} bytes hold no slot of {slot_bytes} bytes"),
            )));
        }
        let len = slots as u64 * slot_bytes;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.set_len(len).map_err(io)?;
        let map = MmapRaw::map_raw(&file).map_err(io)?;
        Ok(Region {
            path: path.to_path_buf(),
            map,
            slot_bytes,
            slots,
            default_lease,
            max_lease: max_lease.max(default_lease),
            state: Mutex::new(State {
                used: vec![false; slots as usize],
                free: slots,
                leases: HashMap::new(),
                expired: VecDeque::new(),
                runs: HashMap::new(),
                tick: 0,
            }),
            owns_file: true,
        })
    }

    /// Path of the region file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes per slot.
    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    /// Slots in the region.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Region size in bytes.
    pub fn len(&self) -> u64 {
        self.slots as u64 * self.slot_bytes
    }

    /// Never true: a region has at least one slot.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Lease lifetime when a request names none.
    pub fn default_lease(&self) -> Duration {
        self.default_lease
    }

    /// Longest lease granted.
    pub fn max_lease(&self) -> Duration {
        self.max_lease
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<M>> {
        // A panic while holding the lock leaves consistent flags (no partial
        // updates span an unwind point), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ttl(&self, ms: u32) -> Duration {
        if ms == 0 {
            self.default_lease
        } else {
            Duration::from_millis(ms as u64).min(self.max_lease)
        }
    }

    /// Slot, lease and free counts.
    pub fn stats(&self) -> RegionStats {
        let st = self.lock();
        RegionStats {
            slots: self.slots,
            free_slots: st.free,
            leases: st.leases.len() as u32,
            runs: st.runs.len() as u32,
        }
    }

    fn info(&self, id: u64, l: &Lease, now: Instant) -> LeaseInfo {
        LeaseInfo {
            id,
            first_slot: l.first,
            slot_count: l.count,
            offset: l.first as u64 * self.slot_bytes,
            bytes: l.count as u64 * self.slot_bytes,
            expires_in: l.expires.saturating_duration_since(now),
        }
    }

    /// Frees expired leases (those not being written; those are freed when
    /// the write ends). Returns how many expired.
    pub fn reap(&self) -> usize {
        let now = Instant::now();
        let mut st = self.lock();
        Self::reap_locked(&mut st, now)
    }

    fn reap_locked(st: &mut State<M>, now: Instant) -> usize {
        let gone: Vec<u64> = st
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now && !l.doomed)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            let writing = st.leases.get(id).is_some_and(|l| l.writing);
            if writing {
                if let Some(l) = st.leases.get_mut(id) {
                    l.doomed = true;
                }
            } else {
                Self::free_locked(st, *id);
            }
            st.expired.push_back(*id);
            if st.expired.len() > EXPIRED_MEMORY {
                st.expired.pop_front();
            }
        }
        gone.len()
    }

    fn free_locked(st: &mut State<M>, id: u64) {
        let Some(l) = st.leases.remove(&id) else { return };
        match l.run {
            Some(key) => Self::unpin_locked(st, key),
            None => Self::free_slots(st, l.first, l.count),
        }
    }

    fn free_slots(st: &mut State<M>, first: u32, count: u32) {
        for s in &mut st.used[first as usize..(first + count) as usize] {
            *s = false;
        }
        st.free += count;
    }

    fn unpin_locked(st: &mut State<M>, key: RunKey) {
        let Some(r) = st.runs.get_mut(&key) else { return };
        r.pins = r.pins.saturating_sub(1);
        if r.pins == 0
            && r.stale
            && let Some(r) = st.runs.remove(&key)
        {
            Self::free_slots(st, r.first, r.count);
        }
    }

    /// Evicts the least recently used unpinned run; false when none is left.
    fn evict_one(st: &mut State<M>) -> bool {
        let victim = st
            .runs
            .iter()
            .filter(|(_, r)| r.pins == 0)
            .min_by_key(|(_, r)| r.tick)
            .map(|(k, _)| *k);
        match victim.and_then(|k| st.runs.remove(&k)) {
            Some(r) => {
                Self::free_slots(st, r.first, r.count);
                true
            }
            None => false,
        }
    }

    /// A read-only lease on the cached run `key`, when the region holds it:
    /// the run's offset, its metadata and the lease.
    pub fn pin_run(&self, key: &RunKey, lease_ms: u32) -> Option<(LeaseInfo, Arc<M>)> {
        let ttl = self.ttl(lease_ms);
        let now = Instant::now();
        let mut st = self.lock();
        Self::reap_locked(&mut st, now);
        st.tick += 1;
        let tick = st.tick;
        let r = st.runs.get_mut(key).filter(|r| !r.stale)?;
        r.pins += 1;
        r.tick = tick;
        let (first, count, meta) = (r.first, r.count, r.meta.clone());
        let mut id = rand::random::<u64>();
        while id == 0 || st.leases.contains_key(&id) {
            id = rand::random::<u64>();
        }
        let lease = Lease {
            first,
            count,
            expires: now + ttl,
            writing: false,
            doomed: false,
            run: Some(*key),
        };
        let info = self.info(id, &lease, now);
        st.leases.insert(id, lease);
        Some((info, meta))
    }

    /// Drops every cached run from the index (after a Delete): unpinned
    /// runs are freed now, pinned ones when their last reader lets go.
    pub fn forget_runs(&self) {
        let mut st = self.lock();
        let keys: Vec<RunKey> = st.runs.keys().copied().collect();
        for k in keys {
            let free = match st.runs.get_mut(&k) {
                Some(r) if r.pins == 0 => true,
                Some(r) => {
                    r.stale = true;
                    false
                }
                None => false,
            };
            if free && let Some(r) = st.runs.remove(&k) {
                Self::free_slots(&mut st, r.first, r.count);
            }
        }
    }

    /// Finds a live lease, turning expiry into its error.
    fn live(st: &mut State<M>, id: u64, now: Instant) -> Result<&mut Lease, RegionError> {
        if !st.leases.contains_key(&id) {
            return Err(if st.expired.contains(&id) {
                RegionError::Expired(id)
            } else {
                RegionError::UnknownLease(id)
            });
        }
        Self::reap_locked(st, now);
        match st.leases.get_mut(&id) {
            Some(l) if !l.doomed => Ok(l),
            _ => Err(RegionError::Expired(id)),
        }
    }

    fn allocate_locked(
        &self,
        st: &mut State<M>,
        bytes: u64,
        ttl: Duration,
        writing: bool,
    ) -> Result<u64, RegionError> {
        if bytes == 0 {
            return Err(RegionError::Empty);
        }
        if bytes > self.len() {
            return Err(RegionError::TooLarge {
                bytes,
                region: self.len(),
            });
        }
        let want = bytes.div_ceil(self.slot_bytes) as u32;
        let now = Instant::now();
        Self::reap_locked(st, now);
        // First fit: slot counts are small (a region of GiBs in MiB slots).
        // Cached runs nobody reads give way, least recently used first.
        let first = loop {
            let mut run = 0u32;
            let mut found = None;
            for (i, used) in st.used.iter().enumerate() {
                run = if *used { 0 } else { run + 1 };
                if run == want {
                    found = Some(i as u32 + 1 - want);
                    break;
                }
            }
            if let Some(f) = found {
                break f;
            }
            if !Self::evict_one(st) {
                return Err(RegionError::NoSpace {
                    bytes,
                    slots: want,
                    free: st.free,
                });
            }
        };
        for s in &mut st.used[first as usize..(first + want) as usize] {
            *s = true;
        }
        st.free -= want;
        let mut id = rand::random::<u64>();
        while id == 0 || st.leases.contains_key(&id) {
            id = rand::random::<u64>();
        }
        st.leases.insert(
            id,
            Lease {
                first,
                count: want,
                expires: now + ttl,
                writing,
                doomed: false,
                run: None,
            },
        );
        Ok(id)
    }

    /// Reserves contiguous slots for `bytes` for `lease_ms` (0 = default).
    pub fn lease(&self, bytes: u64, lease_ms: u32) -> Result<LeaseInfo, RegionError> {
        let ttl = self.ttl(lease_ms);
        let mut st = self.lock();
        let id = self.allocate_locked(&mut st, bytes, ttl, false)?;
        let now = Instant::now();
        Ok(self.info(id, &st.leases[&id], now))
    }

    /// Extends a live lease to `lease_ms` from now.
    pub fn renew(&self, id: u64, lease_ms: u32) -> Result<LeaseInfo, RegionError> {
        let ttl = self.ttl(lease_ms);
        let now = Instant::now();
        let mut st = self.lock();
        let l = Self::live(&mut st, id, now)?;
        l.expires = now + ttl;
        let info = self.info(id, l, now);
        Ok(info)
    }

    /// Gives a lease's slots back (at once, or when a running write ends).
    pub fn release(&self, id: u64) -> Result<(), RegionError> {
        let now = Instant::now();
        let mut st = self.lock();
        let l = Self::live(&mut st, id, now)?;
        if l.writing {
            l.doomed = true;
        } else {
            Self::free_locked(&mut st, id);
        }
        Ok(())
    }

    /// A fresh lease for `bytes`, with its write permit held.
    pub fn lease_for_write(
        self: &Arc<Self>,
        bytes: u64,
        lease_ms: u32,
    ) -> Result<WriteGuard<M>, RegionError> {
        let ttl = self.ttl(lease_ms);
        let mut st = self.lock();
        let id = self.allocate_locked(&mut st, bytes, ttl, true)?;
        let l = &st.leases[&id];
        let offset = l.first as u64 * self.slot_bytes;
        Ok(WriteGuard {
            region: self.clone(),
            id,
            fresh: true,
            offset,
            len: l.count as u64 * self.slot_bytes,
            done: false,
        })
    }

    /// The write permit of an existing lease, for `bytes` from `slot` on.
    pub fn write_into(
        self: &Arc<Self>,
        id: u64,
        slot: u32,
        bytes: u64,
    ) -> Result<WriteGuard<M>, RegionError> {
        if slot >= self.slots {
            return Err(RegionError::SlotOutOfRange {
                slot,
                slots: self.slots,
            });
        }
        let now = Instant::now();
        let mut st = self.lock();
        let slot_bytes = self.slot_bytes;
        let l = Self::live(&mut st, id, now)?;
        let end = l.first + l.count;
        if slot < l.first || slot >= end {
            return Err(RegionError::NotInLease {
                slot,
                lease: id,
                first: l.first,
                end,
            });
        }
        let have = (end - slot) as u64 * slot_bytes;
        if bytes > have {
            return Err(RegionError::DoesNotFit {
                lease: id,
                slot,
                have,
                need: bytes,
            });
        }
        if l.run.is_some() {
            return Err(RegionError::ReadOnly(id));
        }
        if l.writing {
            return Err(RegionError::Busy(id));
        }
        l.writing = true;
        Ok(WriteGuard {
            region: self.clone(),
            id,
            fresh: false,
            offset: slot as u64 * slot_bytes,
            len: have,
            done: false,
        })
    }

    /// The lease as it stands now.
    pub fn lease_info(&self, id: u64) -> Result<LeaseInfo, RegionError> {
        let now = Instant::now();
        let mut st = self.lock();
        let l = Self::live(&mut st, id, now)?;
        let info = self.info(id, l, now);
        Ok(info)
    }

    /// Reads bytes back (tests and benchmarks check what the engine would see).
    pub fn read(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let end = offset.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        // SAFETY: the range is inside the mapping, which lives as long as
        // `self`; a concurrent write may tear what is read, but the bytes are
        // plain data and a torn read is the caller's own race (as for the engine).
        let s = unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset as usize), len as usize) };
        Some(s.to_vec())
    }
}

impl<M> Drop for Region<M> {
    fn drop(&mut self) {
        if self.owns_file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The exclusive right to write one lease's bytes (from a slot on).
/// Dropping it ends the write; a failed write of a fresh lease frees it.
pub struct WriteGuard<M = ()> {
    region: Arc<Region<M>>,
    id: u64,
    fresh: bool,
    offset: u64,
    len: u64,
    done: bool,
}

impl<M> WriteGuard<M> {
    /// The lease written.
    pub fn lease_id(&self) -> u64 {
        self.id
    }

    /// Byte offset (in the region) of the writable bytes.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The writable bytes: from the starting slot to the lease's end.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: [offset, offset+len) lies in the mapping (checked when the
        // guard was made) and belongs to a lease whose only write permit is
        // this guard: the slot table never lets two live leases overlap, and
        // a lease's slots are not reused until its permit is dropped. `&mut
        // self` keeps this guard from handing out two slices at once.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.region.map.as_mut_ptr().add(self.offset as usize),
                self.len as usize,
            )
        }
    }

    /// Ends the write successfully; the lease stays.
    pub fn finish(mut self) -> Result<LeaseInfo, RegionError> {
        self.done = true;
        self.region.lease_info(self.id)
    }

    /// Ends the write of a fresh lease and hands its slots to the cache as
    /// run `key`: the lease becomes the run's first reader, and the same
    /// request later pins the run instead of decoding again. A write into
    /// an existing lease (the caller's own slots) is never cached.
    pub fn finish_cached(mut self, key: RunKey, meta: M) -> Result<LeaseInfo, RegionError> {
        self.done = true;
        if !self.fresh {
            return self.region.lease_info(self.id);
        }
        let now = Instant::now();
        let mut st = self.region.lock();
        st.tick += 1;
        let tick = st.tick;
        let l = Region::live(&mut st, self.id, now)?;
        let (first, count) = (l.first, l.count);
        // The same run cached meanwhile by a concurrent request: keep that
        // one, and this lease keeps its own slots uncached.
        if st.runs.contains_key(&key) {
            let l = Region::live(&mut st, self.id, now)?;
            return Ok(self.region.info(self.id, l, now));
        }
        let l = Region::live(&mut st, self.id, now)?;
        l.run = Some(key);
        let info = self.region.info(self.id, l, now);
        st.runs.insert(
            key,
            Run {
                first,
                count,
                pins: 1,
                tick,
                stale: false,
                meta: Arc::new(meta),
            },
        );
        Ok(info)
    }
}

impl<M> Drop for WriteGuard<M> {
    fn drop(&mut self) {
        let mut st = self.region.lock();
        let (doomed, present) = match st.leases.get_mut(&self.id) {
            Some(l) => {
                l.writing = false;
                (l.doomed, true)
            }
            None => (false, false),
        };
        if present && (doomed || (self.fresh && !self.done)) {
            Region::<M>::free_locked(&mut st, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SLOT: u64 = 4096;

    fn region(slots: u64) -> (tempfile::TempDir, Arc<Region>) {
        let dir = tempfile::tempdir().unwrap();
        let r = Region::create(
            &dir.path().join("region"),
            slots * SLOT,
            SLOT,
            Duration::from_millis(50),
            Duration::from_secs(10),
        )
        .unwrap();
        (dir, Arc::new(r))
    }

    #[test]
    fn leases_are_disjoint_and_come_back() {
        let (_d, r) = region(8);
        let a = r.lease(3 * SLOT, 1000).unwrap();
        let b = r.lease(SLOT + 1, 1000).unwrap();
        assert_eq!((a.first_slot, a.slot_count), (0, 3));
        assert_eq!((b.first_slot, b.slot_count), (3, 2));
        assert_eq!(r.stats().free_slots, 3);
        assert!(matches!(
            r.lease(4 * SLOT, 1000),
            Err(RegionError::NoSpace { .. })
        ));
        r.release(a.id).unwrap();
        assert_eq!(r.stats().free_slots, 6);
        assert_eq!(r.release(a.id), Err(RegionError::UnknownLease(a.id)));
        let c = r.lease(3 * SLOT, 1000).unwrap();
        assert_eq!(c.first_slot, 0);
    }

    #[test]
    fn hostile_requests_get_clear_errors() {
        let (_d, r) = region(8);
        assert!(matches!(r.lease(9 * SLOT, 0), Err(RegionError::TooLarge { .. })));
        assert_eq!(r.lease(0, 0), Err(RegionError::Empty));
        let a = r.lease(2 * SLOT, 1000).unwrap();
        assert!(matches!(
            r.write_into(a.id, 8, 1),
            Err(RegionError::SlotOutOfRange { slot: 8, slots: 8 })
        ));
        assert!(matches!(
            r.write_into(a.id, u32::MAX, 1),
            Err(RegionError::SlotOutOfRange { .. })
        ));
        assert!(matches!(
            r.write_into(a.id, 5, 1),
            Err(RegionError::NotInLease { .. })
        ));
        assert!(matches!(
            r.write_into(a.id, 1, SLOT + 1),
            Err(RegionError::DoesNotFit { .. })
        ));
        assert!(matches!(
            r.write_into(12345, 0, 1),
            Err(RegionError::UnknownLease(12345))
        ));
        let g = r.write_into(a.id, 0, 10).unwrap();
        assert_eq!(r.write_into(a.id, 0, 10).err(), Some(RegionError::Busy(a.id)));
        drop(g);
        assert!(r.write_into(a.id, 1, SLOT).is_ok());
    }

    #[test]
    fn expired_leases_free_their_slots_and_say_so() {
        let (_d, r) = region(4);
        let a = r.lease(4 * SLOT, 20).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(r.write_into(a.id, 0, 1).err(), Some(RegionError::Expired(a.id)));
        assert_eq!(r.renew(a.id, 100).err(), Some(RegionError::Expired(a.id)));
        assert_eq!(r.stats().free_slots, 4);
        assert!(r.lease(4 * SLOT, 20).is_ok());
    }

    #[test]
    fn a_lease_released_during_a_write_is_freed_after_it() {
        let (_d, r) = region(4);
        let mut g = r.lease_for_write(2 * SLOT, 1000).unwrap();
        let id = g.lease_id();
        r.release(id).unwrap();
        // Still held while the write runs: nobody else can get those slots.
        assert_eq!(r.stats().free_slots, 2);
        g.buf()[0] = 1;
        assert!(g.finish().is_err());
        assert_eq!(r.stats().free_slots, 4);
    }

    #[test]
    fn a_failed_fresh_write_frees_its_lease() {
        let (_d, r) = region(4);
        let g = r.lease_for_write(SLOT, 1000).unwrap();
        drop(g);
        assert_eq!(
            r.stats(),
            RegionStats {
                slots: 4,
                free_slots: 4,
                leases: 0,
                runs: 0
            }
        );
    }

    #[test]
    fn writes_land_where_the_lease_says() {
        let (_d, r) = region(4);
        let _first = r.lease(SLOT, 1000).unwrap();
        let mut g = r.lease_for_write(SLOT, 1000).unwrap();
        g.buf()[..4].copy_from_slice(b"kvlt");
        let info = g.finish().unwrap();
        assert_eq!(info.offset, SLOT);
        assert_eq!(r.read(info.offset, 4).unwrap(), b"kvlt");
        // Also visible through the file, as the engine maps it.
        let f = std::fs::read(r.path()).unwrap();
        assert_eq!(&f[SLOT as usize..SLOT as usize + 4], b"kvlt");
        assert!(r.read(4 * SLOT - 2, 4).is_none());
    }

    #[test]
    fn decoded_runs_are_shared_pinned_and_evicted_last_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let r: Arc<Region<&'static str>> = Arc::new(
            Region::create(
                &dir.path().join("region"),
                4 * SLOT,
                SLOT,
                Duration::from_secs(5),
                Duration::from_secs(10),
            )
            .unwrap(),
        );
        let mut g = r.lease_for_write(2 * SLOT, 0).unwrap();
        g.buf()[0] = 9;
        let first = g.finish_cached([1; 32], "run one").unwrap();
        assert!(r.pin_run(&[2; 32], 0).is_none());
        let (pinned, meta) = r.pin_run(&[1; 32], 0).unwrap();
        assert_eq!((*meta, pinned.offset), ("run one", first.offset));
        assert_eq!(
            r.write_into(pinned.id, pinned.first_slot, 1).err(),
            Some(RegionError::ReadOnly(pinned.id))
        );
        // Pinned twice: a full-region lease cannot evict it.
        assert!(matches!(r.lease(4 * SLOT, 0), Err(RegionError::NoSpace { .. })));
        r.release(first.id).unwrap();
        r.release(pinned.id).unwrap();
        assert_eq!(r.stats().runs, 1);
        assert_eq!(r.stats().free_slots, 2, "an unpinned run keeps its slots");
        // Unpinned: it gives way to a lease that needs its slots.
        let all = r.lease(4 * SLOT, 0).unwrap();
        assert_eq!(r.stats().runs, 0);
        assert!(r.pin_run(&[1; 32], 0).is_none());
        r.release(all.id).unwrap();
        // A forgotten run that is still read is freed by its last reader.
        let g = r.lease_for_write(SLOT, 0).unwrap();
        let l = g.finish_cached([3; 32], "run three").unwrap();
        r.forget_runs();
        assert!(r.pin_run(&[3; 32], 0).is_none());
        assert_eq!(r.stats().free_slots, 3);
        r.release(l.id).unwrap();
        assert_eq!(r.stats().free_slots, 4);
    }

    proptest! {
        /// Whatever mix of leases, releases and renewals: live leases never
        /// overlap and the free count matches the slot table.
        #[test]
        fn slot_table_stays_consistent(ops in proptest::collection::vec((0u8..3, 1u64..5 * SLOT, any::<u8>()), 1..60)) {
            let (_d, r) = region(16);
            let mut live: Vec<u64> = Vec::new();
            for (op, bytes, pick) in ops {
                match op {
                    0 => { if let Ok(l) = r.lease(bytes, 5000) { live.push(l.id); } }
                    1 if !live.is_empty() => { let id = live.remove(pick as usize % live.len()); r.release(id).unwrap(); }
                    _ if !live.is_empty() => { let id = live[pick as usize % live.len()]; r.renew(id, 5000).unwrap(); }
                    _ => {}
                }
                let mut owned = [0u32; 16];
                let mut held = 0;
                for id in &live {
                    let i = r.lease_info(*id).unwrap();
                    held += i.slot_count;
                    for s in i.first_slot..i.first_slot + i.slot_count { owned[s as usize] += 1; }
                }
                prop_assert!(owned.iter().all(|c| *c <= 1));
                prop_assert_eq!(r.stats().free_slots, 16 - held);
            }
        }
    }
}
