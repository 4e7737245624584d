//! AVX2 + F16C decoding of `kv-*` blocks, chosen at run time ([`available`]): the eight
//! interleaved rANS lanes of a stream are the eight 32-bit lanes of one vector (one gather
//! for the table lookups, one permute hands out the renormalisation words), fused with
//! dequantization and the conversion to the output dtype, so each symbol is touched once.
//! A stream's steps form one dependency chain (gather, multiply, word permute), so up to
//! four streams of a part are decoded side by side to keep the core busy.
//!
//! It computes exactly what the portable path of `kv.rs` computes (`(s + bias) as f32 *
//! step`, rounded once to the output dtype, words consumed in symbol order), and the tests
//! check the two give the same bytes and the same verdicts, so it stays bit-exact with the
//! GPU decoder too. It needs `channels % 8 == 0` (eight consecutive symbols then lie in one
//! row), which every real model has; other shapes take the portable path.

use std::arch::x86_64::*;

use crate::error::CodecError;
use crate::rans::{LANES, PROB_SCALE};
use crate::tensor::Dtype;

/// Streams decoded side by side at most.
pub(crate) const MAX_STREAMS: usize = 4;

/// Whether this CPU can run [`decode_blocks`].
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("f16c")
        && std::arch::is_x86_feature_detected!("popcnt")
}

/// For each mask of the lanes that take a renormalisation word, the index (after the
/// stream position) of the word each lane takes: the lanes before it that take one.
static PERM: [[u32; 8]; 256] = {
    let mut t = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let mut l = 0;
        while l < 8 {
            t[m][l] = (m & ((1 << l) - 1)).count_ones();
            l += 1;
        }
        m += 1;
    }
    t
};

/// What every block of a part decodes with.
pub(crate) struct PartParams<'a> {
    /// The part's decode table (`DecodeTable` slots: `freq | (slot - cum) << 13 | s << 25`).
    pub(crate) slots: &'a [u32; PROB_SCALE as usize],
    /// Channels per token (a multiple of 8).
    pub(crate) channels: usize,
    /// Groups are tokens (one bias and step per row) rather than channels.
    pub(crate) per_token: bool,
    /// Channel groups shared by every block (true), or each block's own (rows of key
    /// groups: `Block::biases` and `steps` differ between blocks).
    pub(crate) shared_groups: bool,
    /// The escape symbol `2M + 1`.
    pub(crate) esc_sym: u8,
    /// Output dtype.
    pub(crate) out_dtype: Dtype,
    /// A predicted part's weights (`ρ8`, one per channel) and its `M`: each symbol adds
    /// `(ρ8 · state + 4) >> 3`, the state being the channel's previous residual `s − M +
    /// prediction` clamped to ±127 (0 at a block's start and after an escape).
    pub(crate) predicted: Option<(&'a [i32], i32)>,
}

/// One block to decode.
pub(crate) struct Block<'a> {
    /// The whole rANS stream.
    pub(crate) stream: &'a [u8],
    /// Where its elements go, in the output dtype.
    pub(crate) out: &'a mut [u8],
    /// Per group `zero - M`: the block's tokens when per token, all channels otherwise.
    pub(crate) biases: &'a [i32],
    /// Per group: the step, indexed like `biases`.
    pub(crate) steps: &'a [f32],
}

/// Decodes 1 to [`MAX_STREAMS`] blocks of one part that have the same element count, side
/// by side, writing every element's `(s + bias) * step` into its block's `out` and, per
/// block, one byte per eight elements into `esc_masks` (`blocks.len()` runs of
/// `elements / 8`): bit `l` set when element `8k + l` is an escape, whose value the caller
/// patches. `words` is scratch.
///
/// Fails like `rans::decode` on a stream that is too short, too long or does not end in
/// the initial state, and on blocks that do not fit.
pub(crate) fn decode_blocks(
    blocks: &mut [Block<'_>],
    p: &PartParams<'_>,
    words: &mut Vec<u16>,
    esc_masks: &mut Vec<u8>,
    state: &mut Vec<i32>,
) -> Result<(), CodecError> {
    let c = p.channels;
    let size = p.out_dtype.size();
    let n_blocks = blocks.len();
    let Some(first) = blocks.first() else {
        return Ok(());
    };
    let elems = first.out.len() / size;
    let rows = elems.checked_div(c).unwrap_or(0);
    let groups_needed = if p.per_token { rows } else { c };
    let misfit = n_blocks > MAX_STREAMS
        || elems == 0
        || c == 0
        || !c.is_multiple_of(LANES)
        || elems != rows * c
        || !available()
        || p.predicted.is_some_and(|(rho, _)| rho.len() < c)
        || blocks.iter().any(|b| {
            b.out.len() != elems * size || b.biases.len() < groups_needed || b.steps.len() < groups_needed
        });
    if misfit {
        return Err(CodecError::Corrupt(format!(
            "{n_blocks} kv blocks of {elems} elements do not fit the vector decoder ({c} channels)"
        )));
    }
    // Each stream's renormalisation words followed by 8 zeros, so that an 8-word load at
    // any position up to its word count stays inside (a damaged stream's reads past its
    // end see zeros, as in the portable decoder, and the final count check catches them).
    words.clear();
    let mut raw = [Raw::default(); MAX_STREAMS];
    let mut starts = [0usize; MAX_STREAMS];
    for (j, b) in blocks.iter().enumerate() {
        if !b.stream.len().is_multiple_of(2) || b.stream.len() < 4 * LANES {
            return Err(CodecError::Corrupt(format!(
                "rANS stream of {} bytes",
                b.stream.len()
            )));
        }
        let body = &b.stream[4 * LANES..];
        starts[j] = words.len();
        raw[j].n = body.len() / 2;
        words.extend(body.chunks_exact(2).map(|w| u16::from_le_bytes([w[0], w[1]])));
        words.extend_from_slice(&[0; LANES]);
    }
    esc_masks.clear();
    esc_masks.resize(n_blocks * (elems / LANES), 0);
    // Every block starts its stream, so every channel's state starts at 0.
    state.clear();
    state.resize(n_blocks * c, 0);
    for (j, (b, esc)) in blocks
        .iter_mut()
        .zip(esc_masks.chunks_exact_mut((elems / LANES).max(1)))
        .enumerate()
    {
        raw[j].head = b.stream.as_ptr();
        raw[j].words = words[starts[j]..].as_ptr();
        raw[j].out = b.out.as_mut_ptr();
        raw[j].biases = b.biases.as_ptr();
        raw[j].steps = b.steps.as_ptr();
        raw[j].esc = esc.as_mut_ptr();
    }
    for (j, st) in state.chunks_exact_mut(c).enumerate() {
        raw[j].state = st.as_mut_ptr();
    }
    let steps = elems / LANES;
    // SAFETY: AVX2, F16C and POPCNT are present (checked above). For each block: `head`
    // has 32 bytes, `words` n + 8 entries, `out` elems * size bytes, `esc` elems / 8
    // bytes, and `biases`/`steps` the groups the kernel indexes (checked above).
    let results = unsafe {
        match (n_blocks, p.out_dtype) {
            (1, Dtype::F16) => run::<1, F16>(&raw, p, steps),
            (2, Dtype::F16) => run::<2, F16>(&raw, p, steps),
            (3, Dtype::F16) => run::<3, F16>(&raw, p, steps),
            (4, Dtype::F16) => run::<4, F16>(&raw, p, steps),
            (1, Dtype::Bf16) => run::<1, BF16>(&raw, p, steps),
            (2, Dtype::Bf16) => run::<2, BF16>(&raw, p, steps),
            (3, Dtype::Bf16) => run::<3, BF16>(&raw, p, steps),
            (4, Dtype::Bf16) => run::<4, BF16>(&raw, p, steps),
            (1, Dtype::F32) => run::<1, F32>(&raw, p, steps),
            (2, Dtype::F32) => run::<2, F32>(&raw, p, steps),
            (3, Dtype::F32) => run::<3, F32>(&raw, p, steps),
            _ => run::<4, F32>(&raw, p, steps),
        }
    };
    for r in &results[..n_blocks] {
        match *r {
            Outcome::Ok => {}
            Outcome::BadStart => {
                return Err(CodecError::Corrupt(
                    "rANS initial state below the normalised interval".into(),
                ));
            }
            Outcome::Words { have, used } => {
                return Err(CodecError::Corrupt(format!(
                    "rANS stream has {} words, decoding used {}",
                    have + 2 * LANES,
                    used + 2 * LANES
                )));
            }
            Outcome::BadEnd => {
                return Err(CodecError::Corrupt(
                    "rANS stream does not end in its initial state".into(),
                ));
            }
        }
    }
    Ok(())
}

/// A block as the kernel sees it (validated by [`decode_blocks`]).
#[derive(Clone, Copy)]
struct Raw {
    head: *const u8,
    words: *const u16,
    n: usize,
    out: *mut u8,
    biases: *const i32,
    steps: *const f32,
    esc: *mut u8,
    /// Prediction state, `channels` entries.
    state: *mut i32,
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            head: std::ptr::null(),
            words: std::ptr::null(),
            n: 0,
            out: std::ptr::null_mut(),
            biases: std::ptr::null(),
            steps: std::ptr::null(),
            esc: std::ptr::null_mut(),
            state: std::ptr::null_mut(),
        }
    }
}

/// How a stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    BadStart,
    Words { have: usize, used: usize },
    BadEnd,
}

const F16: u8 = 0;
const BF16: u8 = 1;
const F32: u8 = 2;

/// The vector loop over `N` blocks of `steps * 8` elements each, output dtype `DT`.
///
/// # Safety
/// AVX2, F16C and POPCNT must be present, and the first `N` entries of `raw` valid as
/// [`decode_blocks`] checks.
#[target_feature(enable = "avx2,f16c,popcnt")]
unsafe fn run<const N: usize, const DT: u8>(
    raw: &[Raw; MAX_STREAMS],
    p: &PartParams<'_>,
    steps: usize,
) -> [Outcome; MAX_STREAMS] {
    let mut outcome = [Outcome::Ok; MAX_STREAMS];
    let c = p.channels;
    let zero = _mm256_setzero_si256();
    let mut x = [zero; N];
    let mut pos = [0usize; N];
    for j in 0..N {
        // Lane l's initial state is the little-endian u32 at byte 4l (low word first).
        x[j] = unsafe { _mm256_loadu_si256(raw[j].head.cast()) };
        // A state below 2^16 (unsigned): x >> 16 == 0.
        let below = _mm256_cmpeq_epi32(_mm256_srli_epi32::<16>(x[j]), zero);
        if _mm256_movemask_ps(_mm256_castsi256_ps(below)) != 0 {
            outcome[j] = Outcome::BadStart;
        }
    }
    if outcome.iter().any(|&o| o != Outcome::Ok) {
        return outcome;
    }
    let slot_mask = _mm256_set1_epi32(PROB_SCALE as i32 - 1);
    let freq_mask = _mm256_set1_epi32(0x1FFF);
    let off_mask = _mm256_set1_epi32(0xFFF);
    let esc = _mm256_set1_epi32(i32::from(p.esc_sym));
    let slots = p.slots.as_ptr().cast::<i32>();
    let es = if DT == F32 { 4 } else { 2 };
    let (rho, m_sym) = match p.predicted {
        Some((rho, m)) => (rho.as_ptr(), _mm256_set1_epi32(m)),
        None => (std::ptr::null(), zero),
    };
    let (four, lim, neg_lim) = (
        _mm256_set1_epi32(4),
        _mm256_set1_epi32(127),
        _mm256_set1_epi32(-127),
    );
    let (mut row, mut ch) = (0usize, 0usize);
    for k in 0..steps {
        // Symbols 8k..8k + 8 of every block lie in `row`, channels ch..ch + 8 <= c.
        let (cbias, cstep) = if p.per_token || !p.shared_groups {
            (zero, _mm256_setzero_ps())
        } else {
            // SAFETY: ch + 8 <= c <= biases.len(), steps.len() (same for every block).
            unsafe {
                (
                    _mm256_loadu_si256(raw[0].biases.add(ch).cast()),
                    _mm256_loadu_ps(raw[0].steps.add(ch)),
                )
            }
        };
        for j in 0..N {
            let r = raw[j];
            let slot = _mm256_and_si256(x[j], slot_mask);
            // SAFETY: slot < 4096 = p.slots.len().
            let e = unsafe { _mm256_i32gather_epi32::<4>(slots, slot) };
            let freq = _mm256_and_si256(e, freq_mask);
            let off = _mm256_and_si256(_mm256_srli_epi32::<13>(e), off_mask);
            let y = _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32::<12>(x[j])), off);
            let need = _mm256_cmpeq_epi32(_mm256_srli_epi32::<16>(y), zero);
            let m = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as usize;
            let at = pos[j].min(r.n);
            // SAFETY: the stream's words have n + 8 entries and at <= n; m < 256.
            let w = unsafe { _mm256_cvtepu16_epi32(_mm_loadu_si128(r.words.add(at).cast())) };
            let idx = unsafe { _mm256_loadu_si256(PERM.as_ptr().add(m).cast()) };
            let refilled = _mm256_or_si256(_mm256_slli_epi32::<16>(y), _mm256_permutevar8x32_epi32(w, idx));
            x[j] = _mm256_blendv_epi8(y, refilled, need);
            pos[j] += m.count_ones() as usize;
            // Dequantize: (s + bias) wraps in i32 like the portable path's wrapping_add,
            // then converts (round to nearest) and multiplies in f32.
            let sym = _mm256_srli_epi32::<25>(e);
            let (bias, step) = if p.per_token {
                // SAFETY: row < rows <= biases.len(), steps.len().
                unsafe {
                    (
                        _mm256_set1_epi32(*r.biases.add(row)),
                        _mm256_set1_ps(*r.steps.add(row)),
                    )
                }
            } else if p.shared_groups {
                (cbias, cstep)
            } else {
                // SAFETY: ch + 8 <= c <= this block's biases.len(), steps.len().
                unsafe {
                    (
                        _mm256_loadu_si256(r.biases.add(ch).cast()),
                        _mm256_loadu_ps(r.steps.add(ch)),
                    )
                }
            };
            let escaped = _mm256_cmpeq_epi32(sym, esc);
            let mut q = _mm256_add_epi32(sym, bias);
            if !rho.is_null() {
                // SAFETY: ch + 8 <= c <= rho.len() and this block's state's length.
                unsafe {
                    let st = r.state.add(ch).cast::<__m256i>();
                    let w = _mm256_loadu_si256(rho.add(ch).cast());
                    // w in 0..=8 and the state in ±127: one i16 product per i32 lane (the
                    // high halves of w are zero), cheaper than a 32-bit multiply.
                    let pred = _mm256_srai_epi32::<3>(_mm256_add_epi32(
                        _mm256_madd_epi16(w, _mm256_loadu_si256(st)),
                        four,
                    ));
                    q = _mm256_add_epi32(q, pred);
                    let res = _mm256_add_epi32(_mm256_sub_epi32(sym, m_sym), pred);
                    let res = _mm256_min_epi32(_mm256_max_epi32(res, neg_lim), lim);
                    _mm256_storeu_si256(st, _mm256_andnot_si256(escaped, res));
                }
            }
            let v = _mm256_mul_ps(_mm256_cvtepi32_ps(q), step);
            // SAFETY: (8k + 8) * es <= elems * es == out.len().
            let dst = unsafe { r.out.add(8 * k * es) };
            if DT == F16 {
                unsafe { _mm_storeu_si128(dst.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)) };
            } else if DT == F32 {
                unsafe { _mm256_storeu_ps(dst.cast(), v) };
            } else {
                // Round to nearest even on the bits (values are finite): add 0x7FFF plus
                // the lowest kept bit, keep the high half.
                let bits = _mm256_castps_si256(v);
                let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
                let h = _mm256_srli_epi32::<16>(_mm256_add_epi32(
                    _mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)),
                    lsb,
                ));
                let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(h, h));
                unsafe { _mm_storeu_si128(dst.cast(), _mm256_castsi256_si128(packed)) };
            }
            let em = _mm256_movemask_ps(_mm256_castsi256_ps(escaped));
            // SAFETY: k < steps = esc's length.
            unsafe { *r.esc.add(k) = em as u8 };
        }
        ch += LANES;
        if ch == c {
            ch = 0;
            row += 1;
        }
    }
    let low = _mm256_set1_epi32(1 << 16);
    for j in 0..N {
        let done = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(x[j], low))) == 0xFF;
        outcome[j] = if pos[j] != raw[j].n {
            Outcome::Words {
                have: raw[j].n,
                used: pos[j],
            }
        } else if !done {
            Outcome::BadEnd
        } else {
            Outcome::Ok
        };
    }
    outcome
}
