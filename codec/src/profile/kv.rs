//! The `kv-hi`, `kv-mid` and `kv-lo` profiles: uniform scalar quantization with
//! KIVI-style grouping, entropy coded with the interleaved rANS of `rans.rs`.
//!
//! Per layer:
//! - **Keys per channel, values per token** (KIVI, KVQuant): each value token (over its
//!   channels) is a *group* with its own zero point (the group mean, rounded to a multiple
//!   of its step Δ) and its own step byte. Keys are grouped per channel; in payload format
//!   2 per (row, channel), a row being `group_tokens` consecutive tokens, with one step per
//!   row and the zero points coded as differences between neighbouring rows. Post-RoPE keys
//!   drift along positions (a channel pair rotates at its own frequency), so over a
//!   4096-token chunk one zero point per channel is far from most tokens; rows follow the
//!   drift for a few bits per (row, channel). How the steps are chosen is the encoder's
//!   business ([`KvTuning`]); the profiles use one key step per row (or per chunk),
//!   `Δ = f_K · σ_pool` (σ_pool the RMS over channels of their deviations within the row:
//!   what attention feels of a key error is `q · δk`, and queries are large in the same
//!   channels as keys, so steps proportional to each channel's σ put the largest errors
//!   where they cost most), and per value token `Δ = f_V · σ_pool · (σ_t / σ_pool)^1.5` (σ_t
//!   the token's RMS deviation from its mean, σ_pool their RMS over the chunk's tokens).
//! - The choices were measured on real SmolLM2-135M caches by the KL divergence of the
//!   model's next-token distributions (`kvault codec-eval`); see [`KvTuning::of`].
//! - **Symbols**: `q = round(x / Δ)`, residual `r = q - m` (m = zero point in steps). The
//!   alphabet is `r ∈ [-M, M]` plus one escape symbol, with `M ≤ 31` chosen per (layer,
//!   K/V) to minimise the estimated size. **Outliers are never clipped**: a residual beyond
//!   the alphabet is coded as the escape symbol and its exact value (a zigzag varint in
//!   the stream's escape bytes), so the error bound below holds for every element.
//! - **Entropy coding**: one 12-bit frequency table per (layer, K/V), shared by all its
//!   groups (after per-group normalisation the groups' residuals share one distribution;
//!   the table costs `1 + 2(2M+2)` bytes against CacheGen's `66 · channels`); symbols in
//!   canonical `[token][channel]` order, cut into blocks of `block_tokens` tokens, each
//!   block an independent 8-lane rANS stream, so blocks decode in parallel (on x86-64 with
//!   AVX2 and F16C, `kv_avx2.rs` decodes a stream's eight lanes as one vector and four
//!   streams side by side, dequantizing as it goes; same bytes as the portable path).
//! - Step sizes are `Δ(e) = MANT[e mod 4] · 2^(e div 4 - 40)` for a byte `e` (a quarter-
//!   octave grid from 2^-40 to 2^24): exact in f32, so every decoder computes the same
//!   bits. A step is raised when needed so that `max |x| / Δ ≤ 2^29` (residuals fit i32).
//!
//! - **Prediction across tokens** (payload format 4, [`KvTuning::predict`]): in a part where
//!   it is estimated smaller, the coded symbol is `d = r − p` with `p = (ρ8_c · s_c + 4) >> 3`
//!   (arithmetic shift), `ρ8_c ∈ 0..=8` one weight per channel in eighths (least squares
//!   over the part), `s_c` the channel's state: the previous token's `r` in the same stream
//!   clamped to ±127, 0 at the stream's first token and after an escape. An escape (`|d| >
//!   M`) carries the whole `r`, so decoders patch escapes afterwards exactly as in other
//!   parts. Integer arithmetic throughout: CPU and GPU decoders agree bit for bit. This is
//!   lossless on the integers (the quantization is unchanged) and takes 8-11% of the keys'
//!   bits and 3-5% of the values' on SmolLM2 caches: neighbouring post-RoPE keys move
//!   together (slow channels rotate little per token) and a chunk's zero point is far from
//!   a local stretch's mean.
//!
//! Decoding computes `x̂ = (r + m) · Δ` in f32 (exception rows: their stored value).
//!
//! **Error bound** (every tuning): `|x - x̂| ≤ Δ/2 + 2^-22 · |x|` for every element,
//! with Δ the step of the element's group, plus the rounding of the output dtype when it
//! is narrower than f32. With Gaussian-like groups that is an RMS error of about
//! `0.29 · Δ`; the profiles' factors are in [`KvTuning::of`].
//!
//! **Exception tokens** (payload format 3): in a chunk that starts its sequence, the key
//! rows of the first token (the attention sink, which most heads weight most, so that its
//! key errors move every softmax; [`KvTuning::sink_tokens`]) are stored exactly, in the
//! source dtype, and replaced in the quantized part by their neighbour's rows, so that the
//! sink's outlying key (far from the channel means, with a small norm) does not widen
//! every channel's step either; decoders write the rows over what the streams decoded
//! there. On real SmolLM2 caches (`kvault codec-eval`, docs/figures.md) this one token
//! per sequence took a third of kv-mid's KL at 256-token chunks. Chunks further into a
//! sequence are coded as before (formats 1 and 2, byte for byte).
//!
//! Header parameters (5 bytes): format (1 to 4), probability bits 12, lanes 8,
//! `block_tokens` (u16). Without exception lists the encoder writes format 1 when no part
//! needs format 2's rows (chunks no longer than one row), so such chunks stay readable by
//! format-1 decoders. Layer payload, for K then V: in format 3 first the part's exception
//! list (varint count `n`; when `n > 0` the dtype id (u8), the first token and the gaps
//! between the following ones minus one (varints, so tokens strictly increase), then `n`
//! rows of `channels` little-endian elements); then `kind` (u8), then by kind
//! - 0 (format 1 and 2, groups are channels): one step byte `e` per channel, one zigzag
//!   varint `m` per channel;
//! - 1 (format 1 and 2, groups are tokens): one step byte per token, one zigzag varint per
//!   token;
//! - 2 (format 2 and 3, groups are (row, channel)): varint `group_blocks` (rows are
//!   `group_blocks · block_tokens` tokens, the last one shorter), one step byte per row,
//!   the zero points of row 0 (one zigzag varint per channel), and when there is more than
//!   one row the differences `m(r, c) - pred(r, c)` of rows 1.. as a coded integer
//!   sequence (below), where `pred(r, c) = m(r-1, c)` when the two rows have the same step
//!   and `round_ties_even(m(r-1, c) · Δ(r-1) / Δ(r))` in f64 otherwise (clamped to ±2^30);
//!
//! then (format 4) the prediction byte, 0 or 1, and when 1 the `channels` weights as
//! nibbles (channel `2i` in the low nibble of byte `i`; at least 8 channels), then `M`
//! (u8), the frequency table, then per block: varint rANS byte length, varint
//! escape byte length, the rANS stream, the escapes. A coded integer sequence (its length
//! known from the geometry) is `D` (u8, ≤ 31), a frequency table of `2D + 2` symbols
//! (`v + D` for `|v| ≤ D`, then the escape), varint rANS byte length, varint escape byte
//! length, one rANS stream of all its symbols, the escapes (zigzag varints).
//!
//! Not done (measured or not yet worth it): delta coding of the values themselves across
//! tokens (CacheGen#6 measured it larger at equal accuracy; prediction above works on the
//! integers after quantization instead), pre-RoPE keys (the codec does not
//! see RoPE parameters or positions, and un-rotating bit-exactly on CPU and GPU needs a
//! shared rotation table), value groups per (token, head).

use crate::error::CodecError;
use crate::plan::{ExactRow, LayerPlace, NOT_PREDICTED, RansPart, RansPlan, RansStream, index, input_offset};
use crate::profile::payload::{PayloadReader, put_svarint, put_varint, read_varint, unzigzag};
use crate::profile::{LayerGeom, Profile, Scratch, load_f32, store_f32};
use crate::rans::{self, DecodeTable, FreqTable};
use crate::tensor::{Dtype, KvView};

/// Payload format 1: key groups are channels over the whole chunk (kinds 0 and 1).
const FORMAT_V1: u8 = 1;
/// Payload format 2: adds key groups per (row of tokens, channel) (kind 2).
const FORMAT_V2: u8 = 2;
/// Payload format 3: format 2, and every part starts with its exception tokens, whose
/// rows are stored exactly (in the source dtype) instead of quantized.
const FORMAT_V3: u8 = 3;
/// Payload format 4: format 3, and every part says after its groups whether its residuals
/// are predicted from the previous token's in each channel (and with which weights).
const FORMAT_V4: u8 = 4;
/// Prediction weights are eighths: `ρ8 ∈ 0..=8`.
const MAX_RHO8: u8 = 8;
/// A predicted residual's state (the previous token's residual) is clamped to this
/// magnitude, so that predictions stay within ±127 (a byte per channel of GPU state).
const STATE_LIMIT: i32 = 127;
/// Most leading sink tokens a tuning may store exactly ([`KvTuning::sink_tokens`]).
const MAX_SINK_TOKENS: u32 = 64;

/// Shortest chunk the `kv-*` profiles code with key rows. On 256-token SmolLM2 chunks rows
/// lowered the KL by only 8% (against 47% at 4096 tokens, docs/figures.md) while they
/// quadrupled a GPU decode's per-group parameters and its host planning (the end-to-end
/// Llama-3-8B-shape decode fell from 2.1-2.5x to 1.1x the speed of copying fp16).
pub const KEY_ROWS_MIN_TOKENS: u32 = 512;
/// Symbols per rANS stream the encoder aims for: streams are the unit of parallel decoding
/// (eight GPU lanes each), so wide models get blocks of fewer tokens. About 8 K symbols
/// keep the per-stream overhead (32 bytes of initial states, two varints) near 1% while
/// giving a 256-token chunk of a Llama-3-8B-shaped cache 32 streams per part (measured on
/// an H200, `kvault-gpu-bench`: 376 GB/s of fp16 output with 16 K-symbol streams, 432 GB/s
/// with 8 K, for 0.6% more bytes; the GPU decoder is latency-bound).
const STREAM_SYMBOLS: usize = 8 * 1024;
/// Streams the CPU vector decoder takes side by side (`kv_avx2::MAX_STREAMS`).
const STREAMS_TOGETHER: usize = 4;
/// Bounds of the tokens per stream the encoder picks.
const BLOCK_TOKENS: (usize, usize) = (8, 64);
/// Largest residual magnitude with its own symbol (alphabet `2M + 2 <= 64`).
const MAX_M: usize = 31;
/// Residuals beyond this are assumed to cost this many extra bits as escapes.
const ESCAPE_BITS: f64 = 14.0;
/// The bound on `max |x| / Δ`, so that residuals and zero points fit in i32.
const MAX_RATIO: f64 = (1u64 << 29) as f64;
/// Bound of a zero-point prediction across rows of different steps.
const MAX_PREDICTION: f64 = (1u64 << 30) as f64;
/// Mantissas of the quarter-octave step grid: 2^0, 2^0.25, 2^0.5, 2^0.75 (f32 literals,
/// so every build and the GPU decoder read the same bits).
const MANT: [f32; 4] = [1.0, 1.189_207_1, std::f32::consts::SQRT_2, 1.681_792_8];
/// Exponent bias of the step grid: `e = 0` is `2^-40`.
const EXP_BIAS: i32 = 40;

/// The step of grid index `e`.
pub(crate) fn step(e: u8) -> f32 {
    let exp = i32::from(e >> 2) - EXP_BIAS; // -40..=23: normal f32, exact power of two
    MANT[usize::from(e & 3)] * f32::from_bits(((exp + 127) as u32) << 23)
}

/// How a part's quantization groups are laid out (the part's `kind` byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GroupKind {
    /// One group per channel, over all the chunk's tokens.
    Channels = 0,
    /// One group per token, over its channels.
    Tokens = 1,
    /// One group per (row of `group_tokens` tokens, channel); format 2.
    Rows = 2,
}

/// A part's group layout as decoders need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grouping {
    pub(crate) kind: GroupKind,
    /// Tokens per row ([`GroupKind::Rows`]; 0 otherwise).
    pub(crate) group_tokens: usize,
}

impl Grouping {
    /// Index of the group of the element at `token`, `channel` (of `c` channels).
    #[inline]
    pub(crate) fn group(&self, c: usize, token: usize, channel: usize) -> usize {
        match self.kind {
            GroupKind::Channels => channel,
            GroupKind::Tokens => token,
            GroupKind::Rows => token / self.group_tokens * c + channel,
        }
    }

    /// Index of the group of channel 0 at `token` for the channel kinds (the groups of a
    /// token's channels are consecutive from there).
    #[inline]
    fn row_start(&self, c: usize, token: usize) -> usize {
        match self.kind {
            GroupKind::Channels | GroupKind::Tokens => 0,
            GroupKind::Rows => token / self.group_tokens * c,
        }
    }
}

/// The encoder's choices for the `kv-*` profiles: how coarse the quantization steps are,
/// per layer and for keys and values. Every choice is written into the container (one
/// step per group), so any tuning decodes with the same decoders, CPU and GPU; the
/// profiles are fixed tunings ([`KvTuning::of`]), and [`crate::encode_tuned`] encodes with
/// another one (for rate-distortion experiments such as `kvault codec-eval --tune`).
#[derive(Clone, Debug, PartialEq)]
pub struct KvTuning {
    /// Step of key channels in units of the RMS over channels of their deviations.
    pub key_factor: f64,
    /// Step of each value token in units of its own RMS deviation.
    pub value_factor: f64,
    /// Key layers `0..ceil(L * early_keys)` get `early_scale` times the key factor.
    pub early_keys: f64,
    /// Value layers `0..ceil(L * early_values)` get `early_scale` times the value factor.
    pub early_values: f64,
    /// Factor multiplier of the early layer group (0.5: about one bit more).
    pub early_scale: f64,
    /// How key steps follow each channel's own spread: channel `c` gets
    /// `key_factor * σ_pool * (σ_c / σ_pool)^key_power` (σ_pool: the RMS over channels of
    /// their σ; the ratio is clamped to `[2^-8, 2^8]`). 0 is one step for all channels.
    /// Only for chunks coded without key rows (rows have one step for all channels).
    pub key_power: f64,
    /// The same for value tokens: 1 is a step proportional to each token's own σ.
    pub value_power: f64,
    /// Tokens per row of key groups, rounded to a whole number of the chunk's streams
    /// (payload format 2): a zero point per (row, channel) and a step per row. 0: one group
    /// per channel over the whole chunk. Chunks no longer than one row are coded without
    /// rows (format 1).
    pub key_group_tokens: u32,
    /// Chunks of fewer tokens are coded without key rows (format 1) whatever
    /// `key_group_tokens` says: over a short chunk keys drift little, and rows multiply
    /// the parameters a GPU decode plans and uploads (a 256-token Llama-3-8B chunk: 4×).
    pub key_rows_min_tokens: u32,
    /// With key rows: each row's step follows the σ within that row (true) or all rows
    /// share the step of the σ pooled over the chunk's rows (false).
    pub key_step_per_row: bool,
    /// Leading tokens of a sequence whose key rows are stored exactly (payload format 3),
    /// in a chunk that starts its sequence ([`crate::EncodeOptions::starts_sequence`]):
    /// the attention sink. Most heads put most of their weight on the first token, so an
    /// error in its key moves every score's softmax (KVQuant and IntactKV keep it in full
    /// precision likewise); quantized among the others it also widens every channel's
    /// step, its key being far from the channel means. 0: none.
    pub sink_tokens: u32,
    /// Whether the sink tokens' value rows are stored exactly too.
    pub sink_values: bool,
    /// Residuals predicted from the previous token's in each channel (payload format 4):
    /// a part whose residuals are cheaper so codes `r − round(ρ_c · r_prev)` with one
    /// weight `ρ_c` (in eighths) per channel, fitted by least squares. Neighbouring keys
    /// move together (RoPE's slow channels rotate little per token, and the chunk's zero
    /// point is far from a local stretch's mean), so this lowers the bits without touching
    /// the quantization: on SmolLM2 caches about 10% of the keys' and 4% of the values'.
    pub predict: bool,
}

impl KvTuning {
    /// The tuning of a `kv-*` profile (`None` for the others).
    ///
    /// Chosen on real SmolLM2-135M caches with `kvault codec-eval --tune` (docs/figures.md),
    /// by the mean KL divergence of next-token distributions per bit:
    /// - value error costs more than key error at these rates (at 2.27 bits per element,
    ///   a bit spent on values lowered the KL about twice as much as one spent on keys), so
    ///   the split moved from (0.6, 1.8) to (0.9, 1.2) for `kv-mid`;
    /// - `kv-hi` spends the bits that prediction ([`KvTuning::predict`]) saved on finer
    ///   keys: (0.28, 0.7) against (0.38, 0.66) at 5.1-5.4x, on 8 windows of 4096 tokens
    ///   KL 0.0042 against 0.0061 and Δppl +0.34-0.42% against +0.78-0.98% (256- and
    ///   4096-token chunks); finer values at the same size, (0.3, 0.62) and (0.33, 0.58),
    ///   were no better at 256 tokens;
    /// - value steps follow each token's σ more than proportionally (`value_power` 1.5:
    ///   KL 0.0337 against 0.0413 at the same 2.16-2.18 bits; a step shared by all tokens,
    ///   power 0, was five times worse);
    /// - one key step for all channels (`key_power` 0) stays: powers -0.5 and 0.5 measured
    ///   no better;
    /// - the finer early layer group cost 0.11 bits per element for no measurable gain, so
    ///   it is off (`early_scale` 1);
    /// - keys in rows of about 64 tokens (two 32-token streams of a 256-token chunk, or
    ///   one or two of a long chunk's 40), each with its own step: on 4096-token chunks at
    ///   the same 2.13 bits per element, rel L2 of K fell from 0.182 to 0.143 and the KL
    ///   from 0.064 to 0.034 (rows of 128 and 256 tokens: 0.037-0.039, of 1024: 0.060); on
    ///   256-token chunks rows cost no bits (their narrower residuals pay for the zero
    ///   points) but gain little, so chunks under [`KEY_ROWS_MIN_TOKENS`] go without.
    pub fn of(profile: Profile) -> Option<KvTuning> {
        let (key_factor, value_factor) = match profile {
            Profile::KvHi => (0.28, 0.7),
            Profile::KvMid => (0.9, 1.2),
            Profile::KvLo => (1.2, 1.6),
            _ => return None,
        };
        Some(KvTuning {
            key_factor,
            value_factor,
            early_keys: 1.0 / 6.0,
            early_values: 1.0 / 15.0,
            early_scale: 1.0,
            key_power: 0.0,
            value_power: 1.5,
            key_group_tokens: 64,
            key_rows_min_tokens: KEY_ROWS_MIN_TOKENS,
            key_step_per_row: true,
            sink_tokens: 1,
            sink_values: false,
            predict: true,
        })
    }

    /// Sink tokens stored exactly in a chunk of `tokens` tokens (never all of them).
    fn sinks(&self, tokens: usize, starts_sequence: bool) -> usize {
        if starts_sequence {
            (self.sink_tokens as usize).min(tokens.saturating_sub(1))
        } else {
            0
        }
    }

    /// Streams per key row of a chunk of `tokens` tokens in streams of `block` tokens,
    /// when its keys are coded in rows (at least two rows, and the chunk long enough).
    fn rows_for(&self, tokens: usize, block: usize) -> Option<usize> {
        self.key_group_blocks(block)
            .filter(|&gb| tokens > gb * block && tokens >= self.key_rows_min_tokens as usize)
    }

    /// The step factor of one part of layer `index` of `total`.
    fn factor(&self, index: u32, total: u32, is_value: bool) -> f64 {
        let (f, share) = if is_value {
            (self.value_factor, self.early_values)
        } else {
            (self.key_factor, self.early_keys)
        };
        let early = (f64::from(total) * share).ceil() as u32;
        if index < early { f * self.early_scale } else { f }
    }

    /// Streams per key row for streams of `block` tokens, when key rows are on.
    fn key_group_blocks(&self, block: usize) -> Option<usize> {
        (self.key_group_tokens > 0)
            .then(|| ((f64::from(self.key_group_tokens) / block.max(1) as f64).round() as usize).max(1))
    }

    /// Errors unless every factor is finite and positive.
    pub(crate) fn check(&self) -> Result<(), CodecError> {
        let ok = |f: f64| f.is_finite() && f > 0.0;
        let share = |f: f64| f.is_finite() && (0.0..=1.0).contains(&f);
        let power = |f: f64| f.is_finite() && (-4.0..=4.0).contains(&f);
        if ok(self.key_factor)
            && ok(self.value_factor)
            && ok(self.early_scale)
            && power(self.key_power)
            && power(self.value_power)
            && share(self.early_keys)
            && share(self.early_values)
            && self.key_group_tokens <= u32::from(u16::MAX)
            && self.key_rows_min_tokens <= u32::from(u16::MAX)
            && self.sink_tokens <= MAX_SINK_TOKENS
        {
            Ok(())
        } else {
            Err(CodecError::BadShape(format!("kv tuning out of range: {self:?}")))
        }
    }
}

/// The header parameters, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Params {
    format: u8,
    /// Tokens per rANS stream.
    block: usize,
}

pub(super) fn params(
    tuning: &KvTuning,
    view: &KvView<'_>,
    starts_sequence: bool,
) -> Result<Vec<u8>, CodecError> {
    let shape = view.shape();
    let channels = (shape.kv_heads as usize * shape.head_dim as usize).max(1);
    let target = (STREAM_SYMBOLS / channels).clamp(BLOCK_TOKENS.0, BLOCK_TOKENS.1);
    // Streams per part rounded up to a multiple of four, the streams the CPU vector
    // decoder runs side by side, and tokens shared out evenly: a 256-token SmolLM2 chunk
    // gets eight 32-token streams rather than six of 42 and one of 4 (0.3% more bytes).
    let tokens = (shape.tokens as usize).max(1);
    let streams = tokens.div_ceil(target).next_multiple_of(STREAMS_TOGETHER);
    let block = tokens.div_ceil(streams).clamp(BLOCK_TOKENS.0, BLOCK_TOKENS.1);
    // Format 4 for predicted residuals, 3 for exception rows; else 2 only when the chunk
    // has key rows.
    let format = if tuning.predict {
        FORMAT_V4
    } else if tuning.sinks(tokens, starts_sequence) > 0 {
        FORMAT_V3
    } else if tuning.rows_for(tokens, block).is_some() {
        FORMAT_V2
    } else {
        FORMAT_V1
    };
    let mut p = vec![format, rans::PROB_BITS as u8, rans::LANES as u8];
    p.extend_from_slice(&(block as u16).to_le_bytes());
    Ok(p)
}

/// Checks the header parameters.
fn parse_params(params: &[u8]) -> Result<Params, CodecError> {
    match params {
        [
            format @ (FORMAT_V1 | FORMAT_V2 | FORMAT_V3 | FORMAT_V4),
            bits,
            lanes,
            b0,
            b1,
        ] if u32::from(*bits) == rans::PROB_BITS && usize::from(*lanes) == rans::LANES => {
            let block = u16::from_le_bytes([*b0, *b1]);
            if block == 0 {
                return Err(CodecError::Corrupt("kv profile block_tokens is 0".into()));
            }
            Ok(Params {
                format: *format,
                block: usize::from(block),
            })
        }
        _ => Err(CodecError::Corrupt(format!(
            "kv profile parameters {params:02x?} not understood (expected format {FORMAT_V1} to {FORMAT_V4}, {} probability bits, {} lanes)",
            rans::PROB_BITS,
            rans::LANES
        ))),
    }
}

pub(super) fn check_params(_profile: Profile, params: &[u8]) -> Result<(), CodecError> {
    parse_params(params).map(|_| ())
}

fn unencodable(what: &'static str) -> CodecError {
    CodecError::Unencodable { profile: "kv", what }
}

/// `round(v)` (ties to even) as i32, for `|v| < 2^31`, without a libm call or a
/// saturating conversion: adding 1.5 * 2^52 leaves the rounded integer in the low 32 bits
/// of the f64's bits (two's complement). Vectorises, unlike `f64::round` on baseline x86-64.
#[inline(always)]
fn round_i32(v: f64) -> i32 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    (v + MAGIC).to_bits() as u32 as i32
}

/// The σ each group's step follows (see [`KvTuning::key_power`]): `pooled ·
/// clamp(own / pooled)^power`, `pooled` the RMS of the groups' own σ.
fn target_sigmas(own: &[f64], power: f64) -> Vec<f64> {
    let pooled = (own.iter().map(|s| s * s).sum::<f64>() / own.len().max(1) as f64).sqrt();
    if pooled == 0.0 {
        return vec![0.0; own.len()];
    }
    own.iter()
        .map(|&s| pooled * (s / pooled).clamp(1.0 / 256.0, 256.0).powf(power))
        .collect()
}

/// The step index nearest to `target`, raised until `max_abs / Δ <= 2^29`.
fn step_index(target: f64, max_abs: f64) -> Result<u8, CodecError> {
    let mut e = if target > 0.0 {
        (4.0 * target.log2() + f64::from(4 * EXP_BIAS))
            .round()
            .clamp(0.0, 255.0) as u8
    } else {
        0
    };
    while max_abs / f64::from(step(e)) > MAX_RATIO {
        e = e
            .checked_add(1)
            .ok_or_else(|| unencodable("an element too large for its step grid"))?;
    }
    Ok(e)
}

/// Picks a group's step index and zero point (in steps) for step `f * sigma`, from the
/// group's sum, max |x| and element count.
fn choose(sum: f64, max_abs: f64, n: usize, f: f64, sigma: f64) -> Result<(u8, i32), CodecError> {
    let n = n.max(1) as f64;
    let mean = sum / n;
    let e = step_index(f * sigma, max_abs)?;
    let m = (mean / f64::from(step(e))).round() as i32;
    Ok((e, m))
}

/// The prediction of a row's zero point from the previous row's (`m_prev` in steps of
/// grid index `e_prev`), in steps of grid index `e`: the same number when the steps agree,
/// otherwise rescaled in f64 and rounded ties to even (exact IEEE arithmetic, so every
/// decoder predicts the same), clamped to ±2^30.
fn predict(m_prev: i32, e_prev: u8, e: u8) -> i32 {
    if e_prev == e {
        return m_prev;
    }
    let v = f64::from(m_prev) * f64::from(step(e_prev)) / f64::from(step(e));
    v.round_ties_even().clamp(-MAX_PREDICTION, MAX_PREDICTION) as i32
}

pub(super) fn encode_layer(
    tuning: &KvTuning,
    layer: &[u8],
    dtype: Dtype,
    params: &[u8],
    geom: LayerGeom,
    scratch: &mut Scratch,
) -> Result<Vec<u8>, CodecError> {
    encode_layer_with(tuning, layer, dtype, params, geom, scratch, true)
}

/// [`encode_layer`], with the AVX2 build of the encoder allowed (`simd`) or not.
fn encode_layer_with(
    tuning: &KvTuning,
    layer: &[u8],
    dtype: Dtype,
    params: &[u8],
    geom: LayerGeom,
    scratch: &mut Scratch,
    simd: bool,
) -> Result<Vec<u8>, CodecError> {
    let p = parse_params(params)?;
    let block = p.block;
    // Key rows as the header was written for them: format 1 has none, format 2 always
    // has them, format 3 when the chunk is long enough.
    let rows = match p.format {
        FORMAT_V1 => None,
        _ => tuning.rows_for(geom.tokens, block),
    };
    let sinks = if p.format >= FORMAT_V3 {
        Some(tuning.sinks(geom.tokens, geom.starts_sequence))
    } else {
        None
    };
    load_f32(layer, dtype, &mut scratch.f32s);
    let n = geom.part_elems();
    let mut out = Vec::with_capacity(n / 2);
    let f32s = std::mem::take(&mut scratch.f32s);
    let job = Parts {
        tuning,
        f32s: &f32s,
        source: (layer, dtype),
        rows,
        sinks,
        predict: p.format >= FORMAT_V4,
        block,
        geom,
    };
    #[cfg(target_arch = "x86_64")]
    let result = if simd && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { encode_parts_avx2(&job, scratch, &mut out) }
    } else {
        encode_parts(&job, scratch, &mut out)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let result = {
        let _ = simd;
        encode_parts(&job, scratch, &mut out)
    };
    scratch.f32s = f32s;
    result.map(|()| out)
}

/// A layer's elements as f32 and how to code them.
struct Parts<'a> {
    tuning: &'a KvTuning,
    f32s: &'a [f32],
    /// The layer's bytes and their dtype (exception rows are copied from them).
    source: (&'a [u8], Dtype),
    /// Streams per key row, when the keys are coded in rows.
    rows: Option<usize>,
    /// Format 3: every part starts with its exception list, the first `n` tokens.
    sinks: Option<usize>,
    /// Format 4: every part says whether its residuals are predicted.
    predict: bool,
    block: usize,
    geom: LayerGeom,
}

/// [`encode_parts`] compiled for AVX2: the same code, whose f64 loops over channels (group
/// statistics, quantization) then run four lanes wide. The arithmetic is unchanged (LLVM
/// keeps each IEEE operation and never contracts into FMAs), so both builds write the
/// same bytes (test `vector_encoder_matches_portable`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_parts_avx2(
    job: &Parts<'_>,
    scratch: &mut Scratch,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    encode_parts(job, scratch, out)
}

/// Encodes the K and V parts of a layer into `out`.
// Hot path (encode): inlined, with its callees, into the AVX2 build.
#[inline(always)]
fn encode_parts(job: &Parts<'_>, scratch: &mut Scratch, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let Parts {
        tuning,
        f32s,
        source: (layer, dtype),
        rows,
        sinks,
        predict,
        block,
        geom,
    } = *job;
    let (t, c, n) = (geom.tokens, geom.channels, geom.part_elems());
    {
        let mut replaced = Vec::new();
        for (i, part) in f32s.chunks_exact(n).enumerate() {
            let is_value = i == 1;
            let factor = tuning.factor(geom.index, geom.total_layers, is_value);
            let mut part = part;
            if let Some(sinks) = sinks {
                let sinks = if is_value && !tuning.sink_values { 0 } else { sinks };
                // Stored rows skip the statistics, which refuse non-finite elements.
                if part[..sinks * c].iter().any(|x| !x.is_finite()) {
                    return Err(unencodable("a non-finite element"));
                }
                let size = dtype.size();
                put_exceptions(out, sinks, &layer[i * n * size..], dtype, c);
                if sinks > 0 {
                    part = stand_ins(part, c, sinks, &mut replaced);
                }
            }
            match rows {
                Some(gb) if !is_value => encode_key_rows(
                    part,
                    t,
                    c,
                    block,
                    gb,
                    factor,
                    tuning.key_step_per_row,
                    predict,
                    scratch,
                    out,
                )?,
                _ => encode_groups(
                    part,
                    t,
                    c,
                    block,
                    factor,
                    if is_value {
                        tuning.value_power
                    } else {
                        tuning.key_power
                    },
                    is_value,
                    predict,
                    scratch,
                    out,
                )?,
            }
        }
        Ok(())
    }
}

/// Appends a part's exception list (format 3) for its first `n` tokens: the count, and
/// when there are any the source dtype id, the first token (0) and the gaps between the
/// following ones (all 0: varints), then their rows' source bytes, the first of `src`.
fn put_exceptions(out: &mut Vec<u8>, n: usize, src: &[u8], dtype: Dtype, c: usize) {
    put_varint(out, n as u32);
    if n == 0 {
        return;
    }
    out.push(dtype as u8);
    out.extend(std::iter::repeat_n(0u8, n));
    out.extend_from_slice(&src[..n * c * dtype.size()]);
}

/// `part` with the rows of its first `n` tokens (the stored exceptions) replaced by row
/// `n`, in `buf`: they then cost the residuals of an ordinary token and leave the
/// statistics as they would be without them.
fn stand_ins<'b>(part: &[f32], c: usize, n: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
    buf.clear();
    buf.extend_from_slice(part);
    for ti in 0..n {
        buf.copy_within(n * c..(n + 1) * c, ti * c);
    }
    buf
}

/// A part's exception tokens as read from its payload (format 3).
struct Exceptions<'a> {
    /// Dtype of the stored rows.
    dtype: Dtype,
    /// Tokens, increasing, each below the chunk's token count.
    tokens: Vec<usize>,
    /// `tokens.len()` rows of `channels` elements of `dtype`.
    rows: &'a [u8],
}

/// Reads a part's exception list (nothing before format 3), checking every token and
/// length against the chunk's `t` tokens of `c` channels.
fn read_exceptions<'a>(
    r: &mut PayloadReader<'a>,
    p: Params,
    t: usize,
    c: usize,
) -> Result<Exceptions<'a>, CodecError> {
    let none = Exceptions {
        dtype: Dtype::F16,
        tokens: Vec::new(),
        rows: &[],
    };
    if p.format < FORMAT_V3 {
        return Ok(none);
    }
    let n = r.varint()? as usize;
    if n == 0 {
        return Ok(none);
    }
    if n > t {
        return Err(CodecError::Corrupt(format!(
            "kv part has {n} exception tokens in a chunk of {t}"
        )));
    }
    let dtype =
        Dtype::from_u8(r.u8()?).map_err(|e| CodecError::Corrupt(format!("kv exception rows: {e}")))?;
    let mut tokens = Vec::with_capacity(n);
    let mut next = 0usize;
    for _ in 0..n {
        let ti = next.saturating_add(r.varint()? as usize);
        if ti >= t {
            return Err(CodecError::Corrupt(format!(
                "kv exception token {ti} in a chunk of {t}"
            )));
        }
        tokens.push(ti);
        next = ti + 1;
    }
    let rows = r.take(n * c * dtype.size())?;
    Ok(Exceptions { dtype, tokens, rows })
}

impl Exceptions<'_> {
    /// Writes the exception rows over a decoded part (`[token][c]` in `out_dtype`).
    fn write(
        &self,
        c: usize,
        out_dtype: Dtype,
        out: &mut [u8],
        f32s: &mut Vec<f32>,
        halfs: &mut Vec<half::f16>,
    ) {
        let (src_row, out_row) = (c * self.dtype.size(), c * out_dtype.size());
        for (k, &ti) in self.tokens.iter().enumerate() {
            load_f32(&self.rows[k * src_row..(k + 1) * src_row], self.dtype, f32s);
            store_f32(f32s, out_dtype, &mut out[ti * out_row..(ti + 1) * out_row], halfs);
        }
    }
}

/// Encodes a part with groups per channel (`per_token` false, kind 0) or per token (kind 1).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn encode_groups(
    part: &[f32],
    t: usize,
    c: usize,
    block: usize,
    factor: f64,
    power: f64,
    per_token: bool,
    may_predict: bool,
    scratch: &mut Scratch,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    // Group statistics: per channel (keys) or per token (values). Kept as separate
    // arrays so the per-channel loops vectorise.
    let groups = if per_token { t } else { c };
    let (mut sum, mut sum_sq, mut max_abs) = (vec![0f64; groups], vec![0f64; groups], vec![0f64; groups]);
    if per_token {
        token_stats(part, c, &mut sum, &mut sum_sq, &mut max_abs);
    } else {
        channel_stats(part, c, t, &mut sum, &mut sum_sq, &mut max_abs);
    }
    // A NaN or infinity makes its group's sum of squares non-finite (finite f32s cannot
    // overflow an f64 sum), so the statistics double as the finiteness check.
    if sum_sq.iter().any(|q| !q.is_finite()) {
        return Err(unencodable("a non-finite element"));
    }
    let n_group = if per_token { c } else { t };
    let nf = n_group.max(1) as f64;
    let own: Vec<f64> = (0..groups)
        .map(|g| (sum_sq[g] / nf - (sum[g] / nf).powi(2)).max(0.0).sqrt())
        .collect();
    let sigmas = target_sigmas(&own, power);
    let chosen: Vec<(u8, i32)> = (0..groups)
        .map(|g| choose(sum[g], max_abs[g], n_group, factor, sigmas[g]))
        .collect::<Result<_, _>>()?;
    out.push(if per_token {
        GroupKind::Tokens as u8
    } else {
        GroupKind::Channels as u8
    });
    out.extend(chosen.iter().map(|&(e, _)| e));
    for &(_, m) in &chosen {
        put_svarint(out, m);
    }
    // Residuals, with a histogram to choose the alphabet.
    let inv: Vec<f64> = chosen.iter().map(|&(e, _)| 1.0 / f64::from(step(e))).collect();
    let zero: Vec<i32> = chosen.iter().map(|&(_, m)| m).collect();
    let res = &mut scratch.ints;
    res.clear();
    res.reserve(part.len());
    // Hot path (encode): a multiply, a magic-number round and a subtract per element.
    // `|x| * inv <= 2^29` and `|m| <= 2^29` (see `choose`), so the rounding trick is exact
    // and the subtraction cannot wrap; multiplying
    // by the f64 reciprocal rounds like the division except within 2^-50 of a tie.
    for (ti, row) in part.chunks_exact(c).enumerate() {
        if per_token {
            let (inv, m) = (inv[ti], zero[ti]);
            res.extend(row.iter().map(|&x| round_i32(f64::from(x) * inv).wrapping_sub(m)));
        } else {
            quantize_row(row, &inv, &zero, res);
        }
    }
    encode_symbols(c, block, may_predict, scratch, out)
}

/// Adds `x` to a group's sum, sum of squares and max |x| (in f64).
#[inline(always)]
fn add_stat(s: &mut f64, q: &mut f64, m: &mut f64, x: f32) {
    let x = f64::from(x);
    *s += x;
    *q += x * x;
    let a = x.abs();
    *m = if a > *m { a } else { *m };
}

/// Per token of `part` (rows of `c` channels): the sum, sum of squares and max |x| of its
/// row, in f64, each a sequential sum over the channels. Four tokens at a time: their
/// twelve sums are independent chains, where one token's three would make every add wait
/// for the previous one.
#[inline(always)]
fn token_stats(part: &[f32], c: usize, sum: &mut [f64], sum_sq: &mut [f64], max_abs: &mut [f64]) {
    let stats = |row: &[f32]| {
        let (mut s, mut q, mut m) = (0f64, 0f64, 0f64);
        for &x in row {
            add_stat(&mut s, &mut q, &mut m, x);
        }
        (s, q, m)
    };
    if c == 0 {
        return;
    }
    let mut quads = part.chunks_exact(4 * c);
    let mut ti = 0;
    for quad in &mut quads {
        let (r0, rest) = quad.split_at(c);
        let (r1, rest) = rest.split_at(c);
        let (r2, r3) = rest.split_at(c);
        let (mut s, mut q, mut m) = ([0f64; 4], [0f64; 4], [0f64; 4]);
        for j in 0..c {
            for (l, r) in [r0, r1, r2, r3].iter().enumerate() {
                add_stat(&mut s[l], &mut q[l], &mut m[l], r[j]);
            }
        }
        sum[ti..ti + 4].copy_from_slice(&s);
        sum_sq[ti..ti + 4].copy_from_slice(&q);
        max_abs[ti..ti + 4].copy_from_slice(&m);
        ti += 4;
    }
    for row in quads.remainder().chunks_exact(c) {
        (sum[ti], sum_sq[ti], max_abs[ti]) = stats(row);
        ti += 1;
    }
}

/// Per channel of `part` (`t` rows of `c` channels): the sum, sum of squares and max |x|
/// over the tokens, in f64, each a sequential sum in token order, added into `sum`,
/// `sum_sq` and `max_abs` (`c` entries each). Sixteen channels at a time, down the rows,
/// so that their 48 sums stay in registers instead of going through memory per token.
#[inline(always)]
fn channel_stats(part: &[f32], c: usize, t: usize, sum: &mut [f64], sum_sq: &mut [f64], max_abs: &mut [f64]) {
    const W: usize = 16;
    let mut c0 = 0;
    while c0 < c {
        let w = W.min(c - c0);
        let (mut s, mut q, mut m) = ([0f64; W], [0f64; W], [0f64; W]);
        s[..w].copy_from_slice(&sum[c0..c0 + w]);
        q[..w].copy_from_slice(&sum_sq[c0..c0 + w]);
        m[..w].copy_from_slice(&max_abs[c0..c0 + w]);
        if w == W {
            for ti in 0..t {
                // A fixed-size row lets the sums run in registers, unrolled.
                let Ok(row) = <&[f32; W]>::try_from(&part[ti * c + c0..ti * c + c0 + W]) else {
                    unreachable!("a range of W elements")
                };
                for l in 0..W {
                    add_stat(&mut s[l], &mut q[l], &mut m[l], row[l]);
                }
            }
        } else {
            for ti in 0..t {
                for l in 0..w {
                    add_stat(&mut s[l], &mut q[l], &mut m[l], part[ti * c + c0 + l]);
                }
            }
        }
        sum[c0..c0 + w].copy_from_slice(&s[..w]);
        sum_sq[c0..c0 + w].copy_from_slice(&q[..w]);
        max_abs[c0..c0 + w].copy_from_slice(&m[..w]);
        c0 += w;
    }
}

/// Appends the residuals of one token's row against per-channel reciprocal steps and
/// zero points to `out`.
#[inline(always)]
fn quantize_row(row: &[f32], inv: &[f64], zero: &[i32], out: &mut Vec<i32>) {
    out.extend(
        row.iter()
            .zip(inv)
            .zip(zero)
            .map(|((&x, &inv), &m)| round_i32(f64::from(x) * inv).wrapping_sub(m)),
    );
}

/// Encodes a key part with groups per (row of `group_blocks` streams, channel) (kind 2).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn encode_key_rows(
    part: &[f32],
    t: usize,
    c: usize,
    block: usize,
    group_blocks: usize,
    factor: f64,
    step_per_row: bool,
    may_predict: bool,
    scratch: &mut Scratch,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let g = group_blocks * block;
    let rows = t.div_ceil(g);
    let n = rows * c;
    let (mut sum, mut sum_sq, mut max_abs) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
    for (r, rows_part) in part.chunks(g * c.max(1)).enumerate() {
        let at = r * c;
        channel_stats(
            rows_part,
            c,
            rows_part.len() / c.max(1),
            &mut sum[at..at + c],
            &mut sum_sq[at..at + c],
            &mut max_abs[at..at + c],
        );
    }
    if sum_sq.iter().any(|q| !q.is_finite()) {
        return Err(unencodable("a non-finite element"));
    }
    // Per row: the RMS over channels of their σ within the row, and the largest |x|.
    let row_tokens = |r: usize| g.min(t - r * g) as f64;
    let mut var_rows = Vec::with_capacity(rows);
    for r in 0..rows {
        let nt = row_tokens(r);
        let v: f64 = (r * c..(r + 1) * c)
            .map(|i| (sum_sq[i] / nt - (sum[i] / nt).powi(2)).max(0.0))
            .sum::<f64>()
            / c.max(1) as f64;
        var_rows.push(v);
    }
    let pooled_all = (var_rows.iter().sum::<f64>() / rows.max(1) as f64).sqrt();
    let mut e_rows = Vec::with_capacity(rows);
    for (r, &v) in var_rows.iter().enumerate() {
        let sigma = if step_per_row { v.sqrt() } else { pooled_all };
        let max_row = max_abs[r * c..(r + 1) * c].iter().copied().fold(0.0, f64::max);
        e_rows.push(step_index(factor * sigma, max_row)?);
    }
    let zero: Vec<i32> = (0..n)
        .map(|i| {
            let r = i / c.max(1);
            (sum[i] / row_tokens(r) / f64::from(step(e_rows[r]))).round() as i32
        })
        .collect();
    out.push(GroupKind::Rows as u8);
    put_varint(out, group_blocks as u32);
    out.extend_from_slice(&e_rows);
    for &m in &zero[..c] {
        put_svarint(out, m);
    }
    if rows > 1 {
        let deltas: Vec<i32> = (c..n)
            .map(|i| {
                let r = i / c;
                zero[i].wrapping_sub(predict(zero[i - c], e_rows[r - 1], e_rows[r]))
            })
            .collect();
        put_ints(&deltas, &mut scratch.syms, &mut scratch.words, out)?;
    }
    let inv: Vec<f64> = e_rows.iter().map(|&e| 1.0 / f64::from(step(e))).collect();
    let res = &mut scratch.ints;
    res.clear();
    res.reserve(part.len());
    let mut invs = vec![0f64; c];
    for (ti, row) in part.chunks_exact(c).enumerate() {
        let r = ti / g;
        if ti % g == 0 {
            invs.fill(inv[r]);
        }
        quantize_row(row, &invs, &zero[r * c..(r + 1) * c], res);
    }
    encode_symbols(c, block, may_predict, scratch, out)
}

/// Histogram of values in [-32, 31] (bins 0..64), everything else in bin 64.
#[inline(always)]
fn histogram(vals: &[i32]) -> [u64; 65] {
    // Four interleaved histograms: consecutive values often fall in the same bin, and
    // one counter would make every increment wait for the previous one.
    let mut hists = [[0u32; 65]; 4];
    let mut quads = vals.chunks_exact(4);
    for q in &mut quads {
        for (h, &r) in hists.iter_mut().zip(q) {
            // Negative or large values wrap to >= 64 and are clamped to the overflow bin.
            h[(r.wrapping_add(32) as u32).min(64) as usize] += 1;
        }
    }
    for &r in quads.remainder() {
        hists[0][(r.wrapping_add(32) as u32).min(64) as usize] += 1;
    }
    let mut hist = [0u64; 65];
    for h in &hists {
        for (a, &b) in hist.iter_mut().zip(h) {
            *a += u64::from(b);
        }
    }
    hist
}

/// The alphabet half-width `M` that minimises the estimated size of values with
/// histogram `hist` (see [`histogram`]), and that size in bits (table included).
fn best_alphabet(hist: &[u64; 65]) -> (usize, f64) {
    let total = hist.iter().sum::<u64>() as f64;
    let cost = |m: usize| -> f64 {
        let inside = &hist[32 - m..=32 + m];
        let esc = total - inside.iter().sum::<u64>() as f64;
        let ent = |c: f64| if c > 0.0 { c * (total / c).log2() } else { 0.0 };
        inside.iter().map(|&c| ent(c as f64)).sum::<f64>()
            + ent(esc)
            + esc * ESCAPE_BITS
            + (4 * m + 5) as f64 * 8.0
    };
    (0..=MAX_M)
        .map(|m| (m, cost(m)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((MAX_M, f64::INFINITY))
}

/// The frequency table of alphabet `[-m, m]` plus escape for values with histogram `hist`.
fn table_for(hist: &[u64; 65], m: usize) -> Result<FreqTable, CodecError> {
    let mut counts = vec![0u64; 2 * m + 2];
    counts[..=2 * m].copy_from_slice(&hist[32 - m..=32 + m]);
    counts[2 * m + 1] = hist.iter().sum::<u64>() - counts[..=2 * m].iter().sum::<u64>();
    FreqTable::from_counts(&counts)
}

/// Per channel, the prediction weight `ρ8` (eighths, `0..=8`) that fits `res` (rows of
/// `c` residuals, streams of `block` rows) best by least squares against each previous
/// row's clamped residual (the first row of a stream has no predecessor).
// Hot path (encode): inlined into the AVX2 build, where the per-channel sums vectorise.
#[inline(always)]
fn fit_weights(res: &[i32], c: usize, block: usize) -> Vec<u8> {
    let (mut pp, mut pr) = (vec![0f64; c], vec![0f64; c]);
    for blk in res.chunks(block * c) {
        for (prev, row) in blk.chunks_exact(c).zip(blk.chunks_exact(c).skip(1)) {
            for (((a, b), &x0), &x1) in pp.iter_mut().zip(pr.iter_mut()).zip(prev).zip(row) {
                let x0 = f64::from(x0.clamp(-STATE_LIMIT, STATE_LIMIT));
                *a += x0 * x0;
                *b += x0 * f64::from(x1);
            }
        }
    }
    pp.iter()
        .zip(&pr)
        .map(|(&a, &b)| {
            if a > 0.0 {
                (8.0 * b / a).round().clamp(0.0, f64::from(MAX_RHO8)) as u8
            } else {
                0
            }
        })
        .collect()
}

/// The prediction of a residual from its channel's state (`ρ8` eighths of the previous
/// residual, clamped): `(ρ8 · state + 4) >> 3`, within ±127. Every decoder computes this
/// in integers, so they agree bit for bit.
#[inline(always)]
fn prediction(rho8: i32, state: i32) -> i32 {
    (rho8 * state + 4) >> 3
}

/// The predicted form of `res` (see [`KvTuning::predict`]) into `out`: per stream of
/// `block` rows of `c`, each residual minus its prediction from its channel's state,
/// which is the previous residual clamped to ±[`STATE_LIMIT`], 0 at a stream's start and
/// after an escape (a difference beyond `±m`, which is coded with its whole residual, so
/// that decoders can patch escapes afterwards). `m` `None`: no escapes (the first pass,
/// which chooses `M`).
// Hot path (encode): branch-free per channel, so that the AVX2 build vectorises it.
#[inline(always)]
fn predict_residuals(res: &[i32], c: usize, block: usize, rho: &[u8], m: Option<usize>, out: &mut Vec<i32>) {
    out.clear();
    out.resize(res.len(), 0);
    let m = m.map_or(u32::MAX, |m| m as u32);
    let w: Vec<i32> = rho.iter().map(|&x| i32::from(x)).collect();
    let mut state = vec![0i32; c];
    let per = (block * c).max(1);
    for (blk, oblk) in res.chunks(per).zip(out.chunks_mut(per)) {
        state.fill(0);
        for (row, orow) in blk.chunks_exact(c).zip(oblk.chunks_exact_mut(c)) {
            for (((&r, s), &w), o) in row.iter().zip(state.iter_mut()).zip(&w).zip(orow.iter_mut()) {
                let d = r.wrapping_sub(prediction(w, *s));
                let clamped = r.clamp(-STATE_LIMIT, STATE_LIMIT);
                *s = if d.unsigned_abs() > m { 0 } else { clamped };
                *o = d;
            }
        }
    }
}

/// Maps `vals` to the symbols of alphabet `[-m, m]` plus escape in `syms` (cleared first),
/// and for each escaped value the element of `carried` at its position (zigzag varints;
/// `vals` itself, or a predicted part's whole residuals) to `esc` (cleared first).
#[inline(always)]
fn map_values(vals: &[i32], carried: &[i32], m: usize, syms: &mut Vec<u8>, esc: &mut Vec<u8>) {
    let m_i = m as i32;
    let esc_sym = (2 * m + 1) as u8;
    syms.clear();
    esc.clear();
    // Branch-free mapping; values outside [-M, M] wrap above 2M and become the escape
    // symbol, whose values follow in a (rare) second pass.
    let span = 2 * m_i as u32;
    syms.extend(vals.iter().map(|&r| {
        let s = r.wrapping_add(m_i) as u32;
        if s <= span { s as u8 } else { esc_sym }
    }));
    if syms.contains(&esc_sym) {
        for (_, &r) in vals
            .iter()
            .zip(carried)
            .filter(|&(&v, _)| v.unsigned_abs() as usize > m)
        {
            put_svarint(esc, r);
        }
    }
}

/// Appends a part's residuals (`scratch.ints`, rows of `c`): (format 4, `predict`) the
/// prediction byte and weights, then `M`, the frequency table, then `block` tokens per
/// stream (streams coded [`rans::GROUP`] at a time).
#[inline(always)]
fn encode_symbols(
    c: usize,
    block: usize,
    predict: bool,
    scratch: &mut Scratch,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let Scratch {
        ints: res,
        diffs,
        syms,
        words,
        ..
    } = scratch;
    let res: &[i32] = res;
    let mut hist = histogram(res);
    let (mut m, plain_bits) = best_alphabet(&hist);
    // Predicted when it is estimated smaller, weights included. Decoders on GPUs keep the
    // previous row in lanes of eight channels, so narrower parts are never predicted.
    let mut rho = if predict && c >= rans::LANES {
        fit_weights(res, c, block)
    } else {
        Vec::new()
    };
    if rho.iter().any(|&w| w > 0) {
        predict_residuals(res, c, block, &rho, None, diffs);
        let first = histogram(diffs);
        let (pm, bits) = best_alphabet(&first);
        if bits + ((c.div_ceil(2) * 8) as f64) < plain_bits {
            (m, hist) = (pm, first);
            // Escapes reset their channel's state, which moves later differences.
            let inside: u64 = hist[32 - m..=32 + m].iter().sum();
            if inside < diffs.len() as u64 {
                predict_residuals(res, c, block, &rho, Some(m), diffs);
                hist = histogram(diffs);
            }
        } else {
            rho.clear();
        }
    } else {
        rho.clear();
    }
    let predicted = !rho.is_empty();
    let table = table_for(&hist, m)?;
    if predict {
        out.push(u8::from(predicted));
        for pair in rho.chunks(2) {
            out.push(pair[0] | pair.get(1).map_or(0, |&w| w << 4));
        }
    }
    out.push(m as u8);
    table.write(out);
    let vals: &[i32] = if predicted { diffs } else { res };
    const G: usize = rans::GROUP;
    let mut symb: [Vec<u8>; G] = std::array::from_fn(|_| Vec::new());
    let mut esc: [Vec<u8>; G] = std::array::from_fn(|_| Vec::new());
    let mut stream: [Vec<u8>; G] = std::array::from_fn(|_| Vec::new());
    let mut wds: [Vec<u16>; G] = std::array::from_fn(|_| Vec::new());
    // The caller's buffers serve as the first stream's, so they keep their capacity.
    std::mem::swap(&mut symb[0], syms);
    std::mem::swap(&mut wds[0], words);
    let per = (block * c).max(1);
    let result = (|| {
        for (group, whole) in vals.chunks(per * G).zip(res.chunks(per * G)) {
            let n = group.len().div_ceil(per);
            for (j, (blk, rblk)) in group.chunks(per).zip(whole.chunks(per)).enumerate() {
                // A predicted part's escapes carry the whole residual.
                map_values(blk, rblk, m, &mut symb[j], &mut esc[j]);
            }
            let refs: [&[u8]; G] = std::array::from_fn(|j| symb[j].as_slice());
            rans::encode_group(&refs[..n], &table, &mut wds, &mut stream)?;
            for j in 0..n {
                put_varint(out, stream[j].len() as u32);
                put_varint(out, esc[j].len() as u32);
                out.extend_from_slice(&stream[j]);
                out.extend_from_slice(&esc[j]);
            }
        }
        Ok(())
    })();
    std::mem::swap(&mut symb[0], syms);
    std::mem::swap(&mut wds[0], words);
    result
}

/// Appends `vals` as a coded integer sequence (see the module docs).
fn put_ints(
    vals: &[i32],
    syms: &mut Vec<u8>,
    words: &mut Vec<u16>,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let hist = histogram(vals);
    let (d, _) = best_alphabet(&hist);
    let table = table_for(&hist, d)?;
    out.push(d as u8);
    table.write(out);
    let (mut stream, mut esc) = (Vec::new(), Vec::new());
    map_values(vals, vals, d, syms, &mut esc);
    rans::encode(syms, &table, words, &mut stream)?;
    put_varint(out, stream.len() as u32);
    put_varint(out, esc.len() as u32);
    out.extend_from_slice(&stream);
    out.extend_from_slice(&esc);
    Ok(())
}

/// Reads an alphabet half-width and its frequency table of `2M + 2` symbols.
fn read_table(r: &mut PayloadReader<'_>, what: &str) -> Result<(usize, FreqTable), CodecError> {
    let m = usize::from(r.u8()?);
    if m > MAX_M {
        return Err(CodecError::Corrupt(format!(
            "kv {what} alphabet M = {m} above {MAX_M}"
        )));
    }
    let n_syms = usize::from(r.u8()?);
    if n_syms != 2 * m + 2 {
        return Err(CodecError::Corrupt(format!(
            "kv {what} table has {n_syms} symbols, expected {}",
            2 * m + 2
        )));
    }
    let freqs = r
        .take(2 * n_syms)?
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    Ok((m, FreqTable::from_freqs(freqs)?))
}

/// Buffers a part header needs to decode coded integer sequences.
pub(crate) struct SideBufs<'a> {
    pub(crate) dtable: &'a mut DecodeTable,
    pub(crate) syms: &'a mut Vec<u8>,
    pub(crate) words: &'a mut Vec<u16>,
}

/// Reads a coded integer sequence of `n` values, appending them to `out`.
fn read_ints(
    r: &mut PayloadReader<'_>,
    n: usize,
    bufs: &mut SideBufs<'_>,
    out: &mut Vec<i32>,
) -> Result<(), CodecError> {
    let (d, table) = read_table(r, "zero-point")?;
    let rans_len = r.varint()? as usize;
    let esc_len = r.varint()? as usize;
    let stream = r.take(rans_len)?;
    let mut escs = r.take(esc_len)?;
    bufs.dtable.rebuild(&table);
    bufs.syms.clear();
    bufs.syms.resize(n, 0);
    rans::decode_with(stream, bufs.dtable, bufs.syms, bufs.words)?;
    let esc_sym = (2 * d + 1) as u8;
    out.reserve(n);
    for &s in bufs.syms.iter() {
        if s == esc_sym {
            let (v, used) = read_varint(escs)
                .ok_or_else(|| CodecError::Corrupt("kv zero-point escape missing or malformed".into()))?;
            escs = &escs[used..];
            out.push(unzigzag(v));
        } else {
            out.push(i32::from(s) - d as i32);
        }
    }
    if !escs.is_empty() {
        return Err(CodecError::Corrupt(format!(
            "kv zero points have {} unused escape bytes",
            escs.len()
        )));
    }
    Ok(())
}

/// Reads a part's header: kind, the groups' steps and zero points, (format 4) the
/// prediction weights, the alphabet `M` and the frequency table. Appends each group's
/// step and `zero - M` (so that a symbol `s` decodes to `(s + bias) * step`, plus its
/// prediction when predicted) to `steps` and `biases` (indexed as [`Grouping::group`]
/// says) and a predicted part's weights to `rho`. Shared by the decoder and the decode
/// planner, so both accept exactly the same payloads.
#[allow(clippy::too_many_arguments)]
fn read_part_header(
    r: &mut PayloadReader<'_>,
    p: Params,
    t: usize,
    c: usize,
    steps: &mut Vec<f32>,
    biases: &mut Vec<i32>,
    rho: &mut Vec<u8>,
    bufs: &mut SideBufs<'_>,
) -> Result<PartHeader, CodecError> {
    let zeros_at = biases.len();
    let kind = r.u8()?;
    let grouping = match kind {
        0 | 1 => {
            let (kind, groups) = if kind == 0 {
                (GroupKind::Channels, c)
            } else {
                (GroupKind::Tokens, t)
            };
            steps.extend(r.take(groups)?.iter().map(|&e| step(e)));
            for _ in 0..groups {
                biases.push(r.svarint()?);
            }
            Grouping {
                kind,
                group_tokens: 0,
            }
        }
        2 if p.format >= FORMAT_V2 => {
            let gb = r.varint()? as usize;
            let g = gb
                .checked_mul(p.block)
                .filter(|&g| g > 0)
                .ok_or_else(|| CodecError::Corrupt(format!("kv key rows of {gb} blocks")))?;
            let rows = t.div_ceil(g);
            let e_rows = r.take(rows)?;
            for &e in e_rows {
                steps.extend(std::iter::repeat_n(step(e), c));
            }
            for _ in 0..c {
                biases.push(r.svarint()?);
            }
            if rows > 1 {
                read_ints(r, (rows - 1) * c, bufs, biases)?;
                // Differences to zero points, row by row.
                for row in 1..rows {
                    let (e_prev, e) = (e_rows[row - 1], e_rows[row]);
                    for i in zeros_at + row * c..zeros_at + (row + 1) * c {
                        let m = i64::from(predict(biases[i - c], e_prev, e)) + i64::from(biases[i]);
                        biases[i] = i32::try_from(m)
                            .map_err(|_| CodecError::Corrupt("kv zero point out of range".into()))?;
                    }
                }
            }
            Grouping {
                kind: GroupKind::Rows,
                group_tokens: g,
            }
        }
        k => {
            return Err(CodecError::Corrupt(format!(
                "kv part kind {k} in format {}",
                p.format
            )));
        }
    };
    let predicted = p.format >= FORMAT_V4 && read_weights(r, c, rho)?;
    let (m, table) = read_table(r, "residual")?;
    for z in &mut biases[zeros_at..] {
        *z = z
            .checked_sub(m as i32)
            .ok_or_else(|| CodecError::Corrupt("kv zero point out of range".into()))?;
    }
    Ok(PartHeader {
        grouping,
        m,
        table,
        predicted,
    })
}

/// A part's header as [`read_part_header`] returns it.
struct PartHeader {
    grouping: Grouping,
    /// Alphabet half-width.
    m: usize,
    table: FreqTable,
    /// Residuals are predicted (format 4), with the `c` weights appended to `rho`.
    predicted: bool,
}

/// Reads a part's prediction byte (format 4) and, when it is 1, its `c` weights
/// (nibbles, `0..=8`), appended to `rho`; returns whether the part is predicted.
fn read_weights(r: &mut PayloadReader<'_>, c: usize, rho: &mut Vec<u8>) -> Result<bool, CodecError> {
    match r.u8()? {
        0 => Ok(false),
        1 if c >= rans::LANES => {
            let bytes = r.take(c.div_ceil(2))?;
            let at = rho.len();
            rho.extend(bytes.iter().flat_map(|&b| [b & 15, b >> 4]).take(c));
            let odd_pad = c % 2 == 1 && bytes.last().is_some_and(|&b| b >> 4 != 0);
            if odd_pad || rho[at..].iter().any(|&w| w > MAX_RHO8) {
                return Err(CodecError::Corrupt(format!(
                    "kv prediction weights {:02x?} beyond {MAX_RHO8} eighths",
                    bytes
                )));
            }
            Ok(true)
        }
        b => Err(CodecError::Corrupt(format!(
            "kv prediction byte {b} for {c} channels"
        ))),
    }
}

pub(super) fn decode_layer(
    payload: &[u8],
    params: &[u8],
    geom: LayerGeom,
    out_dtype: Dtype,
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<(), CodecError> {
    decode_layer_with(payload, params, geom, out_dtype, out, scratch, simd_available())
}

/// Whether the vector decoder (`kv_avx2.rs`) can run here.
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::kv_avx2::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`decode_layer`] with the vector decoder allowed or not (the tests compare the two).
fn decode_layer_with(
    payload: &[u8],
    params: &[u8],
    geom: LayerGeom,
    out_dtype: Dtype,
    out: &mut [u8],
    scratch: &mut Scratch,
    simd: bool,
) -> Result<(), CodecError> {
    let p = parse_params(params)?;
    let (t, c, n) = (geom.tokens, geom.channels, geom.part_elems());
    let mut r = PayloadReader::new(payload, "kv");
    let mut dtable = scratch.dtable.take().unwrap_or_default();
    let result = (|| {
        for out_part in out.chunks_exact_mut(n * out_dtype.size()) {
            // A part: its exception list (format 3), its streams, then the stored rows
            // written over what the streams decoded there.
            let exceptions = read_exceptions(&mut r, p, t, c)?;
            decode_part(&mut r, p, t, c, out_dtype, out_part, &mut dtable, scratch, simd)?;
            exceptions.write(c, out_dtype, out_part, &mut scratch.f32s, &mut scratch.halfs);
        }
        r.finish()
    })();
    scratch.dtable = Some(dtable);
    result
}

/// A part's header and streams (everything after its exception list), decoded into `out`.
#[allow(clippy::too_many_arguments)]
fn decode_part(
    r: &mut PayloadReader<'_>,
    p: Params,
    t: usize,
    c: usize,
    out_dtype: Dtype,
    out: &mut [u8],
    dtable: &mut DecodeTable,
    scratch: &mut Scratch,
    simd: bool,
) -> Result<(), CodecError> {
    let block = p.block;
    let (steps, zeros) = (&mut scratch.f32b, &mut scratch.ints);
    steps.clear();
    zeros.clear();
    let rho = &mut scratch.rho;
    rho.clear();
    let PartHeader {
        grouping,
        m,
        table,
        predicted,
    } = read_part_header(
        r,
        p,
        t,
        c,
        steps,
        zeros,
        rho,
        &mut SideBufs {
            dtable,
            syms: &mut scratch.syms,
            words: &mut scratch.words,
        },
    )?;
    dtable.rebuild(&table);
    let esc_sym = (2 * m + 1) as u8;
    let g = Groups {
        c,
        grouping,
        m,
        zeros,
        steps,
        rho: if predicted { Some(rho.as_slice()) } else { None },
    };
    #[cfg(target_arch = "x86_64")]
    if simd && c.is_multiple_of(rans::LANES) {
        return decode_part_avx2(
            r,
            t,
            block,
            esc_sym,
            &g,
            out_dtype,
            out,
            dtable,
            (
                &mut scratch.words,
                &mut scratch.syms,
                &mut scratch.halfs,
                &mut scratch.diffs,
            ),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd;
    let (syms, row, halfs, words, esc_at) = (
        &mut scratch.syms,
        &mut scratch.f32s,
        &mut scratch.halfs,
        &mut scratch.words,
        &mut scratch.escapes,
    );
    let state = &mut scratch.diffs;
    let size = out_dtype.size();
    let row_bytes = c * size;
    for (bi, out_blk) in out.chunks_mut(block * c * size).enumerate() {
        let elems = out_blk.len() / size;
        let rans_len = r.varint()? as usize;
        let esc_len = r.varint()? as usize;
        let stream = r.take(rans_len)?;
        let escs = r.take(esc_len)?;
        let t0 = bi * block;
        syms.clear();
        syms.resize(elems, 0);
        rans::decode_with(stream, dtable, syms, words)?;
        // Hot path (decode, portable): an add, a convert and a multiply per element, a row
        // at a time into a small f32 buffer that stays in L1, then one conversion into the
        // caller's buffer; escapes are patched afterwards.
        row.clear();
        row.resize(c, 0.0);
        for (k, (srow, orow)) in syms
            .chunks_exact(c)
            .zip(out_blk.chunks_exact_mut(row_bytes))
            .enumerate()
        {
            let tok = t0 + k;
            if let Some(rho) = g.rho {
                // Predicted: each symbol adds its channel's prediction, and updates the
                // state (escapes reset it; their values are patched below).
                if k == 0 {
                    state.clear();
                    state.resize(c, 0);
                }
                for ch in 0..c {
                    let gi = grouping.group(c, tok, ch);
                    let (b, d) = (g.zeros[gi], g.steps[gi]);
                    let (sym, pred) = (srow[ch], prediction(i32::from(rho[ch]), state[ch]));
                    state[ch] = if sym == esc_sym {
                        0
                    } else {
                        (i32::from(sym) - m as i32 + pred).clamp(-STATE_LIMIT, STATE_LIMIT)
                    };
                    row[ch] = i32::from(sym).wrapping_add(b).wrapping_add(pred) as f32 * d;
                }
            } else if grouping.kind == GroupKind::Tokens {
                let (b, d) = (g.zeros[tok], g.steps[tok]);
                for (x, &s) in row.iter_mut().zip(srow) {
                    *x = i32::from(s).wrapping_add(b) as f32 * d;
                }
            } else {
                let at = grouping.row_start(c, tok);
                let (zs, ds) = (&g.zeros[at..at + c], &g.steps[at..at + c]);
                for (((x, &s), &b), &d) in row.iter_mut().zip(srow).zip(zs).zip(ds) {
                    *x = i32::from(s).wrapping_add(b) as f32 * d;
                }
            }
            store_f32(row, out_dtype, orow, halfs);
        }
        esc_at.clear();
        if syms.contains(&esc_sym) {
            esc_at.extend(
                syms.iter()
                    .enumerate()
                    .filter(|&(_, &s)| s == esc_sym)
                    .map(|(i, _)| i),
            );
        }
        g.patch_escapes(esc_at.iter().copied(), escs, t0, out_dtype, out_blk, halfs)?;
    }
    Ok(())
}

/// A part's groups: what dequantization needs beyond the symbols.
struct Groups<'a> {
    c: usize,
    grouping: Grouping,
    m: usize,
    zeros: &'a [i32],
    steps: &'a [f32],
    /// A predicted part's weights, one per channel.
    rho: Option<&'a [u8]>,
}

impl Groups<'_> {
    /// Writes the exact value of each escape (positions in symbol order, relative to the
    /// block starting at token `t0`) into `out_blk`, reading the residuals from `escs`,
    /// which they must use up.
    fn patch_escapes(
        &self,
        positions: impl Iterator<Item = usize>,
        mut escs: &[u8],
        t0: usize,
        out_dtype: Dtype,
        out_blk: &mut [u8],
        halfs: &mut Vec<half::f16>,
    ) -> Result<(), CodecError> {
        let size = out_dtype.size();
        for i in positions {
            let (v, used) = read_varint(escs)
                .ok_or_else(|| CodecError::Corrupt("kv escape missing or malformed".into()))?;
            escs = &escs[used..];
            let g = self.grouping.group(self.c, t0 + i / self.c, i % self.c);
            let q = i64::from(unzigzag(v)) + i64::from(self.zeros[g]) + self.m as i64;
            store_f32(
                &[q as f32 * self.steps[g]],
                out_dtype,
                &mut out_blk[i * size..(i + 1) * size],
                halfs,
            );
        }
        if !escs.is_empty() {
            return Err(CodecError::Corrupt(format!(
                "kv block has {} unused escape bytes",
                escs.len()
            )));
        }
        Ok(())
    }
}

/// The part's blocks through the vector decoder (`kv_avx2.rs`), up to four of equal size
/// side by side.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn decode_part_avx2(
    r: &mut PayloadReader<'_>,
    t: usize,
    block: usize,
    esc_sym: u8,
    g: &Groups<'_>,
    out_dtype: Dtype,
    out: &mut [u8],
    dtable: &DecodeTable,
    (words, masks, halfs, state): (&mut Vec<u16>, &mut Vec<u8>, &mut Vec<half::f16>, &mut Vec<i32>),
) -> Result<(), CodecError> {
    use super::kv_avx2::{Block, MAX_STREAMS, PartParams, decode_blocks};
    let c = g.c;
    let size = out_dtype.size();
    // Every block's framing first: the vector decoder takes several blocks at once.
    let n_blocks = t.div_ceil(block);
    let mut framing = Vec::with_capacity(n_blocks);
    for _ in 0..n_blocks {
        let rans_len = r.varint()? as usize;
        let esc_len = r.varint()? as usize;
        framing.push((r.take(rans_len)?, r.take(esc_len)?));
    }
    let per_token = g.grouping.kind == GroupKind::Tokens;
    let rho: Option<Vec<i32>> = g.rho.map(|w| w.iter().map(|&x| i32::from(x)).collect());
    let p = PartParams {
        predicted: rho.as_deref().map(|w| (w, g.m as i32)),
        slots: dtable.slots(),
        channels: c,
        per_token,
        shared_groups: g.grouping.kind == GroupKind::Channels,
        esc_sym,
        out_dtype,
    };
    let mut outs: Vec<&mut [u8]> = out.chunks_mut(block * c * size).collect();
    let tokens_of = |b: usize| block.min(t - b * block);
    let mut b0 = 0;
    while b0 < n_blocks {
        let mut b1 = b0 + 1;
        while b1 < n_blocks && b1 - b0 < MAX_STREAMS && tokens_of(b1) == tokens_of(b0) {
            b1 += 1;
        }
        let mut blocks: Vec<Block<'_>> = outs[b0..b1]
            .iter_mut()
            .zip(&framing[b0..b1])
            .enumerate()
            .map(|(j, (o, &(stream, _)))| {
                let t0 = (b0 + j) * block;
                let (biases, steps) = if per_token {
                    let tk = tokens_of(b0 + j);
                    (&g.zeros[t0..t0 + tk], &g.steps[t0..t0 + tk])
                } else {
                    // A row holds whole blocks, so the block's groups are its first
                    // token's.
                    let at = g.grouping.row_start(c, t0);
                    (&g.zeros[at..at + c], &g.steps[at..at + c])
                };
                Block {
                    stream,
                    out: o,
                    biases,
                    steps,
                }
            })
            .collect();
        decode_blocks(&mut blocks, &p, words, masks, state)?;
        drop(blocks);
        let per = tokens_of(b0) * c / rans::LANES;
        for (j, masks) in masks.chunks_exact(per.max(1)).take(b1 - b0).enumerate() {
            let bi = b0 + j;
            let positions = masks
                .iter()
                .enumerate()
                .filter(|&(_, &mk)| mk != 0)
                .flat_map(|(k, &mk)| {
                    (0..rans::LANES)
                        .filter(move |l| mk >> l & 1 == 1)
                        .map(move |l| 8 * k + l)
                });
            g.patch_escapes(positions, framing[bi].1, bi * block, out_dtype, outs[bi], halfs)?;
        }
        b0 = b1;
    }
    Ok(())
}

/// Adds one layer's parts and streams to a decode plan (see `plan.rs`), with the same
/// checks as [`decode_layer`] short of running the streams.
pub(crate) fn plan_layer(
    payload: &[u8],
    params: &[u8],
    place: LayerPlace,
    plan: &mut RansPlan,
) -> Result<(), CodecError> {
    let p = parse_params(params)?;
    let block = p.block;
    let (t, c) = (place.tokens, place.channels);
    let mut r = PayloadReader::new(payload, "kv");
    crate::with_scratch(|scratch| {
        let mut dtable = scratch.dtable.take().unwrap_or_default();
        let result = (|| {
            for kind in 0..2u32 {
                let exceptions = read_exceptions(&mut r, p, t, c)?;
                let row = c * exceptions.dtype.size();
                for (k, &ti) in exceptions.tokens.iter().enumerate() {
                    plan.exact_rows.push(ExactRow {
                        out_slot: place.out_slot + kind,
                        token: place.token_offset + index(ti)?,
                        dtype: exceptions.dtype as u32,
                        reserved: 0,
                        data_offset: input_offset(payload, &exceptions.rows[k * row..], place.payload_offset),
                    });
                }
                let group_start = index(plan.steps.len())?;
                let rho_at = plan.rho.len();
                let PartHeader {
                    grouping,
                    m,
                    table,
                    predicted,
                } = read_part_header(
                    &mut r,
                    p,
                    t,
                    c,
                    &mut plan.steps,
                    &mut plan.biases,
                    &mut plan.rho,
                    &mut SideBufs {
                        dtable: &mut dtable,
                        syms: &mut scratch.syms,
                        words: &mut scratch.words,
                    },
                )?;
                plan.freqs
                    .extend((0..rans::MAX_SYMBOLS).map(|s| table.freq(s) as u16));
                let part = index(plan.parts.len())?;
                plan.parts.push(RansPart {
                    out_slot: place.out_slot + kind,
                    group_kind: grouping.kind as u32,
                    group_start,
                    m: m as u32,
                    token_offset: place.token_offset,
                    first_stream: index(plan.streams.len())?,
                    stream_count: index(t.div_ceil(block))?,
                    group_tokens: index(grouping.group_tokens)?,
                    rho_start: if predicted { index(rho_at)? } else { NOT_PREDICTED },
                    reserved: 0,
                });
                plan_streams(&mut r, payload, place, block, t, c, part, plan)?;
            }
            r.finish()
        })();
        scratch.dtable = Some(dtable);
        result
    })
}

/// Adds a part's streams to the plan.
#[allow(clippy::too_many_arguments)]
fn plan_streams(
    r: &mut PayloadReader<'_>,
    payload: &[u8],
    place: LayerPlace,
    block: usize,
    t: usize,
    c: usize,
    part: u32,
    plan: &mut RansPlan,
) -> Result<(), CodecError> {
    for (bi, token_start) in (0..t).step_by(block).enumerate() {
        let tokens = block.min(t - token_start);
        let rans_len = r.varint()? as usize;
        let esc_len = r.varint()? as usize;
        let stream = r.take(rans_len)?;
        if !rans_len.is_multiple_of(2) || rans_len < 4 * rans::LANES {
            return Err(CodecError::Corrupt(format!(
                "kv block {bi}: rANS stream of {rans_len} bytes"
            )));
        }
        let mut escs = r.take(esc_len)?;
        let before = plan.escapes.len();
        let escape_start = index(before)?;
        while !escs.is_empty() {
            let (v, used) = read_varint(escs)
                .ok_or_else(|| CodecError::Corrupt("kv escape missing or malformed".into()))?;
            escs = &escs[used..];
            plan.escapes.push(unzigzag(v));
        }
        let escape_count = (plan.escapes.len() - before) as u32;
        if plan.escapes.len() - before > tokens * c {
            return Err(CodecError::Corrupt(format!(
                "kv block {bi} has {escape_count} escapes for {} elements",
                tokens * c
            )));
        }
        plan.streams.push(RansStream {
            part,
            token_start: token_start as u32,
            tokens: tokens as u32,
            escape_start,
            escape_count,
            data_len: rans_len as u32,
            data_offset: input_offset(payload, stream, place.payload_offset),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::testdata::{decoded_f32, structured, uniform};
    use crate::tensor::KvShape;
    use proptest::prelude::*;

    #[test]
    fn step_grid_is_exact_and_monotone() {
        assert_eq!(step(4 * EXP_BIAS as u8), 1.0);
        assert_eq!(step(4 * EXP_BIAS as u8 + 4), 2.0);
        assert_eq!(step(0), 2f32.powi(-40));
        for e in 0..255u8 {
            assert!(step(e + 1) > step(e));
            let ratio = f64::from(step(e + 1)) / f64::from(step(e));
            assert!((ratio - 2f64.powf(0.25)).abs() < 1e-6, "{e}: {ratio}");
        }
    }

    /// The bound of the module docs, computed independently of the encoder: the group's
    /// step is at most `f σ` (σ pooled over channels for keys, within the row for key
    /// rows) rounded up a quarter-octave-half (2^(1/8)), or the smallest
    /// step that keeps `max |x| / Δ <= 2^29`, or the grid's minimum.
    fn check_bound(tuning: &KvTuning, blob: &[u8], x: &[f32], y: &[f32]) -> Result<(), TestCaseError> {
        let container = crate::Container::parse(blob)?;
        let h = container.header();
        let shape = h.shape();
        let (t, c) = (shape.tokens as usize, (shape.kv_heads * shape.head_dim) as usize);
        // Key rows never in format 1, always in format 2, in format 3 as the tuning says.
        let block = usize::from(u16::from_le_bytes([h.params[3], h.params[4]]));
        let rows_g = match h.params[0] {
            FORMAT_V1 => None,
            FORMAT_V2 => Some(tuning.rows_for(t, block).expect("format 2 has rows") * block),
            _ => tuning.rows_for(t, block).map(|gb| gb * block),
        };
        let exact = crate::plan::DecodePlan::of_container(blob, None)?.rans.exact_rows;
        let bound_step = |f: f64, sigma: f64, max_abs: f64| {
            (f * sigma * 2f64.powf(0.125))
                .max(max_abs * 2f64.powi(-28))
                .max(2f64.powi(-40))
                * (1.0 + 1e-6)
        };
        for (p, (x_part, yp)) in x.chunks_exact(t * c).zip(y.chunks_exact(t * c)).enumerate() {
            let per_token = p % 2 == 1;
            let f = tuning.factor((p / 2) as u32, shape.layers, per_token);
            // Exception tokens decode exactly; the groups' statistics are those of the
            // part with the exceptions' stand-in rows.
            let picked: Vec<usize> = exact
                .iter()
                .filter(|e| e.out_slot as usize == p)
                .map(|e| e.token as usize)
                .collect();
            for &ti in &picked {
                prop_assert_eq!(
                    &x_part[ti * c..(ti + 1) * c],
                    &yp[ti * c..(ti + 1) * c],
                    "exception token {}",
                    ti
                );
            }
            let mut buf = Vec::new();
            let xp = if picked.is_empty() {
                x_part
            } else {
                stand_ins(x_part, c, picked.len(), &mut buf)
            };
            let variance = |idx: &[usize]| {
                let n = idx.len() as f64;
                let mean = idx.iter().map(|&i| f64::from(xp[i])).sum::<f64>() / n;
                (idx.iter().map(|&i| f64::from(xp[i]).powi(2)).sum::<f64>() / n - mean * mean).max(0.0)
            };
            let max_abs = |idx: &[usize]| idx.iter().map(|&i| f64::from(xp[i]).abs()).fold(0.0, f64::max);
            // (members, step bound) of every group.
            let mut groups: Vec<(Vec<usize>, f64)> = Vec::new();
            match rows_g {
                Some(g) if !per_token => {
                    let rows = t.div_ceil(g);
                    let member = |r: usize, ch: usize| -> Vec<usize> {
                        (r * g..((r + 1) * g).min(t)).map(|ti| ti * c + ch).collect()
                    };
                    let var_rows: Vec<f64> = (0..rows)
                        .map(|r| (0..c).map(|ch| variance(&member(r, ch))).sum::<f64>() / c as f64)
                        .collect();
                    let pooled = (var_rows.iter().sum::<f64>() / rows as f64).sqrt();
                    for (r, v) in var_rows.iter().enumerate() {
                        let sigma = if tuning.key_step_per_row { v.sqrt() } else { pooled };
                        let all: Vec<usize> = (0..c).flat_map(|ch| member(r, ch)).collect();
                        let step = bound_step(f, sigma, max_abs(&all));
                        groups.extend((0..c).map(|ch| (member(r, ch), step)));
                    }
                }
                _ => {
                    let n_groups = if per_token { t } else { c };
                    let members = |g: usize| -> Vec<usize> {
                        if per_token {
                            (g * c..(g + 1) * c).collect()
                        } else {
                            (0..t).map(|ti| ti * c + g).collect()
                        }
                    };
                    // The σ each group's step follows: the pooled RMS times the group's
                    // own σ relative to it, to the tuning's power.
                    let own: Vec<f64> = (0..n_groups).map(|g| variance(&members(g)).sqrt()).collect();
                    let pooled = (own.iter().map(|s| s * s).sum::<f64>() / n_groups as f64).sqrt();
                    let power = if per_token {
                        tuning.value_power
                    } else {
                        tuning.key_power
                    };
                    for (g, &own_g) in own.iter().enumerate() {
                        let idx = members(g);
                        let sigma = if pooled > 0.0 {
                            pooled * (own_g / pooled).clamp(1.0 / 256.0, 256.0).powf(power)
                        } else {
                            0.0
                        };
                        let step = bound_step(f, sigma, max_abs(&idx));
                        groups.push((idx, step));
                    }
                }
            }
            for (g, (idx, step)) in groups.iter().enumerate() {
                for &i in idx {
                    if picked.binary_search(&(i / c)).is_ok() {
                        continue; // checked exact above
                    }
                    let err = f64::from(xp[i] - yp[i]).abs();
                    let bound = step / 2.0 + 2f64.powi(-22) * f64::from(xp[i]).abs();
                    prop_assert!(
                        err <= bound,
                        "part {p} group {g} elem {i}: {} vs {}, err {err} > {bound}",
                        xp[i],
                        yp[i]
                    );
                }
            }
        }
        Ok(())
    }

    /// A profile's tuning with key rows of about `rows` tokens (0: none), steps per row or
    /// pooled.
    fn with_rows(profile: Profile, rows: u32, per_row: bool) -> KvTuning {
        KvTuning {
            key_group_tokens: rows,
            key_rows_min_tokens: 0,
            key_step_per_row: per_row,
            ..KvTuning::of(profile).expect("a kv profile")
        }
    }

    proptest! {
        #[test]
        fn lossy_round_trip_within_bound(
            (t, seen) in structured(),
            profile in prop::sample::select(&[Profile::KvHi, Profile::KvMid, Profile::KvLo][..]),
            rows in prop::sample::select(&[0u32, 8, 20][..]),
            per_row in any::<bool>(),
            starts_sequence in any::<bool>(),
            sinks in 0u32..3,
            predict in any::<bool>(),
        ) {
            let tuning = KvTuning {
                sink_tokens: sinks,
                sink_values: sinks == 2,
                predict,
                ..with_rows(profile, rows, per_row)
            };
            let options = crate::EncodeOptions {
                tuning: Some(&tuning),
                starts_sequence,
            };
            let blob = crate::encode_with(t.view(), profile, options)?;
            let got = decoded_f32(&blob);
            check_bound(&tuning, &blob, &seen, &got)?;
            // The profile's own tuning, through `encode`.
            let own = KvTuning::of(profile).expect("a kv profile");
            let blob = crate::encode(t.view(), profile)?;
            check_bound(&own, &blob, &seen, &decoded_f32(&blob))?;
        }
    }

    /// A tensor with `channels % 8 == 0` (the vector decoder's shapes), per-channel
    /// offsets and scales, per-token magnitudes and outliers (escapes).
    fn wide(layers: u32, tokens: u32, kv_heads: u32, head_dim: u32, seed: u64) -> crate::KvTensor {
        let shape = KvShape {
            layers,
            tokens,
            kv_heads,
            head_dim,
        };
        let c = (kv_heads * head_dim) as usize;
        let mut uni = uniform(seed);
        let off: Vec<f64> = (0..c).map(|_| 3.0 * uni()).collect();
        let sc: Vec<f64> = (0..c).map(|_| 10f64.powf(uni())).collect();
        let data: Vec<u8> = (0..shape.elements() as usize)
            .flat_map(|i| {
                let ch = i % c;
                let outlier = if uni() > 0.99 { 40.0 } else { 1.0 };
                let v = off[ch] + sc[ch] * outlier * (uni() + uni());
                half::f16::from_f32(v as f32).to_bits().to_le_bytes()
            })
            .collect();
        crate::KvTensor::new(shape, Dtype::F16, data).unwrap()
    }

    /// Like [`wide`], but each channel's deviations follow their previous token's (an AR(1)
    /// walk of its own weight, as neighbouring keys do), so that the encoder predicts
    /// residuals; rare outliers give escapes inside predicted parts.
    fn wide_walk(layers: u32, tokens: u32, kv_heads: u32, head_dim: u32, seed: u64) -> crate::KvTensor {
        let shape = KvShape {
            layers,
            tokens,
            kv_heads,
            head_dim,
        };
        let (c, t) = ((kv_heads * head_dim) as usize, tokens as usize);
        let mut uni = uniform(seed);
        let off: Vec<f64> = (0..c).map(|_| 3.0 * uni()).collect();
        let sc: Vec<f64> = (0..c).map(|_| 10f64.powf(uni())).collect();
        let rho: Vec<f64> = (0..c).map(|_| 0.5 + 0.5 * uni().abs()).collect();
        let mut walk = vec![0f64; c];
        let data: Vec<u8> = (0..shape.elements() as usize)
            .flat_map(|i| {
                let ch = i % c;
                if i % (t * c) < c {
                    walk[ch] = 0.0;
                }
                walk[ch] = rho[ch] * walk[ch] + uni() + uni();
                let outlier = if uni() > 0.998 { 80.0 } else { 0.0 };
                let v = off[ch] + sc[ch] * (walk[ch] + outlier);
                half::f16::from_f32(v as f32).to_bits().to_le_bytes()
            })
            .collect();
        crate::KvTensor::new(shape, Dtype::F16, data).unwrap()
    }

    /// Decodes every layer of `blob` with the vector decoder allowed or not; the result of
    /// each layer.
    fn decode_layers(blob: &[u8], out_dtype: Dtype, simd: bool) -> Vec<Result<Vec<u8>, CodecError>> {
        let c = crate::Container::parse(blob).unwrap();
        let h = c.header();
        let shape = h.shape();
        let n = shape.layer_byte_len(out_dtype).unwrap();
        (0..h.layer_count)
            .map(|i| {
                let geom = LayerGeom {
                    index: i,
                    total_layers: h.total_layers,
                    tokens: shape.tokens as usize,
                    channels: (shape.kv_heads * shape.head_dim) as usize,
                    starts_sequence: false,
                };
                let mut out = vec![0x55u8; n];
                decode_layer_with(
                    c.layer_payload(i),
                    &h.params,
                    geom,
                    out_dtype,
                    &mut out,
                    &mut Scratch::default(),
                    simd,
                )
                .map(|()| out)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// The AVX2 build of the encoder writes the portable build's bytes, with and
        /// without key rows, from every input dtype.
        #[test]
        fn vector_encoder_matches_portable(
            layers in 1u32..3,
            tokens in 1u32..200,
            kv_heads in 1u32..4,
            head_dim in prop::sample::select(&[4u32, 8, 24, 64][..]),
            profile in prop::sample::select(&[Profile::KvHi, Profile::KvMid, Profile::KvLo][..]),
            rows in prop::sample::select(&[0u32, 16, 60][..]),
            dtype in prop::sample::select(Dtype::ALL),
            seed in any::<u64>(),
        ) {
            let t = wide(layers, tokens, kv_heads, head_dim, seed);
            let mut data = vec![0u8; t.shape().byte_len(dtype).unwrap()];
            crate::convert(t.data(), t.dtype(), &mut data, dtype).unwrap();
            let t = crate::KvTensor::new(t.shape(), dtype, data).unwrap();
            let tuning = with_rows(profile, rows, seed % 2 == 0);
            // Chunks that start their sequence too (exception rows, format 3).
            let starts_sequence = seed % 3 == 0;
            let params = params(&tuning, &t.view(), starts_sequence).unwrap();
            let shape = t.shape();
            let layer_len = shape.layer_byte_len(dtype).unwrap();
            for (i, layer) in t.data().chunks_exact(layer_len).enumerate() {
                let geom = LayerGeom {
                    index: i as u32,
                    total_layers: layers,
                    tokens: tokens as usize,
                    channels: (kv_heads * head_dim) as usize,
                    starts_sequence,
                };
                let run = |simd| {
                    encode_layer_with(&tuning, layer, dtype, &params, geom, &mut Scratch::default(), simd).unwrap()
                };
                prop_assert_eq!(run(false), run(true), "layer {}", i);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// The vector decoder gives the portable decoder's bytes, for every output dtype,
        /// and fails exactly where it fails on damaged payloads.
        #[test]
        fn vector_decoder_matches_portable(
            layers in 1u32..3,
            tokens in 1u32..140,
            kv_heads in 1u32..4,
            head_dim in prop::sample::select(&[8u32, 16, 24, 64][..]),
            profile in prop::sample::select(&[Profile::KvHi, Profile::KvMid, Profile::KvLo][..]),
            rows in prop::sample::select(&[0u32, 16, 60][..]),
            out_dtype in prop::sample::select(Dtype::ALL),
            seed in any::<u64>(),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            if !simd_available() {
                // Nothing to compare on a CPU without AVX2 and F16C.
                return Ok(());
            }
            // Independent tokens, or walks whose residuals the encoder predicts.
            let t = if seed % 3 == 0 {
                wide(layers, tokens, kv_heads, head_dim, seed)
            } else {
                wide_walk(layers, tokens, kv_heads, head_dim, seed)
            };
            let blob = crate::encode_tuned(t.view(), profile, &with_rows(profile, rows, seed % 2 == 0))?;
            let portable = decode_layers(&blob, out_dtype, false);
            let vector = decode_layers(&blob, out_dtype, true);
            for (a, b) in portable.iter().zip(&vector) {
                prop_assert!(a.is_ok(), "portable decoder failed: {:?}", a);
                prop_assert_eq!(a, b);
            }
            // A flipped payload byte (checksum fixed up): the same verdict, and the same
            // bytes when both accept it.
            let c = crate::Container::parse(&blob)?;
            let first = c.layer_payload(0);
            let start = first.as_ptr() as usize - blob.as_ptr() as usize;
            let mut bad = blob.clone();
            bad[start + at.index(first.len())] ^= xor;
            let n = bad.len() - 4;
            let crc = crc32c::crc32c(&bad[..n]);
            bad[n..].copy_from_slice(&crc.to_le_bytes());
            let portable = decode_layers(&bad, out_dtype, false);
            let vector = decode_layers(&bad, out_dtype, true);
            for (a, b) in portable.iter().zip(&vector) {
                prop_assert_eq!(a.is_ok(), b.is_ok(), "{:?} vs {:?}", a.as_ref().err(), b.as_ref().err());
                if let (Ok(a), Ok(b)) = (a, b) {
                    prop_assert_eq!(a, b);
                }
            }
        }
    }

    /// Walks are predicted (with escapes inside predicted parts), decode within the bound
    /// on both decoders, come out smaller than without prediction, and hostile weights and
    /// prediction bytes are refused by the decoder and the planner.
    #[test]
    fn predicted_parts_round_trip_and_refuse_bad_weights() {
        let t = wide_walk(2, 96, 2, 16, 7);
        let own = KvTuning::of(Profile::KvMid).unwrap();
        let blob = crate::encode(t.view(), Profile::KvMid).unwrap();
        let plan = crate::plan::DecodePlan::of_container(&blob, None).unwrap();
        let predicted: Vec<_> = plan
            .rans
            .parts
            .iter()
            .filter(|p| p.rho_start != NOT_PREDICTED)
            .collect();
        assert!(!predicted.is_empty(), "no part predicted");
        assert!(plan.rans.rho.iter().any(|&w| w > 0) && plan.rans.rho.iter().all(|&w| w <= MAX_RHO8));
        let escapes_in_predicted = plan
            .rans
            .streams
            .iter()
            .filter(|s| plan.rans.parts[s.part as usize].rho_start != NOT_PREDICTED)
            .map(|s| s.escape_count)
            .sum::<u32>();
        assert!(escapes_in_predicted > 0, "no escapes in predicted parts");
        let x = decoded_f32(&crate::encode(t.view(), Profile::Lossless).unwrap());
        check_bound(&own, &blob, &x, &decoded_f32(&blob)).unwrap();
        if simd_available() {
            for dtype in Dtype::ALL.iter().copied() {
                assert_eq!(
                    decode_layers(&blob, dtype, false),
                    decode_layers(&blob, dtype, true)
                );
            }
        }
        let unpredicted = KvTuning {
            predict: false,
            ..own.clone()
        };
        let plain = crate::encode_tuned(t.view(), Profile::KvMid, &unpredicted).unwrap();
        assert_eq!(
            decoded_f32(&plain),
            decoded_f32(&blob),
            "prediction changed the values"
        );
        assert!(
            blob.len() * 20 < plain.len() * 19,
            "{} vs {} bytes",
            blob.len(),
            plain.len()
        );

        // The first part of layer 0 (keys): exception count, kind 0, c step bytes, c zero
        // points, then the prediction byte. Damage it and its first weight.
        let c = 32;
        let payload = crate::Container::parse(&blob).unwrap().layer_payload(0);
        let start = payload.as_ptr() as usize - blob.as_ptr() as usize;
        let mut r = PayloadReader::new(payload, "test");
        assert_eq!(r.varint().unwrap(), 0);
        assert_eq!(r.u8().unwrap(), GroupKind::Channels as u8);
        r.take(c).unwrap();
        for _ in 0..c {
            r.svarint().unwrap();
        }
        let at = start + payload.len() - r.remaining();
        assert_eq!(blob[at], 1, "layer 0's keys are predicted");
        for (offset, value) in [(0, 2u8), (0, 0xFF), (1, 9), (1, 0x90)] {
            let mut bad = blob.clone();
            bad[at + offset] = value;
            fix_checksum(&mut bad);
            for simd in [false, true] {
                let got = decode_layers(&bad, Dtype::F16, simd);
                assert!(
                    matches!(got[0], Err(CodecError::Corrupt(_))),
                    "{offset} {value}: {:?}",
                    got[0]
                );
            }
            assert!(crate::plan::DecodePlan::of_container(&bad, None).is_err());
        }
    }

    /// With an odd channel count the weights' last byte has a padding nibble, which must be
    /// zero: a container with it set is refused by both decoders and the planner.
    #[test]
    fn predicted_weights_padding_must_be_zero() {
        let c = 9;
        let t = wide_walk(1, 96, 1, c as u32, 5);
        let blob = crate::encode(t.view(), Profile::KvMid).unwrap();
        let payload = crate::Container::parse(&blob).unwrap().layer_payload(0);
        let start = payload.as_ptr() as usize - blob.as_ptr() as usize;
        let mut r = PayloadReader::new(payload, "test");
        assert_eq!(r.varint().unwrap(), 0);
        assert_eq!(r.u8().unwrap(), GroupKind::Channels as u8);
        r.take(c).unwrap();
        for _ in 0..c {
            r.svarint().unwrap();
        }
        let at = start + payload.len() - r.remaining();
        assert_eq!(blob[at], 1, "the keys are predicted");
        let last = at + 1 + c / 2;
        assert_eq!(blob[last] >> 4, 0);
        let mut bad = blob.clone();
        bad[last] |= 0x10;
        fix_checksum(&mut bad);
        for simd in [false, true] {
            let got = decode_layers(&bad, Dtype::F16, simd);
            assert!(matches!(got[0], Err(CodecError::Corrupt(_))), "{:?}", got[0]);
        }
        assert!(crate::plan::DecodePlan::of_container(&bad, None).is_err());
    }

    #[test]
    fn constant_and_huge_groups_round_trip() {
        let shape = KvShape {
            layers: 1,
            tokens: 3,
            kv_heads: 1,
            head_dim: 2,
        };
        for v in [0.0f32, 1.0, -3.5e15, 1e-30] {
            let data: Vec<u8> = std::iter::repeat_n(v, 12).flat_map(|x| x.to_le_bytes()).collect();
            let t = crate::KvTensor::new(shape, Dtype::F32, data).unwrap();
            let blob = crate::encode(t.view(), Profile::KvLo).unwrap();
            for y in decoded_f32(&blob) {
                assert!((y - v).abs() <= v.abs() * 1e-6 + 1e-12, "{v} -> {y}");
            }
        }
        // Beyond 2^29 of the largest step (about 7.5e15) a value cannot be coded.
        let huge: Vec<u8> = std::iter::repeat_n(3.5e20f32, 12)
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let t = crate::KvTensor::new(shape, Dtype::F32, huge).unwrap();
        assert!(matches!(
            crate::encode(t.view(), Profile::KvLo),
            Err(CodecError::Unencodable { .. })
        ));
        let nan: Vec<u8> = [1.0f32, f32::NAN, 0.0, 0.0, 0.0, 0.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let nan = [nan.clone(), nan].concat();
        let t = crate::KvTensor::new(shape, Dtype::F32, nan).unwrap();
        assert!(matches!(
            crate::encode(t.view(), Profile::KvMid),
            Err(CodecError::Unencodable { .. })
        ));
    }

    /// Rewrites a container's checksum after an edit.
    fn fix_checksum(blob: &mut [u8]) {
        let n = blob.len() - 4;
        let crc = crc32c::crc32c(&blob[..n]);
        blob[n..].copy_from_slice(&crc.to_le_bytes());
    }

    /// A chunk written by the format-1 encoder (commit 8842c06, `wide(1, 20, 1, 8,
    /// 0x5eed)` as kv-mid: four 5-token streams per part, escapes) decodes as it did then,
    /// on both decoder paths.
    #[test]
    fn format_1_chunks_still_decode() {
        let blob = include_bytes!("../../testdata/kv-v1-mid.bin");
        let c = crate::Container::parse(blob).unwrap();
        assert_eq!(c.header().params[0], FORMAT_V1);
        let plan = crate::plan::DecodePlan::of_container(blob, None).unwrap();
        assert!(
            !plan.rans.escapes.is_empty(),
            "the golden chunk should hold escapes"
        );
        for (dtype, crc) in [
            (Dtype::F16, 0x2468_c29e),
            (Dtype::Bf16, 0x4984_b073),
            (Dtype::F32, 0x8424_28f8),
        ] {
            let n = c.header().shape().byte_len(dtype).unwrap();
            let mut out = vec![0u8; n];
            crate::decode_into(blob, dtype, &mut out).unwrap();
            assert_eq!(crc32c::crc32c(&out), crc, "{dtype:?}");
            for simd in [false, true] {
                let layers: Vec<u8> = decode_layers(blob, dtype, simd)
                    .into_iter()
                    .flat_map(|l| l.unwrap())
                    .collect();
                assert_eq!(layers, out, "{dtype:?}, vector decoder {simd}");
            }
        }
        // Without key rows the encoder still writes format 1 byte for byte: kv-mid's
        // tuning of that commit, spelled out so that retuning the profile keeps the check.
        let then = KvTuning {
            key_factor: 0.9,
            value_factor: 1.2,
            early_keys: 1.0 / 6.0,
            early_values: 1.0 / 15.0,
            early_scale: 1.0,
            key_power: 0.0,
            value_power: 1.5,
            key_group_tokens: 0,
            key_rows_min_tokens: 0,
            key_step_per_row: true,
            sink_tokens: 0,
            sink_values: false,
            predict: false,
        };
        let again = crate::encode_tuned(wide(1, 20, 1, 8, 0x5eed).view(), Profile::KvMid, &then).unwrap();
        assert_eq!(&again[..], &blob[..]);
    }

    #[test]
    fn format_follows_the_rows() {
        let t = wide(2, 100, 1, 16, 3);
        let format = |tuning: &KvTuning| {
            let blob = crate::encode_tuned(t.view(), Profile::KvMid, tuning).unwrap();
            crate::Container::parse(&blob).unwrap().header().params[0]
        };
        // Without exceptions or prediction, 100 tokens in 25-token streams: rows of 25 or
        // 50 tokens need format 2, one row of 100 (or none) does not.
        let plain = |rows: u32, per_row: bool| KvTuning {
            predict: false,
            ..with_rows(Profile::KvMid, rows, per_row)
        };
        assert_eq!(format(&plain(0, true)), FORMAT_V1);
        assert_eq!(format(&plain(25, true)), FORMAT_V2);
        assert_eq!(format(&plain(50, false)), FORMAT_V2);
        assert_eq!(format(&plain(100, true)), FORMAT_V1);
        assert_eq!(format(&plain(400, true)), FORMAT_V1);
        // Prediction is format 4, as are the profiles'.
        assert_eq!(format(&with_rows(Profile::KvMid, 0, true)), FORMAT_V4);
        assert_eq!(format(&with_rows(Profile::KvMid, 25, true)), FORMAT_V4);
        // A chunk that starts its sequence (exception rows) is format 3 or 4 with or
        // without rows; no rows under KEY_ROWS_MIN_TOKENS tokens, rows from it.
        let kind_of = |tokens: u32| {
            let t = wide(1, tokens, 1, 16, 4);
            let options = crate::EncodeOptions::sequence_start(true);
            let blob = crate::encode_with(t.view(), Profile::KvMid, options).unwrap();
            let plan = crate::plan::DecodePlan::of_container(&blob, None).unwrap();
            (
                crate::Container::parse(&blob).unwrap().header().params[0],
                plan.rans.parts[0].group_kind,
            )
        };
        let (channels, rows) = (GroupKind::Channels as u32, GroupKind::Rows as u32);
        assert_eq!(kind_of(256), (FORMAT_V4, channels));
        assert_eq!(kind_of(KEY_ROWS_MIN_TOKENS - 1), (FORMAT_V4, channels));
        assert_eq!(kind_of(KEY_ROWS_MIN_TOKENS), (FORMAT_V4, rows));
        // A format-2 payload under a format-1 header is refused, by the planner too.
        let mut blob = crate::encode_tuned(t.view(), Profile::KvMid, &plain(25, true)).unwrap();
        assert_eq!(blob[40], FORMAT_V2);
        blob[40] = FORMAT_V1;
        fix_checksum(&mut blob);
        assert!(matches!(crate::decode(&blob), Err(CodecError::Corrupt(_))));
        assert!(crate::plan::DecodePlan::of_container(&blob, None).is_err());
    }

    /// Keys that drift and change scale from row to row: rows get their own zero points
    /// and steps (predictions across different steps), and the bound holds.
    #[test]
    fn drifting_keys_round_trip_in_rows() {
        let shape = KvShape {
            layers: 1,
            tokens: 256,
            kv_heads: 2,
            head_dim: 8,
        };
        let c = 16;
        let data: Vec<f32> = (0..shape.elements() as usize)
            .map(|i| {
                let (p, ti, ch) = (i / (256 * c), i / c % 256, i % c);
                let scale = if ti < 128 { 1.0 } else { 9.0 };
                let drift = 5.0 * ((ti as f64) / 40.0 + ch as f64).sin();
                let noise = ((i * 2_654_435_761) % 1000) as f64 / 500.0 - 1.0;
                (if p == 0 { drift + scale * noise } else { noise }) as f32
            })
            .collect();
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = crate::KvTensor::new(shape, Dtype::F32, bytes).unwrap();
        for per_row in [true, false] {
            let tuning = with_rows(Profile::KvMid, 32, per_row);
            let blob = crate::encode_tuned(t.view(), Profile::KvMid, &tuning).unwrap();
            assert_eq!(
                crate::Container::parse(&blob).unwrap().header().params[0],
                FORMAT_V4
            );
            check_bound(&tuning, &blob, &data, &decoded_f32(&blob)).unwrap();
            // Rows err less than one zero point per channel for the whole chunk here.
            let plain =
                crate::encode_tuned(t.view(), Profile::KvMid, &with_rows(Profile::KvMid, 0, true)).unwrap();
            let err = |b: &[u8]| -> f64 {
                let y = decoded_f32(b);
                data[..256 * c]
                    .iter()
                    .zip(&y)
                    .map(|(a, b)| f64::from(a - b).powi(2))
                    .sum()
            };
            assert!(
                err(&blob) < err(&plain),
                "rows: {} vs plain {}",
                err(&blob),
                err(&plain)
            );
        }
    }

    /// A chunk whose token 0 has keys far from the others (an attention sink): its key
    /// rows are stored exactly (format 3) in every layer, every decoder path and the plan
    /// agree, the other tokens err less than with the sink quantized among them, and a
    /// hostile exception list is refused.
    #[test]
    fn sink_tokens_are_stored_exactly() {
        let base = wide(2, 64, 2, 8, 11);
        let (c, t) = (16usize, 64usize);
        let mut x = decoded_f32(&crate::encode(base.view(), Profile::Lossless).unwrap());
        for layer in 0..2 {
            for ch in 0..c {
                x[layer * 2 * t * c + ch] = 60.0 + 7.0 * ch as f32;
            }
        }
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let sink = crate::KvTensor::new(base.shape(), Dtype::F32, bytes).unwrap();
        let own = KvTuning::of(Profile::KvMid).unwrap();
        let first = |tuning: &KvTuning| {
            let options = crate::EncodeOptions {
                tuning: Some(tuning),
                starts_sequence: true,
            };
            crate::encode_with(sink.view(), Profile::KvMid, options).unwrap()
        };
        let blob = first(&own);
        assert_eq!(
            crate::Container::parse(&blob).unwrap().header().params[0],
            FORMAT_V4
        );
        let unpredicted = KvTuning {
            predict: false,
            ..own.clone()
        };
        assert_eq!(
            crate::Container::parse(&first(&unpredicted))
                .unwrap()
                .header()
                .params[0],
            FORMAT_V3
        );
        let rows_of = |blob: &[u8]| -> Vec<(u32, u32, u32)> {
            let plan = crate::plan::DecodePlan::of_container(blob, None).unwrap();
            plan.rans
                .exact_rows
                .iter()
                .map(|e| (e.out_slot, e.token, e.dtype))
                .collect()
        };
        // Token 0 of both key parts; values too only when the tuning says so.
        let f32_id = Dtype::F32 as u32;
        assert_eq!(rows_of(&blob), [(0, 0, f32_id), (2, 0, f32_id)]);
        let with_values = KvTuning {
            sink_tokens: 2,
            sink_values: true,
            ..own.clone()
        };
        let both = first(&with_values);
        assert_eq!(rows_of(&both).len(), 8);
        check_bound(&with_values, &both, &x, &decoded_f32(&both)).unwrap();
        // A chunk further into its sequence has no sink: no exception rows (format 1
        // when not predicted).
        let later = crate::encode(sink.view(), Profile::KvMid).unwrap();
        assert!(rows_of(&later).is_empty());
        let later = crate::encode_tuned(sink.view(), Profile::KvMid, &unpredicted).unwrap();
        assert_eq!(
            crate::Container::parse(&later).unwrap().header().params[0],
            FORMAT_V1
        );
        assert!(rows_of(&later).is_empty());
        let y = decoded_f32(&blob);
        check_bound(&own, &blob, &x, &y).unwrap();
        for dtype in Dtype::ALL.iter().copied() {
            let n = sink.shape().byte_len(dtype).unwrap();
            let mut out = vec![0u8; n];
            crate::decode_into(&blob, dtype, &mut out).unwrap();
            for simd in [false, true] {
                let layers: Vec<u8> = decode_layers(&blob, dtype, simd)
                    .into_iter()
                    .flat_map(|l| l.unwrap())
                    .collect();
                assert_eq!(layers, out, "{dtype:?}, vector decoder {simd}");
            }
        }
        // The other tokens' keys: closer than with the sink among the quantized tokens.
        let without = KvTuning {
            sink_tokens: 0,
            ..own.clone()
        };
        let plain = first(&without);
        let key_err = |y: &[f32]| -> f64 {
            (0..2)
                .flat_map(|l| (l * 2 * t * c + c)..(l * 2 + 1) * t * c)
                .map(|i| f64::from(x[i] - y[i]).powi(2))
                .sum()
        };
        assert!(key_err(&y) < 0.5 * key_err(&decoded_f32(&plain)));
        // A non-finite sink is refused like any other non-finite element.
        let mut bad = x.clone();
        bad[3] = f32::INFINITY;
        let bytes: Vec<u8> = bad.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bad = crate::KvTensor::new(base.shape(), Dtype::F32, bytes).unwrap();
        let options = crate::EncodeOptions::sequence_start(true);
        assert!(matches!(
            crate::encode_with(bad.view(), Profile::KvMid, options),
            Err(CodecError::Unencodable { .. })
        ));
        // Hostile lists: the first part's count, dtype id and token, each out of range.
        let at = {
            let c = crate::Container::parse(&blob).unwrap();
            c.layer_payload(0).as_ptr() as usize - blob.as_ptr() as usize
        };
        // Layer 0's keys: one exception, token 0, in f32.
        assert_eq!(&blob[at..at + 3], &[1, Dtype::F32 as u8, 0]);
        for (off, v) in [(0, 100u8), (1, 9), (2, 64), (2, 70)] {
            let mut bad = blob.clone();
            bad[at + off] = v;
            fix_checksum(&mut bad);
            assert!(
                matches!(crate::decode(&bad), Err(CodecError::Corrupt(_))),
                "byte {off} = {v}"
            );
            assert!(crate::plan::DecodePlan::of_container(&bad, None).is_err());
        }
    }

    #[test]
    fn params_are_checked() {
        assert_eq!(
            parse_params(&[1, 12, 8, 32, 0]),
            Ok(Params { format: 1, block: 32 })
        );
        assert_eq!(
            parse_params(&[2, 12, 8, 41, 0]),
            Ok(Params { format: 2, block: 41 })
        );
        assert_eq!(
            parse_params(&[3, 12, 8, 8, 0]),
            Ok(Params { format: 3, block: 8 })
        );
        assert_eq!(
            parse_params(&[4, 12, 8, 32, 0]),
            Ok(Params { format: 4, block: 32 })
        );
        for bad in [
            &[][..],
            &[5, 12, 8, 32, 0],
            &[0, 12, 8, 32, 0],
            &[1, 11, 8, 32, 0],
            &[1, 12, 4, 32, 0],
            &[1, 12, 8, 0, 0],
            &[1, 12, 8, 32],
        ] {
            assert!(parse_params(bad).is_err(), "{bad:?}");
        }
    }
}
