//! AVX2 + F16C decoding of one `kv-*` block, chosen at run time ([`available`]): the eight
//! interleaved rANS lanes of a stream are the eight 32-bit lanes of one vector (one gather
//! for the table lookups, one permute hands out the renormalisation words), fused with
//! dequantization and the conversion to the output dtype, so each symbol is touched once.
//!
//! It computes exactly what the portable path of `kv.rs` computes (`(s + bias) as f32 *
//! step`, rounded once to the output dtype, words consumed in symbol order), and the tests
//! check the two give the same bytes and the same errors, so it stays bit-exact with the
//! GPU decoder too. It needs `channels % 8 == 0` (eight consecutive symbols then lie in one
//! row), which every real model has; other shapes take the portable path.

use std::arch::x86_64::*;

use crate::error::CodecError;
use crate::rans::{LANES, PROB_SCALE};
use crate::tensor::Dtype;

/// Whether this CPU can run [`decode_block`].
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
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

/// What a block decodes with, besides its stream.
pub(crate) struct BlockParams<'a> {
    /// The part's decode table (`DecodeTable` slots: `freq | (slot - cum) << 13 | s << 25`).
    pub(crate) slots: &'a [u32; PROB_SCALE as usize],
    /// Channels per token (a multiple of 8).
    pub(crate) channels: usize,
    /// Groups are tokens (one bias and step per row) rather than channels.
    pub(crate) per_token: bool,
    /// Per group: `zero - M` (the block's tokens when per token, all channels otherwise).
    pub(crate) biases: &'a [i32],
    /// Per group: the step, indexed like `biases`.
    pub(crate) steps: &'a [f32],
    /// The escape symbol `2M + 1`.
    pub(crate) esc_sym: u8,
    /// Output dtype of `out`.
    pub(crate) out_dtype: Dtype,
}

/// Decodes one block of `out.len() / out_dtype.size()` elements from `stream`, writing
/// every element's `(s + bias) * step` into `out` and the positions of escape symbols
/// (whose values the caller patches) into `escapes`. `words` is scratch.
///
/// Fails like `rans::decode` on a stream that is too short, too long or does not end in
/// the initial state, and on parameters that do not fit the block.
pub(crate) fn decode_block(
    stream: &[u8],
    p: &BlockParams<'_>,
    out: &mut [u8],
    words: &mut Vec<u16>,
    escapes: &mut Vec<u32>,
) -> Result<(), CodecError> {
    let c = p.channels;
    let elems = out.len() / p.out_dtype.size();
    let rows = if c == 0 { 0 } else { elems / c };
    let groups_needed = if p.per_token { rows } else { c };
    if c == 0
        || !c.is_multiple_of(LANES)
        || elems != rows * c
        || out.len() != elems * p.out_dtype.size()
        || p.biases.len() < groups_needed
        || p.steps.len() < groups_needed
    {
        return Err(CodecError::Corrupt(format!(
            "kv block of {elems} elements does not fit the vector decoder ({c} channels)"
        )));
    }
    if !stream.len().is_multiple_of(2) || stream.len() < 4 * LANES {
        return Err(CodecError::Corrupt(format!(
            "rANS stream of {} bytes",
            stream.len()
        )));
    }
    let (head, body) = stream.split_at(4 * LANES);
    let n = body.len() / 2;
    // The renormalisation words and 8 zeros, so that an 8-word load at any position up to
    // `n` stays inside (a damaged stream's reads past the end see zeros, as in the
    // portable decoder, and the final count check catches them).
    words.clear();
    words.extend(body.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])));
    words.extend_from_slice(&[0; LANES]);
    escapes.clear();
    if !available() {
        return Err(CodecError::Corrupt(
            "vector decoder unavailable on this CPU".into(),
        ));
    }
    // SAFETY: AVX2 and F16C are present (checked above); the checks above make every
    // load and store of the kernel fall inside `head`, `words`, `p.biases`, `p.steps`,
    // `p.slots` and `out` (see the comments there).
    let (pos, final_ok) = unsafe { kernel(head, words, n, p, out, elems, escapes) };
    if pos != n {
        return Err(CodecError::Corrupt(format!(
            "rANS stream has {} words, decoding used {}",
            n + 2 * LANES,
            pos + 2 * LANES
        )));
    }
    match final_ok {
        Ok(true) => Ok(()),
        Ok(false) => Err(CodecError::Corrupt(
            "rANS stream does not end in its initial state".into(),
        )),
        Err(e) => Err(e),
    }
}

/// The vector loop. Returns the words consumed and whether every lane ended in the
/// initial state (or the initial-state error).
#[target_feature(enable = "avx2,f16c")]
unsafe fn kernel(
    head: &[u8],
    words: &[u16],
    n: usize,
    p: &BlockParams<'_>,
    out: &mut [u8],
    elems: usize,
    escapes: &mut Vec<u32>,
) -> (usize, Result<bool, CodecError>) {
    let c = p.channels;
    // `head` is 32 bytes: lane l's state is the little-endian u32 at 4l (low word first).
    let mut x = unsafe { _mm256_loadu_si256(head.as_ptr().cast()) };
    let low = _mm256_set1_epi32(1 << 16);
    // x < 2^16 (unsigned) per lane: x >> 16 == 0.
    let below = _mm256_cmpeq_epi32(_mm256_srli_epi32::<16>(x), _mm256_setzero_si256());
    if _mm256_movemask_ps(_mm256_castsi256_ps(below)) != 0 {
        return (
            n,
            Err(CodecError::Corrupt(
                "rANS initial state below the normalised interval".into(),
            )),
        );
    }
    let slot_mask = _mm256_set1_epi32(PROB_SCALE as i32 - 1);
    let freq_mask = _mm256_set1_epi32(0x1FFF);
    let off_mask = _mm256_set1_epi32(0xFFF);
    let esc = _mm256_set1_epi32(i32::from(p.esc_sym));
    let zero = _mm256_setzero_si256();
    let slots = p.slots.as_ptr().cast::<i32>();
    let size = p.out_dtype.size();
    let mut pos = 0usize;
    let (mut row, mut ch) = (0usize, 0usize);
    let mut i = 0usize;
    while i < elems {
        // Symbols i..i + 8 of the block, all in `row` (c is a multiple of 8), channels
        // ch..ch + 8 < c.
        let slot = _mm256_and_si256(x, slot_mask);
        // SAFETY: slot < 4096 = p.slots.len().
        let e = unsafe { _mm256_i32gather_epi32::<4>(slots, slot) };
        let freq = _mm256_and_si256(e, freq_mask);
        let off = _mm256_and_si256(_mm256_srli_epi32::<13>(e), off_mask);
        let y = _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32::<12>(x)), off);
        let need = _mm256_cmpeq_epi32(_mm256_srli_epi32::<16>(y), zero);
        let m = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as usize;
        let at = pos.min(n);
        // SAFETY: words.len() == n + 8 and at <= n; m < 256.
        let w = unsafe { _mm256_cvtepu16_epi32(_mm_loadu_si128(words.as_ptr().add(at).cast())) };
        let idx = unsafe { _mm256_loadu_si256(PERM.as_ptr().add(m).cast()) };
        let wp = _mm256_permutevar8x32_epi32(w, idx);
        let refilled = _mm256_or_si256(_mm256_slli_epi32::<16>(y), wp);
        x = _mm256_blendv_epi8(y, refilled, need);
        pos += m.count_ones() as usize;
        // Dequantize: (s + bias) wraps in i32 like the portable path's wrapping_add, then
        // converts (round to nearest) and multiplies in f32.
        let sym = _mm256_srli_epi32::<25>(e);
        let (bias, step) = if p.per_token {
            // SAFETY: row < rows <= biases.len(), steps.len().
            unsafe {
                (
                    _mm256_set1_epi32(*p.biases.get_unchecked(row)),
                    _mm256_set1_ps(*p.steps.get_unchecked(row)),
                )
            }
        } else {
            // SAFETY: ch + 8 <= c <= biases.len(), steps.len().
            unsafe {
                (
                    _mm256_loadu_si256(p.biases.as_ptr().add(ch).cast()),
                    _mm256_loadu_ps(p.steps.as_ptr().add(ch)),
                )
            }
        };
        let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(sym, bias)), step);
        // SAFETY: (i + 8) * size <= elems * size == out.len().
        let dst = unsafe { out.as_mut_ptr().add(i * size) };
        match p.out_dtype {
            Dtype::F16 => unsafe {
                _mm_storeu_si128(dst.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
            },
            Dtype::F32 => unsafe { _mm256_storeu_ps(dst.cast(), v) },
            Dtype::Bf16 => {
                // Round to nearest even on the bits (values are finite): add 0x7FFF plus
                // the lowest kept bit, keep the high half.
                let bits = _mm256_castps_si256(v);
                let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
                let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(
                    _mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)),
                    lsb,
                ));
                let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(r, r));
                unsafe { _mm_storeu_si128(dst.cast(), _mm256_castsi256_si128(packed)) };
            }
        }
        let em = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(sym, esc)));
        if em != 0 {
            let mut bits = em as u32;
            while bits != 0 {
                escapes.push((i + bits.trailing_zeros() as usize) as u32);
                bits &= bits - 1;
            }
        }
        i += LANES;
        ch += LANES;
        if ch == c {
            ch = 0;
            row += 1;
        }
    }
    let done = _mm256_cmpeq_epi32(x, low);
    (pos, Ok(_mm256_movemask_ps(_mm256_castsi256_ps(done)) == 0xFF))
}
