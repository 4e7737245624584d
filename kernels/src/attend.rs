//! The GPU attention worker: decode attention over an f16 KV cache in device memory,
//! with the contract of the server's CPU workers (`Attend` in `kvault.v1`): for each
//! query (all query heads of one layer, post-RoPE, f32) and token range, the normalised
//! partial output `o` per query head and `lse = ln Σ exp(scale·q·k)`; an empty range
//! gives `lse = −inf` and `o = 0`. Partials merge exactly with any others (the client's
//! `attend::merge`).
//!
//! The cache is the GPU decoder's canonical layout (`[layers, 2, tokens, kv_heads,
//! head_dim]`), so chunks decoded on the GPU ([`crate::Target::Canonical`]) are attended
//! where they land ([`GpuAttention::from_canonical`]). The kernels (`cu/attend.cu`) split
//! every (query, KV head) over token pieces on many warps and merge the pieces exactly;
//! each KV byte of a piece is read once for all the query heads of its GQA group (up to
//! four per pass: groups of more heads take several passes).

use half::f16;

use crate::KernelError;

/// Largest head dimension the kernels take (32 lanes of 16 channels).
pub const MAX_HEAD_DIM: usize = 512;

/// Shape of a KV cache in the canonical layout `[layers, 2, tokens, kv_heads, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvDims {
    /// Layers held.
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Channels per head (a multiple of 8, at most [`MAX_HEAD_DIM`]).
    pub head_dim: usize,
    /// Tokens held.
    pub tokens: usize,
}

impl KvDims {
    /// f16 elements of the cache.
    pub fn elements(&self) -> usize {
        self.layers * 2 * self.tokens * self.kv_heads * self.head_dim
    }

    /// Checks that the kernels can take this shape.
    pub fn check(&self) -> Result<(), KernelError> {
        let bad = |why: String| Err(KernelError::Query(why));
        if self.layers == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return bad(format!("empty KV shape {self:?}"));
        }
        if !self.head_dim.is_multiple_of(8) || self.head_dim > MAX_HEAD_DIM {
            return bad(format!(
                "head dim {} is not a multiple of 8 up to {MAX_HEAD_DIM} (what the GPU worker takes)",
                self.head_dim
            ));
        }
        if self.tokens > i32::MAX as usize || self.elements() > isize::MAX as usize / 2 {
            return bad(format!("KV shape {self:?} is too large"));
        }
        Ok(())
    }
}

/// One query of a step: every query head of `layer`, over tokens `start..end`.
#[derive(Clone, Copy, Debug)]
pub struct AttendQuery<'a> {
    /// Layer of the cache.
    pub layer: usize,
    /// Post-RoPE queries, `[q_heads][head_dim]`.
    pub q: &'a [f32],
    /// Softmax scale (usually `1/√head_dim`).
    pub scale: f32,
    /// First token of the range.
    pub start: usize,
    /// One past the last token of the range.
    pub end: usize,
}

/// What one query gives: per query head the normalised output and its log-sum-exp.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    /// `[q_heads][head_dim]`, normalised (zeros for an empty range).
    pub o: Vec<f32>,
    /// `[q_heads]`, natural log (`−inf` for an empty range).
    pub lse: Vec<f32>,
}

/// Checks a step's queries against the cache: the head count is a multiple of the KV
/// heads (GQA) and matches every query's length, layers and ranges lie inside the cache,
/// and queries and scales are finite. The first bad query is named.
pub fn check_queries(dims: &KvDims, q_heads: usize, queries: &[AttendQuery<'_>]) -> Result<(), KernelError> {
    dims.check()?;
    if q_heads == 0 || !q_heads.is_multiple_of(dims.kv_heads) {
        return Err(KernelError::Query(format!(
            "{q_heads} query heads for {} KV heads (must be a positive multiple)",
            dims.kv_heads
        )));
    }
    for (i, q) in queries.iter().enumerate() {
        let bad = |why: String| Err(KernelError::Query(format!("query {i}: {why}")));
        if q.q.len() != q_heads * dims.head_dim {
            return bad(format!(
                "{} values, expected {q_heads} heads of {}",
                q.q.len(),
                dims.head_dim
            ));
        }
        if q.layer >= dims.layers {
            return bad(format!("layer {} of {}", q.layer, dims.layers));
        }
        if q.start > q.end || q.end > dims.tokens {
            return bad(format!("range {}..{} of {} tokens", q.start, q.end, dims.tokens));
        }
        if !q.scale.is_finite() {
            return bad(format!("scale {}", q.scale));
        }
        if let Some(j) = q.q.iter().position(|x| !x.is_finite()) {
            return bad(format!("value {j} is {}", q.q[j]));
        }
    }
    Ok(())
}

/// Attention in f64 over a host cache (canonical layout) for one query: `(o, lse)` per
/// query head, as the kernels are checked against (tests and benchmark).
pub fn reference(kv: &[f16], dims: KvDims, q_heads: usize, q: &AttendQuery<'_>) -> (Vec<f64>, Vec<f64>) {
    let (d, kvh, t) = (dims.head_dim, dims.kv_heads, dims.tokens);
    let g = q_heads / kvh;
    let row =
        |slot: usize, tok: usize, h: usize| &kv[(((q.layer * 2 + slot) * t + tok) * kvh + h) * d..][..d];
    let mut o = vec![0f64; q_heads * d];
    let mut lse = vec![f64::NEG_INFINITY; q_heads];
    for qh in 0..q_heads {
        let h = qh / g;
        let qv = &q.q[qh * d..(qh + 1) * d];
        let s: Vec<f64> = (q.start..q.end)
            .map(|tok| {
                let dot: f64 = qv
                    .iter()
                    .zip(row(0, tok, h))
                    .map(|(a, b)| *a as f64 * b.to_f64())
                    .sum();
                q.scale as f64 * dot
            })
            .collect();
        if s.is_empty() {
            continue;
        }
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let l: f64 = w.iter().sum();
        for (wi, tok) in w.iter().zip(q.start..q.end) {
            for (acc, v) in o[qh * d..(qh + 1) * d].iter_mut().zip(row(1, tok, h)) {
                *acc += wi / l * v.to_f64();
            }
        }
        lse[qh] = m + l.ln();
    }
    (o, lse)
}

/// Query heads of a group that one pass of the kernel takes.
#[cfg(any(feature = "cuda", test))]
fn pass_heads(group: usize) -> usize {
    match group {
        1 => 1,
        2 => 2,
        _ => 4,
    }
}

/// Lanes per token row the kernels are built for.
#[cfg(feature = "cuda")]
const LANES: [usize; 6] = [1, 2, 4, 8, 16, 32];

/// Lanes that read one token's row: 16 channels each, a power of two.
#[cfg(any(feature = "cuda", test))]
fn lanes_per_token(head_dim: usize) -> usize {
    head_dim.div_ceil(16).next_power_of_two()
}

/// Token pieces per (query, KV head, head group): enough warps to fill a large GPU many
/// times over, at least four 32-token tiles per piece, at most 256 pieces (the merge reads
/// all of them).
#[cfg(any(feature = "cuda", test))]
fn pieces(units: usize, max_tokens: usize) -> usize {
    const WARPS_WANTED: usize = 16_384;
    let tiles = max_tokens.div_ceil(32);
    WARPS_WANTED
        .div_ceil(units.max(1))
        .min(tiles.div_ceil(4))
        .clamp(1, 256)
}

#[cfg(feature = "cuda")]
pub use gpu::{GpuAttention, GpuKv};

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::{Arc, Mutex};

    use cudarc::driver::{
        CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
        PushKernelArg, ValidAsZeroBits, sys,
    };
    use half::slice::HalfFloatSliceExt;
    use kvault_codec::plan::as_bytes;

    use super::*;
    use crate::compile::ptx;
    use crate::decoder::cuda;

    /// A KV cache in device memory, canonical layout, f16.
    pub struct GpuKv {
        dims: KvDims,
        buf: CudaSlice<u8>,
    }

    impl GpuKv {
        /// Its shape.
        pub fn dims(&self) -> KvDims {
            self.dims
        }

        /// Bytes of device memory it holds.
        pub fn bytes(&self) -> usize {
            self.dims.elements() * 2
        }
    }

    /// The attention kernels on one device (compiled with NVRTC once per process).
    pub struct GpuAttention {
        stream: Arc<CudaStream>,
        /// `attend_partials_{GT}_{LPT}`: one pass over GT = 1, 2 or 4 query heads of a
        /// group, LPT = 1, 2, ... 32 lanes per token row; `[log2 GT][log2 LPT]`.
        partials: [[CudaFunction; 6]; 3],
        combine: CudaFunction,
        _module: Arc<CudaModule>,
        scratch: Mutex<Scratch>,
    }

    /// Device buffers kept between calls (grow-only): a step allocates nothing.
    #[derive(Default)]
    struct Scratch {
        q: Option<CudaSlice<f32>>,
        meta: Option<CudaSlice<i32>>,
        part: Option<CudaSlice<f32>>,
        o: Option<CudaSlice<f32>>,
        lse: Option<CudaSlice<f32>>,
        /// Kernel time of the last call (both kernels), ms.
        last_ms: Option<f32>,
    }

    /// `slot`'s buffer, grown to hold at least `n` values.
    fn grow<'a, T: DeviceRepr + ValidAsZeroBits>(
        s: &Arc<CudaStream>,
        slot: &'a mut Option<CudaSlice<T>>,
        n: usize,
    ) -> Result<&'a mut CudaSlice<T>, KernelError> {
        match slot {
            Some(b) if b.len() >= n => {}
            _ => {
                // The old buffer goes first: the new one may need its memory.
                *slot = None;
                *slot = Some(s.alloc_zeros(n.max(1)).map_err(cuda)?);
            }
        }
        slot.as_mut()
            .ok_or_else(|| KernelError::Cuda("attention scratch buffer missing".into()))
    }

    impl GpuAttention {
        /// Opens device `ordinal` (no GPU: [`KernelError::NoGpu`]).
        pub fn new(ordinal: usize) -> Result<GpuAttention, KernelError> {
            crate::decoder::driver_ready(ordinal)?;
            let ctx = CudaContext::new(ordinal).map_err(|e| KernelError::NoGpu(e.to_string()))?;
            GpuAttention::in_context(&ctx)
        }

        /// Shares `ctx` (a [`crate::GpuDecoder`]'s, so that its canonical output can be
        /// attended without a copy).
        pub fn in_context(ctx: &Arc<CudaContext>) -> Result<GpuAttention, KernelError> {
            let (major, minor) = ctx.compute_capability().map_err(cuda)?;
            let module = ctx
                .load_module(ptx("attend.cu", &format!("sm_{major}{minor}"))?)
                .map_err(cuda)?;
            let f = |n: &str| module.load_function(n).map_err(cuda);
            let row = |gt: usize| -> Result<[CudaFunction; 6], KernelError> {
                let fs = LANES
                    .iter()
                    .map(|l| f(&format!("attend_partials_{gt}_{l}")))
                    .collect::<Result<Vec<_>, _>>()?;
                fs.try_into()
                    .map_err(|_| KernelError::Compile("attend.cu: kernel table".into()))
            };
            Ok(GpuAttention {
                stream: ctx.new_stream().map_err(cuda)?,
                partials: [row(1)?, row(2)?, row(4)?],
                combine: f("attend_combine")?,
                _module: module,
                scratch: Mutex::new(Scratch::default()),
            })
        }

        /// The stream the kernels run on.
        pub fn stream(&self) -> &Arc<CudaStream> {
            &self.stream
        }

        /// Kernel time of the last [`attend`](Self::attend) call, in milliseconds.
        pub fn last_kernel_ms(&self) -> Option<f32> {
            self.scratch.lock().unwrap_or_else(|e| e.into_inner()).last_ms
        }

        /// Copies a host cache (canonical layout) to the device.
        pub fn upload(&self, dims: KvDims, kv: &[f16]) -> Result<GpuKv, KernelError> {
            dims.check()?;
            if kv.len() != dims.elements() {
                return Err(KernelError::Layout(format!(
                    "{} f16 values for a KV cache of {dims:?} ({} values)",
                    kv.len(),
                    dims.elements()
                )));
            }
            let buf = self
                .stream
                .clone_htod(as_bytes::<u16>(kv.reinterpret_cast()))
                .map_err(cuda)?;
            Ok(GpuKv { dims, buf })
        }

        /// Takes a device buffer already in the canonical layout as f16 (a GPU decode's
        /// output).
        pub fn from_canonical(&self, dims: KvDims, buf: CudaSlice<u8>) -> Result<GpuKv, KernelError> {
            dims.check()?;
            if buf.len() != dims.elements() * 2 {
                return Err(KernelError::Layout(format!(
                    "{} bytes for a KV cache of {dims:?} ({} bytes of f16)",
                    buf.len(),
                    dims.elements() * 2
                )));
            }
            Ok(GpuKv { dims, buf })
        }

        /// Attends `queries` (each every one of `q_heads` heads of a layer) over `kv`: per
        /// query its [`Partial`]. Bad queries are refused before anything runs.
        pub fn attend(
            &self,
            kv: &GpuKv,
            q_heads: usize,
            queries: &[AttendQuery<'_>],
        ) -> Result<Vec<Partial>, KernelError> {
            let dims = kv.dims;
            check_queries(&dims, q_heads, queries)?;
            if queries.is_empty() {
                return Ok(Vec::new());
            }
            let (nq, d, kvh) = (queries.len(), dims.head_dim, dims.kv_heads);
            let g = q_heads / kvh;
            let gt = pass_heads(g);
            let groups = g.div_ceil(gt);
            let lpt = lanes_per_token(d);
            let longest = queries.iter().map(|q| q.end - q.start).max().unwrap_or(0);
            let np = pieces(nq * kvh * groups, longest);
            let mut qv = Vec::with_capacity(nq * q_heads * d);
            let mut meta = Vec::with_capacity(nq * 4);
            for q in queries {
                qv.extend_from_slice(q.q);
                // QueryMeta {layer, start, end, scale}; all fit in i32 (checked).
                meta.extend_from_slice(&[
                    q.layer as i32,
                    q.start as i32,
                    q.end as i32,
                    q.scale.to_bits() as i32,
                ]);
            }
            let s = &self.stream;
            let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            let sc = &mut *guard;
            let qd = grow(s, &mut sc.q, qv.len())?;
            let md = grow(s, &mut sc.meta, meta.len())?;
            // Every slot of the pieces is written by the kernel before the merge reads it.
            let part = grow(s, &mut sc.part, nq * q_heads * np * (2 + d))?;
            let o = grow(s, &mut sc.o, nq * q_heads * d)?;
            let lse = grow(s, &mut sc.lse, nq * q_heads)?;
            s.memcpy_htod(&qv, &mut qd.slice_mut(..qv.len())).map_err(cuda)?;
            s.memcpy_htod(&meta, &mut md.slice_mut(..meta.len()))
                .map_err(cuda)?;
            let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
            let start = s.record_event(timed).map_err(cuda)?;
            // Both are powers of two: their logs index the table.
            let f = &self.partials[gt.trailing_zeros() as usize][lpt.trailing_zeros() as usize];
            const WARPS: usize = 4;
            let shared = 4 * (gt * lpt * 20 + WARPS * gt * 32);
            let (tokens, kvh_i, d_i, qh_i, groups_i, np_i) = (
                dims.tokens as i32,
                kvh as i32,
                d as i32,
                q_heads as i32,
                groups as i32,
                np as i32,
            );
            let mut b = s.launch_builder(f);
            b.arg(&kv.buf)
                .arg(&tokens)
                .arg(&kvh_i)
                .arg(&d_i)
                .arg(&*qd)
                .arg(&*md)
                .arg(&qh_i)
                .arg(&groups_i)
                .arg(&np_i)
                .arg(&mut *part);
            let cfg = LaunchConfig {
                grid_dim: (np.div_ceil(WARPS) as u32, (kvh * groups) as u32, nq as u32),
                block_dim: (32 * WARPS as u32, 1, 1),
                shared_mem_bytes: shared as u32,
            };
            // SAFETY: the arguments match `attend_partials_*`; every index the kernel forms
            // lies inside the buffers for the checked dims and queries.
            unsafe { b.launch(cfg) }.map_err(cuda)?;
            let mut b = s.launch_builder(&self.combine);
            b.arg(&*part).arg(&np_i).arg(&d_i).arg(&mut *o).arg(&mut *lse);
            let cfg = LaunchConfig {
                grid_dim: ((nq * q_heads) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above, for `attend_combine`.
            unsafe { b.launch(cfg) }.map_err(cuda)?;
            let end = s.record_event(timed).map_err(cuda)?;
            let o = s.clone_dtoh(&o.slice(..nq * q_heads * d)).map_err(cuda)?;
            let lse = s.clone_dtoh(&lse.slice(..nq * q_heads)).map_err(cuda)?;
            sc.last_ms = Some(start.elapsed_ms(&end).map_err(cuda)?);
            Ok((0..nq)
                .map(|i| Partial {
                    o: o[i * q_heads * d..(i + 1) * q_heads * d].to_vec(),
                    lse: lse[i * q_heads..(i + 1) * q_heads].to_vec(),
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIMS: KvDims = KvDims {
        layers: 2,
        kv_heads: 2,
        head_dim: 64,
        tokens: 100,
    };

    fn q(v: &[f32], layer: usize, start: usize, end: usize) -> AttendQuery<'_> {
        AttendQuery {
            layer,
            q: v,
            scale: 0.125,
            start,
            end,
        }
    }

    #[test]
    fn good_queries_pass_and_bad_ones_are_named() {
        let v = vec![0.5f32; 4 * 64];
        assert!(check_queries(&DIMS, 4, &[q(&v, 0, 0, 100), q(&v, 1, 7, 7)]).is_ok());
        let short = vec![0.5f32; 4 * 64 - 1];
        let mut nan = v.clone();
        nan[70] = f32::NAN;
        let cases: Vec<(usize, Vec<AttendQuery<'_>>, &str)> = vec![
            (3, vec![q(&v, 0, 0, 1)], "3 query heads for 2 KV heads"),
            (4, vec![q(&v, 0, 0, 1), q(&short, 0, 0, 1)], "query 1: 255 values"),
            (4, vec![q(&v, 2, 0, 1)], "layer 2 of 2"),
            (4, vec![q(&v, 0, 0, 101)], "range 0..101 of 100"),
            (4, vec![q(&v, 0, 9, 8)], "range 9..8"),
            (4, vec![q(&nan, 0, 0, 1)], "value 70 is NaN"),
            (
                4,
                vec![AttendQuery {
                    scale: f32::INFINITY,
                    ..q(&v, 0, 0, 1)
                }],
                "scale inf",
            ),
        ];
        for (heads, qs, want) in cases {
            let e = check_queries(&DIMS, heads, &qs).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
    }

    #[test]
    fn reference_of_equal_keys_is_the_value_and_the_log_count() {
        // Every key and value 0.25: each head's o is the value, lse = ln n + scale·q·k.
        let kv = vec![f16::from_f32(0.25); DIMS.elements()];
        let v = crate::synthetic::uniform(4 * 64, 3);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let (o, lse) = reference(&kv, DIMS, 4, &q(&v, 1, 10, 60));
        assert!(o.iter().all(|x| (x - 0.25).abs() < 1e-12));
        for (h, l) in lse.iter().enumerate() {
            let dot: f64 = v[h * 64..(h + 1) * 64].iter().map(|x| *x as f64 * 0.25).sum();
            assert!((l - (50f64.ln() + 0.125 * dot)).abs() < 1e-9, "head {h}: {l}");
        }
        let (o, lse) = reference(&kv, DIMS, 4, &q(&v, 0, 7, 7));
        assert!(o.iter().all(|x| *x == 0.0) && lse.iter().all(|x| *x == f64::NEG_INFINITY));
    }

    #[test]
    fn shapes_the_kernels_cannot_take_are_refused() {
        for d in [0, 12, 520] {
            let dims = KvDims { head_dim: d, ..DIMS };
            assert!(dims.check().is_err(), "head dim {d}");
        }
        for d in [8, 64, 80, 128, 256, 512] {
            assert!(KvDims { head_dim: d, ..DIMS }.check().is_ok(), "head dim {d}");
        }
    }

    #[test]
    fn launch_shape_covers_every_head_and_token() {
        // Groups of heads: passes of 1, 2 or 4 heads cover any group.
        for g in 1..=16 {
            let gt = pass_heads(g);
            assert!(g.div_ceil(gt) * gt >= g);
        }
        // Lanes per token cover the head and divide the warp.
        for d in (8..=512).step_by(8) {
            let l = lanes_per_token(d);
            assert!(l * 16 >= d && 32 % l == 0, "d {d}: {l} lanes");
        }
        // Pieces: at least one, never more tiles than the range has (beyond one).
        assert_eq!(pieces(1, 0), 1);
        assert_eq!(pieces(1, 32_768), 256);
        assert_eq!(pieces(8 * 8, 32_768), 256);
        assert_eq!(pieces(100_000, 32_768), 1);
        assert_eq!(pieces(1, 100), 1);
    }
}
