//! The attention worker's inner loop: decode attention of the G query heads
//! that share one KV head, over a token range of that head, with an online
//! softmax in f32. Hot path.
//!
//! Each block of keys and values is read once and serves all G queries, so a
//! step reads every KV byte of its range once whatever the group size. The
//! loops are plain slices and fixed-width lanes that the compiler
//! vectorises; [`attend`] picks an AVX-512 or AVX2 build of them (with FMA) at run time
//! when the CPU has it (the portable build is SSE2 only). f16 → f32 goes through
//! `half`'s slice conversion, which uses F16C when present.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Tokens per inner block: a block's scores for every head of a group, and
/// its keys and values widened to f32, stay in L1.
const BLOCK: usize = 32;

/// Keys and values of one (layer, KV head) for tokens `0..T`, rows of `head_dim`.
#[derive(Clone, Copy)]
pub enum HeadKv<'a> {
    /// As f16: `k`, `v` are `[T][D]`.
    F16 {
        /// Keys.
        k: &'a [f16],
        /// Values.
        v: &'a [f16],
    },
    /// Keys int8 with per-channel scales (`k_scale[D]`, folded into the
    /// query so scores need no dequantised keys); values int8 with
    /// per-token scales (`v_scale[T]`, folded into the softmax weights).
    Int8 {
        /// Quantised keys, `[T][D]`.
        k: &'a [i8],
        /// Per-channel key scales, `[D]`.
        k_scale: &'a [f32],
        /// Quantised values, `[T][D]`.
        v: &'a [i8],
        /// Per-token value scales, `[T]`.
        v_scale: &'a [f32],
    },
    /// Keys as in `Int8`; values 4-bit, two per byte (element `2i` in the
    /// low nibble), stored as `x + 8` for `x` in `-7..=7`, per-token scales.
    K8V4 {
        /// Quantised keys, `[T][D]`.
        k: &'a [i8],
        /// Per-channel key scales, `[D]`.
        k_scale: &'a [f32],
        /// Packed values, `[T][D/2]`.
        v: &'a [u8],
        /// Per-token value scales, `[T]`.
        v_scale: &'a [f32],
    },
}

impl HeadKv<'_> {
    /// Bytes a pass over `tokens` tokens of one head reads.
    pub fn bytes_per_token(&self, d: usize) -> usize {
        match self {
            HeadKv::F16 { .. } => 4 * d,
            HeadKv::Int8 { .. } => 2 * d + 4,
            HeadKv::K8V4 { .. } => d + d / 2 + 4,
        }
    }
}

/// Online-softmax state of G query heads over some tokens: running max
/// `m`, sum of `exp(s - m)` in `l`, and the un-normalised output `acc`.
#[derive(Debug, Clone)]
pub struct State {
    d: usize,
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
}

impl State {
    /// The state of an empty token set for `g` heads of dimension `d`.
    pub fn new(g: usize, d: usize) -> State {
        State {
            d,
            m: vec![f32::NEG_INFINITY; g],
            l: vec![0.0; g],
            acc: vec![0.0; g * d],
        }
    }

    /// Folds in the state of a disjoint token set.
    pub fn merge(&mut self, o: &State) {
        for g in 0..self.m.len() {
            if o.l[g] == 0.0 {
                continue;
            }
            let m = self.m[g].max(o.m[g]);
            let (a, b) = ((self.m[g] - m).exp(), (o.m[g] - m).exp());
            self.l[g] = self.l[g] * a + o.l[g] * b;
            let d = self.d;
            for (x, y) in self.acc[g * d..(g + 1) * d]
                .iter_mut()
                .zip(&o.acc[g * d..(g + 1) * d])
            {
                *x = *x * a + *y * b;
            }
            self.m[g] = m;
        }
    }

    /// Normalised outputs `o[G][D]` and `lse[G]` (`-inf` and zeros when empty).
    pub fn finish(&self, o: &mut [f32], lse: &mut [f32]) {
        let d = self.d;
        for g in 0..self.m.len() {
            let out = &mut o[g * d..(g + 1) * d];
            if self.l[g] == 0.0 {
                out.fill(0.0);
                lse[g] = f32::NEG_INFINITY;
                continue;
            }
            let inv = 1.0 / self.l[g];
            for (x, a) in out.iter_mut().zip(&self.acc[g * d..(g + 1) * d]) {
                *x = a * inv;
            }
            lse[g] = self.m[g] + self.l[g].ln();
        }
    }
}

/// Attends the G queries `q[G][D]` (softmax scale `scale`) over tokens
/// `t0..t1` of `kv`, folding the result into `st`.
pub fn attend(kv: HeadKv<'_>, d: usize, q: &[f32], scale: f32, t0: usize, t1: usize, st: &mut State) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("fma") && has!("f16c") {
            // SAFETY: the CPU has AVX-512F and FMA (checked just above).
            unsafe { attend_avx512(kv, d, q, scale, t0, t1, st) };
            return;
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { attend_avx2(kv, d, q, scale, t0, t1, st) };
            return;
        }
    }
    attend_impl::<false>(kv, d, q, scale, t0, t1, st);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn attend_avx512(kv: HeadKv<'_>, d: usize, q: &[f32], scale: f32, t0: usize, t1: usize, st: &mut State) {
    attend_impl::<true>(kv, d, q, scale, t0, t1, st);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn attend_avx2(kv: HeadKv<'_>, d: usize, q: &[f32], scale: f32, t0: usize, t1: usize, st: &mut State) {
    attend_impl::<true>(kv, d, q, scale, t0, t1, st);
}

/// `a·b + c`, fused where the build has FMA (without it `mul_add` would be a library call).
#[inline(always)]
fn madd<const SIMD: bool>(a: f32, b: f32, c: f32) -> f32 {
    if SIMD { a.mul_add(b, c) } else { a * b + c }
}

#[inline(always)]
fn attend_impl<const SIMD: bool>(
    kv: HeadKv<'_>,
    d: usize,
    q: &[f32],
    scale: f32,
    t0: usize,
    t1: usize,
    st: &mut State,
) {
    let g = st.m.len();
    debug_assert_eq!(q.len(), g * d);
    // The scale (and for int8 keys the per-channel key scale) goes into the
    // query once, instead of into every score.
    let mut qs: Vec<f32> = q.iter().map(|x| x * scale).collect();
    if let HeadKv::Int8 { k_scale, .. } | HeadKv::K8V4 { k_scale, .. } = kv {
        for row in qs.chunks_exact_mut(d) {
            for (x, s) in row.iter_mut().zip(k_scale) {
                *x *= s;
            }
        }
    }
    let mut kbuf = vec![0f32; BLOCK * d];
    let mut vbuf = vec![0f32; BLOCK * d];
    let mut s = vec![0f32; g * BLOCK];
    let mut b = t0;
    while b < t1 {
        let n = BLOCK.min(t1 - b);
        let rows = b * d..(b + n) * d;
        match kv {
            HeadKv::F16 { k, .. } => widen_f16::<SIMD>(&k[rows.clone()], &mut kbuf[..n * d]),
            HeadKv::Int8 { k, .. } | HeadKv::K8V4 { k, .. } => widen_i8(&k[rows.clone()], &mut kbuf[..n * d]),
        }
        for gi in 0..g {
            let qg = &qs[gi * d..(gi + 1) * d];
            let sg = &mut s[gi * BLOCK..gi * BLOCK + n];
            for (j, x) in sg.iter_mut().enumerate() {
                *x = dot::<SIMD>(qg, &kbuf[j * d..(j + 1) * d]);
            }
            let mb = sg.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let m = st.m[gi].max(mb);
            let corr = (st.m[gi] - m).exp();
            st.m[gi] = m;
            for x in sg.iter_mut() {
                *x -= m;
            }
            exp_in_place(sg);
            let sum: f32 = sg.iter().sum();
            st.l[gi] = st.l[gi] * corr + sum;
            if corr != 1.0 {
                for a in &mut st.acc[gi * d..(gi + 1) * d] {
                    *a *= corr;
                }
            }
        }
        match kv {
            HeadKv::F16 { v, .. } => widen_f16::<SIMD>(&v[rows], &mut vbuf[..n * d]),
            HeadKv::Int8 { v, v_scale, .. } => {
                widen_i8(&v[rows], &mut vbuf[..n * d]);
                fold_value_scales(&mut s, g, n, &v_scale[b..b + n]);
            }
            HeadKv::K8V4 { v, v_scale, .. } => {
                widen_i4(&v[b * d / 2..(b + n) * d / 2], &mut vbuf[..n * d]);
                fold_value_scales(&mut s, g, n, &v_scale[b..b + n]);
            }
        }
        for gi in 0..g {
            let acc = &mut st.acc[gi * d..(gi + 1) * d];
            for j in 0..n {
                let p = s[gi * BLOCK + j];
                for (a, x) in acc.iter_mut().zip(&vbuf[j * d..(j + 1) * d]) {
                    *a = madd::<SIMD>(p, *x, *a);
                }
            }
        }
        b += n;
    }
}

/// f16 → f32. `SIMD` builds (AVX2/AVX-512 with F16C, see [`attend`]) use
/// F16C inline; `half`'s slice conversion would be a call per 8 values.
#[inline(always)]
fn widen_f16<const SIMD: bool>(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: SIMD is only true inside the F16C-enabled builds, and
            // i + 8 <= n keeps both the 16-byte load and the 32-byte store in bounds.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for (o, x) in dst[i..n].iter_mut().zip(&src[i..n]) {
            *o = x.to_f32();
        }
        return;
    }
    src.convert_to_f32_slice(dst);
}

/// Per-token value scales ride on the softmax weights `s[G][BLOCK]`.
#[inline(always)]
fn fold_value_scales(s: &mut [f32], g: usize, n: usize, scales: &[f32]) {
    for gi in 0..g {
        for (p, sc) in s[gi * BLOCK..gi * BLOCK + n].iter_mut().zip(scales) {
            *p *= sc;
        }
    }
}

/// Unpacks 4-bit values (`x + 8`, low nibble first) to f32.
#[inline(always)]
fn widen_i4(src: &[u8], dst: &mut [f32]) {
    for (o, b) in dst.chunks_exact_mut(2).zip(src) {
        o[0] = (b & 0x0f) as f32 - 8.0;
        o[1] = (b >> 4) as f32 - 8.0;
    }
}

#[inline(always)]
fn widen_i8(src: &[i8], dst: &mut [f32]) {
    for (o, x) in dst.iter_mut().zip(src) {
        *o = *x as f32;
    }
}

/// Dot product. `SIMD` builds (see [`attend`]) use AVX2 FMA in two
/// accumulators and one shuffle reduction: left to itself the compiler
/// splits a lane array into scalar pieces. The portable build keeps 16
/// independent lanes so it is not one serial chain.
#[inline(always)]
fn dot<const SIMD: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        use std::arch::x86_64::*;
        // SAFETY: SIMD is only true inside the AVX2+FMA builds; every load
        // reads 8 floats at i with i + 8 <= n.
        unsafe {
            let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= n {
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    s0,
                );
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                    _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                    s1,
                );
                i += 16;
            }
            if i + 8 <= n {
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    s0,
                );
                i += 8;
            }
            let s = _mm256_add_ps(s0, s1);
            let x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
            let x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
            let mut r = _mm_cvtss_f32(x);
            for k in i..n {
                r += a[k] * b[k];
            }
            return r;
        }
    }
    let mut lanes = [0f32; 16];
    let (ac, ar) = a[..n].as_chunks::<16>();
    let (bc, br) = b[..n].as_chunks::<16>();
    for (x, y) in ac.iter().zip(bc) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            lanes[i] += lanes[i + w];
        }
    }
    lanes[0] + tail
}

/// `x ↦ e^x` for `x ≤ 0` (scores minus their running max), branch-free so
/// it vectorises: 2^n·p(f) with a degree-6 polynomial, relative error about
/// 2e-7; inputs below -87 give 0.
#[inline(always)]
fn exp_in_place(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    for x in xs.iter_mut() {
        let v = x.max(-87.0);
        let n = (v * LOG2E).round();
        let f = v - n * LN2_HI - n * LN2_LO;
        let p = 1.0
            + f * (1.0
                + f * (0.5
                    + f * (1.666_666_7e-1 + f * (4.166_579_6e-2 + f * (8.333_452e-3 + f * 1.394_275_5e-3)))));
        let pow2 = f32::from_bits((((n as i32) + 127) as u32) << 23);
        *x = if *x < -87.0 { 0.0 } else { p * pow2 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Attention of one head in f64: `(o, lse)`.
    fn reference(k: &[f32], v: &[f32], d: usize, q: &[f32], scale: f64) -> (Vec<f64>, f64) {
        let t = k.len() / d;
        let s: Vec<f64> = (0..t)
            .map(|j| scale * (0..d).map(|i| q[i] as f64 * k[j * d + i] as f64).sum::<f64>())
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
        let mut o = vec![0f64; d];
        for j in 0..t {
            let p = (s[j] - m).exp() / l;
            for i in 0..d {
                o[i] += p * v[j * d + i] as f64;
            }
        }
        (o, m + l.ln())
    }

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        for i in 0..20_000 {
            let x = -(i as f32) * 0.0045;
            let mut v = [x];
            exp_in_place(&mut v);
            let want = x.exp();
            worst = worst.max(((v[0] - want) / want.max(1e-30)).abs());
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        let mut v = [-100.0f32, -87.5, 0.0];
        exp_in_place(&mut v);
        assert_eq!(v, [0.0, 0.0, 1.0]);
    }

    #[test]
    fn f16_head_matches_f64_reference_for_every_split() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (t, d, g) = (301, 64, 3);
        let k16: Vec<f16> = (0..t * d)
            .map(|_| f16::from_f32(rng.random_range(-3.0..3.0)))
            .collect();
        let v16: Vec<f16> = (0..t * d)
            .map(|_| f16::from_f32(rng.random_range(-3.0..3.0)))
            .collect();
        let q: Vec<f32> = (0..g * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let (kf, vf): (Vec<f32>, Vec<f32>) = (
            k16.iter().map(|x| x.to_f32()).collect(),
            v16.iter().map(|x| x.to_f32()).collect(),
        );
        let kv = HeadKv::F16 { k: &k16, v: &v16 };
        let scale = 0.125;
        // One pass, and the same range split in three and merged.
        let mut one = State::new(g, d);
        attend(kv, d, &q, scale, 0, t, &mut one);
        let mut parts = State::new(g, d);
        for (a, b) in [(0, 100), (100, 100), (100, 301)] {
            let mut p = State::new(g, d);
            attend(kv, d, &q, scale, a, b, &mut p);
            parts.merge(&p);
        }
        for st in [one, parts] {
            let (mut o, mut lse) = (vec![0f32; g * d], vec![0f32; g]);
            st.finish(&mut o, &mut lse);
            for gi in 0..g {
                let (ro, rl) = reference(&kf, &vf, d, &q[gi * d..(gi + 1) * d], scale as f64);
                assert!(
                    (lse[gi] as f64 - rl).abs() < 1e-4 * (1.0 + rl.abs()),
                    "{} vs {rl}",
                    lse[gi]
                );
                for i in 0..d {
                    assert!((o[gi * d + i] as f64 - ro[i]).abs() < 1e-4, "o[{gi}][{i}]");
                }
            }
        }
    }

    #[test]
    fn portable_build_agrees_with_the_dispatched_one() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (t, d, g) = (77, 40, 2);
        let k: Vec<i8> = (0..t * d).map(|_| rng.random_range(-127..=127)).collect();
        let v: Vec<i8> = (0..t * d).map(|_| rng.random_range(-127..=127)).collect();
        let k_scale: Vec<f32> = (0..d).map(|_| rng.random_range(0.001..0.02)).collect();
        let v_scale: Vec<f32> = (0..t).map(|_| rng.random_range(0.001..0.02)).collect();
        let q: Vec<f32> = (0..g * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let kv = HeadKv::Int8 {
            k: &k,
            k_scale: &k_scale,
            v: &v,
            v_scale: &v_scale,
        };
        let mut a = State::new(g, d);
        attend(kv, d, &q, 0.3, 5, t, &mut a);
        let mut b = State::new(g, d);
        attend_impl::<false>(kv, d, &q, 0.3, 5, t, &mut b);
        let (mut oa, mut la, mut ob, mut lb) =
            (vec![0f32; g * d], vec![0f32; g], vec![0f32; g * d], vec![0f32; g]);
        a.finish(&mut oa, &mut la);
        b.finish(&mut ob, &mut lb);
        for (x, y) in oa.iter().zip(&ob).chain(la.iter().zip(&lb)) {
            assert!((x - y).abs() < 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn empty_range_is_minus_infinity_and_zero() {
        let k = vec![f16::ONE; 8];
        let st = {
            let mut st = State::new(2, 4);
            attend(HeadKv::F16 { k: &k, v: &k }, 4, &[1.0; 8], 1.0, 1, 1, &mut st);
            st
        };
        let (mut o, mut lse) = (vec![9f32; 8], vec![0f32; 2]);
        st.finish(&mut o, &mut lse);
        assert_eq!(lse, [f32::NEG_INFINITY; 2]);
        assert_eq!(o, [0.0; 8]);
    }
}
