//! AVX2 rANS encoding, chosen at run time by [`crate::rans::encode`]: a stream's eight
//! interleaved states are the eight 32-bit lanes of one vector, and up to four streams of
//! one table run side by side ([`crate::rans::encode_group`]). Per eight symbols: two
//! gathers of the symbols' table entries (off the dependency chain: they depend only on
//! the symbols), the renormalisation test, one shuffle that packs the low halves of the
//! lanes that emit a word in the scalar encoder's order (lane 7 first), and the division
//! by the frequency as a multiply by the reciprocal with one correction, as in the scalar
//! encoder. It writes exactly the scalar encoder's words (test
//! `vector_encoder_matches_scalar`), so the streams are the same bytes.

use std::arch::x86_64::*;

use crate::rans::{FreqTable, LANES, MAX_SYMBOLS, PROB_BITS};

/// For each mask of the lanes that emit a renormalisation word, the byte shuffle that
/// packs their low 16 bits (lane `l` at bytes `2l, 2l + 1` of the source) in the order
/// the scalar encoder writes them: lane 7 first, down to lane 0; unused bytes zero.
static PACK: [[u8; 16]; 256] = {
    let mut t = [[0x80u8; 16]; 256];
    let mut m = 0;
    while m < 256 {
        let (mut l, mut at) = (8, 0);
        while l > 0 {
            l -= 1;
            if m & (1 << l) != 0 {
                t[m][at] = 2 * l as u8;
                t[m][at + 1] = 2 * l as u8 + 1;
                at += 2;
            }
        }
        m += 1;
    }
    t
};

/// Whether this CPU can run [`encode_chunks`].
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("popcnt")
}

/// One stream being encoded by [`encode_chunks`]: its symbols (whole groups of [`LANES`],
/// coded last group first), its eight states, where its renormalisation words go and how
/// many have been written.
pub(crate) struct Lane<'a> {
    pub(crate) chunks: &'a [u8],
    pub(crate) st: &'a mut [u32; LANES],
    pub(crate) words: &'a mut [u16],
    pub(crate) k: &'a mut usize,
}

/// Runs the encoder over `N` streams of equal length side by side (one stream's steps
/// form a dependency chain; several keep the core busy), each from its states, writing
/// renormalisation words at `words[*k..]` as the scalar encoder does. Returns false if a
/// symbol of any stream is beyond [`MAX_SYMBOLS`] or has no frequency (the words and
/// states are then meaningless).
///
/// # Safety
/// The CPU must have AVX2 and POPCNT ([`available`]); every lane's `chunks` has the same
/// length, a multiple of [`LANES`], and `words.len() >= *k + chunks.len() + LANES` (each
/// store writes eight words at the current position).
#[target_feature(enable = "avx2,popcnt")]
pub(crate) unsafe fn encode_chunks<const N: usize>(lanes: &mut [Lane<'_>; N], table: &FreqTable) -> bool {
    let len = lanes[0].chunks.len();
    debug_assert!(len.is_multiple_of(LANES));
    debug_assert!(
        lanes
            .iter()
            .all(|l| l.chunks.len() == len && l.words.len() >= *l.k + len + LANES)
    );
    // The table as two arrays of 32-bit lanes for the gathers: `freq | cum << 16` (a
    // frequency is at most 2^12 and a start below it) and the reciprocal. A frequency of 1
    // has the reciprocal 2^32, which does not fit: 2^32 - 1 gives the quotient one less,
    // and the correction step restores it, as it does for any other frequency.
    let (mut fc, mut rcp) = ([0u32; MAX_SYMBOLS], [0u32; MAX_SYMBOLS]);
    for s in 0..MAX_SYMBOLS {
        let e = table.enc_entry(s);
        fc[s] = e.0 | e.1 << 16;
        rcp[s] = e.2.min(u64::from(u32::MAX)) as u32;
    }
    let lo16 = _mm256_set1_epi32(0xFFFF);
    let mut x = [_mm256_setzero_si256(); N];
    let mut at = [0usize; N];
    for j in 0..N {
        // SAFETY: `st` holds eight u32.
        x[j] = unsafe { _mm256_loadu_si256(lanes[j].st.as_ptr().cast()) };
        at[j] = *lanes[j].k;
    }
    let mut seen = _mm256_setzero_si256();
    let mut no_freq = _mm256_setzero_si256();
    let mut i = len;
    while i >= LANES {
        i -= LANES;
        for j in 0..N {
            // SAFETY: i + 8 <= len = this lane's chunk length.
            let s = _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(lanes[j].chunks.as_ptr().add(i).cast()) });
            seen = _mm256_or_si256(seen, s);
            let idx = _mm256_and_si256(s, _mm256_set1_epi32(MAX_SYMBOLS as i32 - 1));
            // SAFETY: idx < MAX_SYMBOLS, the arrays' length.
            let (e, rc) = unsafe {
                (
                    _mm256_i32gather_epi32::<4>(fc.as_ptr().cast(), idx),
                    _mm256_i32gather_epi32::<4>(rcp.as_ptr().cast(), idx),
                )
            };
            let (f, cm) = (_mm256_and_si256(e, lo16), _mm256_srli_epi32::<16>(e));
            no_freq = _mm256_or_si256(no_freq, _mm256_cmpeq_epi32(f, _mm256_setzero_si256()));
            // need = x >= freq << (32 - PROB_BITS), unsigned; freq <= 4096 makes the bound
            // 2^32 (never reached) only for a single-symbol table, where it wraps to 0
            // here: that lane's freq << 20 is 0 and `max(x, 0) == x` would say "need". A
            // table of one symbol of frequency 4096 is thus handled apart (bound 2^32:
            // never).
            let xj = x[j];
            let thr = _mm256_slli_epi32::<{ 32 - PROB_BITS as i32 }>(f);
            let full = _mm256_cmpeq_epi32(f, _mm256_set1_epi32(1 << PROB_BITS));
            let need = _mm256_andnot_si256(full, _mm256_cmpeq_epi32(_mm256_max_epu32(xj, thr), xj));
            let mask = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as usize;
            // Low halves of the lanes, packed to eight u16 in lane order, then shuffled.
            let halves = _mm256_and_si256(xj, lo16);
            let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(halves, halves));
            let words8 = _mm_shuffle_epi8(
                _mm256_castsi256_si128(packed),
                // SAFETY: PACK[mask] is 16 bytes.
                unsafe { _mm_loadu_si128(PACK[mask].as_ptr().cast()) },
            );
            // SAFETY: at + 8 <= words.len() (at <= *k + symbols so far, see the contract).
            unsafe { _mm_storeu_si128(lanes[j].words.as_mut_ptr().add(at[j]).cast(), words8) };
            at[j] += mask.count_ones() as usize;
            let y = _mm256_blendv_epi8(xj, _mm256_srli_epi32::<16>(xj), need);
            // q = (y * rcp) >> 32 per lane: even lanes from one 32x32->64 multiply, odd
            // lanes from another on the shifted inputs.
            let even = _mm256_srli_epi64::<32>(_mm256_mul_epu32(y, rc));
            let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(y), _mm256_srli_epi64::<32>(rc));
            let q = _mm256_blend_epi32::<0b1010_1010>(even, odd);
            let r = _mm256_sub_epi32(y, _mm256_mullo_epi32(q, f));
            // r >= f (unsigned): the estimate was one short.
            let fix = _mm256_cmpeq_epi32(_mm256_max_epu32(r, f), r);
            let q = _mm256_sub_epi32(q, fix);
            let r = _mm256_sub_epi32(r, _mm256_and_si256(fix, f));
            x[j] = _mm256_add_epi32(
                _mm256_add_epi32(_mm256_slli_epi32::<{ PROB_BITS as i32 }>(q), r),
                cm,
            );
        }
    }
    for j in 0..N {
        // SAFETY: `st` holds eight u32.
        unsafe { _mm256_storeu_si256(lanes[j].st.as_mut_ptr().cast(), x[j]) };
        *lanes[j].k = at[j];
    }
    let beyond = _mm256_andnot_si256(_mm256_set1_epi32(MAX_SYMBOLS as i32 - 1), seen);
    _mm256_testz_si256(beyond, beyond) == 1 && _mm256_testz_si256(no_freq, no_freq) == 1
}
