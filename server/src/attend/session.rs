//! Attention sessions: a stored prefix decoded once into an attention-ready
//! layout, and the table that budgets their memory and expires idle ones.
//!
//! A session holds one [`Plane`] per (layer, KV head): that head's keys and
//! values for all the session's tokens, in the block layout of
//! [`super::layout`], so a worker streams one head's range front to back.
//! Canonical chunks are `[layer][K,V][token][head][dim]`; decoding gathers
//! each layer's rows per head and packs them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use half::f16;
use kvault_codec::{Container, Dtype};
use kvault_proto::Layout;
use rayon::prelude::*;

use super::AttendError;
use super::kernel::HeadKv;
pub use super::layout::Format;
use super::layout::{Geometry, Plane};

impl Format {
    /// Bytes a session of `tokens` tokens of `layout` holds.
    pub fn session_bytes(self, layout: &Layout, tokens: u64) -> u64 {
        let heads = layout.layers as u64 * layout.kv_heads as u64;
        heads * self.plane_bytes(&Geometry::new(tokens as usize, layout.head_dim as usize))
    }
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
    /// `[layer][kv head]`.
    planes: Vec<Plane>,
}

impl Session {
    /// Decodes `blobs` (chunk containers of `layout`, in token order; all
    /// full but the last) into `format`. CPU-bound: parallel over layers.
    pub fn build(layout: &Layout, blobs: &[bytes::Bytes], format: Format) -> Result<Session, AttendError> {
        let ct = layout.chunk_tokens as usize;
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
        let geo = Geometry::new(tokens, d);
        let plane = tokens * d; // one (layer, head) of K or V
        // One layer's head-major rows at a time per thread, packed as soon
        // as the layer is complete: the f16 copy never exists for the whole session.
        let per_layer: Vec<Vec<Plane>> = (0..layers)
            .into_par_iter()
            .map(|l| -> Result<Vec<Plane>, AttendError> {
                let mut k = vec![f16::ZERO; kvh * plane];
                let mut v = vec![f16::ZERO; kvh * plane];
                let mut buf: Vec<u8> = Vec::new();
                for (c, &t0) in containers.iter().zip(&starts) {
                    let n = c.header().tokens as usize;
                    buf.resize(2 * n * kvh * d * 2, 0);
                    c.decode_layer_into(l as u32, Dtype::F16, &mut buf)
                        .map_err(|e| AttendError::DataLoss(format!("stored chunk does not decode: {e}")))?;
                    // buf: [K,V][token][head][dim] f16 little-endian.
                    for (p, dst) in [(0usize, &mut k), (1, &mut v)] {
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
                Ok((0..kvh)
                    .map(|h| {
                        let r = h * plane..(h + 1) * plane;
                        Plane::pack(format, &k[r.clone()], &v[r], geo)
                    })
                    .collect())
            })
            .collect::<Result<_, _>>()?;
        Ok(Session {
            layers,
            kv_heads: kvh,
            head_dim: d,
            tokens,
            format,
            planes: per_layer.into_iter().flatten().collect(),
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.planes.iter().map(Plane::bytes).sum()
    }

    /// The KV of one (layer, KV head).
    pub fn head(&self, layer: usize, head: usize) -> HeadKv<'_> {
        self.planes[layer * self.kv_heads + head].view()
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
        // Layer 1, token 5 (chunk 1 token 1), head 1, dim 3, K and V:
        // index in chunk 1 ((layer 1 · 2 + K|V) · 3 tokens + token 1) · 2 heads + head 1, then dim 3.
        let (layer, t, h) = (1, 1, 1);
        let at =
            |p: usize| f16::from_f32(100.0 + ((((layer * 2 + p) * 3 + t) * 2 + h) * 8 + 3) as f32 * 0.01);
        let kv = s.head(1, 1);
        assert_eq!(kv.key(5, 3), at(0).to_f32());
        assert_eq!(kv.value(5, 3), at(1).to_f32());
        // Chunk 0, token 2, head 0, layer 0, dim 7.
        let at0 = |p: usize| f16::from_f32(((p * 4 + 2) * 2 * 8 + 7) as f32 * 0.01);
        assert_eq!(s.head(0, 0).key(2, 7), at0(0).to_f32());
        assert_eq!(s.head(0, 0).value(2, 7), at0(1).to_f32());
        for f in [Format::Int8, Format::K8V4, Format::K4V4] {
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
