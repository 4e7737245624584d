//! Decode plans: a flat, validated description of where every entropy-coded substream and
//! every dequantization parameter of a batch of containers lies, for decoders that are not
//! this crate's CPU code (the CUDA kernels of `kvault-kernels`).
//!
//! Parsing an untrusted container is branchy, sequential work that a GPU does badly; the
//! bulk of the bytes (the substreams) is the opposite. So the host walks each container's
//! headers and payload framing once, checks every length, count and table against the
//! container's geometry, and writes fixed-size `#[repr(C)]` records (parts and streams) plus
//! a few parameter arrays. A GPU decoder uploads those records beside the raw container
//! bytes and decodes every stream independently; it never parses variable-length framing
//! and never reads outside `[data_offset, data_offset + data_len)` of a stream.
//!
//! What stays for the decoder to check: that each rANS stream ends in its initial state with
//! every word consumed and that its escape count matches (exactly the checks of
//! [`crate::rans::decode`] and the `kv` profile), and that a cachegen stream renormalises.
//!
//! Output is described per part by `out_slot = 2 * output_layer + (0 for K, 1 for V)` and a
//! global `token_offset`, so one plan covers several chunks of a prefix (chunks follow each
//! other along the token axis) and a layer range of each.
//!
//! Records are plain `u32`/`u64`/`f32` fields without padding, so they can be copied to a
//! device as bytes ([`as_bytes`]).

use std::ops::Range;

use crate::container::Container;
use crate::error::CodecError;
use crate::profile::Profile;
use crate::profile::{cachegen, kv, q8};

/// Which decoder family a container needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `kv-hi`, `kv-mid`, `kv-lo`: quantized groups, interleaved rANS streams.
    Rans,
    /// `q8`: 8-bit codes with per-channel min and step.
    Q8,
    /// `cachegen-baseline`: per-token scales, binary arithmetic coded channel streams.
    Cachegen,
}

impl Family {
    /// The family of a profile, or `None` for profiles with no plan (lossless: zstd is a
    /// CPU codec).
    pub fn of(profile: Profile) -> Option<Family> {
        match profile {
            Profile::KvHi | Profile::KvMid | Profile::KvLo => Some(Family::Rans),
            Profile::Q8 => Some(Family::Q8),
            Profile::CachegenBaseline => Some(Family::Cachegen),
            Profile::Lossless => None,
        }
    }
}

/// One K or V part of one layer of one chunk in a rANS plan (40 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RansPart {
    /// `2 * output_layer + kind` (kind 0 = K, 1 = V).
    pub out_slot: u32,
    /// How the part's quantization groups are laid out: 0 one per channel (group
    /// `channel`), 1 one per token (group `token`), 2 one per (row of `group_tokens`
    /// tokens, channel) (group `token / group_tokens * channels + channel`); tokens count
    /// from the chunk's first, groups from `group_start`.
    pub group_kind: u32,
    /// Index of the part's first group in [`RansPlan::steps`] and [`RansPlan::biases`].
    pub group_start: u32,
    /// Alphabet half-width `M`: symbols `0..=2M` are residuals `s - M`, `2M + 1` escapes.
    pub m: u32,
    /// Global output token of the chunk's first token.
    pub token_offset: u32,
    /// Index of the part's first stream in [`RansPlan::streams`] (a part's streams are
    /// consecutive, in token order).
    pub first_stream: u32,
    /// Streams of the part.
    pub stream_count: u32,
    /// Tokens per row of groups when `group_kind` is 2 (a multiple of the streams'
    /// tokens), 0 otherwise.
    pub group_tokens: u32,
    /// A predicted part (payload format 4): index of its `channels` weights in
    /// [`RansPlan::rho`]; [`NOT_PREDICTED`] otherwise. In a predicted part every symbol
    /// `s` that is not an escape decodes to `(s + bias + pred) * step` (i32 wrapping adds),
    /// `pred = (ρ8 · state + 4) >> 3` from its channel's state: the previous token's
    /// `s − M + pred` in the same stream, clamped to ±127; 0 at the stream's first token
    /// and after an escape. Escapes decode as in other parts.
    pub rho_start: u32,
    /// Reserved (zero).
    pub reserved: u32,
}

/// [`RansPart::rho_start`] of a part whose residuals are not predicted.
pub const NOT_PREDICTED: u32 = u32::MAX;

/// One rANS stream (a block of tokens of one part) in a rANS plan (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RansStream {
    /// Index into [`RansPlan::parts`] (also of the part's 4096-slot decode table).
    pub part: u32,
    /// First token of the block within its chunk.
    pub token_start: u32,
    /// Tokens in the block.
    pub tokens: u32,
    /// Index of the block's first escape value in [`RansPlan::escapes`].
    pub escape_start: u32,
    /// Escape values the block holds.
    pub escape_count: u32,
    /// Bytes of the rANS stream (even, at least `4 * LANES`).
    pub data_len: u32,
    /// Byte offset of the stream in the batch's input bytes.
    pub data_offset: u64,
}

/// One token row of one part stored exactly (a `kv-*` exception token, payload format 3),
/// which a decoder writes over what the part's streams decoded there (24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExactRow {
    /// `2 * output_layer + kind`.
    pub out_slot: u32,
    /// Global output token.
    pub token: u32,
    /// Dtype id of the stored row ([`crate::Dtype`]: 1 f16, 2 bf16, 3 f32).
    pub dtype: u32,
    /// Reserved (zero).
    pub reserved: u32,
    /// Byte offset of the row's `channels` little-endian elements in the batch's input.
    pub data_offset: u64,
}

/// The rANS family's records and parameters.
#[derive(Clone, Debug, Default)]
pub struct RansPlan {
    /// Parts, one per (chunk, layer, K/V).
    pub parts: Vec<RansPart>,
    /// Streams, each part's consecutive and in token order.
    pub streams: Vec<RansStream>,
    /// Frequency tables, [`crate::rans::MAX_SYMBOLS`] entries per part (zero-padded), each
    /// summing to `1 << PROB_BITS`.
    pub freqs: Vec<u16>,
    /// Step of every group (f32, exact grid values).
    pub steps: Vec<f32>,
    /// `zero - M` of every group: a symbol `s` decodes to `(s + bias) * step` (i32 wrapping
    /// add, as the CPU decoder).
    pub biases: Vec<i32>,
    /// Escaped residuals (already un-zigzagged); an escape decodes to
    /// `f32(i64(r) + bias + M) * step`.
    pub escapes: Vec<i32>,
    /// Rows stored exactly, to be written after the streams are decoded (each row's
    /// element converted exactly to f32, then rounded to the output dtype).
    pub exact_rows: Vec<ExactRow>,
    /// Prediction weights `ρ8` (`0..=8`) of the predicted parts, `channels` per part.
    pub rho: Vec<u8>,
}

/// One part of a q8 plan (24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Q8Part {
    /// `2 * output_layer + kind`.
    pub out_slot: u32,
    /// Global output token of the chunk's first token.
    pub token_offset: u32,
    /// Tokens of the chunk.
    pub tokens: u32,
    /// Index of the part's `channels` minimums, then `channels` steps, in [`Q8Plan::lo_step`].
    pub param_start: u32,
    /// Byte offset of the part's `tokens * channels` codes in the batch's input bytes.
    pub data_offset: u64,
}

/// The q8 family's records and parameters.
#[derive(Clone, Debug, Default)]
pub struct Q8Plan {
    /// Parts, one per (chunk, layer, K/V).
    pub parts: Vec<Q8Part>,
    /// Per part: `channels` f32 minimums, then `channels` f32 steps.
    pub lo_step: Vec<f32>,
}

/// One part of a cachegen plan (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachegenPart {
    /// `2 * output_layer + kind`.
    pub out_slot: u32,
    /// Global output token of the chunk's first token.
    pub token_offset: u32,
    /// Index of the part's per-token scales in [`CachegenPlan::scales`].
    pub scale_start: u32,
    /// Index of the part's `channels` CDFs (33 entries each) in [`CachegenPlan::cdfs`].
    pub cdf_start: u32,
    /// `bins / 2 - 1`.
    pub max: u32,
    /// Reserved (zero).
    pub reserved: [u32; 3],
}

/// One arithmetic-coded stream (one channel of up to 256 tokens) of a cachegen plan (24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachegenStream {
    /// Index into [`CachegenPlan::parts`].
    pub part: u32,
    /// Channel the stream codes.
    pub channel: u32,
    /// First token of the stream within its chunk.
    pub token_start: u32,
    /// Tokens the stream codes.
    pub tokens: u32,
    /// Byte offset of the stream in the batch's input bytes.
    pub data_offset: u64,
    /// Bytes of the stream.
    pub data_len: u32,
    /// Reserved (zero).
    pub reserved: u32,
}

/// The cachegen family's records and parameters.
#[derive(Clone, Debug, Default)]
pub struct CachegenPlan {
    /// Parts, one per (chunk, layer, K/V).
    pub parts: Vec<CachegenPart>,
    /// Streams.
    pub streams: Vec<CachegenStream>,
    /// Per-token scales (f32, converted exactly from the source dtype).
    pub scales: Vec<f32>,
    /// CDFs, 33 entries per channel, strictly increasing from 0.
    pub cdfs: Vec<u16>,
}

/// A decode plan for a batch of containers that share a channel count: every chunk's
/// selected layers, placed along the token axis of one output.
#[derive(Clone, Debug, Default)]
pub struct DecodePlan {
    /// Channels per token (`kv_heads * head_dim`), the same for every chunk.
    pub channels: u32,
    /// Output layers (the length of the layer range selected in every chunk).
    pub layers: u32,
    /// Output tokens: the end of the last chunk placed.
    pub tokens: u32,
    /// Bytes of input the plan refers to (the end of the last container placed).
    pub input_bytes: u64,
    /// Records of `kv-*` containers.
    pub rans: RansPlan,
    /// Records of `q8` containers.
    pub q8: Q8Plan,
    /// Records of `cachegen-baseline` containers.
    pub cachegen: CachegenPlan,
}

impl DecodePlan {
    /// An empty plan.
    pub fn new() -> DecodePlan {
        DecodePlan::default()
    }

    /// Adds the layers `layers` (relative to the container's first stored layer; `None` for
    /// all) of container `blob`, which the decoder will find at byte `input_offset` of its
    /// input, placed at output token `token_offset`.
    ///
    /// Every chunk of a plan must have the same channel count and select the same number
    /// of layers. Fails on a container that is not valid (the whole container is parsed and
    /// checksummed), on a profile without a plan (lossless), or on a geometry mismatch; the
    /// plan is left unchanged on failure.
    pub fn add(
        &mut self,
        blob: &[u8],
        input_offset: u64,
        token_offset: u32,
        layers: Option<Range<u32>>,
    ) -> Result<(), CodecError> {
        let one = DecodePlan::of_container(blob, layers)?;
        self.merge(&one, input_offset, token_offset)
    }

    /// The plan of one container alone, at input offset 0 and output token 0 (chunks of a
    /// batch can be planned in parallel and then [`merge`](Self::merge)d in order).
    pub fn of_container(blob: &[u8], layers: Option<Range<u32>>) -> Result<DecodePlan, CodecError> {
        let mut plan = DecodePlan::new();
        plan.plan_container(blob, layers)?;
        Ok(plan)
    }

    /// Empties the plan, keeping its allocations.
    pub fn clear(&mut self) {
        let DecodePlan {
            channels,
            layers,
            tokens,
            input_bytes,
            rans,
            q8,
            cachegen,
        } = self;
        (*channels, *layers, *tokens, *input_bytes) = (0, 0, 0, 0);
        rans.parts.clear();
        rans.streams.clear();
        rans.freqs.clear();
        rans.steps.clear();
        rans.biases.clear();
        rans.escapes.clear();
        rans.exact_rows.clear();
        rans.rho.clear();
        q8.parts.clear();
        q8.lo_step.clear();
        cachegen.parts.clear();
        cachegen.streams.clear();
        cachegen.scales.clear();
        cachegen.cdfs.clear();
    }

    /// Replaces this plan with the plan of one container, as [`of_container`](Self::of_container)
    /// does, reusing this plan's allocations (planning many batches then touches no fresh
    /// memory). On failure the plan is left empty.
    pub fn plan_container(&mut self, blob: &[u8], layers: Option<Range<u32>>) -> Result<(), CodecError> {
        self.clear();
        let r = self.fill(blob, layers);
        if r.is_err() {
            self.clear();
        }
        r
    }

    fn fill(&mut self, blob: &[u8], layers: Option<Range<u32>>) -> Result<(), CodecError> {
        let c = Container::parse(blob)?;
        let h = c.header();
        let family = Family::of(h.profile).ok_or_else(|| {
            CodecError::Corrupt(format!("profile {} has no decode plan (a CPU codec)", h.profile))
        })?;
        let layers = layers.unwrap_or(0..h.layer_count);
        if layers.is_empty() || layers.end > h.layer_count {
            return Err(CodecError::LayerRange {
                start: h.layer_start.saturating_add(layers.start),
                end: h.layer_start.saturating_add(layers.end),
                available_start: h.layer_start,
                available_end: h.layer_range().end,
            });
        }
        let channels = h.kv_heads * h.head_dim;
        let plan = self;
        plan.channels = channels;
        plan.layers = layers.end - layers.start;
        plan.tokens = h.tokens;
        plan.input_bytes = blob.len() as u64;
        // Reserve what the records will need, so that planning does not reallocate.
        let n_layers = plan.layers as usize;
        let (t, ch) = (h.tokens as usize, channels as usize);
        match family {
            Family::Rans => {
                plan.rans.parts.reserve(2 * n_layers);
                plan.rans.freqs.reserve(2 * n_layers * crate::rans::MAX_SYMBOLS);
                plan.rans.steps.reserve(n_layers * (t + ch));
                plan.rans.biases.reserve(n_layers * (t + ch));
                plan.rans.streams.reserve(2 * n_layers * t.div_ceil(8));
            }
            Family::Q8 => plan.q8.lo_step.reserve(4 * n_layers * ch),
            Family::Cachegen => {
                plan.cachegen.scales.reserve(2 * n_layers * t);
                plan.cachegen.cdfs.reserve(2 * n_layers * ch * 33);
            }
        }
        for (out_layer, i) in layers.enumerate() {
            let payload = c.layer_payload(i);
            let place = LayerPlace {
                tokens: h.tokens as usize,
                channels: channels as usize,
                out_slot: 2 * out_layer as u32,
                token_offset: 0,
                // The payload borrows `blob`: its offset there is a pointer difference.
                payload_offset: (payload.as_ptr() as usize - blob.as_ptr() as usize) as u64,
            };
            match family {
                Family::Rans => kv::plan_layer(payload, &h.params, place, &mut plan.rans)?,
                Family::Q8 => q8::plan_layer(payload, place, &mut plan.q8)?,
                Family::Cachegen => cachegen::plan_layer(payload, h.dtype, place, &mut plan.cachegen)?,
            }
        }
        Ok(())
    }

    /// Appends `other` (a plan whose input starts at 0 and whose tokens start at 0), moved
    /// to input byte `input_offset` and output token `token_offset`. Fails, leaving `self`
    /// unchanged, if the channel or layer counts differ or an index would overflow.
    pub fn merge(
        &mut self,
        other: &DecodePlan,
        input_offset: u64,
        token_offset: u32,
    ) -> Result<(), CodecError> {
        if other.is_empty() {
            return Ok(());
        }
        if !self.is_empty() && (other.channels != self.channels || other.layers != self.layers) {
            return Err(CodecError::BadShape(format!(
                "chunk of {} channels and {} layers in a plan of {} channels and {} layers",
                other.channels, other.layers, self.channels, self.layers
            )));
        }
        let overflow = || CodecError::BadShape("decode plan offsets overflow".into());
        let token_end = token_offset.checked_add(other.tokens).ok_or_else(overflow)?;
        let input_end = input_offset.checked_add(other.input_bytes).ok_or_else(overflow)?;
        let idx = |base: usize| u32::try_from(base).map_err(|_| overflow());
        let count = |n: usize, extra: usize| {
            n.checked_add(extra)
                .filter(|&v| u32::try_from(v).is_ok())
                .ok_or_else(overflow)
        };
        // Check every rebased index fits before touching `self`.
        count(self.rans.parts.len(), other.rans.parts.len())?;
        count(self.rans.steps.len(), other.rans.steps.len())?;
        count(self.rans.escapes.len(), other.rans.escapes.len())?;
        count(self.rans.exact_rows.len(), other.rans.exact_rows.len())?;
        count(self.rans.rho.len(), other.rans.rho.len())?;
        count(self.q8.lo_step.len(), other.q8.lo_step.len())?;
        count(self.cachegen.parts.len(), other.cachegen.parts.len())?;
        count(self.cachegen.scales.len(), other.cachegen.scales.len())?;
        count(self.cachegen.cdfs.len(), other.cachegen.cdfs.len())?;
        let (rp, rg, re) = (
            idx(self.rans.parts.len())?,
            idx(self.rans.steps.len())?,
            idx(self.rans.escapes.len())?,
        );
        let rs = idx(self.rans.streams.len())?;
        let rr = idx(self.rans.rho.len())?;
        count(self.rans.streams.len(), other.rans.streams.len())?;
        self.rans.parts.extend(other.rans.parts.iter().map(|p| RansPart {
            group_start: p.group_start + rg,
            first_stream: p.first_stream + rs,
            token_offset: p.token_offset + token_offset,
            rho_start: if p.rho_start == NOT_PREDICTED {
                NOT_PREDICTED
            } else {
                p.rho_start + rr
            },
            ..*p
        }));
        self.rans
            .streams
            .extend(other.rans.streams.iter().map(|s| RansStream {
                part: s.part + rp,
                escape_start: s.escape_start + re,
                data_offset: s.data_offset + input_offset,
                ..*s
            }));
        self.rans.freqs.extend(&other.rans.freqs);
        self.rans.steps.extend(&other.rans.steps);
        self.rans.biases.extend(&other.rans.biases);
        self.rans.escapes.extend(&other.rans.escapes);
        self.rans.rho.extend(&other.rans.rho);
        self.rans
            .exact_rows
            .extend(other.rans.exact_rows.iter().map(|e| ExactRow {
                token: e.token + token_offset,
                data_offset: e.data_offset + input_offset,
                ..*e
            }));
        let qp = idx(self.q8.lo_step.len())?;
        self.q8.parts.extend(other.q8.parts.iter().map(|p| Q8Part {
            token_offset: p.token_offset + token_offset,
            param_start: p.param_start + qp,
            data_offset: p.data_offset + input_offset,
            ..*p
        }));
        self.q8.lo_step.extend(&other.q8.lo_step);
        let (cp, cs, cc) = (
            idx(self.cachegen.parts.len())?,
            idx(self.cachegen.scales.len())?,
            idx(self.cachegen.cdfs.len())?,
        );
        self.cachegen
            .parts
            .extend(other.cachegen.parts.iter().map(|p| CachegenPart {
                token_offset: p.token_offset + token_offset,
                scale_start: p.scale_start + cs,
                cdf_start: p.cdf_start + cc,
                ..*p
            }));
        self.cachegen
            .streams
            .extend(other.cachegen.streams.iter().map(|s| CachegenStream {
                part: s.part + cp,
                data_offset: s.data_offset + input_offset,
                ..*s
            }));
        self.cachegen.scales.extend(&other.cachegen.scales);
        self.cachegen.cdfs.extend(&other.cachegen.cdfs);
        self.channels = other.channels;
        self.layers = other.layers;
        self.tokens = self.tokens.max(token_end);
        self.input_bytes = self.input_bytes.max(input_end);
        Ok(())
    }

    /// Whether the plan has no parts.
    pub fn is_empty(&self) -> bool {
        self.rans.parts.is_empty() && self.q8.parts.is_empty() && self.cachegen.parts.is_empty()
    }
}

/// A record index as the u32 the records hold.
pub(crate) fn index(local: usize) -> Result<u32, CodecError> {
    u32::try_from(local).map_err(|_| CodecError::BadShape("decode plan exceeds 2^32 records".into()))
}

/// Byte offset in the batch input of `inner`, a subslice of `payload`, which starts at
/// `payload_offset`.
pub(crate) fn input_offset(payload: &[u8], inner: &[u8], payload_offset: u64) -> u64 {
    payload_offset + (inner.as_ptr() as usize - payload.as_ptr() as usize) as u64
}

/// One layer's place in the output and in the input.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerPlace {
    pub(crate) tokens: usize,
    pub(crate) channels: usize,
    /// `2 * output_layer` (add 1 for V).
    pub(crate) out_slot: u32,
    pub(crate) token_offset: u32,
    /// Byte offset of the layer payload in the batch input.
    pub(crate) payload_offset: u64,
}

/// Views a slice of plan records (or of `u16`/`i32`/`f32` parameters) as bytes, to copy
/// them to a device.
pub fn as_bytes<T: PlanRecord>(records: &[T]) -> &[u8] {
    // SAFETY: `PlanRecord` is only implemented for `#[repr(C)]` types made of u32/u64/f32
    // fields without padding (checked by the size assertions below) and for primitive
    // numbers: every byte is initialised and any alignment-1 view is valid.
    unsafe { std::slice::from_raw_parts(records.as_ptr().cast::<u8>(), std::mem::size_of_val(records)) }
}

/// Types whose values are plain bytes without padding (see [`as_bytes`]).
///
/// # Safety
/// Only for `#[repr(C)]` or primitive types with no padding and no invalid bit patterns.
pub unsafe trait PlanRecord: Copy {}

// SAFETY: primitives and padding-free repr(C) records (sizes asserted below).
unsafe impl PlanRecord for RansPart {}
unsafe impl PlanRecord for RansStream {}
unsafe impl PlanRecord for ExactRow {}
unsafe impl PlanRecord for Q8Part {}
unsafe impl PlanRecord for CachegenPart {}
unsafe impl PlanRecord for CachegenStream {}
unsafe impl PlanRecord for u16 {}
unsafe impl PlanRecord for i32 {}
unsafe impl PlanRecord for u32 {}
unsafe impl PlanRecord for f32 {}

const _: () = {
    assert!(std::mem::size_of::<RansPart>() == 40);
    assert!(std::mem::size_of::<RansStream>() == 32);
    assert!(std::mem::size_of::<ExactRow>() == 24);
    assert!(std::mem::size_of::<Q8Part>() == 24);
    assert!(std::mem::size_of::<CachegenPart>() == 32);
    assert!(std::mem::size_of::<CachegenStream>() == 32);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dtype, KvShape, KvTensor};

    fn tensor(layers: u32, tokens: u32, seed: u32) -> KvTensor {
        let shape = KvShape {
            layers,
            tokens,
            kv_heads: 2,
            head_dim: 8,
        };
        let mut s = seed | 1;
        let data: Vec<u8> = (0..shape.elements())
            .flat_map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let ch = (i % 16) as f32;
                let v = (s % 2001) as f32 / 1000.0 - 1.0 + ch * 0.1;
                // An outlier now and then, to exercise escapes.
                let v = if s.is_multiple_of(97) { v * 40.0 } else { v };
                half::f16::from_f32(v).to_bits().to_le_bytes()
            })
            .collect();
        KvTensor::new(shape, Dtype::F16, data).unwrap()
    }

    #[test]
    fn plans_place_chunks_and_refuse_mismatches() {
        let a = crate::encode(tensor(3, 70, 1).view(), Profile::KvMid).unwrap();
        let b = crate::encode(tensor(3, 5, 2).view(), Profile::KvMid).unwrap();
        let mut plan = DecodePlan::new();
        plan.add(&a, 0, 0, None).unwrap();
        plan.add(&b, a.len() as u64, 70, None).unwrap();
        assert_eq!((plan.channels, plan.layers, plan.tokens), (16, 3, 75));
        assert_eq!(plan.input_bytes, (a.len() + b.len()) as u64);
        assert_eq!(plan.rans.parts.len(), 12);
        // 70 tokens in four 18-token blocks (a multiple of four streams per part); 5 tokens
        // in one block of at least 8.
        assert_eq!(plan.rans.streams.len(), 6 * 4 + 6);
        for s in &plan.rans.streams {
            let end = s.data_offset + u64::from(s.data_len);
            assert!(end <= plan.input_bytes);
        }
        // Layer count mismatch, layer range past the end, a lossless chunk, garbage.
        let before = plan.rans.streams.len();
        assert!(plan.add(&a, 0, 75, Some(0..2)).is_err());
        assert!(plan.add(&a, 0, 75, Some(1..4)).is_err());
        let lossless = crate::encode(tensor(3, 5, 3).view(), Profile::Lossless).unwrap();
        assert!(plan.add(&lossless, 0, 75, None).is_err());
        let mut bad = a.clone();
        let n = bad.len();
        bad[n / 2] ^= 0x40;
        assert!(plan.add(&bad, 0, 75, None).is_err());
        assert_eq!(plan.rans.streams.len(), before);
        assert_eq!(crate::peek_profile(&lossless).unwrap(), Profile::Lossless);
        assert_eq!(crate::peek_profile(&a).unwrap(), Profile::KvMid);
        assert!(crate::peek_profile(&a[..5]).is_err());
        assert!(crate::peek_profile(b"nope, not a container").is_err());
        for p in [Profile::Q8, Profile::CachegenBaseline] {
            let blob = crate::encode(tensor(3, 300, 4).view(), p).unwrap();
            let mut plan = DecodePlan::new();
            plan.add(&blob, 0, 0, Some(1..3)).unwrap();
            assert_eq!(plan.layers, 2);
        }
    }
}
