//! Static, interleaved rANS: the entropy coder of the `kv-*` profiles.
//!
//! One [`FreqTable`] (at most [`MAX_SYMBOLS`] symbols, frequencies summing to
//! 2^[`PROB_BITS`]) codes many independent *streams*; each stream interleaves [`LANES`]
//! rANS states over its symbols (symbol `i` goes to lane `i % LANES`), so a CPU core gets
//! instruction-level parallelism from one stream and a GPU warp can take one stream per
//! thread. Streams carry no symbol count: the caller knows it from the tensor geometry, so a
//! hostile stream can never make the decoder loop or allocate.
//!
//! Parameters (fixed, so CPU and GPU decoders agree bit for bit): 32-bit states normalised
//! to `[2^16, 2^32)`, 16-bit little-endian renormalisation words, 12-bit probabilities.
//! With 12-bit probabilities a 4096-entry slot table per frequency table decodes a symbol
//! with one lookup, one multiply and one add; tables are shared by whole `(layer, K/V)`
//! parts, so there are few of them and each is cheap to ship (`1 + 2n` bytes).
//!
//! Stream layout: `LANES` initial states (each as two words, low then high), then the
//! renormalisation words in the order the decoder consumes them. The encoder runs backwards
//! (rANS is last-in first-out) and reverses its output. A correct stream leaves every lane
//! in state `2^16` with every word consumed; the decoder checks both, which catches most
//! damage even without the container checksum.

use crate::error::CodecError;

/// Bits of probability precision: frequencies sum to `1 << PROB_BITS`.
pub const PROB_BITS: u32 = 12;
/// Sum of the frequencies of every table.
pub const PROB_SCALE: u32 = 1 << PROB_BITS;
/// Largest alphabet a table may have.
pub const MAX_SYMBOLS: usize = 64;
/// Interleaved states per stream.
pub const LANES: usize = 8;
/// Lower bound of the normalised state interval (and the encoder's initial state).
const RANS_L: u32 = 1 << 16;

/// A static frequency table: `freq[s]` of `1 << PROB_BITS` for each symbol `s < len()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreqTable {
    freq: Vec<u16>,
    /// `cum[s]` = sum of `freq[..s]`; one entry longer than `freq`.
    cum: Vec<u32>,
    /// Per symbol, what the encoder needs: frequency, start and `floor(2^32 / freq)`;
    /// [`MAX_SYMBOLS`] entries, zero beyond the table.
    enc_padded: [EncSym; MAX_SYMBOLS],
}

/// One symbol's encoder entry: the division `x / freq` becomes a multiply by `rcp` and
/// at most one correction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct EncSym {
    freq: u32,
    cum: u32,
    rcp: u64,
}

impl FreqTable {
    /// Builds a table from symbol counts (`counts.len()` symbols, at most [`MAX_SYMBOLS`]).
    ///
    /// Every symbol with a non-zero count gets a frequency of at least 1, so anything that
    /// was counted can be coded; symbols never seen get 0. With no counts at all, symbol 0
    /// takes all the probability.
    pub fn from_counts(counts: &[u64]) -> Result<FreqTable, CodecError> {
        let n = counts.len();
        if n == 0 || n > MAX_SYMBOLS {
            return Err(CodecError::Corrupt(format!(
                "frequency table with {n} symbols (1..={MAX_SYMBOLS} allowed)"
            )));
        }
        let total: u64 = counts.iter().sum();
        let mut freq = vec![0u32; n];
        if total == 0 {
            freq[0] = PROB_SCALE;
        } else {
            for (f, &c) in freq.iter_mut().zip(counts) {
                if c > 0 {
                    // u128: counts may be up to the tensor size, times 4096.
                    let scaled =
                        (u128::from(c) * u128::from(PROB_SCALE) + u128::from(total) / 2) / u128::from(total);
                    *f = (scaled as u32).max(1);
                }
            }
            // Rounding leaves the sum off by at most one per symbol: give or take the
            // difference from the most frequent symbols, which can afford it best.
            let mut sum: u32 = freq.iter().sum();
            while sum != PROB_SCALE {
                let (i, _) = freq
                    .iter()
                    .enumerate()
                    .max_by_key(|&(_, &f)| f)
                    .ok_or_else(|| CodecError::Corrupt("empty frequency table".into()))?;
                if sum > PROB_SCALE {
                    if freq[i] <= 1 {
                        // Only possible with more present symbols than probability slots,
                        // which MAX_SYMBOLS < PROB_SCALE rules out.
                        return Err(CodecError::Corrupt("cannot normalise frequency table".into()));
                    }
                    freq[i] -= 1;
                    sum -= 1;
                } else {
                    freq[i] += 1;
                    sum += 1;
                }
            }
        }
        FreqTable::from_freqs(freq.into_iter().map(|f| f as u16).collect())
    }

    /// Builds a table from frequencies, checking that they sum to `1 << PROB_BITS`.
    pub fn from_freqs(freq: Vec<u16>) -> Result<FreqTable, CodecError> {
        if freq.is_empty() || freq.len() > MAX_SYMBOLS {
            return Err(CodecError::Corrupt(format!(
                "frequency table with {} symbols (1..={MAX_SYMBOLS} allowed)",
                freq.len()
            )));
        }
        let mut cum = Vec::with_capacity(freq.len() + 1);
        let mut acc = 0u32;
        cum.push(0);
        for &f in &freq {
            acc += u32::from(f);
            cum.push(acc);
        }
        if acc != PROB_SCALE {
            return Err(CodecError::Corrupt(format!(
                "frequency table sums to {acc}, expected {PROB_SCALE}"
            )));
        }
        let mut enc_padded = [EncSym::default(); MAX_SYMBOLS];
        for ((e, &f), &c) in enc_padded.iter_mut().zip(&freq).zip(&cum) {
            *e = EncSym {
                freq: u32::from(f),
                cum: c,
                rcp: if f > 0 { (1u64 << 32) / u64::from(f) } else { 0 },
            };
        }
        Ok(FreqTable {
            freq,
            cum,
            enc_padded,
        })
    }

    /// Symbol `s`'s encoder entry (`s < MAX_SYMBOLS`): frequency, start and
    /// `floor(2^32 / freq)` (0 without frequency).
    pub(crate) fn enc_entry(&self, s: usize) -> (u32, u32, u64) {
        let e = self.enc_padded[s];
        (e.freq, e.cum, e.rcp)
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.freq.len()
    }

    /// Always false: a table has at least one symbol.
    pub fn is_empty(&self) -> bool {
        self.freq.is_empty()
    }

    /// Frequency of `s` (0 if out of range).
    pub fn freq(&self, s: usize) -> u32 {
        self.freq.get(s).map_or(0, |&f| u32::from(f))
    }

    /// Serialised form: `n` (u8), then `n` little-endian u16 frequencies.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.freq.len() as u8);
        for f in &self.freq {
            out.extend_from_slice(&f.to_le_bytes());
        }
    }

    /// Parses the form written by [`FreqTable::write`], returning the table and the bytes
    /// consumed.
    pub fn read(bytes: &[u8]) -> Result<(FreqTable, usize), CodecError> {
        let short = || CodecError::Corrupt("frequency table truncated".into());
        let n = usize::from(*bytes.first().ok_or_else(short)?);
        let body = bytes.get(1..1 + 2 * n).ok_or_else(short)?;
        let freq = body
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Ok((FreqTable::from_freqs(freq)?, 1 + 2 * n))
    }

    /// Estimated bits to code `counts` with this table (for choosing among tables).
    pub fn cost_bits(&self, counts: &[u64]) -> f64 {
        counts
            .iter()
            .enumerate()
            .filter(|&(_, &c)| c > 0)
            .map(|(s, &c)| {
                let f = self.freq(s).max(1) as f64 / f64::from(PROB_SCALE);
                -(c as f64) * f.log2()
            })
            .sum()
    }
}

/// Encodes `symbols` as one interleaved stream with `table`, appending the bytes to `out`.
///
/// Every symbol must have a non-zero frequency in `table`.
#[inline(always)]
pub fn encode(
    symbols: &[u8],
    table: &FreqTable,
    words: &mut Vec<u16>,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    encode_with(symbols, table, words, out, true)
}

/// [`encode`], with the AVX2 encoder allowed (`simd`) or not: both write the same bytes.
#[inline(always)]
pub(crate) fn encode_with(
    symbols: &[u8],
    table: &FreqTable,
    words: &mut Vec<u16>,
    out: &mut Vec<u8>,
    simd: bool,
) -> Result<(), CodecError> {
    encode_group_with(
        &[symbols],
        table,
        std::slice::from_mut(words),
        std::slice::from_mut(out),
        simd,
    )
}

/// Streams [`encode_group`] codes side by side at most.
pub const GROUP: usize = 4;

/// Encodes up to [`GROUP`] streams under one table into `outs` (cleared first), with
/// `words` as scratch (one per stream): exactly what [`encode`] writes for each, but the
/// AVX2 encoder runs streams of equal length side by side (one stream's steps are one
/// dependency chain). Fails if any stream has a symbol without frequency.
pub fn encode_group(
    streams: &[&[u8]],
    table: &FreqTable,
    words: &mut [Vec<u16>],
    outs: &mut [Vec<u8>],
) -> Result<(), CodecError> {
    for o in outs.iter_mut() {
        o.clear();
    }
    encode_group_with(streams, table, words, outs, true)
}

/// [`encode_group`] (appending to `outs`), with the AVX2 encoder allowed or not.
#[inline(always)]
pub(crate) fn encode_group_with(
    streams: &[&[u8]],
    table: &FreqTable,
    words: &mut [Vec<u16>],
    outs: &mut [Vec<u8>],
    simd: bool,
) -> Result<(), CodecError> {
    let n = streams.len();
    if n > GROUP || words.len() < n || outs.len() < n {
        return Err(CodecError::Compression(format!(
            "{n} streams in one rANS group (at most {GROUP}, with {} word and {} output buffers)",
            words.len(),
            outs.len()
        )));
    }
    let enc = &table.enc_padded;
    let mut st = [[RANS_L; LANES]; GROUP];
    let mut k = [0usize; GROUP];
    let mut bad = false;
    // Every renormalisation word is written (at most one per symbol, then the states),
    // and the write position advances only when one is due: no branch per symbol.
    // Symbols run backwards: first each stream's tail beyond whole groups of LANES.
    for j in 0..n {
        let (sym, w) = (streams[j], &mut words[j]);
        w.clear();
        w.resize(sym.len() + 2 * LANES, 0);
        let full = sym.len() / LANES * LANES;
        for (l, &s) in sym[full..].iter().enumerate().rev() {
            st[j][l] = step(enc, w, &mut k[j], &mut bad, st[j][l], s);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if simd
        && n > 0
        && crate::rans_avx2::available()
        && streams
            .iter()
            .all(|s| s.len() / LANES == streams[0].len() / LANES)
    {
        // SAFETY: the CPU has AVX2 and POPCNT (checked just above); the streams' whole
        // groups have one length; each `words` holds its stream's length + 2 * LANES
        // words and `k` counts at most the tail's symbols.
        let ok = unsafe {
            match n {
                1 => vector::<1>(streams, table, &mut st, words, &mut k),
                2 => vector::<2>(streams, table, &mut st, words, &mut k),
                3 => vector::<3>(streams, table, &mut st, words, &mut k),
                _ => vector::<4>(streams, table, &mut st, words, &mut k),
            }
        };
        for j in 0..n {
            finish(st[j], ok && !bad, k[j], &mut words[j], &mut outs[j])?;
        }
        return Ok(());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd;
    for j in 0..n {
        let (sym, w) = (streams[j], &mut words[j]);
        let full = sym.len() / LANES * LANES;
        let [mut x0, mut x1, mut x2, mut x3, mut x4, mut x5, mut x6, mut x7] = st[j];
        let kj = &mut k[j];
        // Lanes alternate: consecutive steps are independent, and the states stay in
        // registers.
        for c in sym[..full].chunks_exact(LANES).rev() {
            x7 = step(enc, w, kj, &mut bad, x7, c[7]);
            x6 = step(enc, w, kj, &mut bad, x6, c[6]);
            x5 = step(enc, w, kj, &mut bad, x5, c[5]);
            x4 = step(enc, w, kj, &mut bad, x4, c[4]);
            x3 = step(enc, w, kj, &mut bad, x3, c[3]);
            x2 = step(enc, w, kj, &mut bad, x2, c[2]);
            x1 = step(enc, w, kj, &mut bad, x1, c[1]);
            x0 = step(enc, w, kj, &mut bad, x0, c[0]);
        }
        st[j] = [x0, x1, x2, x3, x4, x5, x6, x7];
    }
    for j in 0..n {
        finish(st[j], !bad, k[j], &mut words[j], &mut outs[j])?;
    }
    Ok(())
}

/// The AVX2 encoder over the whole groups of `N` streams.
///
/// # Safety
/// As [`crate::rans_avx2::encode_chunks`]: AVX2 and POPCNT, streams whose whole groups
/// have one length, `words[j]` at least `streams[j].len() + LANES` past `k[j]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn vector<const N: usize>(
    streams: &[&[u8]],
    table: &FreqTable,
    st: &mut [[u32; LANES]; GROUP],
    words: &mut [Vec<u16>],
    k: &mut [usize; GROUP],
) -> bool {
    let full = streams[0].len() / LANES * LANES;
    let (mut sts, mut ws, mut ks) = (st.iter_mut(), words.iter_mut(), k.iter_mut());
    let mut lanes: [crate::rans_avx2::Lane<'_>; N] = std::array::from_fn(|j| {
        // N <= GROUP <= each array's length (checked by the caller).
        let (Some(st), Some(w), Some(k)) = (sts.next(), ws.next(), ks.next()) else {
            unreachable!("N <= GROUP buffers")
        };
        crate::rans_avx2::Lane {
            chunks: &streams[j][..full],
            st,
            words: w.as_mut_slice(),
            k,
        }
    });
    // SAFETY: the caller's contract.
    unsafe { crate::rans_avx2::encode_chunks::<N>(&mut lanes, table) }
}

/// One encoder step of state `x` with symbol `s` (hot path: per symbol one table entry, a
/// renormalisation and `x / freq` as a multiply by the reciprocal plus one correction; a
/// hardware division costs tens of cycles). Symbols without frequency (or beyond the
/// table) set `bad` and are refused after the loop; until then the arithmetic wraps
/// harmlessly.
#[inline(always)]
fn step(enc: &[EncSym; MAX_SYMBOLS], words: &mut [u16], k: &mut usize, bad: &mut bool, x: u32, s: u8) -> u32 {
    let e = enc[usize::from(s) % MAX_SYMBOLS];
    *bad |= e.freq == 0 || usize::from(s) >= MAX_SYMBOLS;
    // x_max = ((RANS_L >> PROB_BITS) << 16) * freq; as u64 since freq may be 4096.
    let need = u64::from(x) >= u64::from(e.freq) << (32 - PROB_BITS);
    words[*k] = x as u16;
    *k += usize::from(need);
    let y = std::hint::select_unpredictable(need, x >> 16, x);
    let (q, r) = div_rem(y, e);
    (q << PROB_BITS).wrapping_add(r).wrapping_add(e.cum)
}

/// Ends a stream: refuses it unless `ok`, then writes the final states and the `k`
/// renormalisation words, all reversed.
fn finish(
    states: [u32; LANES],
    ok: bool,
    k: usize,
    words: &mut Vec<u16>,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    if !ok {
        return Err(CodecError::Compression(
            "a symbol has no frequency in its table".into(),
        ));
    }
    words.truncate(k);
    for &x in states.iter().rev() {
        words.push((x >> 16) as u16);
        words.push(x as u16);
    }
    out.reserve(words.len() * 2);
    for w in words.iter().rev() {
        out.extend_from_slice(&w.to_le_bytes());
    }
    Ok(())
}

/// `(x / freq, x % freq)` for `freq > 0` without a division: `rcp = floor(2^32 / freq)`,
/// so `x * rcp / 2^32` lies in `(x / freq - 1, x / freq]` (as `x < 2^32`); the estimate is
/// the quotient or one less, and the remainder says which.
#[inline(always)]
fn div_rem(x: u32, e: EncSym) -> (u32, u32) {
    // Wrapping: the encoder also runs this on entries without frequency (rcp 0) before
    // it refuses them.
    let q = ((u64::from(x) * e.rcp) >> 32) as u32;
    let r = x.wrapping_sub(q.wrapping_mul(e.freq));
    let fix = r >= e.freq;
    (q + u32::from(fix), r.wrapping_sub(if fix { e.freq } else { 0 }))
}

/// A frequency table prepared for decoding: one packed entry per probability slot.
#[derive(Clone)]
pub struct DecodeTable {
    /// Per slot: `freq | (slot - cum) << 13 | symbol << 25`.
    slots: Box<[u32; PROB_SCALE as usize]>,
}

impl DecodeTable {
    /// Prepares `table` for decoding.
    pub fn new(table: &FreqTable) -> DecodeTable {
        let mut slots = Box::new([0u32; PROB_SCALE as usize]);
        for s in 0..table.len() {
            let (lo, hi) = (table.cum[s], table.cum[s + 1]);
            let freq = hi - lo;
            for slot in lo..hi {
                // freq <= 4096 (13 bits), slot - lo < 4096 (12 bits), s < 64 (6 bits).
                slots[slot as usize] = freq | ((slot - lo) << 13) | ((s as u32) << 25);
            }
        }
        DecodeTable { slots }
    }

    /// The packed slots (for the vector decoder).
    pub(crate) fn slots(&self) -> &[u32; PROB_SCALE as usize] {
        &self.slots
    }

    /// Rebuilds this table in place for `table` (no allocation).
    pub fn rebuild(&mut self, table: &FreqTable) {
        for s in 0..table.len() {
            let (lo, hi) = (table.cum[s], table.cum[s + 1]);
            let freq = hi - lo;
            for slot in lo..hi {
                self.slots[slot as usize] = freq | ((slot - lo) << 13) | ((s as u32) << 25);
            }
        }
    }
}

impl Default for DecodeTable {
    fn default() -> Self {
        DecodeTable::new(&FreqTable {
            freq: vec![PROB_SCALE as u16],
            cum: vec![0, PROB_SCALE],
            enc_padded: [EncSym::default(); MAX_SYMBOLS],
        })
    }
}

/// Decodes exactly `out.len()` symbols from `stream` (which must be the whole stream).
///
/// Fails, without reading out of bounds, if the stream is too short, too long or does not
/// end in the encoder's initial state.
pub fn decode(stream: &[u8], table: &DecodeTable, out: &mut [u8]) -> Result<(), CodecError> {
    decode_with(stream, table, out, &mut Vec::new())
}

/// [`decode`] with a caller's word buffer (reused between streams, so decoding does not
/// allocate once warm).
pub(crate) fn decode_with(
    stream: &[u8],
    table: &DecodeTable,
    out: &mut [u8],
    words: &mut Vec<u16>,
) -> Result<(), CodecError> {
    if !stream.len().is_multiple_of(2) || stream.len() < 4 * LANES {
        return Err(CodecError::Corrupt(format!(
            "rANS stream of {} bytes",
            stream.len()
        )));
    }
    let (head, body) = stream.split_at(4 * LANES);
    let mut states = [0u32; LANES];
    for (x, b) in states.iter_mut().zip(head.chunks_exact(4)) {
        *x = u32::from(u16::from_le_bytes([b[0], b[1]])) | u32::from(u16::from_le_bytes([b[2], b[3]])) << 16;
        if *x < RANS_L {
            return Err(CodecError::Corrupt(
                "rANS initial state below the normalised interval".into(),
            ));
        }
    }
    // The renormalisation words, plus one 0 that every read past the end lands on: a
    // damaged stream may ask for more words than it has, and the final count check
    // catches that without a branch per read.
    let n = body.len() / 2;
    words.clear();
    words.extend(body.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])));
    words.push(0);
    let words = &words[..=n];
    let slots = &*table.slots;
    let mut pos = 0usize;
    // Hot path (decode): per symbol one table lookup, one multiply-add and a branch-free
    // refill (the refill is needed about once per 16 bits of output, at random: a branch
    // there mispredicts often). The next word is always read, and taken with a select.
    // `pos` keeps counting past the end, which the final check catches.
    let step = |x: &mut u32, pos: &mut usize| -> u8 {
        let e = slots[(*x & (PROB_SCALE - 1)) as usize];
        let y = (e & 0x1FFF) * (*x >> PROB_BITS) + ((e >> 13) & 0xFFF);
        let need = u32::from(y < RANS_L);
        let w = u32::from(words[(*pos).min(n)]);
        // Arithmetic select: written as `if`, the compiler emits a branch.
        let mask = need.wrapping_neg();
        *x = (y & !mask) | (((y << 16) | w) & mask);
        *pos += need as usize;
        (e >> 25) as u8
    };
    let mut chunks = out.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (o, x) in c.iter_mut().zip(states.iter_mut()) {
            *o = step(x, &mut pos);
        }
    }
    for (o, x) in chunks.into_remainder().iter_mut().zip(states.iter_mut()) {
        *o = step(x, &mut pos);
    }
    if pos != n {
        return Err(CodecError::Corrupt(format!(
            "rANS stream has {} words, decoding used {}",
            n + 2 * LANES,
            pos + 2 * LANES
        )));
    }
    if states.iter().any(|&x| x != RANS_L) {
        return Err(CodecError::Corrupt(
            "rANS stream does not end in its initial state".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(symbols: &[u8], table: &FreqTable) -> Vec<u8> {
        let mut bytes = Vec::new();
        encode(symbols, table, &mut Vec::new(), &mut bytes).unwrap();
        let mut back = vec![0xFFu8; symbols.len()];
        decode(&bytes, &DecodeTable::new(table), &mut back).unwrap();
        back
    }

    fn counts_of(symbols: &[u8], n: usize) -> Vec<u64> {
        let mut c = vec![0u64; n];
        for &s in symbols {
            c[usize::from(s)] += 1;
        }
        c
    }

    #[test]
    fn skewed_source_codes_near_its_entropy() {
        // A geometric-ish source over 16 symbols, deterministic.
        let mut seed = 0x1234_5678u32;
        let symbols: Vec<u8> = (0..100_000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                (seed.trailing_zeros().min(15)) as u8
            })
            .collect();
        let counts = counts_of(&symbols, 16);
        let table = FreqTable::from_counts(&counts).unwrap();
        let mut bytes = Vec::new();
        encode(&symbols, &table, &mut Vec::new(), &mut bytes).unwrap();
        let n = symbols.len() as f64;
        let entropy: f64 = counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| -(c as f64) * (c as f64 / n).log2())
            .sum();
        let bits = bytes.len() as f64 * 8.0;
        assert!(bits < entropy * 1.01 + 256.0, "{bits} bits vs entropy {entropy}");
        assert_eq!(round_trip(&symbols, &table), symbols);
    }

    #[test]
    fn tables_serialise_and_refuse_bad_sums() {
        let t = FreqTable::from_counts(&[5, 0, 3, 1]).unwrap();
        assert_eq!(t.freq(1), 0);
        let mut b = Vec::new();
        t.write(&mut b);
        assert_eq!(FreqTable::read(&b).unwrap(), (t, b.len()));
        assert!(FreqTable::read(&b[..b.len() - 1]).is_err());
        assert!(FreqTable::from_freqs(vec![1, 2, 3]).is_err());
        assert!(FreqTable::from_freqs(vec![]).is_err());
        assert!(FreqTable::from_counts(&[1; MAX_SYMBOLS + 1]).is_err());
        assert_eq!(FreqTable::from_counts(&[0, 0]).unwrap().freq(0), PROB_SCALE);
        let mut zero_n = b.clone();
        zero_n[0] = 0;
        assert!(FreqTable::read(&zero_n).is_err());
    }

    #[test]
    fn reciprocal_division_is_exact() {
        for freq in 1..=PROB_SCALE {
            let e = EncSym {
                freq,
                cum: 0,
                rcp: (1u64 << 32) / u64::from(freq),
            };
            // The encoder divides states below x_max = freq << 20; check around every
            // multiple of freq near both ends and at a spread of points in between.
            let x_max = (u64::from(freq) << 20).min(u64::from(u32::MAX));
            let mut xs: Vec<u64> = (0..64).chain(x_max.saturating_sub(64)..x_max).collect();
            xs.extend((1..200u64).map(|k| k * (x_max / 200) / u64::from(freq) * u64::from(freq)));
            for x in xs {
                for x in [x.saturating_sub(1), x, x + 1] {
                    let x = x.min(u64::from(u32::MAX)) as u32;
                    assert_eq!(div_rem(x, e), (x / freq, x % freq), "{x} / {freq}");
                }
            }
        }
        let e = EncSym {
            freq: 3,
            cum: 0,
            rcp: (1u64 << 32) / 3,
        };
        assert_eq!(div_rem(u32::MAX, e), (u32::MAX / 3, u32::MAX % 3));
    }

    #[test]
    fn unencodable_symbol_is_an_error() {
        let t = FreqTable::from_counts(&[1, 0]).unwrap();
        assert!(encode(&[1], &t, &mut Vec::new(), &mut Vec::new()).is_err());
    }

    #[test]
    fn empty_and_short_inputs() {
        let t = FreqTable::from_counts(&[1, 1]).unwrap();
        assert_eq!(round_trip(&[], &t), Vec::<u8>::new());
        assert_eq!(round_trip(&[1], &t), vec![1]);
        let d = DecodeTable::new(&t);
        assert!(decode(&[], &d, &mut []).is_err());
        assert!(decode(&[0; 15], &d, &mut []).is_err());
    }

    fn table_and_symbols() -> impl Strategy<Value = (FreqTable, Vec<u8>)> {
        prop::collection::vec(0u64..1000, 1..=MAX_SYMBOLS)
            .prop_filter("some count", |c| c.iter().any(|&x| x > 0))
            .prop_flat_map(|counts| {
                let table = FreqTable::from_counts(&counts).unwrap();
                let present: Vec<u8> = (0..counts.len())
                    .filter(|&s| counts[s] > 0)
                    .map(|s| s as u8)
                    .collect();
                (
                    Just(table),
                    prop::collection::vec(prop::sample::select(present), 0..3000),
                )
            })
    }

    proptest! {
        #[test]
        fn round_trips((table, symbols) in table_and_symbols()) {
            prop_assert_eq!(round_trip(&symbols, &table), symbols);
        }

        /// The AVX2 encoder writes the scalar encoder's bytes (single-symbol tables
        /// included), and refuses exactly what it refuses: a symbol without frequency or
        /// beyond the alphabet.
        #[test]
        fn vector_encoder_matches_scalar(
            (table, mut symbols) in table_and_symbols(),
            bad in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
        ) {
            if let Some((at, s)) = bad.filter(|_| !symbols.is_empty()) {
                let i = at.index(symbols.len());
                symbols[i] = s;
            }
            let run = |simd| {
                let mut bytes = Vec::new();
                encode_with(&symbols, &table, &mut Vec::new(), &mut bytes, simd).map(|()| bytes)
            };
            let (scalar, vector) = (run(false), run(true));
            prop_assert_eq!(scalar.is_ok(), vector.is_ok());
            if let (Ok(a), Ok(b)) = (scalar, vector) {
                prop_assert_eq!(a, b);
            }
        }

        /// Streams coded side by side are each the bytes of coding it alone, vector or
        /// scalar, for equal and unequal lengths; one bad stream fails the group.
        #[test]
        fn group_encoding_matches_single_streams(
            (table, symbols) in table_and_symbols(),
            n in 1usize..=GROUP,
            cut in prop::collection::vec(0usize..40, GROUP),
            equal in any::<bool>(),
        ) {
            let streams: Vec<&[u8]> = (0..n)
                .map(|j| {
                    let drop = if equal { 0 } else { cut[j].min(symbols.len()) };
                    &symbols[drop..]
                })
                .collect();
            let alone: Vec<Vec<u8>> = streams
                .iter()
                .map(|s| {
                    let mut b = Vec::new();
                    encode_with(s, &table, &mut Vec::new(), &mut b, false).map(|()| b)
                })
                .collect::<Result<_, _>>()?;
            for simd in [false, true] {
                let (mut words, mut outs) = (vec![Vec::new(); n], vec![vec![7u8]; n]);
                encode_group_with(&streams, &table, &mut words, &mut outs, simd)?;
                for (o, a) in outs.iter().zip(&alone) {
                    prop_assert_eq!(o[0], 7, "appends");
                    prop_assert_eq!(&o[1..], &a[..]);
                }
            }
            if !streams[0].is_empty() && table.len() < MAX_SYMBOLS {
                let mut broken = streams[0].to_vec();
                broken[0] = (MAX_SYMBOLS - 1) as u8;
                let mut with_bad: Vec<&[u8]> = streams.clone();
                with_bad[0] = &broken;
                let (mut words, mut outs) = (vec![Vec::new(); n], vec![Vec::new(); n]);
                prop_assert!(encode_group(&with_bad, &table, &mut words, &mut outs).is_err());
            }
            let (mut words, mut outs) = (vec![Vec::new(); GROUP + 1], vec![Vec::new(); GROUP + 1]);
            prop_assert!(encode_group(&[&symbols[..]; GROUP + 1], &table, &mut words, &mut outs).is_err());
        }

        #[test]
        fn counts_always_normalise(counts in prop::collection::vec(0u64..u64::MAX / 8192, 1..=MAX_SYMBOLS)) {
            let t = FreqTable::from_counts(&counts)?;
            for (s, &c) in counts.iter().enumerate() {
                prop_assert_eq!(c > 0, t.freq(s) > 0);
            }
        }

        #[test]
        fn damaged_streams_fail_or_decode_without_panic(
            (table, symbols) in table_and_symbols(),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
            cut in any::<prop::sample::Index>(),
            extra in 0usize..8,
        ) {
            let mut bytes = Vec::new();
            encode(&symbols, &table, &mut Vec::new(), &mut bytes)?;
            let d = DecodeTable::new(&table);
            let mut out = vec![0u8; symbols.len()];
            let mut bad = bytes.clone();
            let i = at.index(bad.len());
            bad[i] ^= xor;
            // A flipped bit must be detected in the state or the word count, or (rarely)
            // decode to different symbols; it must never panic.
            if decode(&bad, &d, &mut out).is_ok() {
                prop_assert!(out != symbols || bad == bytes);
            }
            let short = &bytes[..cut.index(bytes.len())];
            prop_assert!(decode(short, &d, &mut out).is_err());
            // Asking for more symbols than were coded runs out of words, unless one symbol
            // has all the probability (it costs nothing, so any count decodes).
            let mut longer = vec![0u8; symbols.len() + 1 + extra];
            if (0..table.len()).all(|s| table.freq(s) < PROB_SCALE) {
                prop_assert!(decode(&bytes, &d, &mut longer).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            n in 0usize..2000,
            counts in prop::collection::vec(0u64..50, 1..=MAX_SYMBOLS),
        ) {
            let t = FreqTable::from_counts(&counts)?;
            let mut out = vec![0u8; n];
            let _ = decode(&bytes, &DecodeTable::new(&t), &mut out);
            let _ = FreqTable::read(&bytes);
        }
    }
}
