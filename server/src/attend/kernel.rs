//! The attention worker's inner loop: decode attention of the G query heads
//! that share one KV head, over a token range of that head, with an online
//! softmax in f32. Hot path.
//!
//! The range is walked in blocks of [`BLOCK`] tokens (layouts in
//! [`super::layout`]); each block is read once from memory and serves every
//! query head of the group, up to four heads per pass over the block while
//! it sits in L1. Per block and head tile:
//! 1. scores of the block's tokens: keys are channel-major inside a block,
//!    so a block's scores are one broadcast-query FMA (f16 keys) or integer
//!    dot product (quantised keys) per channel, with no horizontal sums;
//! 2. online softmax: the block's max, a rescale of the running output when
//!    the max grows, and a vectorised `exp`;
//! 3. the weighted sum of values: broadcast-weight FMAs over f16 rows, or
//!    integer dot products over token pairs of quantised values.
//!
//! Quantised keys are scored in integers: the query, with the softmax
//! scale and the key scales of the block's group folded in, is quantised
//! per head (int16 for int8 keys, int8 for 4-bit keys) and multiplied with
//! the codes by `vpmaddwd`/`vpmaddubsw`. Quantised values are summed the
//! same way with the softmax weights quantised per block and head (int16
//! for int8 values, 8 bits for 4-bit values). The rounding this adds is
//! bounded in `tests/attend.rs`.
//!
//! [`attend`] runs the fastest [`Build`] the CPU has: AVX-512 (F, VL,
//! VNNI), AVX2+FMA+F16C, or portable loops. All compute the same integers;
//! the AVX-512 and AVX2 builds agree bit for bit, the portable one to f32
//! rounding (tested).

use half::f16;

pub use super::layout::{BLOCK, Geometry, HeadKv, KEY_GROUP, Keys, Values};

/// Query heads per pass over a block (register budget of the AVX2 loops).
const TILE: usize = 4;

/// Online-softmax state of G query heads over some tokens: running max
/// `m`, sum of `exp(s - m)` in `l`, and the un-normalised output
/// `acc + z` (rows of the padded head dimension, plus a per-head part
/// common to every channel: the 4-bit values' offsets, added once at the end).
#[derive(Debug, Clone)]
pub struct State {
    d: usize,
    dp: usize,
    m: Vec<f32>,
    l: Vec<f32>,
    z: Vec<f32>,
    acc: Vec<f32>,
}

impl State {
    /// The state of an empty token set for `g` heads of dimension `d`.
    pub fn new(g: usize, d: usize) -> State {
        let dp = super::layout::padded_dim(d);
        State {
            d,
            dp,
            m: vec![f32::NEG_INFINITY; g],
            l: vec![0.0; g],
            z: vec![0.0; g],
            acc: vec![0.0; g * dp],
        }
    }

    /// Folds in the state of a disjoint token set.
    pub fn merge(&mut self, o: &State) {
        let dp = self.dp;
        for g in 0..self.m.len() {
            if o.l[g] == 0.0 {
                continue;
            }
            let m = self.m[g].max(o.m[g]);
            let (a, b) = ((self.m[g] - m).exp(), (o.m[g] - m).exp());
            self.l[g] = self.l[g] * a + o.l[g] * b;
            self.z[g] = self.z[g] * a + o.z[g] * b;
            for (x, y) in self.acc[g * dp..(g + 1) * dp]
                .iter_mut()
                .zip(&o.acc[g * dp..(g + 1) * dp])
            {
                *x = *x * a + *y * b;
            }
            self.m[g] = m;
        }
    }

    /// Normalised outputs `o[G][D]` and `lse[G]` (`-inf` and zeros when empty).
    pub fn finish(&self, o: &mut [f32], lse: &mut [f32]) {
        let (d, dp) = (self.d, self.dp);
        for g in 0..self.m.len() {
            let out = &mut o[g * d..(g + 1) * d];
            if self.l[g] == 0.0 {
                out.fill(0.0);
                lse[g] = f32::NEG_INFINITY;
                continue;
            }
            let (inv, z) = (1.0 / self.l[g], self.z[g]);
            for (x, a) in out.iter_mut().zip(&self.acc[g * dp..g * dp + d]) {
                *x = (a + z) * inv;
            }
            lse[g] = self.m[g] + self.l[g].ln();
        }
    }
}

/// Attends the G queries `q[G][D]` (softmax scale `scale`) over tokens
/// `t0..t1` of `kv`, folding the result into `st`, with the fastest build
/// this CPU runs ([`Build::best`]).
pub fn attend(kv: HeadKv<'_>, q: &[f32], scale: f32, t0: usize, t1: usize, st: &mut State) {
    attend_with(Build::best(), kv, q, scale, t0, t1, st);
}

/// A build of the kernel: every build computes the same integer sums, so
/// their results agree to f32 rounding (the AVX-512 and AVX2 ones bit for bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// Plain loops, whatever the CPU.
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// The AVX2 build with AVX-512 F, VL and VNNI: the f16 layout's FMAs on
    /// 512-bit registers (a block's sixteen tokens, a run's sixteen
    /// channels), the quantised layouts' integer dot products in VNNI on
    /// 256-bit ones (`vpdpbusd`, `vpdpwssd`: multiply, sum four or two
    /// products and accumulate in i32, one instruction where AVX2 needs two
    /// or three), and 32 vector registers throughout.
    Avx512,
}

impl Build {
    /// The fastest build this CPU runs.
    pub fn best() -> Build {
        if Build::Avx512.available() {
            Build::Avx512
        } else if Build::Avx2.available() {
            Build::Avx2
        } else {
            Build::Portable
        }
    }

    /// Whether this CPU runs the build.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Build::Portable => true,
                Build::Avx2 => avx2,
                Build::Avx512 => avx2 && has!("avx512f") && has!("avx512vl") && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        matches!(self, Build::Portable)
    }
}

/// [`attend`] with a chosen build.
///
/// # Panics
/// If this CPU does not run `build` ([`Build::available`]).
pub fn attend_with(
    build: Build,
    kv: HeadKv<'_>,
    q: &[f32],
    scale: f32,
    t0: usize,
    t1: usize,
    st: &mut State,
) {
    assert!(
        build.available(),
        "this CPU does not run the {build:?} attention kernel"
    );
    match build {
        Build::Portable => run::<PORTABLE>(kv, q, scale, t0, t1, st),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2, FMA and F16C (asserted just above).
        Build::Avx2 => unsafe { attend_avx2(kv, q, scale, t0, t1, st) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2, FMA, F16C, AVX-512 F, VL and VNNI (asserted just above).
        Build::Avx512 => unsafe { attend_avx512(kv, q, scale, t0, t1, st) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the portable build is available off x86-64"),
    }
}

/// The builds as `run`'s const parameter (each SIMD build includes AVX2's).
const PORTABLE: u8 = 0;
const AVX2: u8 = 1;
const AVX512: u8 = 2;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn attend_avx2(kv: HeadKv<'_>, q: &[f32], scale: f32, t0: usize, t1: usize, st: &mut State) {
    run::<AVX2>(kv, q, scale, t0, t1, st);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn attend_avx512(kv: HeadKv<'_>, q: &[f32], scale: f32, t0: usize, t1: usize, st: &mut State) {
    run::<AVX512>(kv, q, scale, t0, t1, st);
}

/// Per-head quantised queries of the current key group.
struct QuantQ {
    /// Folded query of one head (scratch).
    a: Vec<f32>,
    /// Step of the integer query (score = `sig·Σ α·κ + cst`).
    sig: Vec<f32>,
    /// Constant part of the score (key offsets).
    cst: Vec<f32>,
    /// The integer query α, `[G][dp]` (within ±127 for 4-bit keys).
    alpha: Vec<i16>,
    /// 4-bit keys: each channel pair's two α as int8, repeated over 32
    /// bytes (what `vpmaddubsw` multiplies a unit by), `[dp/2][G]` (the
    /// heads of a pair side by side: rows 2 KiB apart would share L1 banks).
    bcast: Vec<[u16; 16]>,
    /// 4-bit keys in the AVX-512 build: each four channels' α as int8, in one
    /// i32 (what `vpdpbusd` multiplies a token's four codes by, broadcast
    /// from memory), `[G][dp/4]`: a head's α packed to bytes in order.
    quads: Vec<i32>,
}

/// Largest integer query for int8 keys: `dp` channels of `|α·κ| ≤ lim·127`
/// must sum within i32.
fn i16_query_limit(dp: usize) -> f32 {
    ((i32::MAX as usize / (127 * dp)).min(32767)) as f32
}

impl QuantQ {
    fn new<const ISA: u8>(g: usize, dp: usize, keys: &Keys<'_>) -> QuantQ {
        let u4 = matches!(keys, Keys::U4 { .. });
        QuantQ {
            a: vec![0.0; dp],
            sig: vec![0.0; g],
            cst: vec![0.0; g],
            alpha: vec![0; g * dp],
            bcast: vec![[0; 16]; if u4 && ISA != AVX512 { g * dp / 2 } else { 0 }],
            quads: vec![0; if u4 && ISA == AVX512 { g * dp / 4 } else { 0 }],
        }
    }

    /// Folds the key scales of group `grp` into the scaled queries `qs`
    /// and quantises them per head: `α = round(qs·scale / sig)` with
    /// `sig = max|qs·scale| / lim`.
    #[inline(always)]
    fn prepare<const ISA: u8>(&mut self, keys: &Keys<'_>, qs: &[f32], grp: usize, dp: usize) {
        let (scale, offset, lim) = match *keys {
            Keys::F16(_) => return,
            Keys::I8 { scale, .. } => (&scale[grp * dp..(grp + 1) * dp], None, i16_query_limit(dp)),
            Keys::U4 { scale, offset, .. } => (
                &scale[grp * dp..(grp + 1) * dp],
                Some(&offset[grp * dp..(grp + 1) * dp]),
                127.0,
            ),
        };
        for (h, q) in qs.chunks_exact(dp).enumerate() {
            let alpha = &mut self.alpha[h * dp..(h + 1) * dp];
            #[cfg(target_arch = "x86_64")]
            let (sig, sum_alpha) = if ISA >= AVX2 {
                // SAFETY: SIMD builds run inside attend_avx2 or attend_avx512; every slice holds dp values.
                unsafe { avx2::quantise_query(q, scale, lim, &mut self.a, alpha) }
            } else {
                portable::quantise_query(q, scale, lim, &mut self.a, alpha)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (sig, sum_alpha) = portable::quantise_query(q, scale, lim, &mut self.a, alpha);
            self.sig[h] = sig;
            self.cst[h] = 0.0;
            if let Some(off) = offset {
                // k = offset + scale·(κ − 8), and the integer sum is over κ.
                let mut lanes = [0f32; 8];
                for (q8, o8) in q.chunks_exact(8).zip(off.chunks_exact(8)) {
                    for i in 0..8 {
                        lanes[i] += q8[i] * o8[i];
                    }
                }
                let z: f32 = lanes.iter().sum();
                self.cst[h] = z - 8.0 * sig * sum_alpha as f32;
                let g = self.sig.len();
                #[cfg(target_arch = "x86_64")]
                if ISA == AVX512 {
                    // SAFETY: only inside attend_avx512; quads holds g rows of dp/4.
                    unsafe { avx512::pack_quads(alpha, &mut self.quads[h * dp / 4..(h + 1) * dp / 4]) };
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if ISA >= AVX2 {
                    // SAFETY: as above; bcast holds dp/2 rows of g.
                    unsafe { avx2::broadcast_pairs(alpha, &mut self.bcast, g, h) };
                    continue;
                }
                for (j, xy) in alpha.chunks_exact(2).enumerate() {
                    self.bcast[j * g + h] =
                        [(xy[0] as i8 as u8 as u16) | ((xy[1] as i8 as u8 as u16) << 8); 16];
                }
            }
        }
    }
}

#[inline(always)]
fn run<const ISA: u8>(kv: HeadKv<'_>, q: &[f32], scale: f32, t0: usize, t1: usize, st: &mut State) {
    kv.check();
    let geo = kv.geo;
    let (d, dp, g) = (geo.d, geo.dp, st.m.len());
    debug_assert_eq!(q.len(), g * d);
    debug_assert_eq!(st.dp, dp);
    let t1 = t1.min(geo.tokens);
    if t0 >= t1 {
        return;
    }
    // The softmax scale goes into the query once, instead of into every score.
    let mut qs = vec![0f32; g * dp];
    for (dst, src) in qs.chunks_exact_mut(dp).zip(q.chunks_exact(d)) {
        for (x, y) in dst.iter_mut().zip(src) {
            *x = y * scale;
        }
    }
    let mut qq = QuantQ::new::<ISA>(g, dp, &kv.keys);
    let mut group = usize::MAX;
    let mut s = [[0f32; BLOCK]; TILE];
    let (b0, b1) = (t0 / BLOCK, t1.div_ceil(BLOCK));
    let pf = if ISA >= AVX2 {
        prefetch_distance::<ISA>()
    } else {
        0
    };
    // The AVX-512 4-bit value stage leaves each run's channels in vpunpck's
    // order; it keeps the accumulator in that order while it runs.
    let lane_order = ISA == AVX512 && matches!(kv.values, Values::U4 { .. });
    if lane_order {
        swap_middle_quads(&mut st.acc);
    }
    for b in b0..b1 {
        #[cfg(target_arch = "x86_64")]
        if pf > 0 && b + pf < b1 {
            prefetch_block(&kv, b + pf);
        }
        let base = b * BLOCK;
        if base / KEY_GROUP != group {
            group = base / KEY_GROUP;
            qq.prepare::<ISA>(&kv.keys, &qs, group, dp);
        }
        let (lo, hi) = (t0.saturating_sub(base), (t1 - base).min(BLOCK));
        let mut h0 = 0;
        while h0 < g {
            let nh = (g - h0).min(TILE);
            match nh {
                1 => tile::<ISA, 1>(&kv, b, h0, lo, hi, &qs, &qq, &mut s, st),
                2 => tile::<ISA, 2>(&kv, b, h0, lo, hi, &qs, &qq, &mut s, st),
                3 => tile::<ISA, 3>(&kv, b, h0, lo, hi, &qs, &qq, &mut s, st),
                _ => tile::<ISA, 4>(&kv, b, h0, lo, hi, &qs, &qq, &mut s, st),
            }
            h0 += nh;
        }
    }
    if lane_order {
        swap_middle_quads(&mut st.acc);
    }
}

/// Swaps items 4..8 and 8..12 of every sixteen: between channel order and
/// the order `vpunpck{l,h}wd` leaves a run of sixteen channels in (its own
/// inverse).
fn swap_middle_quads(acc: &mut [f32]) {
    for run in acc.chunks_exact_mut(16) {
        let (a, b) = run[4..12].split_at_mut(4);
        a.swap_with_slice(b);
    }
}

/// Blocks a SIMD build asks for ahead of the one it computes: by default 2
/// in the AVX-512 build and none in the AVX2 one, or `KVAULT_ATTEND_PREFETCH`.
///
/// Measured (docs/figures.md, attention offload): on a 16-core Xeon the
/// f16 layout reads 0.67–0.71 of STREAM triad without and 0.76–0.94 with
/// two blocks ahead (its hardware prefetchers stop at 4 KiB pages, a
/// block's keys are 4 KiB), and the 4-bit layout gains 8–15 % since its
/// integer stages got lighter; on the 2-core Zen 3 development VM every
/// software prefetch tried was slower.
fn prefetch_distance<const ISA: u8>() -> usize {
    static D: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let set = *D.get_or_init(|| {
        std::env::var("KVAULT_ATTEND_PREFETCH")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    set.unwrap_or(if ISA == AVX512 { 2 } else { 0 })
}

/// Asks for every line of block `b`'s keys and values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_block(kv: &HeadKv<'_>, b: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    let dp = kv.geo.dp;
    let n = dp * BLOCK;
    let (kp, kb): (*const i8, usize) = match kv.keys {
        Keys::F16(k) => (k[b * n..].as_ptr() as *const i8, n * 2),
        Keys::I8 { k, .. } => (k[b * n..].as_ptr(), n),
        Keys::U4 { k, .. } => (k[b * n / 2..].as_ptr() as *const i8, n / 2),
    };
    let (vp, vb): (*const i8, usize) = match kv.values {
        Values::F16(v) => (v[b * n..].as_ptr() as *const i8, n * 2),
        Values::I8 { v, .. } => (v[b * n..].as_ptr(), n),
        Values::U4 { v, .. } => (v[b * n / 2..].as_ptr() as *const i8, n / 2),
    };
    for (p, bytes) in [(kp, kb), (vp, vb)] {
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults; the address is inside the block.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
        }
    }
}

/// One block for heads `h0..h0 + NH`: scores, softmax, values.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile<const ISA: u8, const NH: usize>(
    kv: &HeadKv<'_>,
    b: usize,
    h0: usize,
    lo: usize,
    hi: usize,
    qs: &[f32],
    qq: &QuantQ,
    s: &mut [[f32; BLOCK]; TILE],
    st: &mut State,
) {
    let dp = kv.geo.dp;
    let qrows = &qs[h0 * dp..(h0 + NH) * dp];
    let alpha = &qq.alpha[h0 * dp..(h0 + NH) * dp];
    let bcast = (&qq.bcast[..], h0, qq.sig.len());
    let quads = (&qq.quads[..], h0, qq.sig.len());
    let (sig, cst) = (&qq.sig[h0..h0 + NH], &qq.cst[h0..h0 + NH]);
    match kv.keys {
        Keys::F16(k) => {
            let k = &k[b * dp * BLOCK..(b + 1) * dp * BLOCK];
            #[cfg(target_arch = "x86_64")]
            if ISA == AVX512 {
                // SAFETY: SIMD builds run inside attend_avx2 or attend_avx512; the slices hold a whole block.
                unsafe { avx512::scores_f16::<NH>(k, qrows, dp, s) };
            } else if ISA >= AVX2 {
                // SAFETY: as above.
                unsafe { avx2::scores_f16::<NH>(k, qrows, dp, s) };
            } else {
                portable::scores_f16::<NH>(k, qrows, dp, s);
            }
            #[cfg(not(target_arch = "x86_64"))]
            portable::scores_f16::<NH>(k, qrows, dp, s);
        }
        Keys::I8 { k, .. } => {
            let k = &k[b * dp * BLOCK..(b + 1) * dp * BLOCK];
            #[cfg(target_arch = "x86_64")]
            if ISA >= AVX2 {
                // SAFETY: as above.
                unsafe { avx2::scores_i8::<ISA, NH>(k, alpha, sig, cst, dp, s) };
            } else {
                portable::scores_i8::<NH>(k, alpha, sig, cst, dp, s);
            }
            #[cfg(not(target_arch = "x86_64"))]
            portable::scores_i8::<NH>(k, alpha, sig, cst, dp, s);
        }
        Keys::U4 { k, .. } => {
            let k = &k[b * dp * BLOCK / 2..(b + 1) * dp * BLOCK / 2];
            #[cfg(target_arch = "x86_64")]
            if ISA == AVX512 {
                // SAFETY: as above.
                unsafe { avx512::scores_u4::<NH>(k, quads, sig, cst, dp, s) };
            } else if ISA >= AVX2 {
                // SAFETY: as above.
                unsafe { avx2::scores_u4::<NH>(k, bcast, sig, cst, dp, s) };
            } else {
                portable::scores_u4::<NH>(k, alpha, sig, cst, dp, s);
            }
            #[cfg(not(target_arch = "x86_64"))]
            portable::scores_u4::<NH>(k, alpha, sig, cst, dp, s);
        }
    }
    // Tokens of the block outside the range weigh nothing.
    for row in s.iter_mut().take(NH) {
        row[..lo].fill(f32::NEG_INFINITY);
        row[hi..].fill(f32::NEG_INFINITY);
    }
    let acc = &mut st.acc[h0 * dp..(h0 + NH) * dp];
    let (m, l, z) = (
        &mut st.m[h0..h0 + NH],
        &mut st.l[h0..h0 + NH],
        &mut st.z[h0..h0 + NH],
    );
    #[cfg(target_arch = "x86_64")]
    if ISA >= AVX2 {
        // SAFETY: as above.
        unsafe { avx2::softmax::<NH>(s, m, l, z, acc, dp) };
    } else {
        portable::softmax::<NH>(s, m, l, z, acc, dp);
    }
    #[cfg(not(target_arch = "x86_64"))]
    portable::softmax::<NH>(s, m, l, z, acc, dp);
    let t = b * BLOCK..(b + 1) * BLOCK;
    match kv.values {
        Values::F16(v) => {
            let v = &v[t.start * dp..t.end * dp];
            #[cfg(target_arch = "x86_64")]
            if ISA == AVX512 {
                // SAFETY: as above.
                unsafe { avx512::values_f16::<NH>(v, s, acc, dp) };
            } else if ISA >= AVX2 {
                // SAFETY: as above.
                unsafe { avx2::values_f16::<NH>(v, s, acc, dp) };
            } else {
                portable::values_f16::<NH>(v, s, acc, dp);
            }
            #[cfg(not(target_arch = "x86_64"))]
            portable::values_f16::<NH>(v, s, acc, dp);
        }
        Values::I8 { v, scale } => {
            let (v, sc) = (&v[t.start * dp..t.end * dp], &scale[t]);
            #[cfg(target_arch = "x86_64")]
            if ISA >= AVX2 {
                // SAFETY: as above.
                unsafe { avx2::values_i8::<ISA, NH>(v, sc, s, acc, dp) };
            } else {
                portable::values_i8::<NH>(v, sc, s, acc, dp);
            }
            #[cfg(not(target_arch = "x86_64"))]
            portable::values_i8::<NH>(v, sc, s, acc, dp);
        }
        Values::U4 { v, scale, offset } => {
            let (v, sc, off) = (
                &v[t.start * dp / 2..t.end * dp / 2],
                &scale[t.clone()],
                &offset[t],
            );
            #[cfg(target_arch = "x86_64")]
            if ISA == AVX512 {
                // SAFETY: as above.
                unsafe { avx512::values_u4::<NH>(v, sc, off, s, z, acc, dp) };
            } else if ISA >= AVX2 {
                // SAFETY: as above.
                unsafe { avx2::values_u4::<NH>(v, sc, off, s, z, acc, dp) };
            } else {
                portable::values_u4::<NH>(v, sc, off, s, z, acc, dp);
            }
            #[cfg(not(target_arch = "x86_64"))]
            portable::values_u4::<NH>(v, sc, off, s, z, acc, dp);
        }
    }
}

/// Quantises the weights `w` of a block to `0..=lim`: returns the step
/// (`w ≈ step·π`) and the reciprocal used, so that every build rounds alike.
#[inline(always)]
fn weight_step(wmax: f32, lim: f32) -> (f32, f32) {
    if wmax > 0.0 {
        (wmax / lim, lim / wmax)
    } else {
        (0.0, 0.0)
    }
}

/// `x ↦ e^x` for `x ≤ 0` (scores minus their running max): 2^n·p(f) with a
/// degree-6 polynomial, relative error about 2e-7; inputs below -87 give 0.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let v = x.max(-87.0);
    let n = (v * EXP_LOG2E).round_ties_even();
    let f = v - n * EXP_LN2_HI - n * EXP_LN2_LO;
    let mut p = EXP_C[6];
    for c in EXP_C[..6].iter().rev() {
        p = p * f + c;
    }
    let pow2 = f32::from_bits((((n as i32) + 127) as u32) << 23);
    if x < -87.0 { 0.0 } else { p * pow2 }
}

const EXP_LOG2E: f32 = std::f32::consts::LOG2_E;
const EXP_LN2_HI: f32 = 0.693_145_75;
const EXP_LN2_LO: f32 = 1.428_606_8e-6;
/// Taylor-like coefficients of e^f on [-ln2/2, ln2/2], lowest order first.
const EXP_C: [f32; 7] = [
    1.0,
    1.0,
    0.5,
    1.666_666_7e-1,
    4.166_579_6e-2,
    8.333_452e-3,
    1.394_275_5e-3,
];

/// The portable build of each stage: the same arithmetic as [`avx2`], in
/// plain loops.
// Heads, tokens and channels index several arrays at once: index loops read plainest.
#[allow(clippy::needless_range_loop)]
mod portable {
    use super::*;

    /// `a = q·scale`, `α = round(a / sig)`; returns `(sig, Σα)`.
    pub fn quantise_query(
        q: &[f32],
        scale: &[f32],
        lim: f32,
        a: &mut [f32],
        alpha: &mut [i16],
    ) -> (f32, i32) {
        let mut amax = 0f32;
        for ((x, qc), sc) in a.iter_mut().zip(q).zip(scale) {
            *x = qc * sc;
            amax = amax.max(x.abs());
        }
        let (sig, inv) = weight_step(amax, lim);
        let mut sum = 0i32;
        for (o, x) in alpha.iter_mut().zip(a.iter()) {
            let v = (x * inv).clamp(-lim, lim).round_ties_even() as i32;
            *o = v as i16;
            sum += v;
        }
        (sig, sum)
    }

    pub fn scores_f16<const NH: usize>(k: &[f16], q: &[f32], dp: usize, s: &mut [[f32; BLOCK]; TILE]) {
        for (h, row) in s.iter_mut().enumerate().take(NH) {
            row.fill(0.0);
            for c in 0..dp {
                let qc = q[h * dp + c];
                for (i, x) in row.iter_mut().enumerate() {
                    *x += qc * k[c * BLOCK + i].to_f32();
                }
            }
        }
    }

    pub fn scores_i8<const NH: usize>(
        k: &[i8],
        alpha: &[i16],
        sig: &[f32],
        cst: &[f32],
        dp: usize,
        s: &mut [[f32; BLOCK]; TILE],
    ) {
        for h in 0..NH {
            for i in 0..BLOCK {
                let mut acc = 0i32;
                for c in 0..dp {
                    acc += alpha[h * dp + c] as i32 * k[(c / 2) * 32 + 2 * i + c % 2] as i32;
                }
                s[h][i] = sig[h] * acc as f32 + cst[h];
            }
        }
    }

    fn nibble(buf: &[u8], u: usize, p: usize) -> i32 {
        super::super::layout::nibble(buf, u, p) as i32
    }

    pub fn scores_u4<const NH: usize>(
        k: &[u8],
        alpha: &[i16],
        sig: &[f32],
        cst: &[f32],
        dp: usize,
        s: &mut [[f32; BLOCK]; TILE],
    ) {
        for h in 0..NH {
            for i in 0..BLOCK {
                let mut acc = 0i32;
                for c in 0..dp {
                    acc += alpha[h * dp + c] as i32 * nibble(k, c / 2, 2 * i + c % 2);
                }
                s[h][i] = sig[h] * acc as f32 + cst[h];
            }
        }
    }

    pub fn softmax<const NH: usize>(
        s: &mut [[f32; BLOCK]; TILE],
        m: &mut [f32],
        l: &mut [f32],
        z: &mut [f32],
        acc: &mut [f32],
        dp: usize,
    ) {
        for h in 0..NH {
            let row = &mut s[h];
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if mx > m[h] {
                let corr = (m[h] - mx).exp();
                l[h] *= corr;
                z[h] *= corr;
                for a in &mut acc[h * dp..(h + 1) * dp] {
                    *a *= corr;
                }
                m[h] = mx;
            }
            let mut sum = 0.0;
            for x in row.iter_mut() {
                *x = exp_neg(*x - m[h]);
                sum += *x;
            }
            l[h] += sum;
        }
    }

    pub fn values_f16<const NH: usize>(v: &[f16], p: &[[f32; BLOCK]; TILE], acc: &mut [f32], dp: usize) {
        for h in 0..NH {
            let a = &mut acc[h * dp..(h + 1) * dp];
            for (i, pi) in p[h].iter().enumerate() {
                for (c, x) in a.iter_mut().enumerate() {
                    *x += pi * v[((c / 16) * BLOCK + i) * 16 + c % 16].to_f32();
                }
            }
        }
    }

    pub fn values_i8<const NH: usize>(
        v: &[i8],
        scale: &[f32],
        p: &[[f32; BLOCK]; TILE],
        acc: &mut [f32],
        dp: usize,
    ) {
        for h in 0..NH {
            let w: Vec<f32> = p[h].iter().zip(scale).map(|(a, b)| a * b).collect();
            let (step, inv) = weight_step(w.iter().copied().fold(0.0, f32::max), 32767.0);
            let pi: Vec<i32> = w.iter().map(|x| (x * inv).round_ties_even() as i32).collect();
            for c in 0..dp {
                let mut sum = 0i32;
                for (i, pv) in pi.iter().enumerate() {
                    sum += pv * v[((c / 16) * 8 + i / 2) * 32 + (c % 16) * 2 + i % 2] as i32;
                }
                acc[h * dp + c] += step * sum as f32;
            }
        }
    }

    pub fn values_u4<const NH: usize>(
        v: &[u8],
        scale: &[f32],
        offset: &[f32],
        p: &[[f32; BLOCK]; TILE],
        z: &mut [f32],
        acc: &mut [f32],
        dp: usize,
    ) {
        for h in 0..NH {
            let w: Vec<f32> = p[h].iter().zip(scale).map(|(a, b)| a * b).collect();
            z[h] += p[h].iter().zip(offset).map(|(a, b)| a * b).sum::<f32>();
            let (step, inv) = weight_step(w.iter().copied().fold(0.0, f32::max), 255.0);
            let pi: Vec<i32> = w.iter().map(|x| (x * inv).round_ties_even() as i32).collect();
            for c in 0..dp {
                let mut sum = 0i32;
                for (i, pv) in pi.iter().enumerate() {
                    let u = (c / 16) * 8 + i / 2;
                    sum += pv * (nibble(v, u, 2 * (c % 16) + i % 2) - 8);
                }
                acc[h * dp + c] += step * sum as f32;
            }
        }
    }
}

/// AVX2 + FMA + F16C stages. Each is `#[inline(always)]` and only called
/// from inside [`attend_avx2`], whose target features they inherit.
/// Callers pass slices of at least one whole block (the loads are unchecked).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hmax(x: __m256) -> f32 {
        unsafe {
            let y = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
            let y = _mm_max_ps(y, _mm_movehl_ps(y, y));
            let y = _mm_max_ss(y, _mm_shuffle_ps(y, y, 1));
            _mm_cvtss_f32(y)
        }
    }

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        unsafe {
            let y = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
            let y = _mm_add_ps(y, _mm_movehl_ps(y, y));
            let y = _mm_add_ss(y, _mm_shuffle_ps(y, y, 1));
            _mm_cvtss_f32(y)
        }
    }

    /// [`exp_neg`] on eight lanes.
    #[inline(always)]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        unsafe {
            let lim = _mm256_set1_ps(-87.0);
            let v = _mm256_max_ps(x, lim);
            let n = _mm256_round_ps(
                _mm256_mul_ps(v, _mm256_set1_ps(EXP_LOG2E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), v);
            let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), f);
            let mut p = _mm256_set1_ps(EXP_C[6]);
            for c in EXP_C[..6].iter().rev() {
                p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(*c));
            }
            let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            ));
            let r = _mm256_mul_ps(p, pow2);
            _mm256_andnot_ps(_mm256_cmp_ps(x, lim, _CMP_LT_OQ), r)
        }
    }

    /// [`portable::quantise_query`] on eight lanes.
    #[inline(always)]
    pub unsafe fn quantise_query(
        q: &[f32],
        scale: &[f32],
        lim: f32,
        a: &mut [f32],
        alpha: &mut [i16],
    ) -> (f32, i32) {
        let dp = q.len();
        debug_assert!(dp.is_multiple_of(16) && scale.len() >= dp && a.len() >= dp && alpha.len() >= dp);
        unsafe {
            let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let mut mx = _mm256_setzero_ps();
            for c in (0..dp).step_by(8) {
                let x = _mm256_mul_ps(
                    _mm256_loadu_ps(q.as_ptr().add(c)),
                    _mm256_loadu_ps(scale.as_ptr().add(c)),
                );
                _mm256_storeu_ps(a.as_mut_ptr().add(c), x);
                mx = _mm256_max_ps(mx, _mm256_and_ps(x, abs));
            }
            let (sig, inv) = weight_step(hmax(mx), lim);
            let (iv, lo, hi) = (_mm256_set1_ps(inv), _mm256_set1_ps(-lim), _mm256_set1_ps(lim));
            let mut sum = _mm256_setzero_si256();
            for c in (0..dp).step_by(16) {
                let x0 = _mm256_mul_ps(_mm256_loadu_ps(a.as_ptr().add(c)), iv);
                let x1 = _mm256_mul_ps(_mm256_loadu_ps(a.as_ptr().add(c + 8)), iv);
                let x0 = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(x0, lo), hi));
                let x1 = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(x1, lo), hi));
                sum = _mm256_add_epi32(sum, _mm256_add_epi32(x0, x1));
                let p = _mm256_permute4x64_epi64(_mm256_packs_epi32(x0, x1), 0b11_01_10_00);
                _mm256_storeu_si256(alpha.as_mut_ptr().add(c) as *mut __m256i, p);
            }
            let s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            (sig, _mm_cvtsi128_si32(s))
        }
    }

    /// `out[j·g + h]` = channel pair j of `alpha` (within ±127) as two i8,
    /// repeated sixteen times.
    #[inline(always)]
    pub unsafe fn broadcast_pairs(alpha: &[i16], out: &mut [[u16; 16]], g: usize, h: usize) {
        let dp = alpha.len();
        debug_assert!(dp.is_multiple_of(16) && out.len() >= dp / 2 * g && h < g);
        unsafe {
            let o = out.as_mut_ptr() as *mut __m256i;
            // Shuffle j repeats bytes 2j, 2j+1 of each lane.
            let masks = [
                _mm256_set1_epi16(0x0100),
                _mm256_set1_epi16(0x0302),
                _mm256_set1_epi16(0x0504),
                _mm256_set1_epi16(0x0706),
            ];
            for c in (0..dp).step_by(16) {
                // Bytes 0..8 of each lane: channels c..c+8, then c+8..c+16.
                let b = _mm256_packs_epi16(
                    _mm256_loadu_si256(alpha.as_ptr().add(c) as *const __m256i),
                    _mm256_setzero_si256(),
                );
                let (lo, hi) = (
                    _mm256_permute2x128_si256(b, b, 0x00),
                    _mm256_permute2x128_si256(b, b, 0x11),
                );
                let j0 = c / 2;
                for (i, m) in masks.iter().enumerate() {
                    _mm256_storeu_si256(o.add((j0 + i) * g + h), _mm256_shuffle_epi8(lo, *m));
                    _mm256_storeu_si256(o.add((j0 + 4 + i) * g + h), _mm256_shuffle_epi8(hi, *m));
                }
            }
        }
    }

    #[inline(always)]
    pub unsafe fn scores_f16<const NH: usize>(k: &[f16], q: &[f32], dp: usize, s: &mut [[f32; BLOCK]; TILE]) {
        debug_assert!(k.len() >= dp * BLOCK && q.len() >= NH * dp);
        unsafe {
            let kp = k.as_ptr() as *const __m128i;
            let qp = q.as_ptr();
            let mut a0 = [_mm256_setzero_ps(); NH];
            let mut a1 = [_mm256_setzero_ps(); NH];
            for c in 0..dp {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(2 * c)));
                let k1 = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(2 * c + 1)));
                for h in 0..NH {
                    let qb = _mm256_broadcast_ss(&*qp.add(h * dp + c));
                    a0[h] = _mm256_fmadd_ps(qb, k0, a0[h]);
                    a1[h] = _mm256_fmadd_ps(qb, k1, a1[h]);
                }
            }
            for h in 0..NH {
                _mm256_storeu_ps(s[h].as_mut_ptr(), a0[h]);
                _mm256_storeu_ps(s[h].as_mut_ptr().add(8), a1[h]);
            }
        }
    }

    /// Scores `sig·Σ + cst` of a block's integer sums (tokens 0..8 in `a0`,
    /// 8..16 in `a1`), per head.
    #[inline(always)]
    pub(super) unsafe fn store_scores<const NH: usize>(
        a0: &[__m256i; NH],
        a1: &[__m256i; NH],
        sig: &[f32],
        cst: &[f32],
        s: &mut [[f32; BLOCK]; TILE],
    ) {
        unsafe {
            for h in 0..NH {
                let (sg, c) = (_mm256_set1_ps(sig[h]), _mm256_set1_ps(cst[h]));
                _mm256_storeu_ps(
                    s[h].as_mut_ptr(),
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0[h]), sg, c),
                );
                _mm256_storeu_ps(
                    s[h].as_mut_ptr().add(8),
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1[h]), sg, c),
                );
            }
        }
    }

    /// `acc + Σ` of the i16 pair products of `a` and `b` per i32 lane:
    /// one `vpdpwssd` in the AVX-512 build.
    #[inline(always)]
    unsafe fn dot2<const ISA: u8>(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        unsafe {
            if ISA == AVX512 {
                _mm256_dpwssd_epi32(acc, a, b)
            } else {
                _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
            }
        }
    }

    #[inline(always)]
    pub unsafe fn scores_i8<const ISA: u8, const NH: usize>(
        k: &[i8],
        alpha: &[i16],
        sig: &[f32],
        cst: &[f32],
        dp: usize,
        s: &mut [[f32; BLOCK]; TILE],
    ) {
        debug_assert!(k.len() >= dp * BLOCK && alpha.len() >= NH * dp);
        unsafe {
            let kp = k.as_ptr() as *const __m128i;
            // Channel pair j of head h: two i16 read as one i32.
            let pp = alpha.as_ptr() as *const i32;
            let mut a0 = [_mm256_setzero_si256(); NH];
            let mut a1 = [_mm256_setzero_si256(); NH];
            for j in 0..dp / 2 {
                let lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(kp.add(2 * j)));
                let hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(kp.add(2 * j + 1)));
                for h in 0..NH {
                    let qw = _mm256_set1_epi32(pp.add(h * dp / 2 + j).read_unaligned());
                    a0[h] = dot2::<ISA>(a0[h], lo, qw);
                    a1[h] = dot2::<ISA>(a1[h], hi, qw);
                }
            }
            store_scores::<NH>(&a0, &a1, sig, cst, s);
        }
    }

    /// The codes of 4-bit units `2m` and `2m+1` stored at `p` (see
    /// [`super::super::layout::nibble`]), as bytes 0..=15.
    #[inline(always)]
    pub(super) unsafe fn unpack2(p: *const __m256i, mask: __m256i) -> (__m256i, __m256i) {
        unsafe {
            let x = _mm256_loadu_si256(p);
            (
                _mm256_and_si256(x, mask),
                _mm256_and_si256(_mm256_srli_epi16(x, 4), mask),
            )
        }
    }

    #[inline(always)]
    pub unsafe fn scores_u4<const NH: usize>(
        k: &[u8],
        (bcast, h0, g): (&[[u16; 16]], usize, usize),
        sig: &[f32],
        cst: &[f32],
        dp: usize,
        s: &mut [[f32; BLOCK]; TILE],
    ) {
        debug_assert!(k.len() >= dp * BLOCK / 2 && bcast.len() >= g * dp / 2 && h0 + NH <= g);
        unsafe {
            let kp = k.as_ptr() as *const __m256i;
            // Channel pair j of head h0 + h at j·g + h0 + h.
            let qp = (bcast.as_ptr() as *const __m256i).add(h0);
            let mask = _mm256_set1_epi8(0x0f);
            let mut a0 = [_mm256_setzero_si256(); NH];
            let mut a1 = [_mm256_setzero_si256(); NH];
            // Each pair of channels adds at most 2·15·127 per lane: eight fit in i16.
            for j8 in (0..dp / 2).step_by(8) {
                let mut a16 = [_mm256_setzero_si256(); NH];
                for j in (j8..j8 + 8).step_by(2) {
                    let (c0, c1) = unpack2(kp.add(j / 2), mask);
                    for h in 0..NH {
                        let q0 = _mm256_loadu_si256(qp.add(j * g + h));
                        let q1 = _mm256_loadu_si256(qp.add((j + 1) * g + h));
                        let x = _mm256_add_epi16(_mm256_maddubs_epi16(c0, q0), _mm256_maddubs_epi16(c1, q1));
                        a16[h] = _mm256_add_epi16(a16[h], x);
                    }
                }
                for h in 0..NH {
                    a0[h] = _mm256_add_epi32(a0[h], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a16[h])));
                    a1[h] =
                        _mm256_add_epi32(a1[h], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a16[h], 1)));
                }
            }
            store_scores::<NH>(&a0, &a1, sig, cst, s);
        }
    }

    #[inline(always)]
    pub unsafe fn softmax<const NH: usize>(
        s: &mut [[f32; BLOCK]; TILE],
        m: &mut [f32],
        l: &mut [f32],
        z: &mut [f32],
        acc: &mut [f32],
        dp: usize,
    ) {
        debug_assert!(acc.len() >= NH * dp && m.len() >= NH && l.len() >= NH && z.len() >= NH);
        unsafe {
            for h in 0..NH {
                let x0 = _mm256_loadu_ps(s[h].as_ptr());
                let x1 = _mm256_loadu_ps(s[h].as_ptr().add(8));
                let mx = hmax(_mm256_max_ps(x0, x1));
                if mx > m[h] {
                    let corr = (m[h] - mx).exp();
                    l[h] *= corr;
                    z[h] *= corr;
                    let cv = _mm256_set1_ps(corr);
                    let a = acc.as_mut_ptr().add(h * dp);
                    for c in (0..dp).step_by(8) {
                        _mm256_storeu_ps(a.add(c), _mm256_mul_ps(_mm256_loadu_ps(a.add(c)), cv));
                    }
                    m[h] = mx;
                }
                let mb = _mm256_set1_ps(m[h]);
                let p0 = exp8(_mm256_sub_ps(x0, mb));
                let p1 = exp8(_mm256_sub_ps(x1, mb));
                l[h] += hsum(_mm256_add_ps(p0, p1));
                _mm256_storeu_ps(s[h].as_mut_ptr(), p0);
                _mm256_storeu_ps(s[h].as_mut_ptr().add(8), p1);
            }
        }
    }

    #[inline(always)]
    pub unsafe fn values_f16<const NH: usize>(
        v: &[f16],
        p: &[[f32; BLOCK]; TILE],
        acc: &mut [f32],
        dp: usize,
    ) {
        debug_assert!(v.len() >= dp * BLOCK && acc.len() >= NH * dp);
        unsafe {
            let vp = v.as_ptr() as *const __m128i;
            let ap = acc.as_mut_ptr();
            for c in (0..dp).step_by(16) {
                let mut o0 = [_mm256_setzero_ps(); NH];
                let mut o1 = [_mm256_setzero_ps(); NH];
                for h in 0..NH {
                    o0[h] = _mm256_loadu_ps(ap.add(h * dp + c));
                    o1[h] = _mm256_loadu_ps(ap.add(h * dp + c + 8));
                }
                for i in 0..BLOCK {
                    let row = vp.add((c / 16 * BLOCK + i) * 2);
                    let v0 = _mm256_cvtph_ps(_mm_loadu_si128(row));
                    let v1 = _mm256_cvtph_ps(_mm_loadu_si128(row.add(1)));
                    for h in 0..NH {
                        let pb = _mm256_broadcast_ss(&p[h][i]);
                        o0[h] = _mm256_fmadd_ps(pb, v0, o0[h]);
                        o1[h] = _mm256_fmadd_ps(pb, v1, o1[h]);
                    }
                }
                for h in 0..NH {
                    _mm256_storeu_ps(ap.add(h * dp + c), o0[h]);
                    _mm256_storeu_ps(ap.add(h * dp + c + 8), o1[h]);
                }
            }
        }
    }

    /// The block's weights `p·scale` of head row `p`, rounded to integers
    /// `0..=lim`, as sixteen i16 in token order; returns the step too.
    #[inline(always)]
    unsafe fn quantise_weights(p: &[f32; BLOCK], scale: &[f32], lim: f32) -> (f32, __m256i) {
        unsafe {
            let w0 = _mm256_mul_ps(_mm256_loadu_ps(p.as_ptr()), _mm256_loadu_ps(scale.as_ptr()));
            let w1 = _mm256_mul_ps(
                _mm256_loadu_ps(p.as_ptr().add(8)),
                _mm256_loadu_ps(scale.as_ptr().add(8)),
            );
            let (step, inv) = weight_step(hmax(_mm256_max_ps(w0, w1)), lim);
            let iv = _mm256_set1_ps(inv);
            let (i0, i1) = (
                _mm256_cvtps_epi32(_mm256_mul_ps(w0, iv)),
                _mm256_cvtps_epi32(_mm256_mul_ps(w1, iv)),
            );
            (
                step,
                _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0b11_01_10_00),
            )
        }
    }

    /// A block's weights of head row `p` for 4-bit values: folds `p·offset`
    /// into the head's common part `z` and returns [`quantise_weights`] of
    /// `p·scale` to `0..=255`.
    #[inline(always)]
    pub(super) unsafe fn u4_weights(
        p: &[f32; BLOCK],
        scale: &[f32],
        offset: &[f32],
        z: &mut f32,
    ) -> (f32, __m256i) {
        unsafe {
            let zp = _mm256_fmadd_ps(
                _mm256_loadu_ps(p.as_ptr()),
                _mm256_loadu_ps(offset.as_ptr()),
                _mm256_mul_ps(
                    _mm256_loadu_ps(p.as_ptr().add(8)),
                    _mm256_loadu_ps(offset.as_ptr().add(8)),
                ),
            );
            *z += hsum(zp);
            quantise_weights(p, scale, 255.0)
        }
    }

    #[inline(always)]
    pub unsafe fn values_i8<const ISA: u8, const NH: usize>(
        v: &[i8],
        scale: &[f32],
        p: &[[f32; BLOCK]; TILE],
        acc: &mut [f32],
        dp: usize,
    ) {
        debug_assert!(v.len() >= dp * BLOCK && scale.len() >= BLOCK && acc.len() >= NH * dp);
        unsafe {
            // Token pair j of head h: two i16 read as one i32.
            let mut pw = [[0i32; BLOCK / 2]; TILE];
            let mut step = [0f32; TILE];
            for h in 0..NH {
                let pi;
                (step[h], pi) = quantise_weights(&p[h], scale, 32767.0);
                _mm256_storeu_si256(pw[h].as_mut_ptr() as *mut __m256i, pi);
            }
            let vp = v.as_ptr() as *const __m128i;
            let ap = acc.as_mut_ptr();
            for c in (0..dp).step_by(16) {
                let mut a0 = [_mm256_setzero_si256(); NH];
                let mut a1 = [_mm256_setzero_si256(); NH];
                for j in 0..BLOCK / 2 {
                    let row = vp.add((c / 16 * 8 + j) * 2);
                    let lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(row));
                    let hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(row.add(1)));
                    for h in 0..NH {
                        let w = _mm256_set1_epi32(pw[h][j]);
                        a0[h] = dot2::<ISA>(a0[h], lo, w);
                        a1[h] = dot2::<ISA>(a1[h], hi, w);
                    }
                }
                for h in 0..NH {
                    let st = _mm256_set1_ps(step[h]);
                    let o = ap.add(h * dp + c);
                    _mm256_storeu_ps(
                        o,
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0[h]), st, _mm256_loadu_ps(o)),
                    );
                    _mm256_storeu_ps(
                        o.add(8),
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1[h]), st, _mm256_loadu_ps(o.add(8))),
                    );
                }
            }
        }
    }

    #[inline(always)]
    pub unsafe fn values_u4<const NH: usize>(
        v: &[u8],
        scale: &[f32],
        offset: &[f32],
        p: &[[f32; BLOCK]; TILE],
        z: &mut [f32],
        acc: &mut [f32],
        dp: usize,
    ) {
        debug_assert!(v.len() >= dp * BLOCK / 2 && scale.len() >= BLOCK && offset.len() >= BLOCK);
        debug_assert!(acc.len() >= NH * dp && z.len() >= NH);
        unsafe {
            let mut pb = [[_mm256_setzero_si256(); BLOCK / 2]; NH];
            let mut step = [0f32; TILE];
            for h in 0..NH {
                let pi;
                (step[h], pi) = u4_weights(&p[h], scale, offset, &mut z[h]);
                // Lane j = π(2j) + 256·π(2j+1), doubled into both halves, then broadcast.
                let w = _mm256_madd_epi16(pi, _mm256_set1_epi32(0x0100_0001));
                let w = _mm256_or_si256(w, _mm256_slli_epi32(w, 16));
                for (j, x) in pb[h].iter_mut().enumerate() {
                    *x = _mm256_permutevar8x32_epi32(w, _mm256_set1_epi32(j as i32));
                }
            }
            let vp = v.as_ptr() as *const __m256i;
            let ap = acc.as_mut_ptr();
            let mask = _mm256_set1_epi8(0x0f);
            let eight = _mm256_set1_epi8(8);
            let units = dp / 16;
            for u in 0..units {
                // Each token pair adds at most 2·255·8 per lane: a block fits in i16.
                let mut a16 = [_mm256_setzero_si256(); NH];
                for j in (0..BLOCK / 2).step_by(2) {
                    let (c0, c1) = unpack2(vp.add((u * 8 + j) / 2), mask);
                    let (c0, c1) = (_mm256_sub_epi8(c0, eight), _mm256_sub_epi8(c1, eight));
                    for h in 0..NH {
                        let x = _mm256_add_epi16(
                            _mm256_maddubs_epi16(pb[h][j], c0),
                            _mm256_maddubs_epi16(pb[h][j + 1], c1),
                        );
                        a16[h] = _mm256_add_epi16(a16[h], x);
                    }
                }
                for h in 0..NH {
                    let st = _mm256_set1_ps(step[h]);
                    let o = ap.add(h * dp + u * 16);
                    let lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(a16[h])));
                    let hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(a16[h], 1)));
                    _mm256_storeu_ps(o, _mm256_fmadd_ps(lo, st, _mm256_loadu_ps(o)));
                    _mm256_storeu_ps(o.add(8), _mm256_fmadd_ps(hi, st, _mm256_loadu_ps(o.add(8))));
                }
            }
        }
    }
}

/// The AVX-512 build's own stages: f16 on 512-bit registers, and the 4-bit
/// layouts through VNNI. The layouts are AVX2's; for 4-bit codes, one
/// `vpunpck{l,h}wd` of two units' codes (shared by every head) gives the
/// four consecutive bytes `vpdpbusd` sums per i32 lane (four channels of a
/// token for keys, four tokens of a channel for values), so the sums
/// accumulate in i32 with no widening. Each stage's integer sums equal the
/// AVX2 stage's, and their f32 steps are the same instructions.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::avx2::{store_scores, u4_weights, unpack2};
    use super::*;
    use std::arch::x86_64::*;

    /// `(a, b)` with lanes in the order `vpunpck{l,h}wd` leaves them, each
    /// holding items `[0..4, 8..12]` and `[4..8, 12..16]` of sixteen: back
    /// in order as `([0..8], [8..16])`.
    #[inline(always)]
    unsafe fn in_order(a: __m256i, b: __m256i) -> (__m256i, __m256i) {
        unsafe {
            (
                _mm256_permute2x128_si256(a, b, 0x20),
                _mm256_permute2x128_si256(a, b, 0x31),
            )
        }
    }

    /// [`super::avx2::scores_f16`] with a block's sixteen tokens in one
    /// 512-bit register: each lane's FMAs are AVX2's, in the same order.
    #[inline(always)]
    pub unsafe fn scores_f16<const NH: usize>(k: &[f16], q: &[f32], dp: usize, s: &mut [[f32; BLOCK]; TILE]) {
        debug_assert!(k.len() >= dp * BLOCK && q.len() >= NH * dp);
        unsafe {
            let kp = k.as_ptr() as *const __m256i;
            let qp = q.as_ptr();
            let mut a = [_mm512_setzero_ps(); NH];
            for c in 0..dp {
                let kc = _mm512_cvtph_ps(_mm256_loadu_si256(kp.add(c)));
                for h in 0..NH {
                    a[h] = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(h * dp + c)), kc, a[h]);
                }
            }
            for h in 0..NH {
                _mm512_storeu_ps(s[h].as_mut_ptr(), a[h]);
            }
        }
    }

    /// [`super::avx2::values_f16`] with a run's sixteen channels in one
    /// 512-bit register: each lane's FMAs are AVX2's, in the same order.
    #[inline(always)]
    pub unsafe fn values_f16<const NH: usize>(
        v: &[f16],
        p: &[[f32; BLOCK]; TILE],
        acc: &mut [f32],
        dp: usize,
    ) {
        debug_assert!(v.len() >= dp * BLOCK && acc.len() >= NH * dp);
        unsafe {
            let vp = v.as_ptr() as *const __m256i;
            let ap = acc.as_mut_ptr();
            for r in 0..dp / 16 {
                let mut o = [_mm512_setzero_ps(); NH];
                for h in 0..NH {
                    o[h] = _mm512_loadu_ps(ap.add(h * dp + r * 16));
                }
                for i in 0..BLOCK {
                    let row = _mm512_cvtph_ps(_mm256_loadu_si256(vp.add(r * BLOCK + i)));
                    for h in 0..NH {
                        o[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[h][i]), row, o[h]);
                    }
                }
                for h in 0..NH {
                    _mm512_storeu_ps(ap.add(h * dp + r * 16), o[h]);
                }
            }
        }
    }

    /// Packs one head's integer query (within ±127, `dp` a multiple of 16)
    /// into bytes in channel order: `out[m]` holds channels 4m..4m+4.
    #[inline(always)]
    pub unsafe fn pack_quads(alpha: &[i16], out: &mut [i32]) {
        let dp = alpha.len();
        debug_assert!(dp.is_multiple_of(16) && out.len() >= dp / 4);
        unsafe {
            let o = out.as_mut_ptr() as *mut __m128i;
            for c in (0..dp).step_by(16) {
                // Bytes 0..8 of each lane: channels c..c+8, then c+8..c+16; the
                // permute brings both halves into the low lane, in order.
                let b = _mm256_packs_epi16(
                    _mm256_loadu_si256(alpha.as_ptr().add(c) as *const __m256i),
                    _mm256_setzero_si256(),
                );
                let b = _mm256_permute4x64_epi64(b, 0b11_01_10_00);
                _mm_storeu_si128(o.add(c / 16), _mm256_castsi256_si128(b));
            }
        }
    }

    #[inline(always)]
    pub unsafe fn scores_u4<const NH: usize>(
        k: &[u8],
        (quads, h0, g): (&[i32], usize, usize),
        sig: &[f32],
        cst: &[f32],
        dp: usize,
        s: &mut [[f32; BLOCK]; TILE],
    ) {
        debug_assert!(k.len() >= dp * BLOCK / 2 && quads.len() >= g * dp / 4 && h0 + NH <= g);
        unsafe {
            let kp = k.as_ptr() as *const __m256i;
            // Channels 4m..4m+4 of head h0 + h at (h0 + h)·dp/4 + m.
            let qp = quads.as_ptr().add(h0 * dp / 4);
            let mask = _mm256_set1_epi8(0x0f);
            let mut a = [_mm256_setzero_si256(); NH];
            let mut b = [_mm256_setzero_si256(); NH];
            for m in 0..dp / 4 {
                // Channel pairs 2m and 2m+1 of the block's sixteen tokens; interleaved,
                // the four channels of tokens 0..4, 8..12 (lo) and 4..8, 12..16 (hi).
                let (c0, c1) = unpack2(kp.add(m), mask);
                let (lo, hi) = (_mm256_unpacklo_epi16(c0, c1), _mm256_unpackhi_epi16(c0, c1));
                for h in 0..NH {
                    let q = _mm256_set1_epi32(qp.add(h * dp / 4 + m).read());
                    a[h] = _mm256_dpbusd_epi32(a[h], lo, q);
                    b[h] = _mm256_dpbusd_epi32(b[h], hi, q);
                }
            }
            let mut a0 = [_mm256_setzero_si256(); NH];
            let mut a1 = [_mm256_setzero_si256(); NH];
            for h in 0..NH {
                (a0[h], a1[h]) = in_order(a[h], b[h]);
            }
            store_scores::<NH>(&a0, &a1, sig, cst, s);
        }
    }

    #[inline(always)]
    pub unsafe fn values_u4<const NH: usize>(
        v: &[u8],
        scale: &[f32],
        offset: &[f32],
        p: &[[f32; BLOCK]; TILE],
        z: &mut [f32],
        acc: &mut [f32],
        dp: usize,
    ) {
        debug_assert!(v.len() >= dp * BLOCK / 2 && scale.len() >= BLOCK && offset.len() >= BLOCK);
        debug_assert!(acc.len() >= NH * dp && z.len() >= NH);
        unsafe {
            // Quad j of head h: the weights of tokens 4j..4j+4 as bytes of one i32.
            let mut wq = [[0i32; BLOCK / 4]; TILE];
            let mut step = [0f32; TILE];
            // −8·Σπ in every lane: the sums start there and add π·κ over the raw
            // codes, so they equal AVX2's Σ π·(κ − 8) with no per-code subtraction.
            let mut init = [_mm256_setzero_si256(); NH];
            for h in 0..NH {
                let pi;
                (step[h], pi) = u4_weights(&p[h], scale, offset, &mut z[h]);
                // i32 lanes 0, 1: tokens 0..8; lanes 4, 5: tokens 8..16.
                let mut b = [0i32; 8];
                _mm256_storeu_si256(b.as_mut_ptr() as *mut __m256i, _mm256_packus_epi16(pi, pi));
                wq[h] = [b[0], b[1], b[4], b[5]];
                let x = _mm256_madd_epi16(pi, _mm256_set1_epi16(-8));
                let x = _mm256_add_epi32(x, _mm256_permute2x128_si256(x, x, 0x01));
                let x = _mm256_add_epi32(x, _mm256_shuffle_epi32(x, 0b01_00_11_10));
                init[h] = _mm256_add_epi32(x, _mm256_shuffle_epi32(x, 0b10_11_00_01));
            }
            let vp = v.as_ptr() as *const __m256i;
            let ap = acc.as_mut_ptr();
            let mask = _mm256_set1_epi8(0x0f);
            for u in 0..dp / 16 {
                let mut a = init;
                let mut b = init;
                for j in (0..BLOCK / 2).step_by(2) {
                    // Token pairs j and j+1 of the run's sixteen channels; interleaved,
                    // the four tokens of channels 0..4, 8..12 (lo) and 4..8, 12..16 (hi).
                    let (c0, c1) = unpack2(vp.add((u * 8 + j) / 2), mask);
                    let (lo, hi) = (_mm256_unpacklo_epi16(c0, c1), _mm256_unpackhi_epi16(c0, c1));
                    for h in 0..NH {
                        let w = _mm256_set1_epi32(wq[h][j / 2]);
                        a[h] = _mm256_dpbusd_epi32(a[h], w, lo);
                        b[h] = _mm256_dpbusd_epi32(b[h], w, hi);
                    }
                }
                // The accumulator is in that same lane order while this build runs
                // (`run` swaps it in and out), so no permute is needed here.
                for h in 0..NH {
                    let st = _mm256_set1_ps(step[h]);
                    let o = ap.add(h * dp + u * 16);
                    _mm256_storeu_ps(
                        o,
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[h]), st, _mm256_loadu_ps(o)),
                    );
                    _mm256_storeu_ps(
                        o.add(8),
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(b[h]), st, _mm256_loadu_ps(o.add(8))),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::{Format, Plane, padded_dim};
    use super::*;
    use rand::{Rng, SeedableRng};

    const FORMATS: [Format; 4] = [Format::F16, Format::Int8, Format::K8V4, Format::K4V4];

    /// The builds this CPU runs.
    fn builds() -> Vec<Build> {
        [Build::Portable, Build::Avx2, Build::Avx512]
            .into_iter()
            .filter(|b| b.available())
            .collect()
    }

    /// Rows `[t][d]` uniform in ±`amp`, channel 3 (keys' outlier) ten times wider.
    fn rows(rng: &mut impl Rng, t: usize, d: usize, amp: f32) -> Vec<f16> {
        (0..t * d)
            .map(|i| {
                let a = if i % d == 3 { 10.0 * amp } else { amp };
                f16::from_f32(rng.random_range(-a..a))
            })
            .collect()
    }

    /// Attention of one head in f64 over tokens `t0..t1` of the plane as
    /// its layout holds it: `(o, lse)`.
    fn reference(kv: &HeadKv<'_>, q: &[f32], scale: f64, t0: usize, t1: usize) -> (Vec<f64>, f64) {
        let d = kv.geo.d;
        let s: Vec<f64> = (t0..t1)
            .map(|t| scale * (0..d).map(|c| q[c] as f64 * kv.key(t, c) as f64).sum::<f64>())
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
        let mut o = vec![0f64; d];
        for (j, t) in (t0..t1).enumerate() {
            let p = (s[j] - m).exp() / l;
            for (c, x) in o.iter_mut().enumerate() {
                *x += p * kv.value(t, c) as f64;
            }
        }
        (o, m + l.ln())
    }

    /// The kernel's `(o, lse)`: one pass, or `t0..t1` split at `mid` and merged.
    #[allow(clippy::too_many_arguments)]
    fn run(
        kv: HeadKv<'_>,
        q: &[f32],
        g: usize,
        scale: f32,
        t0: usize,
        t1: usize,
        split: Option<usize>,
        build: Build,
    ) -> (Vec<f32>, Vec<f32>) {
        let d = kv.geo.d;
        let go = |st: &mut State, a, b| attend_with(build, kv, q, scale, a, b, st);
        let mut st = State::new(g, d);
        match split {
            None => go(&mut st, t0, t1),
            Some(mid) => {
                go(&mut st, t0, mid);
                let mut rest = State::new(g, d);
                go(&mut rest, mid, t1);
                st.merge(&rest);
            }
        }
        let (mut o, mut lse) = (vec![0f32; g * d], vec![0f32; g]);
        st.finish(&mut o, &mut lse);
        (o, lse)
    }

    /// Worst score error the integer query adds for one head (key codes at
    /// most `kmax` from the centre) and the worst output error the integer
    /// weights add (values codes at most `vmax_code` from the centre, of
    /// step at most `vstep`): see `tests/attend.rs`.
    fn rounding_bounds(kv: &HeadKv<'_>, q: &[f32], scale: f32, t0: usize, t1: usize) -> (f64, f64) {
        let (d, dp) = (kv.geo.d, kv.geo.dp);
        let eps_q = match kv.keys {
            Keys::F16(_) => 0.0,
            Keys::I8 { scale: ks, .. } | Keys::U4 { scale: ks, .. } => {
                let (lim, kmax) = if matches!(kv.keys, Keys::I8 { .. }) {
                    (i16_query_limit(dp) as f64, 127.0)
                } else {
                    (127.0, 8.0)
                };
                let amax = (t0 / KEY_GROUP..t1.div_ceil(KEY_GROUP))
                    .flat_map(|g| (0..d).map(move |c| (g, c)))
                    .map(|(g, c)| (scale * q[c] * ks[g * dp + c]).abs() as f64)
                    .fold(0.0, f64::max);
                amax / lim / 2.0 * kmax * d as f64
            }
        };
        let step_max = |vs: &[f32]| vs[t0..t1].iter().fold(0f32, |m, x| m.max(*x)) as f64;
        let eps_w = match kv.values {
            Values::F16(_) => 0.0,
            Values::I8 { scale: vs, .. } => BLOCK as f64 * 127.0 * step_max(vs) / (2.0 * 32767.0),
            Values::U4 { scale: vs, .. } => BLOCK as f64 * 8.0 * step_max(vs) / (2.0 * 255.0),
        };
        (eps_q, eps_w)
    }

    #[test]
    fn exp_matches_std() {
        let xs: Vec<f32> = (0..20_000).map(|i| -(i as f32) * 0.0045).collect();
        let check = |got: &[f32]| {
            for (x, y) in xs.iter().zip(got) {
                let want = x.exp();
                assert!(
                    ((y - want) / want.max(1e-30)).abs() < 1e-6,
                    "exp({x}) = {y}, want {want}"
                );
            }
        };
        check(&xs.iter().map(|x| exp_neg(*x)).collect::<Vec<_>>());
        assert_eq!([-100.0f32, -87.5, 0.0].map(exp_neg), [0.0, 0.0, 1.0]);
        #[cfg(target_arch = "x86_64")]
        if Build::Avx2.available() {
            #[target_feature(enable = "avx2,fma,f16c")]
            fn exp_all(xs: &[f32]) -> Vec<f32> {
                use std::arch::x86_64::*;
                let mut out = vec![0f32; xs.len()];
                for (o, x) in out.chunks_exact_mut(8).zip(xs.chunks_exact(8)) {
                    // SAFETY: the CPU has AVX2 (checked by the caller); 8 values each way.
                    unsafe { _mm256_storeu_ps(o.as_mut_ptr(), avx2::exp8(_mm256_loadu_ps(x.as_ptr()))) };
                }
                out
            }
            // SAFETY: the CPU has AVX2, FMA and F16C.
            let got = unsafe { exp_all(&xs) };
            check(&got);
            // SAFETY: as above.
            assert_eq!(
                unsafe { exp_all(&[-100.0, -87.5, 0.0, -1e30, f32::NEG_INFINITY, -0.5, -1.0, -2.0]) }[..5],
                [0.0, 0.0, 1.0, 0.0, 0.0]
            );
        }
    }

    /// Every layout, head tile (1..=4 heads and more), range (inside one
    /// block, across key groups, unaligned ends) and build against f64
    /// attention on the values the layout holds, within f32 rounding plus
    /// the stated rounding of the integer query and weights.
    #[test]
    fn every_layout_matches_f64_attention_on_its_own_values() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (t, d) in [(301usize, 64usize), (150, 40)] {
            let (k, v) = (rows(&mut rng, t, d, 2.0), rows(&mut rng, t, d, 3.0));
            let geo = Geometry::new(t, d);
            for f in FORMATS {
                let plane = Plane::pack(f, &k, &v, geo);
                let kv = plane.view();
                let vmax = (0..t)
                    .flat_map(|i| (0..d).map(move |c| (i, c)))
                    .map(|(i, c)| kv.value(i, c).abs())
                    .fold(0f32, f32::max) as f64;
                for g in [1usize, 3, 4, 6] {
                    let q: Vec<f32> = (0..g * d).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                    let scale = 1.0 / (d as f32).sqrt();
                    for (t0, t1, split) in [
                        (0, t, Some(100)),
                        (5, t - 7, None),
                        (17, 18, None),
                        (130, t, Some(131)),
                        (3, 29, Some(16)),
                    ] {
                        for build in builds() {
                            let (o, lse) = run(kv, &q, g, scale, t0, t1, split, build);
                            for h in 0..g {
                                let qh = &q[h * d..(h + 1) * d];
                                let (ro, rl) = reference(&kv, qh, scale as f64, t0, t1);
                                let (eq, ew) = rounding_bounds(&kv, qh, scale, t0, t1);
                                let tol_o = (2.0 * eq).exp_m1() * vmax + ew + 1e-5 * (1.0 + vmax);
                                let tol_l = eq + 1e-5 * (1.0 + rl.abs());
                                assert!(
                                    (lse[h] as f64 - rl).abs() <= tol_l,
                                    "{f:?} g {g} {t0}..{t1} {build:?}: lse {} vs {rl}",
                                    lse[h]
                                );
                                for c in 0..d {
                                    let e = (o[h * d + c] as f64 - ro[c]).abs();
                                    assert!(
                                        e <= tol_o,
                                        "{f:?} d {d} g {g} {t0}..{t1} {build:?}: o[{h}][{c}] = {}, want {} (tolerance {tol_o})",
                                        o[h * d + c],
                                        ro[c]
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The SIMD and portable builds compute the same integers; their f32
    /// parts differ by rounding (which can move an integer weight by one).
    #[test]
    fn portable_build_agrees_with_the_simd_one() {
        if !Build::Avx2.available() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (t, d, g) = (517usize, 128usize, 5usize);
        let (k, v) = (rows(&mut rng, t, d, 1.5), rows(&mut rng, t, d, 2.0));
        let q: Vec<f32> = (0..g * d).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        for f in FORMATS {
            let plane = Plane::pack(f, &k, &v, Geometry::new(t, d));
            let (a, la) = run(plane.view(), &q, g, 0.09, 9, t, None, Build::Avx2);
            let (b, lb) = run(plane.view(), &q, g, 0.09, 9, t, None, Build::Portable);
            let tol = if f == Format::F16 { 1e-5 } else { 2e-3 };
            for (x, y) in a.iter().zip(&b).chain(la.iter().zip(&lb)) {
                assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{f:?}: {x} vs {y}");
            }
        }
    }

    /// The AVX-512 build's integer sums are the AVX2 build's and its f32 steps
    /// the same instructions: equal outputs, bit for bit, on every layout,
    /// head tile and unaligned range (skipped on a CPU without AVX-512 VNNI).
    #[test]
    fn avx512_build_equals_the_avx2_one_bit_for_bit() {
        if !Build::Avx512.available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (t, d) in [(517usize, 128usize), (300, 40), (64, 1040)] {
            let (k, v) = (rows(&mut rng, t, d, 1.5), rows(&mut rng, t, d, 2.0));
            for g in [1usize, 2, 3, 4, 7] {
                let q: Vec<f32> = (0..g * d).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                for f in FORMATS {
                    let plane = Plane::pack(f, &k, &v, Geometry::new(t, d));
                    for (t0, t1, split) in [(0, t, None), (9, t - 3, Some(t / 2)), (17, 18, None)] {
                        let a = run(plane.view(), &q, g, 0.09, t0, t1, split, Build::Avx512);
                        let b = run(plane.view(), &q, g, 0.09, t0, t1, split, Build::Avx2);
                        assert_eq!(a, b, "{f:?} d {d} g {g} {t0}..{t1}");
                    }
                }
            }
        }
    }

    /// Long heads: the integer query of int8 keys shrinks so that `dp`
    /// channels of extreme codes still sum within i32.
    #[test]
    fn long_heads_do_not_overflow_the_integer_sums() {
        let (t, d, g) = (40usize, 1040usize, 2usize);
        let k: Vec<f16> = (0..t * d)
            .map(|i| f16::from_f32(if (i / d) % 2 == 0 { 3.0 } else { -3.0 }))
            .collect();
        let v: Vec<f16> = (0..t * d)
            .map(|i| f16::from_f32(((i % 7) as f32 - 3.0) * 0.5))
            .collect();
        let q = vec![0.5f32; g * d];
        assert!(i16_query_limit(padded_dim(d)) * 127.0 * padded_dim(d) as f32 <= i32::MAX as f32);
        for f in FORMATS {
            let plane = Plane::pack(f, &k, &v, Geometry::new(t, d));
            let kv = plane.view();
            for build in builds() {
                let (o, lse) = run(kv, &q, g, 0.01, 0, t, None, build);
                let (ro, rl) = reference(&kv, &q[..d], 0.01, 0, t);
                let (eq, ew) = rounding_bounds(&kv, &q[..d], 0.01, 0, t);
                assert!(
                    (lse[0] as f64 - rl).abs() <= eq + 1e-5 * (1.0 + rl.abs()),
                    "{f:?}: lse {} vs {rl}",
                    lse[0]
                );
                for c in 0..d {
                    assert!(
                        (o[c] as f64 - ro[c]).abs() <= (2.0 * eq).exp_m1() * 1.5 + ew + 2e-5,
                        "{f:?} {build:?} o[{c}]"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_range_is_minus_infinity_and_zero() {
        let k = vec![f16::ONE; 8 * 4];
        for f in FORMATS {
            let plane = Plane::pack(f, &k, &k, Geometry::new(8, 4));
            for (a, b) in [(1, 1), (5, 3), (8, 20)] {
                let (o, lse) = run(plane.view(), &[1.0; 8], 2, 1.0, a, b, None, Build::best());
                assert_eq!(lse, [f32::NEG_INFINITY; 2], "{f:?}");
                assert_eq!(o, [0.0; 8], "{f:?}");
            }
        }
    }
}
