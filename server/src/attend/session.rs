//! Attention sessions: a stored prefix decoded once into an attention-ready
//! layout, and the table that budgets their memory and expires idle ones.
//!
//! Layout: per (layer, KV head) the keys and values of all the session's
//! tokens are contiguous rows of `head_dim`, so a worker streams one head's
//! range front to back. Canonical chunks are `[layer][K,V][token][head][dim]`;
//! decoding scatters each chunk's layer into that head-major order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use half::f16;
use half::slice::HalfFloatSliceExt;
use kvault_codec::{Container, Dtype};
use kvault_proto::Layout;
use rayon::prelude::*;

use super::AttendError;
use super::kernel::HeadKv;

/// The in-memory layout of a session's KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// f16 keys and values (lossless for f16 caches).
    F16,
    /// int8 keys (per-channel scales) and int8 values (per-token scales).
    Int8,
    /// int8 keys (per-channel scales) and 4-bit values (per-token scales).
    K8V4,
}

impl Format {
    /// Bytes a session of `tokens` tokens of `layout` holds.
    pub fn session_bytes(self, layout: &Layout, tokens: u64) -> u64 {
        let heads = layout.layers as u64 * layout.kv_heads as u64;
        let d = layout.head_dim as u64;
        match self {
            Format::F16 => heads * tokens * d * 4,
            Format::Int8 => heads * (tokens * (2 * d + 4) + d * 4),
            Format::K8V4 => heads * (tokens * (d + d / 2 + 4) + d * 4),
        }
    }
}

enum Store {
    F16 {
        k: Vec<f16>,
        v: Vec<f16>,
    },
    Int8 {
        k: Vec<i8>,
        k_scale: Vec<f32>,
        v: Vec<i8>,
        v_scale: Vec<f32>,
    },
    K8V4 {
        k: Vec<i8>,
        k_scale: Vec<f32>,
        v: Vec<u8>,
        v_scale: Vec<f32>,
    },
}

/// One decoded prefix (or the part of it this server holds).
pub struct Session {
    /// Layers of the model.
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Dimension of a head.
    pub head_dim: usize,
    /// Tokens covered.
    pub tokens: usize,
    /// The layout its KV was decoded into.
    pub format: Format,
    store: Store,
}

impl Session {
    /// Decodes `blobs` (chunk containers of `layout`, in token order; all
    /// full but the last) into `format`. CPU-bound: parallel over layers.
    pub fn build(layout: &Layout, blobs: &[bytes::Bytes], format: Format) -> Result<Session, AttendError> {
        let ct = layout.chunk_tokens as usize;
        if format == Format::K8V4 && !layout.head_dim.is_multiple_of(2) {
            return Err(AttendError::InvalidArgument(format!(
                "the 4-bit value layout needs an even head_dim, the prefix has {}",
                layout.head_dim
            )));
        }
        let (layers, kvh, d) = (
            layout.layers as usize,
            layout.kv_heads as usize,
            layout.head_dim as usize,
        );
        let mut containers = Vec::with_capacity(blobs.len());
        let mut starts = Vec::with_capacity(blobs.len());
        let mut tokens = 0usize;
        for (i, b) in blobs.iter().enumerate() {
            let c = Container::parse(b)
                .map_err(|e| AttendError::DataLoss(format!("stored chunk {i} does not parse: {e}")))?;
            let h = c.header();
            if h.layer_start != 0
                || h.layer_count != layout.layers
                || h.kv_heads != layout.kv_heads
                || h.head_dim != layout.head_dim
            {
                return Err(AttendError::DataLoss(format!(
                    "stored chunk {i} has shape {} that is not the namespace's",
                    h.shape()
                )));
            }
            let n = h.tokens as usize;
            let last = i + 1 == blobs.len();
            if n == 0 || n > ct || (!last && n != ct) {
                return Err(AttendError::InvalidArgument(format!(
                    "chunk {i} holds {n} tokens; every chunk but the last must hold {ct}"
                )));
            }
            starts.push(tokens);
            tokens += n;
            containers.push(c);
        }
        let plane = tokens * d; // one (layer, head) of K or V
        let mut k = vec![f16::ZERO; layers * kvh * plane];
        let mut v = vec![f16::ZERO; layers * kvh * plane];
        k.par_chunks_mut(kvh * plane)
            .zip(v.par_chunks_mut(kvh * plane))
            .enumerate()
            .try_for_each(|(l, (kl, vl))| -> Result<(), AttendError> {
                let mut buf: Vec<u8> = Vec::new();
                for (c, &t0) in containers.iter().zip(&starts) {
                    let n = c.header().tokens as usize;
                    buf.resize(2 * n * kvh * d * 2, 0);
                    c.decode_layer_into(l as u32, Dtype::F16, &mut buf)
                        .map_err(|e| AttendError::DataLoss(format!("stored chunk does not decode: {e}")))?;
                    // buf: [K,V][token][head][dim] f16 little-endian.
                    for (p, dst) in [(0usize, &mut *kl), (1, &mut *vl)] {
                        for t in 0..n {
                            for h in 0..kvh {
                                let src = ((p * n + t) * kvh + h) * d * 2;
                                let at = h * plane + (t0 + t) * d;
                                for (i, o) in dst[at..at + d].iter_mut().enumerate() {
                                    *o = f16::from_le_bytes([buf[src + 2 * i], buf[src + 2 * i + 1]]);
                                }
                            }
                        }
                    }
                }
                Ok(())
            })?;
        let store = match format {
            Format::F16 => Store::F16 { k, v },
            Format::Int8 => quantize(&k, &v, layers * kvh, tokens, d, false),
            Format::K8V4 => quantize(&k, &v, layers * kvh, tokens, d, true),
        };
        Ok(Session {
            layers,
            kv_heads: kvh,
            head_dim: d,
            tokens,
            format,
            store,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        match &self.store {
            Store::F16 { k, v } => (k.len() + v.len()) as u64 * 2,
            Store::Int8 {
                k,
                k_scale,
                v,
                v_scale,
            } => (k.len() + v.len()) as u64 + (k_scale.len() + v_scale.len()) as u64 * 4,
            Store::K8V4 {
                k,
                k_scale,
                v,
                v_scale,
            } => (k.len() + v.len()) as u64 + (k_scale.len() + v_scale.len()) as u64 * 4,
        }
    }

    /// The KV of one (layer, KV head).
    pub fn head(&self, layer: usize, head: usize) -> HeadKv<'_> {
        let i = layer * self.kv_heads + head;
        let plane = self.tokens * self.head_dim;
        let rows = i * plane..(i + 1) * plane;
        match &self.store {
            Store::F16 { k, v } => HeadKv::F16 {
                k: &k[rows.clone()],
                v: &v[rows],
            },
            Store::Int8 {
                k,
                k_scale,
                v,
                v_scale,
            } => HeadKv::Int8 {
                k: &k[rows.clone()],
                k_scale: &k_scale[i * self.head_dim..(i + 1) * self.head_dim],
                v: &v[rows],
                v_scale: &v_scale[i * self.tokens..(i + 1) * self.tokens],
            },
            Store::K8V4 {
                k,
                k_scale,
                v,
                v_scale,
            } => HeadKv::K8V4 {
                k: &k[rows],
                k_scale: &k_scale[i * self.head_dim..(i + 1) * self.head_dim],
                v: &v[i * plane / 2..(i + 1) * plane / 2],
                v_scale: &v_scale[i * self.tokens..(i + 1) * self.tokens],
            },
        }
    }
}

/// Keys per channel over the session's tokens (the scale of channel c goes
/// into q_c at query time), values per token to int8 or (`v4`) 4 bits.
/// Rows are widened to f32 a slice at a time (`half`'s scalar conversion
/// is a call per element).
fn quantize(k: &[f16], v: &[f16], heads: usize, tokens: usize, d: usize, v4: bool) -> Store {
    let plane = tokens * d;
    let mut kq = vec![0i8; k.len()];
    let mut k_scale = vec![0f32; heads * d];
    let mut v_scale = vec![0f32; heads * tokens];
    kq.par_chunks_mut(plane.max(1))
        .zip(k_scale.par_chunks_mut(d))
        .enumerate()
        .for_each(|(h, (q, sc))| {
            let src = &k[h * plane..(h + 1) * plane];
            let mut row = vec![0f32; d];
            // One row-major pass for every channel's max (a pass per channel would stride).
            sc.fill(0.0);
            for r in src.chunks_exact(d) {
                r.convert_to_f32_slice(&mut row);
                for (m, x) in sc.iter_mut().zip(&row) {
                    *m = m.max(x.abs());
                }
            }
            for s in sc.iter_mut() {
                *s = if *s > 0.0 { *s / 127.0 } else { 1.0 };
            }
            for (out, r) in q.chunks_exact_mut(d).zip(src.chunks_exact(d)) {
                r.convert_to_f32_slice(&mut row);
                for ((o, x), s) in out.iter_mut().zip(&row).zip(sc.iter()) {
                    *o = (x / s).round().clamp(-127.0, 127.0) as i8;
                }
            }
        });
    // Values per token: `levels` steps each side of zero.
    let token_row = |src: &[f16], row: &mut [f32], levels: f32| -> f32 {
        src.convert_to_f32_slice(row);
        let max = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        if max > 0.0 { max / levels } else { 1.0 }
    };
    if v4 {
        let mut vq = vec![0u8; v.len() / 2];
        vq.par_chunks_mut(d / 2)
            .zip(v_scale.par_iter_mut())
            .zip(v.par_chunks(d))
            .for_each_init(
                || vec![0f32; d],
                |row, ((q, s), src)| {
                    *s = token_row(src, row, 7.0);
                    let code = |x: f32| ((x / *s).round().clamp(-7.0, 7.0) + 8.0) as u8;
                    for (o, pair) in q.iter_mut().zip(row.chunks_exact(2)) {
                        *o = code(pair[0]) | code(pair[1]) << 4;
                    }
                },
            );
        return Store::K8V4 {
            k: kq,
            k_scale,
            v: vq,
            v_scale,
        };
    }
    let mut vq = vec![0i8; v.len()];
    vq.par_chunks_mut(d)
        .zip(v_scale.par_iter_mut())
        .zip(v.par_chunks(d))
        .for_each_init(
            || vec![0f32; d],
            |row, ((q, s), src)| {
                *s = token_row(src, row, 127.0);
                for (o, x) in q.iter_mut().zip(row.iter()) {
                    *o = (x / *s).round().clamp(-127.0, 127.0) as i8;
                }
            },
        );
    Store::Int8 {
        k: kq,
        k_scale,
        v: vq,
        v_scale,
    }
}

/// Which stream and which of its session ids a table entry belongs to.
pub type SessionKey = (u64, u64);

struct Entry {
    session: Option<Arc<Session>>,
    reserved: u64,
    last_used: Instant,
}

/// All open sessions: a memory budget over them and idle expiry.
pub struct SessionTable {
    budget: u64,
    idle: Duration,
    // std Mutex: held for map operations only, never across an await or a computation.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    used: u64,
    entries: HashMap<SessionKey, Entry>,
}

impl SessionTable {
    /// A table holding at most `budget` bytes of sessions, dropping those idle for `idle`.
    pub fn new(budget: u64, idle: Duration) -> SessionTable {
        SessionTable {
            budget,
            idle,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Poison only means a panic elsewhere; every update is one map call.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `bytes` for a session being built under `key`.
    pub fn reserve(&self, key: SessionKey, bytes: u64) -> Result<(), AttendError> {
        self.expire();
        let mut g = self.lock();
        if g.entries.contains_key(&key) {
            return Err(AttendError::InvalidArgument(format!(
                "session id {} is already open on this stream",
                key.1
            )));
        }
        if g.used + bytes > self.budget {
            return Err(AttendError::ResourceExhausted(format!(
                "session needs {bytes} bytes; {} of the {} byte attention budget are in use",
                g.used, self.budget
            )));
        }
        g.used += bytes;
        g.entries.insert(
            key,
            Entry {
                session: None,
                reserved: bytes,
                last_used: Instant::now(),
            },
        );
        Ok(())
    }

    /// Installs the built session in its reservation (adjusting to its real size).
    pub fn install(&self, key: SessionKey, s: Arc<Session>) {
        let mut g = self.lock();
        let bytes = s.bytes();
        let Some(e) = g.entries.get_mut(&key) else { return };
        let old = e.reserved;
        e.reserved = bytes;
        e.session = Some(s);
        e.last_used = Instant::now();
        g.used = g.used - old + bytes;
    }

    /// The session under `key`, marking it used.
    pub fn get(&self, key: SessionKey) -> Option<Arc<Session>> {
        let mut g = self.lock();
        let now = Instant::now();
        let e = g.entries.get_mut(&key)?;
        // Expired but not yet swept: gone all the same.
        if e.session.is_some() && now.duration_since(e.last_used) > self.idle {
            let bytes = e.reserved;
            g.entries.remove(&key);
            g.used -= bytes;
            return None;
        }
        e.last_used = now;
        e.session.clone()
    }

    /// Removes one session; true when it was there.
    pub fn remove(&self, key: SessionKey) -> bool {
        let mut g = self.lock();
        match g.entries.remove(&key) {
            Some(e) => {
                g.used -= e.reserved;
                true
            }
            None => false,
        }
    }

    /// Removes every session of a stream.
    pub fn remove_stream(&self, stream: u64) {
        let mut g = self.lock();
        let keys: Vec<SessionKey> = g.entries.keys().filter(|k| k.0 == stream).copied().collect();
        for k in keys {
            if let Some(e) = g.entries.remove(&k) {
                g.used -= e.reserved;
            }
        }
    }

    /// Drops sessions idle longer than the expiry; returns how many.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let mut g = self.lock();
        let old: Vec<SessionKey> = g
            .entries
            .iter()
            .filter(|(_, e)| e.session.is_some() && now.duration_since(e.last_used) > self.idle)
            .map(|(k, _)| *k)
            .collect();
        for k in &old {
            if let Some(e) = g.entries.remove(k) {
                g.used -= e.reserved;
                tracing::debug!(stream = k.0, session = k.1, "attention session expired");
            }
        }
        old.len()
    }

    /// (open sessions, bytes held).
    pub fn usage(&self) -> (usize, u64) {
        let g = self.lock();
        (g.entries.len(), g.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvault_codec::{KvShape, KvTensor, Profile};

    fn layout() -> Layout {
        Layout {
            model_id: "t".into(),
            layers: 2,
            kv_heads: 2,
            head_dim: 8,
            dtype: Dtype::F16,
            chunk_tokens: 4,
            rope: None,
        }
    }

    fn chunk(tokens: u32, base: f32) -> bytes::Bytes {
        let shape = KvShape {
            layers: 2,
            tokens,
            kv_heads: 2,
            head_dim: 8,
        };
        let n = shape.elements() as usize;
        let data: Vec<u8> = (0..n)
            .flat_map(|i| f16::from_f32(base + i as f32 * 0.01).to_le_bytes())
            .collect();
        let t = KvTensor::new(shape, Dtype::F16, data).unwrap();
        kvault_codec::encode(t.view(), Profile::Lossless).unwrap().into()
    }

    #[test]
    fn decode_scatters_chunks_head_major() {
        let blobs = [chunk(4, 0.0), chunk(3, 100.0)];
        let s = Session::build(&layout(), &blobs, Format::F16).unwrap();
        assert_eq!(s.tokens, 7);
        assert_eq!(s.bytes(), Format::F16.session_bytes(&layout(), 7));
        // Layer 1, V, token 5 (chunk 1 token 1), head 1, dim 3.
        let HeadKv::F16 { v, .. } = s.head(1, 1) else {
            panic!()
        };
        // Index in chunk 1: ((layer 1 · 2 + V) · 3 tokens + token 1) · 2 heads + head 1, then dim 3.
        let (layer, p, t, h) = (1, 1, 1, 1);
        let idx_in_chunk = (((layer * 2 + p) * 3 + t) * 2 + h) * 8 + 3;
        let want = f16::from_f32(100.0 + idx_in_chunk as f32 * 0.01);
        assert_eq!(v[5 * 8 + 3], want);
        for f in [Format::Int8, Format::K8V4] {
            let q = Session::build(&layout(), &blobs, f).unwrap();
            assert_eq!(q.bytes(), f.session_bytes(&layout(), 7), "{f:?}");
        }
    }

    #[test]
    fn short_chunk_in_the_middle_is_refused() {
        let blobs = [chunk(3, 0.0), chunk(4, 0.0)];
        assert!(matches!(
            Session::build(&layout(), &blobs, Format::F16),
            Err(AttendError::InvalidArgument(_))
        ));
    }

    #[test]
    fn budget_and_expiry() {
        let t = SessionTable::new(100, Duration::from_millis(20));
        t.reserve((1, 1), 60).unwrap();
        assert!(matches!(
            t.reserve((1, 2), 60),
            Err(AttendError::ResourceExhausted(_))
        ));
        assert!(matches!(
            t.reserve((1, 1), 1),
            Err(AttendError::InvalidArgument(_))
        ));
        let s = Arc::new(Session::build(&layout(), &[chunk(1, 0.0)], Format::F16).unwrap());
        let b = s.bytes();
        t.install((1, 1), s);
        assert_eq!(t.usage(), (1, b));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(t.expire(), 1);
        assert!(t.get((1, 1)).is_none());
        t.reserve((2, 1), 60).unwrap();
        t.reserve((2, 2), 40).unwrap();
        t.remove_stream(2);
        assert_eq!(t.usage(), (0, 0));
    }
}
