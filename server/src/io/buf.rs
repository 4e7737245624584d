//! Page-aligned heap buffers, as O_DIRECT requires.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Mutex;

use super::ALIGN;

/// A zero-initialised buffer whose address and capacity are multiples of 4096.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of initialised bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` zero bytes, capacity rounded up to the alignment.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN).expect("aligned layout of a bounded size");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, cap, len }
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes are in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated bytes (a multiple of 4096).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the bytes in use (at most the capacity).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "length {len} beyond capacity {}", self.cap);
        self.len = len;
    }

    /// Raw pointer for the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: len <= cap, and the whole allocation is initialised (zeroed).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in Deref, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("same layout as allocated");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Recycles aligned buffers by size class, so that hot reads and writes do
/// not pay for fresh zeroed pages (page faults and zeroing cost as much as
/// the device transfer for MiB-sized records).
pub struct BufPool {
    classes: Mutex<HashMap<usize, Vec<AlignedBuf>>>,
    max_bytes: usize,
    held: Mutex<usize>,
}

/// Capacity class of a request: within 1/8 of the next power of two.
fn class_of(len: usize) -> usize {
    let n = len.max(ALIGN);
    let step = (n.next_power_of_two() / 8).max(ALIGN);
    n.div_ceil(step) * step
}

impl BufPool {
    /// A pool keeping at most `max_bytes` of idle buffers.
    pub fn new(max_bytes: usize) -> BufPool {
        BufPool {
            classes: Mutex::new(HashMap::new()),
            max_bytes,
            held: Mutex::new(0),
        }
    }

    /// A buffer of `len` bytes. Recycled buffers hold stale bytes: callers
    /// overwrite all `len` of them (a full read, or an encoded record).
    pub fn take(&self, len: usize) -> AlignedBuf {
        let class = class_of(len);
        let reused = self
            .classes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&class)
            .and_then(Vec::pop);
        let mut buf = match reused {
            Some(b) => {
                *self.held.lock().unwrap_or_else(|p| p.into_inner()) -= b.capacity();
                b
            }
            None => AlignedBuf::zeroed(class),
        };
        buf.set_len(len);
        buf
    }

    /// Returns a buffer for reuse (dropped when the pool is full).
    pub fn give(&self, buf: AlignedBuf) {
        let cap = buf.capacity();
        if class_of(cap) != cap {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if *held + cap > self.max_bytes {
            return;
        }
        *held += cap;
        drop(held);
        self.classes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cap)
            .or_default()
            .push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_by_class() {
        let pool = BufPool::new(64 << 20);
        let b = pool.take(4 << 20 | 4096);
        let cap = b.capacity();
        assert!(((4 << 20) + 4096..=5 << 20).contains(&cap), "{cap}");
        let p = b.as_ptr();
        pool.give(b);
        let again = pool.take((4 << 20) + 8192);
        assert_eq!(again.as_ptr(), p, "same class should reuse the buffer");
        assert_eq!(again.len(), (4 << 20) + 8192);
    }

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::zeroed(5000);
        assert_eq!(b.as_mut_ptr() as usize % ALIGN, 0);
        assert_eq!(b.capacity(), 8192);
        assert!(b.iter().all(|x| *x == 0));
        b[4999] = 7;
        b.set_len(8192);
        assert_eq!(b[4999], 7);
    }
}
