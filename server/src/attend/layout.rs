//! Attention-ready layouts of one (layer, KV head) plane, and the packers
//! that build them from head-major f16 rows.
//!
//! Every layout stores tokens in blocks of [`BLOCK`] (the last block padded
//! with zeros) and channels padded to a multiple of 16 ([`padded_dim`]), so
//! the kernel's inner loops have no remainders. Keys are channel-major
//! inside a block (scores of a block's tokens are vector FMAs or integer
//! dot products with no horizontal sums); values are token-major, in token
//! pairs for the integer layouts (so `vpmaddubsw`/`vpmaddwd` sum two tokens
//! at once).
//!
//! Quantised layouts (error bounds in `tests/attend.rs`):
//! - keys int8, symmetric per (group of [`KEY_GROUP`] tokens, channel):
//!   `k ≈ scale·κ`, `κ ∈ −127..=127`, error ≤ scale/2;
//! - keys 4-bit, asymmetric per (group, channel): `k ≈ offset + scale·(κ − 8)`,
//!   `κ ∈ 0..=15`, scale = (max − min)/15, error ≤ scale/2;
//! - values int8, symmetric per token: `v ≈ scale·κ`, `κ ∈ −127..=127`;
//! - values 4-bit, asymmetric per token: `v ≈ offset + scale·(κ − 8)`, `κ ∈ 0..=15`.

use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Tokens per block: the kernel's unit of work.
pub const BLOCK: usize = 16;
/// Tokens per key quantisation group (a multiple of [`BLOCK`]).
pub const KEY_GROUP: usize = 128;
/// Channel padding: every layout's rows hold a multiple of this.
const DIM_ALIGN: usize = 16;

/// `d` rounded up to a multiple of 16.
pub fn padded_dim(d: usize) -> usize {
    d.div_ceil(DIM_ALIGN) * DIM_ALIGN
}

/// The in-memory layout of a session's KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// f16 keys and values (lossless for f16 caches).
    F16,
    /// int8 keys (per group and channel), int8 values (per token).
    Int8,
    /// int8 keys (per group and channel), 4-bit values (per token).
    K8V4,
    /// 4-bit keys (per group and channel), 4-bit values (per token).
    K4V4,
}

/// Sizes of one plane of `tokens` tokens and head dimension `d`.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Tokens held.
    pub tokens: usize,
    /// Head dimension.
    pub d: usize,
    /// Head dimension padded to a multiple of 16.
    pub dp: usize,
    /// Token blocks (the last one padded).
    pub blocks: usize,
    /// Key quantisation groups.
    pub groups: usize,
}

impl Geometry {
    /// The geometry of `tokens` tokens of dimension `d`.
    pub fn new(tokens: usize, d: usize) -> Geometry {
        Geometry {
            tokens,
            d,
            dp: padded_dim(d),
            blocks: tokens.div_ceil(BLOCK),
            groups: tokens.div_ceil(KEY_GROUP),
        }
    }

    fn padded_tokens(&self) -> usize {
        self.blocks * BLOCK
    }
}

impl Format {
    /// Bytes one plane of `geo` holds in this layout.
    pub fn plane_bytes(self, geo: &Geometry) -> u64 {
        let (pt, dp, gr) = (geo.padded_tokens() as u64, geo.dp as u64, geo.groups as u64);
        let keys = match self {
            Format::F16 => pt * dp * 2,
            Format::Int8 | Format::K8V4 => pt * dp + gr * dp * 4,
            Format::K4V4 => pt * dp / 2 + gr * dp * 8,
        };
        let values = match self {
            Format::F16 => pt * dp * 2,
            Format::Int8 => pt * dp + pt * 4,
            Format::K8V4 | Format::K4V4 => pt * dp / 2 + pt * 8,
        };
        keys + values
    }
}

/// Transparent huge page size on x86-64 Linux.
const HUGE_PAGE: usize = 2 << 20;

/// The codes of a plane: a fixed-length buffer that, from 2 MiB up, is
/// 2 MiB-aligned and advised for transparent huge pages before it is first
/// written. A worker streams a session's planes front to back; with 4 KiB
/// pages every 4 KiB of a stream is a new TLB entry (a two-level walk in a
/// VM), with 2 MiB pages one entry covers 128 f16 blocks.
pub struct Buf<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
    layout: Layout,
}

// SAFETY: Buf owns its elements like a Box<[T]>.
unsafe impl<T: Copy + Send> Send for Buf<T> {}
// SAFETY: as above; shared access is read-only.
unsafe impl<T: Copy + Sync> Sync for Buf<T> {}

impl<T: Copy> Buf<T> {
    /// `len` copies of `fill`.
    pub fn filled(len: usize, fill: T) -> Buf<T> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .expect("plane buffer size overflows");
        let align = if bytes >= HUGE_PAGE { HUGE_PAGE } else { 64 };
        let layout = Layout::from_size_align(bytes.max(1), align).expect("plane buffer size overflows");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) } as *mut T;
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        if align == HUGE_PAGE {
            advise_huge_pages(raw as *mut u8, bytes);
        }
        for i in 0..len {
            // SAFETY: i < len and the allocation holds len elements.
            unsafe { raw.add(i).write(fill) };
        }
        Buf { ptr, len, layout }
    }
}

impl<T: Copy> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr holds len initialised elements (written in `filled`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, and &mut self is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> Drop for Buf<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `filled` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr() as *mut u8, self.layout) };
    }
}

/// Asks Linux to back `bytes` at `ptr` (not yet touched) with transparent
/// huge pages; a no-op where it cannot (other systems, THP off).
pub fn advise_huge_pages(ptr: *mut u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: madvise only changes how the kernel backs a range the caller
    // owns; MADV_HUGEPAGE never changes its contents. Failure is harmless.
    unsafe {
        libc::madvise(ptr as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, bytes);
}

/// Keys of one plane, as laid out for the kernel (see [`Keys`]).
pub enum KeyStore {
    /// f16, `[blocks][dp][BLOCK]`.
    F16(Buf<f16>),
    /// int8 codes and per-(group, channel) scales.
    I8 {
        /// Codes.
        k: Buf<i8>,
        /// Scales, `[groups][dp]`.
        scale: Vec<f32>,
    },
    /// 4-bit codes and per-(group, channel) scales and offsets.
    U4 {
        /// Packed codes.
        k: Buf<u8>,
        /// Scales, `[groups][dp]`.
        scale: Vec<f32>,
        /// Offsets (the value of code 8), `[groups][dp]`.
        offset: Vec<f32>,
    },
}

/// Values of one plane, as laid out for the kernel (see [`Values`]).
pub enum ValueStore {
    /// f16, `[blocks·BLOCK][dp]`.
    F16(Buf<f16>),
    /// int8 codes and per-token scales.
    I8 {
        /// Codes.
        v: Buf<i8>,
        /// Scales, `[blocks·BLOCK]`.
        scale: Vec<f32>,
    },
    /// 4-bit codes and per-token scales and offsets.
    U4 {
        /// Packed codes.
        v: Buf<u8>,
        /// Scales, `[blocks·BLOCK]`.
        scale: Vec<f32>,
        /// Offsets (the value of code 8), `[blocks·BLOCK]`.
        offset: Vec<f32>,
    },
}

/// Keys of one plane, borrowed. Element (token t, channel c), with
/// `b = t / BLOCK`, `i = t % BLOCK`:
/// - `F16`: `k[(b·dp + c)·BLOCK + i]`.
/// - `I8`: `k[(b·dp/2 + c/2)·32 + 2i + c%2]`; scale `[t / KEY_GROUP][c]`.
/// - `U4`: position `p = 2i + c%2` of 4-bit unit `b·dp/2 + c/2` (see [`nibble`]).
#[derive(Clone, Copy)]
pub enum Keys<'a> {
    /// f16.
    F16(&'a [f16]),
    /// int8 with scales.
    I8 {
        /// Codes.
        k: &'a [i8],
        /// Scales, `[groups][dp]`.
        scale: &'a [f32],
    },
    /// 4-bit with scales and offsets.
    U4 {
        /// Packed codes.
        k: &'a [u8],
        /// Scales, `[groups][dp]`.
        scale: &'a [f32],
        /// Offsets, `[groups][dp]`.
        offset: &'a [f32],
    },
}

/// Values of one plane, borrowed. Element (token t, channel c), with
/// `b = t / BLOCK`, `i = t % BLOCK`, token pair `j = i / 2`:
/// Blocks hold runs of 16 channels, each run all the block's tokens, in
/// the order the kernel reads them; with run `r = b·dp/16 + c/16`:
/// - `F16`: `v[(r·BLOCK + i)·16 + c%16]`.
/// - `I8`: `v[(r·8 + j)·32 + 2·(c%16) + i%2]`; scale `[t]`.
/// - `U4`: position `p = 2·(c%16) + i%2` of 4-bit unit `r·8 + j` (see [`nibble`]).
#[derive(Clone, Copy)]
pub enum Values<'a> {
    /// f16.
    F16(&'a [f16]),
    /// int8 with per-token scales.
    I8 {
        /// Codes.
        v: &'a [i8],
        /// Scales, `[blocks·BLOCK]`.
        scale: &'a [f32],
    },
    /// 4-bit with per-token scales and offsets.
    U4 {
        /// Packed codes.
        v: &'a [u8],
        /// Scales, `[blocks·BLOCK]`.
        scale: &'a [f32],
        /// Offsets, `[blocks·BLOCK]`.
        offset: &'a [f32],
    },
}

/// One (layer, KV head) of a session, borrowed for the kernel.
#[derive(Clone, Copy)]
pub struct HeadKv<'a> {
    /// Sizes.
    pub geo: Geometry,
    /// Keys.
    pub keys: Keys<'a>,
    /// Values.
    pub values: Values<'a>,
}

impl HeadKv<'_> {
    /// Panics unless every slice is as long as the geometry says: the
    /// SIMD kernel reads through raw pointers on the strength of this.
    pub fn check(&self) {
        let g = &self.geo;
        let (pt, dp) = (g.padded_tokens(), g.dp);
        let ok_keys = match self.keys {
            Keys::F16(k) => k.len() >= pt * dp,
            Keys::I8 { k, scale } => k.len() >= pt * dp && scale.len() >= g.groups * dp,
            Keys::U4 { k, scale, offset } => {
                k.len() >= pt * dp / 2 && scale.len() >= g.groups * dp && offset.len() >= g.groups * dp
            }
        };
        let ok_values = match self.values {
            Values::F16(v) => v.len() >= pt * dp,
            Values::I8 { v, scale } => v.len() >= pt * dp && scale.len() >= pt,
            Values::U4 { v, scale, offset } => {
                v.len() >= pt * dp / 2 && scale.len() >= pt && offset.len() >= pt
            }
        };
        assert!(
            ok_keys && ok_values,
            "attention plane slices do not match its geometry"
        );
    }

    /// Bytes a pass over tokens `t0..t1` reads: the blocks and key groups
    /// it touches.
    pub fn bytes_read(&self, t0: usize, t1: usize) -> u64 {
        let g = &self.geo;
        let t1 = t1.min(g.tokens);
        if t0 >= t1 {
            return 0;
        }
        let blocks = (t1.div_ceil(BLOCK) - t0 / BLOCK) as u64;
        let groups = (t1.div_ceil(KEY_GROUP) - t0 / KEY_GROUP) as u64;
        let dp = g.dp as u64;
        let b = BLOCK as u64;
        let keys = match self.keys {
            Keys::F16(_) => blocks * b * dp * 2,
            Keys::I8 { .. } => blocks * b * dp + groups * dp * 4,
            Keys::U4 { .. } => blocks * b * dp / 2 + groups * dp * 8,
        };
        let values = match self.values {
            Values::F16(_) => blocks * b * dp * 2,
            Values::I8 { .. } => blocks * b * (dp + 4),
            Values::U4 { .. } => blocks * b * (dp / 2 + 8),
        };
        keys + values
    }

    /// Key (token `t`, channel `c`) as the layout holds it, dequantised.
    pub fn key(&self, t: usize, c: usize) -> f32 {
        let (dp, b, i) = (self.geo.dp, t / BLOCK, t % BLOCK);
        let g = t / KEY_GROUP * dp + c;
        match self.keys {
            Keys::F16(k) => k[(b * dp + c) * BLOCK + i].to_f32(),
            Keys::I8 { k, scale } => scale[g] * k[(b * dp / 2 + c / 2) * 32 + 2 * i + c % 2] as f32,
            Keys::U4 { k, scale, offset } => {
                offset[g] + scale[g] * (nibble(k, b * dp / 2 + c / 2, 2 * i + c % 2) as f32 - 8.0)
            }
        }
    }

    /// Value (token `t`, channel `c`) as the layout holds it, dequantised.
    pub fn value(&self, t: usize, c: usize) -> f32 {
        let (dp, b, i) = (self.geo.dp, t / BLOCK, t % BLOCK);
        let run = b * dp / 16 + c / 16;
        match self.values {
            Values::F16(v) => v[(run * BLOCK + i) * 16 + c % 16].to_f32(),
            Values::I8 { v, scale } => scale[t] * v[(run * 8 + i / 2) * 32 + 2 * (c % 16) + i % 2] as f32,
            Values::U4 { v, scale, offset } => {
                offset[t] + scale[t] * (nibble(v, run * 8 + i / 2, 2 * (c % 16) + i % 2) as f32 - 8.0)
            }
        }
    }
}

/// Code at position `p` (0..32) of 4-bit unit `u`: units `2m` and `2m+1`
/// share the 32 bytes at `32m`, byte `p` holding unit `2m`'s code in its
/// low nibble and unit `2m+1`'s in its high one (one load, a shift and two
/// masks unpack both).
#[inline(always)]
pub fn nibble(buf: &[u8], u: usize, p: usize) -> u8 {
    let b = buf[u / 2 * 32 + p];
    if u.is_multiple_of(2) { b & 0x0f } else { b >> 4 }
}

/// One plane, owned.
pub struct Plane {
    geo: Geometry,
    keys: KeyStore,
    values: ValueStore,
}

impl Plane {
    /// Packs keys and values rows `[tokens][d]` (f16) into `format`.
    pub fn pack(format: Format, k: &[f16], v: &[f16], geo: Geometry) -> Plane {
        debug_assert_eq!(k.len(), geo.tokens * geo.d);
        debug_assert_eq!(v.len(), geo.tokens * geo.d);
        let keys = match format {
            Format::F16 => KeyStore::F16(keys_f16(k, &geo)),
            Format::Int8 | Format::K8V4 => keys_i8(k, &geo),
            Format::K4V4 => keys_u4(k, &geo),
        };
        let values = match format {
            Format::F16 => ValueStore::F16(values_f16(v, &geo)),
            Format::Int8 => values_i8(v, &geo),
            Format::K8V4 | Format::K4V4 => values_u4(v, &geo),
        };
        Plane { geo, keys, values }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        let k = match &self.keys {
            KeyStore::F16(k) => k.len() * 2,
            KeyStore::I8 { k, scale } => k.len() + scale.len() * 4,
            KeyStore::U4 { k, scale, offset } => k.len() + (scale.len() + offset.len()) * 4,
        };
        let v = match &self.values {
            ValueStore::F16(v) => v.len() * 2,
            ValueStore::I8 { v, scale } => v.len() + scale.len() * 4,
            ValueStore::U4 { v, scale, offset } => v.len() + (scale.len() + offset.len()) * 4,
        };
        (k + v) as u64
    }

    /// The plane, borrowed for the kernel.
    pub fn view(&self) -> HeadKv<'_> {
        let keys = match &self.keys {
            KeyStore::F16(k) => Keys::F16(k),
            KeyStore::I8 { k, scale } => Keys::I8 { k, scale },
            KeyStore::U4 { k, scale, offset } => Keys::U4 { k, scale, offset },
        };
        let values = match &self.values {
            ValueStore::F16(v) => Values::F16(v),
            ValueStore::I8 { v, scale } => Values::I8 { v, scale },
            ValueStore::U4 { v, scale, offset } => Values::U4 { v, scale, offset },
        };
        HeadKv {
            geo: self.geo,
            keys,
            values,
        }
    }
}

/// Calls `f(t, row)` with every row of `rows` widened to f32, a row at a
/// time (`half`'s scalar conversion is a call per element).
fn for_rows(rows: &[f16], d: usize, mut f: impl FnMut(usize, &[f32])) {
    let mut buf = vec![0f32; d];
    for (t, r) in rows.chunks_exact(d).enumerate() {
        r.convert_to_f32_slice(&mut buf);
        f(t, &buf);
    }
}

fn keys_f16(rows: &[f16], geo: &Geometry) -> Buf<f16> {
    let (d, dp) = (geo.d, geo.dp);
    let mut out = Buf::filled(geo.padded_tokens() * dp, f16::ZERO);
    for (t, r) in rows.chunks_exact(d).enumerate() {
        let (b, i) = (t / BLOCK, t % BLOCK);
        for (c, x) in r.iter().enumerate() {
            out[(b * dp + c) * BLOCK + i] = *x;
        }
    }
    out
}

/// Per-(group, channel) minimum and maximum of key rows.
fn key_ranges(rows: &[f16], geo: &Geometry) -> (Vec<f32>, Vec<f32>) {
    let (d, dp) = (geo.d, geo.dp);
    let mut lo = vec![f32::INFINITY; geo.groups * dp];
    let mut hi = vec![f32::NEG_INFINITY; geo.groups * dp];
    for_rows(rows, d, |t, r| {
        let g = t / KEY_GROUP * dp;
        for (c, x) in r.iter().enumerate() {
            lo[g + c] = lo[g + c].min(*x);
            hi[g + c] = hi[g + c].max(*x);
        }
    });
    // Padded channels (and never-seen ones) hold zeros.
    for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
        if *a > *b {
            (*a, *b) = (0.0, 0.0);
        }
    }
    (lo, hi)
}

fn keys_i8(rows: &[f16], geo: &Geometry) -> KeyStore {
    let (d, dp) = (geo.d, geo.dp);
    let (lo, hi) = key_ranges(rows, geo);
    let scale: Vec<f32> = lo
        .iter()
        .zip(&hi)
        .map(|(a, b)| {
            let m = a.abs().max(b.abs());
            if m > 0.0 { m / 127.0 } else { 1.0 }
        })
        .collect();
    let mut k = Buf::filled(geo.padded_tokens() * dp, 0i8);
    for_rows(rows, d, |t, r| {
        let (b, i, g) = (t / BLOCK, t % BLOCK, t / KEY_GROUP * dp);
        for (c, x) in r.iter().enumerate() {
            let code = nearest(x / scale[g + c], -127.0, 127.0) as i8;
            k[(b * dp / 2 + c / 2) * 32 + 2 * i + c % 2] = code;
        }
    });
    KeyStore::I8 { k, scale }
}

/// `y` clamped to `lo..=hi` (|·| < 2^22) and rounded to the nearest integer (ties to even).
///
/// Adding and subtracting 1.5·2^23 rounds any |y| < 2^22 in the default
/// rounding mode; `f32::round` is a libm call on baseline x86-64, which
/// took a third of the packing time in a profile.
#[inline]
fn nearest(y: f32, lo: f32, hi: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (y.clamp(lo, hi) + MAGIC) - MAGIC
}

/// Asymmetric 4-bit step and offset (the value of code 8) of a range.
fn u4_params(lo: f32, hi: f32) -> (f32, f32) {
    let s = (hi - lo) / 15.0;
    (s, lo + 8.0 * s)
}

/// The 4-bit code of `x` for step `s` above `lo`.
fn u4_code(x: f32, lo: f32, s: f32) -> u8 {
    if s > 0.0 {
        nearest((x - lo) / s, 0.0, 15.0) as u8
    } else {
        8
    }
}

/// Sets the code at position `p` of 4-bit unit `unit` (see [`nibble`]).
fn put_nibble(buf: &mut [u8], unit: usize, p: usize, code: u8) {
    let byte = &mut buf[unit / 2 * 32 + p];
    if unit.is_multiple_of(2) {
        *byte = (*byte & 0xf0) | code;
    } else {
        *byte = (*byte & 0x0f) | (code << 4);
    }
}

fn keys_u4(rows: &[f16], geo: &Geometry) -> KeyStore {
    let (d, dp) = (geo.d, geo.dp);
    let (lo, hi) = key_ranges(rows, geo);
    let (scale, offset): (Vec<f32>, Vec<f32>) = lo.iter().zip(&hi).map(|(a, b)| u4_params(*a, *b)).unzip();
    // Code 8 everywhere: padded channels and tokens decode to the offset (0).
    let mut k = Buf::filled(geo.padded_tokens() * dp / 2, 0x88u8);
    for_rows(rows, d, |t, r| {
        let (b, i, g) = (t / BLOCK, t % BLOCK, t / KEY_GROUP * dp);
        for (c, x) in r.iter().enumerate() {
            let code = u4_code(*x, lo[g + c], scale[g + c]);
            put_nibble(&mut k, b * dp / 2 + c / 2, 2 * i + c % 2, code);
        }
    });
    KeyStore::U4 { k, scale, offset }
}

fn values_f16(rows: &[f16], geo: &Geometry) -> Buf<f16> {
    let (d, dp) = (geo.d, geo.dp);
    let mut out = Buf::filled(geo.padded_tokens() * dp, f16::ZERO);
    for (t, r) in rows.chunks_exact(d).enumerate() {
        let (b, i) = (t / BLOCK, t % BLOCK);
        for (c, x) in r.iter().enumerate() {
            out[((b * dp / 16 + c / 16) * BLOCK + i) * 16 + c % 16] = *x;
        }
    }
    out
}

fn values_i8(rows: &[f16], geo: &Geometry) -> ValueStore {
    let (d, dp) = (geo.d, geo.dp);
    let mut v = Buf::filled(geo.padded_tokens() * dp, 0i8);
    let mut scale = vec![0f32; geo.padded_tokens()];
    for_rows(rows, d, |t, r| {
        let m = r.iter().fold(0f32, |m, x| m.max(x.abs()));
        let s = if m > 0.0 { m / 127.0 } else { 1.0 };
        scale[t] = s;
        let (b, i) = (t / BLOCK, t % BLOCK);
        for (c, x) in r.iter().enumerate() {
            let unit = (b * dp / 16 + c / 16) * 8 + i / 2;
            v[unit * 32 + (c % 16) * 2 + i % 2] = nearest(x / s, -127.0, 127.0) as i8;
        }
    });
    ValueStore::I8 { v, scale }
}

fn values_u4(rows: &[f16], geo: &Geometry) -> ValueStore {
    let (d, dp) = (geo.d, geo.dp);
    let mut v = Buf::filled(geo.padded_tokens() * dp / 2, 0x88u8);
    let mut scale = vec![0f32; geo.padded_tokens()];
    let mut offset = vec![0f32; geo.padded_tokens()];
    for_rows(rows, d, |t, r| {
        let lo = r.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (s, o) = u4_params(lo, hi);
        (scale[t], offset[t]) = (s, o);
        let (b, i) = (t / BLOCK, t % BLOCK);
        for (c, x) in r.iter().enumerate() {
            let unit = (b * dp / 16 + c / 16) * 8 + i / 2;
            put_nibble(&mut v, unit, 2 * (c % 16) + i % 2, u4_code(*x, lo, s));
        }
    });
    ValueStore::U4 { v, scale, offset }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Buffers of a huge page and more start on a huge page boundary (so
    /// that the advice covers them) and hold their fill; small ones too.
    #[test]
    fn buffers_are_aligned_and_filled() {
        let big = Buf::filled(HUGE_PAGE + 3, 0x88u8);
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(big.len(), HUGE_PAGE + 3);
        assert!(big.iter().all(|x| *x == 0x88));
        let small = Buf::filled(5, f16::from_f32(1.5));
        assert_eq!(&small[..], &[f16::from_f32(1.5); 5]);
        assert!(Buf::filled(0, 0i8).is_empty());
    }

    /// Every element read back through the layout within half its
    /// quantisation step (exactly for f16); padded keys are zero.
    #[test]
    fn layouts_hold_every_element_within_half_a_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (t, d) in [(301usize, 40usize), (16, 16), (1, 2), (130, 128)] {
            let mut k: Vec<f16> = (0..t * d)
                .map(|_| f16::from_f32(rng.random_range(-2.0f32..2.0)))
                .collect();
            let mut v: Vec<f16> = (0..t * d)
                .map(|_| f16::from_f32(rng.random_range(-3.0f32..1.0)))
                .collect();
            // A constant key channel and a constant value row.
            for i in 0..t {
                k[i * d] = f16::from_f32(0.75);
            }
            v[..d].fill(f16::from_f32(-1.25));
            let geo = Geometry::new(t, d);
            let kf: Vec<f32> = k.iter().map(|x| x.to_f32()).collect();
            let vf: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
            for f in [Format::F16, Format::Int8, Format::K8V4, Format::K4V4] {
                let plane = Plane::pack(f, &k, &v, geo);
                assert_eq!(plane.bytes(), f.plane_bytes(&geo), "{f:?}");
                let kv = plane.view();
                kv.check();
                for i in 0..t {
                    let g = i / KEY_GROUP;
                    let grp = g * KEY_GROUP..((g + 1) * KEY_GROUP).min(t);
                    let row = &vf[i * d..(i + 1) * d];
                    let vstep = match f {
                        Format::F16 => 0.0,
                        Format::Int8 => row.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0,
                        Format::K8V4 | Format::K4V4 => {
                            (row.iter().copied().fold(f32::MIN, f32::max)
                                - row.iter().copied().fold(f32::MAX, f32::min))
                                / 15.0
                        }
                    };
                    for c in 0..d {
                        let col = grp.clone().map(|j| kf[j * d + c]);
                        let kstep = match f {
                            Format::F16 => 0.0,
                            Format::Int8 | Format::K8V4 => col.fold(0f32, |m, x| m.max(x.abs())) / 127.0,
                            Format::K4V4 => {
                                let (lo, hi) =
                                    col.fold((f32::MAX, f32::MIN), |(a, b), x| (a.min(x), b.max(x)));
                                (hi - lo) / 15.0
                            }
                        };
                        let (kx, vx) = (kf[i * d + c], vf[i * d + c]);
                        assert!(
                            (kv.key(i, c) - kx).abs() <= kstep / 2.0 + 1e-6 * kx.abs(),
                            "{f:?} key ({i},{c})"
                        );
                        assert!(
                            (kv.value(i, c) - vx).abs() <= vstep / 2.0 + 1e-6 * vx.abs(),
                            "{f:?} value ({i},{c})"
                        );
                    }
                    for c in d..geo.dp {
                        assert_eq!(kv.key(i, c), 0.0, "{f:?} padded key channel");
                    }
                }
                for i in t..geo.blocks * BLOCK {
                    assert_eq!(kv.value(i, d - 1), 0.0, "{f:?} padded token");
                }
            }
        }
    }
}
