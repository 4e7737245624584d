//! The `cachegen-baseline` profile: a re-implementation of the codec that CacheGen
//! releases in LMCache (`cachegen_basics.py`, `cal_cdf.cu`, `ac_enc.cu`, `ac_dec.cu`;
//! specified in `shared/research/cachegen-codec.md` §3, §8), kept so that every benchmark
//! can put kvault's profiles side by side with it. It is not meant to be used for storage.
//!
//! Per layer, separately for K and V:
//! - bins by layer group, LMCache's fallback for models it does not list: keys 32 bins
//!   for layers 0–9 and 16 after, values 32 for layers 0–1 and 16 after (models with fewer
//!   than 10 layers: 32 everywhere); `MAX = bins/2 - 1`;
//! - one abs-max scale per token over all channels (`s = max_c |x|`, kept in the source
//!   dtype), symbols `q = round_half_even(x * (MAX/s) + MAX)` computed in f32;
//! - one 16-bit CDF per channel built from the chunk's own symbols with the exact integer
//!   construction of `cal_cdf.cu` (`cdf[k] = floor((0xFFFF - max_bins) * cum[k] / T) + k`,
//!   `Lp = max_bins + 1 = 33` entries), shipped with the chunk as int16;
//! - the torchac-style 32-bit binary arithmetic coder with pending-bit (E3) handling and
//!   MSB-first bit packing, one stream per (channel, 256-token sub-chunk), with a u32
//!   length per stream.
//!
//! Decoding gives `x̂ = (q - MAX) / MAX * s` in f32.
//!
//! **Error bound**: `|x - x̂| <= s / (2 MAX) + 2^-20 * s` (s = the token's abs-max), plus
//! the rounding of the output dtype.
//!
//! Where this can differ from the original:
//! - Layout: kvault containers are per layer, so each layer's payload holds its K then V
//!   scales, CDFs, stream lengths and streams; LMCache pickles one object per chunk with
//!   all streams of `[2L, C]` concatenated. The byte count differs only by the 3-byte layer
//!   header and the container framing; lengths are u32 here, int32 there (same size).
//! - The bins are written into each layer's payload; LMCache rebuilds them from the model
//!   name on decode.
//! - `Lp` is fixed at `max_bins + 1` of the schedule (33, since layer 0 always has 32
//!   bins); LMCache takes the maximum over the layers in the chunk, which is the same
//!   value whenever the chunk holds every layer.
//! - Histogram counters are u32 and the CDF product is u64 (upstream: uint16 counters and
//!   u32 products, which overflow above 65,535 tokens per chunk).
//! - A zero scale (an all-zero token) codes every symbol as `MAX` (upstream divides by
//!   zero), and a subnormal scale divides before multiplying (upstream's `MAX/s` overflows).
//! - Streams have no 256-byte cap (upstream's GPU buffer is unchecked); bits read past a
//!   stream's end are 0, as in upstream's zero-padded shared buffer.
//! - Dequantization runs in f32 on the CPU; upstream uses torch ops on the GPU, which round
//!   the same way for `(q - MAX) / MAX * s` but may fuse differently.

use crate::error::CodecError;
use crate::plan::{CachegenPart, CachegenPlan, CachegenStream, LayerPlace, index, input_offset};
use crate::profile::payload::PayloadReader;
use crate::profile::{LayerGeom, Scratch, load_f32, store_f32};
use crate::tensor::Dtype;

/// Tokens per arithmetic-coded stream (`CACHEGEN_GPU_MAX_TOKENS_PER_CHUNK`).
const SUB_CHUNK_TOKENS: usize = 256;
/// Largest bin count of the schedule; CDFs have `MAX_BINS + 1` entries.
const MAX_BINS: u32 = 32;
/// Entries per channel CDF.
const LP: usize = MAX_BINS as usize + 1;
/// Renormalisation steps allowed per symbol; a valid stream needs at most about 18.
const MAX_RENORM: u32 = 64;

/// LMCache's bins for (keys, values) of absolute layer `layer` of a `total`-layer model.
pub(crate) fn bins(layer: u32, total: u32) -> (u32, u32) {
    if total < 10 {
        return (32, 32);
    }
    (if layer < 10 { 32 } else { 16 }, if layer < 2 { 32 } else { 16 })
}

fn unencodable(what: &'static str) -> CodecError {
    CodecError::Unencodable {
        profile: "cachegen-baseline",
        what,
    }
}

pub(super) fn encode_layer(
    layer: &[u8],
    dtype: Dtype,
    geom: LayerGeom,
    scratch: &mut Scratch,
) -> Result<Vec<u8>, CodecError> {
    let (bins_k, bins_v) = bins(geom.index, geom.total_layers);
    load_f32(layer, dtype, &mut scratch.f32s);
    let (t, c, n) = (geom.tokens, geom.channels, geom.part_elems());
    let mut out = vec![bins_k as u8, bins_v as u8, LP as u8];
    let mut syms = std::mem::take(&mut scratch.syms);
    for (part, bins) in scratch.f32s.chunks_exact(n).zip([bins_k, bins_v]) {
        let max = (bins / 2 - 1) as f32;
        syms.clear();
        // Scales: abs-max per token, exact in the source dtype (a max of its own values).
        let mut scales = Vec::with_capacity(t);
        for row in part.chunks_exact(c) {
            let mut s = 0f32;
            for &x in row {
                if !x.is_finite() {
                    return Err(unencodable("a non-finite element"));
                }
                s = s.max(x.abs());
            }
            scales.push(s);
            let bytes = match dtype {
                Dtype::F16 => half::f16::from_f32(s).to_bits().to_le_bytes().to_vec(),
                Dtype::Bf16 => half::bf16::from_f32(s).to_bits().to_le_bytes().to_vec(),
                Dtype::F32 => s.to_le_bytes().to_vec(),
            };
            out.extend_from_slice(&bytes);
            let factor = if s > 0.0 { max / s } else { 0.0 };
            if factor.is_finite() {
                syms.extend(
                    row.iter()
                        .map(|&x| (x * factor + max).round_ties_even().clamp(0.0, 2.0 * max) as u8),
                );
            } else {
                // A subnormal scale: MAX/s overflows, so divide first (upstream would emit NaN).
                syms.extend(
                    row.iter()
                        .map(|&x| (x / s * max + max).round_ties_even().clamp(0.0, 2.0 * max) as u8),
                );
            }
        }
        // Per-channel CDFs (cal_cdf.cu).
        let mut cdfs = vec![0u16; c * LP];
        let mut count = vec![0u32; c * MAX_BINS as usize];
        for row in syms.chunks_exact(c) {
            for (ch, &q) in row.iter().enumerate() {
                count[ch * MAX_BINS as usize + usize::from(q)] += 1;
            }
        }
        let a = u64::from(0xFFFF - MAX_BINS);
        for (cdf, cnt) in cdfs
            .chunks_exact_mut(LP)
            .zip(count.chunks_exact(MAX_BINS as usize))
        {
            let mut cum = 0u64;
            for (k, v) in cdf.iter_mut().enumerate() {
                *v = (a * cum / t as u64 + k as u64) as u16;
                cum += u64::from(cnt.get(k).copied().unwrap_or(0));
            }
        }
        for v in &cdfs {
            out.extend_from_slice(&v.to_le_bytes());
        }
        // Streams: per 256-token sub-chunk, per channel; lengths first.
        let mut lengths = Vec::new();
        let mut streams = Vec::new();
        let mut column = Vec::with_capacity(SUB_CHUNK_TOKENS);
        for sub in syms.chunks(SUB_CHUNK_TOKENS * c) {
            for ch in 0..c {
                column.clear();
                column.extend(sub.chunks_exact(c).map(|row| row[ch]));
                let before = streams.len();
                ac_encode(&column, &cdfs[ch * LP..(ch + 1) * LP], &mut streams);
                lengths.push((streams.len() - before) as u32);
            }
        }
        for l in lengths {
            out.extend_from_slice(&l.to_le_bytes());
        }
        out.extend_from_slice(&streams);
    }
    scratch.syms = syms;
    Ok(out)
}

/// MSB-first bit packer.
struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u8,
    n: u8,
}

impl BitWriter<'_> {
    fn bit(&mut self, b: bool) {
        self.acc = (self.acc << 1) | u8::from(b);
        self.n += 1;
        if self.n == 8 {
            self.out.push(self.acc);
            self.acc = 0;
            self.n = 0;
        }
    }

    fn bit_plus_pending(&mut self, b: bool, pending: &mut u64) {
        self.bit(b);
        for _ in 0..*pending {
            self.bit(!b);
        }
        *pending = 0;
    }

    fn finish(self) {
        if self.n > 0 {
            self.out.push(self.acc << (8 - self.n));
        }
    }
}

/// The interval update shared by encoder and decoder (ac_enc.cu / ac_dec.cu).
fn narrow(low: &mut u32, high: &mut u32, cdf: &[u16], s: usize) {
    let range = u64::from(*high - *low) + 1;
    let c_lo = u64::from(cdf[s]);
    let c_hi = if s == LP - 2 {
        0x10000
    } else {
        u64::from(cdf[s + 1])
    };
    *high = (u64::from(*low) + ((range * c_hi) >> 16)).wrapping_sub(1) as u32;
    *low = low.wrapping_add(((range * c_lo) >> 16) as u32);
}

/// Encodes one stream of symbols with one channel CDF (`cdf.len() == LP`).
fn ac_encode(symbols: &[u8], cdf: &[u16], out: &mut Vec<u8>) {
    let mut w = BitWriter { out, acc: 0, n: 0 };
    let (mut low, mut high, mut pending) = (0u32, u32::MAX, 0u64);
    for &s in symbols {
        narrow(&mut low, &mut high, cdf, usize::from(s));
        loop {
            if high < 0x8000_0000 {
                w.bit_plus_pending(false, &mut pending);
                low <<= 1;
                high = (high << 1) | 1;
            } else if low >= 0x8000_0000 {
                w.bit_plus_pending(true, &mut pending);
                low <<= 1;
                high = (high << 1) | 1;
            } else if low >= 0x4000_0000 && high < 0xC000_0000 {
                pending += 1;
                low = (low << 1) & 0x7FFF_FFFF;
                high = (high << 1) | 0x8000_0001;
            } else {
                break;
            }
        }
    }
    pending += 1;
    w.bit_plus_pending(low >= 0x4000_0000, &mut pending);
    w.finish();
}

/// Decodes `out.len()` symbols of one stream; bits past the end read as 0.
fn ac_decode(stream: &[u8], cdf: &[u16], out: &mut [u8]) -> Result<(), CodecError> {
    let bit_at = |i: usize| -> u32 { stream.get(i / 8).map_or(0, |b| u32::from(b >> (7 - i % 8)) & 1) };
    let mut value = 0u32;
    for i in 0..32 {
        value = (value << 1) | bit_at(i);
    }
    let mut next = 32usize;
    let (mut low, mut high) = (0u32, u32::MAX);
    let n = out.len();
    for (i, o) in out.iter_mut().enumerate() {
        let range = u64::from(high - low) + 1;
        let count = (((u64::from(value.wrapping_sub(low)) + 1) * 65536 - 1) / range) as u16;
        // Largest s <= LP - 2 with cdf[s] <= count; cdf[0] == 0 was checked.
        let s = cdf[..LP - 1].partition_point(|&v| v <= count).saturating_sub(1);
        *o = s as u8;
        if i + 1 == n {
            break;
        }
        narrow(&mut low, &mut high, cdf, s);
        let mut steps = 0;
        loop {
            if low >= 0x8000_0000 || high < 0x8000_0000 {
                low <<= 1;
                high = (high << 1) | 1;
                value = (value << 1) | bit_at(next);
            } else if low >= 0x4000_0000 && high < 0xC000_0000 {
                low = (low << 1) & 0x7FFF_FFFF;
                high = (high << 1) | 0x8000_0001;
                value = (value.wrapping_sub(0x4000_0000) << 1) | bit_at(next);
            } else {
                break;
            }
            next += 1;
            steps += 1;
            if steps > MAX_RENORM {
                return Err(CodecError::Corrupt(
                    "cachegen-baseline stream does not renormalise".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Reads one part's header: its bins check, per-token scales (as f32, appended to
/// `scales`) and per-channel CDFs (checked, appended to `cdfs`). Returns `MAX` (= bins/2 - 1).
/// Shared by the decoder and the decode planner.
fn read_part_header(
    r: &mut PayloadReader<'_>,
    bins: u8,
    dtype: Dtype,
    t: usize,
    c: usize,
    scales: &mut Vec<f32>,
    cdfs: &mut Vec<u16>,
) -> Result<u8, CodecError> {
    if !matches!(bins, 4..=32) {
        return Err(CodecError::Corrupt(format!("cachegen-baseline bins {bins}")));
    }
    let mut part_scales = Vec::with_capacity(t);
    load_f32(r.take(t * dtype.size())?, dtype, &mut part_scales);
    scales.extend(part_scales);
    let at = cdfs.len();
    cdfs.extend(
        r.take(c * LP * 2)?
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]])),
    );
    for cdf in cdfs[at..].chunks_exact(LP) {
        if cdf[0] != 0 || cdf.windows(2).any(|w| w[0] >= w[1]) {
            return Err(CodecError::Corrupt(
                "cachegen-baseline CDF not strictly increasing from 0".into(),
            ));
        }
    }
    Ok(bins / 2 - 1)
}

pub(super) fn decode_layer(
    payload: &[u8],
    dtype: Dtype,
    geom: LayerGeom,
    out_dtype: Dtype,
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<(), CodecError> {
    let (t, c, n) = (geom.tokens, geom.channels, geom.part_elems());
    let mut r = PayloadReader::new(payload, "cachegen-baseline");
    let (bins_k, bins_v, lp) = (r.u8()?, r.u8()?, r.u8()?);
    if usize::from(lp) != LP {
        return Err(CodecError::Corrupt(format!(
            "cachegen-baseline Lp {lp}, expected {LP}"
        )));
    }
    let mut syms = std::mem::take(&mut scratch.syms);
    syms.clear();
    syms.resize(n, 0);
    let mut column = vec![0u8; SUB_CHUNK_TOKENS.min(t)];
    let row_bytes = c * out_dtype.size();
    let result = (|| {
        for (out_part, bins) in out.chunks_exact_mut(n * out_dtype.size()).zip([bins_k, bins_v]) {
            let (mut scales, mut cdfs) = (Vec::with_capacity(t), Vec::with_capacity(c * LP));
            let max = f32::from(read_part_header(
                &mut r,
                bins,
                dtype,
                t,
                c,
                &mut scales,
                &mut cdfs,
            )?);
            let subs = t.div_ceil(SUB_CHUNK_TOKENS);
            let len_bytes = r.take(subs * c * 4)?;
            let mut lengths = len_bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            for (sub, sub_syms) in syms.chunks_mut(SUB_CHUNK_TOKENS * c).enumerate() {
                let tokens = (t - sub * SUB_CHUNK_TOKENS).min(SUB_CHUNK_TOKENS);
                for ch in 0..c {
                    let len = lengths.next().unwrap_or(0) as usize;
                    let stream = r.take(len)?;
                    ac_decode(stream, &cdfs[ch * LP..(ch + 1) * LP], &mut column[..tokens])?;
                    for (row, &q) in sub_syms.chunks_exact_mut(c).zip(&column[..tokens]) {
                        row[ch] = q;
                    }
                }
            }
            let rowf = &mut scratch.f32s;
            rowf.clear();
            rowf.resize(c, 0.0);
            for ((q, o), &s) in syms
                .chunks_exact(c)
                .zip(out_part.chunks_exact_mut(row_bytes))
                .zip(&scales)
            {
                for (x, &q) in rowf.iter_mut().zip(q) {
                    *x = (f32::from(q) - max) / max * s;
                }
                store_f32(rowf, out_dtype, o, &mut scratch.halfs);
            }
        }
        r.finish()
    })();
    scratch.syms = syms;
    result
}

/// Adds one layer's parts and streams to a decode plan (see `plan.rs`), with the checks of
/// [`decode_layer`] short of running the streams.
pub(crate) fn plan_layer(
    payload: &[u8],
    dtype: Dtype,
    place: LayerPlace,
    plan: &mut CachegenPlan,
) -> Result<(), CodecError> {
    let (t, c) = (place.tokens, place.channels);
    let mut r = PayloadReader::new(payload, "cachegen-baseline");
    let (bins_k, bins_v, lp) = (r.u8()?, r.u8()?, r.u8()?);
    if usize::from(lp) != LP {
        return Err(CodecError::Corrupt(format!(
            "cachegen-baseline Lp {lp}, expected {LP}"
        )));
    }
    for (kind, bins) in [bins_k, bins_v].into_iter().enumerate() {
        let scale_start = index(plan.scales.len())?;
        let cdf_start = index(plan.cdfs.len())?;
        let max = read_part_header(&mut r, bins, dtype, t, c, &mut plan.scales, &mut plan.cdfs)?;
        let part = index(plan.parts.len())?;
        plan.parts.push(CachegenPart {
            out_slot: place.out_slot + kind as u32,
            token_offset: place.token_offset,
            scale_start,
            cdf_start,
            max: u32::from(max),
            reserved: [0; 3],
        });
        let subs = t.div_ceil(SUB_CHUNK_TOKENS);
        let lengths: Vec<u32> = r
            .take(subs * c * 4)?
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut lengths = lengths.into_iter();
        for sub in 0..subs {
            let token_start = sub * SUB_CHUNK_TOKENS;
            for ch in 0..c {
                let len = lengths.next().unwrap_or(0);
                let stream = r.take(len as usize)?;
                plan.streams.push(CachegenStream {
                    part,
                    channel: ch as u32,
                    token_start: token_start as u32,
                    tokens: (t - token_start).min(SUB_CHUNK_TOKENS) as u32,
                    data_offset: input_offset(payload, stream, place.payload_offset),
                    data_len: len,
                    reserved: 0,
                });
            }
        }
    }
    r.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_follow_lmcache_fallback() {
        assert_eq!(bins(0, 30), (32, 32));
        assert_eq!(bins(1, 30), (32, 32));
        assert_eq!(bins(2, 30), (32, 16));
        assert_eq!(bins(9, 30), (32, 16));
        assert_eq!(bins(10, 30), (16, 16));
        assert_eq!(bins(5, 9), (32, 32));
    }

    fn uniform_cdf(n_pow: u32) -> Vec<u16> {
        // A CDF giving each of the first 2^n_pow symbols 1/2^n_pow, others the minimum.
        let mut counts = vec![0u64; MAX_BINS as usize];
        for c in counts.iter_mut().take(1 << n_pow) {
            *c = 1;
        }
        let total = 1u64 << n_pow;
        let a = u64::from(0xFFFF - MAX_BINS);
        let mut cum = 0;
        (0..LP)
            .map(|k| {
                let v = (a * cum / total + k as u64) as u16;
                cum += counts.get(k).copied().unwrap_or(0);
                v
            })
            .collect()
    }

    #[test]
    fn arithmetic_coder_round_trips() {
        let cdf = uniform_cdf(4);
        let symbols: Vec<u8> = (0..256).map(|i| ((i * 7) % 16) as u8).collect();
        let mut bytes = Vec::new();
        ac_encode(&symbols, &cdf, &mut bytes);
        // ~4 bits per symbol plus the tail.
        assert!(bytes.len() <= 129 && bytes.len() >= 127, "{}", bytes.len());
        let mut back = vec![0u8; symbols.len()];
        ac_decode(&bytes, &cdf, &mut back).unwrap();
        assert_eq!(back, symbols);
    }

    #[test]
    fn decoder_survives_garbage() {
        let cdf = uniform_cdf(3);
        let mut out = vec![0u8; 300];
        for seed in 0..50u8 {
            let bytes: Vec<u8> = (0..40).map(|i| i as u8 ^ seed.wrapping_mul(37)).collect();
            let _ = ac_decode(&bytes, &cdf, &mut out);
        }
        let _ = ac_decode(&[], &cdf, &mut out);
    }
}

#[cfg(test)]
mod bound_tests {
    use super::bins;
    use crate::Profile;
    use crate::profile::testdata::{decoded_f32, structured};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip_within_half_a_level((t, seen) in structured()) {
            let blob = crate::encode(t.view(), Profile::CachegenBaseline)?;
            let got = decoded_f32(&blob);
            let s = t.shape();
            let c = (s.kv_heads * s.head_dim) as usize;
            let part = s.tokens as usize * c;
            for (p, (xp, yp)) in seen.chunks_exact(part).zip(got.chunks_exact(part)).enumerate() {
                let (bk, bv) = bins((p / 2) as u32, s.layers);
                let max = f64::from(if p % 2 == 0 { bk } else { bv } / 2 - 1);
                for (xr, yr) in xp.chunks_exact(c).zip(yp.chunks_exact(c)) {
                    // The scale as stored: the row's abs-max, exact in every source dtype.
                    let scale = f64::from(xr.iter().fold(0f32, |m, x| m.max(x.abs())));
                    let bound = scale / (2.0 * max) + scale * 2f64.powi(-20);
                    for (&x, &y) in xr.iter().zip(yr) {
                        prop_assert!(f64::from(x - y).abs() <= bound, "{x} vs {y}, bound {bound}");
                    }
                }
            }
        }
    }
}
