//! Codec profiles: how one layer of a KV tensor becomes payload bytes and back.
//!
//! Each profile lives in its own module (`lossless.rs`, `q8.rs`, `cachegen.rs`, `kv.rs`)
//! and provides four functions: `params` (the profile parameter block stored in the
//! header), `check_params`, `encode_layer` and `decode_layer`. [`Profile`] dispatches to
//! them. To add a profile: add a variant with a new id, a module, and one arm in each
//! `match` here.
//!
//! A layer is the `2 * tokens * kv_heads * head_dim` elements of one layer (K then V),
//! contiguous in the canonical layout. Layers are coded independently, so a container's
//! layers can be fetched and decoded alone. Anything a lossy profile chooses per layer
//! (bit widths, steps, tables) is written into that layer's payload, so a decoder needs
//! only the header parameters and the payload: it never recomputes a schedule from the
//! layer index or the model.

pub(crate) mod cachegen;
pub(crate) mod kv;
#[cfg(target_arch = "x86_64")]
mod kv_avx2;

pub use kv::{KEY_ROWS_MIN_TOKENS, KvTuning};
mod lossless;
mod payload;
pub(crate) mod q8;

use std::fmt;
use std::str::FromStr;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::error::CodecError;
use crate::tensor::{Dtype, KvView};

/// A codec profile: the method that turns a layer into payload bytes.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Profile {
    /// Byte shuffle + zstd of the source bits; decodes bit-exact.
    Lossless = 1,
    /// 8-bit per-channel min/max quantization, no entropy coding.
    Q8 = 2,
    /// A re-implementation of the released CacheGen codec (LMCache), for comparison.
    CachegenBaseline = 3,
    /// Near-lossless kvault profile (fine steps).
    KvHi = 4,
    /// The default lossy kvault profile.
    KvMid = 5,
    /// Aggressive kvault profile (coarse steps).
    KvLo = 6,
}

impl Profile {
    /// Every profile this build knows.
    pub const ALL: &'static [Profile] = &[
        Profile::Lossless,
        Profile::Q8,
        Profile::CachegenBaseline,
        Profile::KvHi,
        Profile::KvMid,
        Profile::KvLo,
    ];

    /// The lossy profile to use when none is named.
    pub const DEFAULT_LOSSY: Profile = Profile::KvMid;

    /// Lowercase name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Lossless => "lossless",
            Profile::Q8 => "q8",
            Profile::CachegenBaseline => "cachegen-baseline",
            Profile::KvHi => "kv-hi",
            Profile::KvMid => "kv-mid",
            Profile::KvLo => "kv-lo",
        }
    }

    /// One line saying what the profile does.
    pub fn description(self) -> &'static str {
        match self {
            Profile::Lossless => "byte-shuffle + zstd of the source bits; bit-exact",
            Profile::Q8 => "8-bit per-channel min/max quantization, no entropy coding; |err| <= step/2",
            Profile::CachegenBaseline => {
                "released CacheGen scheme: per-token abs-max, 32/16 bins, per-channel CDFs, arithmetic coder"
            }
            Profile::KvHi => {
                "near-lossless (~5.1x): K per channel (step 0.28 sigma), V per token (0.7 sigma), predicted rANS, sink keys exact; |err| <= step/2"
            }
            Profile::KvMid => {
                "default lossy (~7.9x): K per channel (step 0.9 sigma), V per token (1.2 sigma), predicted rANS, sink keys exact; |err| <= step/2"
            }
            Profile::KvLo => {
                "aggressive (~9.5x): K per channel (step 1.2 sigma), V per token (1.6 sigma), predicted rANS, sink keys exact; |err| <= step/2"
            }
        }
    }

    /// The id stored in containers.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The profile with the given container id.
    pub fn from_id(id: u8) -> Result<Profile, CodecError> {
        Profile::ALL
            .iter()
            .copied()
            .find(|p| p.id() == id)
            .ok_or_else(|| CodecError::UnknownProfile(format!("id {id}")))
    }

    /// Whether decoding gives back the source bits exactly.
    pub fn is_lossless(self) -> bool {
        matches!(self, Profile::Lossless)
    }

    /// The parameter block to store in the header when encoding `view`; `tuning`
    /// replaces a `kv-*` profile's own, as in [`Profile::encode_layer`].
    pub(crate) fn params(
        self,
        view: &KvView<'_>,
        tuning: Option<&kv::KvTuning>,
        starts_sequence: bool,
    ) -> Result<Vec<u8>, CodecError> {
        match self {
            // These profiles keep everything they need in the layer payloads.
            Profile::Lossless | Profile::Q8 | Profile::CachegenBaseline => Ok(Vec::new()),
            Profile::KvHi | Profile::KvMid | Profile::KvLo => match tuning {
                Some(t) => kv::params(t, view, starts_sequence),
                None => kv::params(&self.kv_tuning()?, view, starts_sequence),
            },
        }
    }

    /// A `kv-*` profile's own tuning.
    fn kv_tuning(self) -> Result<kv::KvTuning, CodecError> {
        kv::KvTuning::of(self).ok_or_else(|| CodecError::UnknownProfile(self.to_string()))
    }

    /// Checks a parameter block read from a container.
    pub(crate) fn check_params(self, _dtype: Dtype, params: &[u8]) -> Result<(), CodecError> {
        match self {
            Profile::Lossless | Profile::Q8 | Profile::CachegenBaseline if params.is_empty() => Ok(()),
            Profile::Lossless | Profile::Q8 | Profile::CachegenBaseline => Err(CodecError::Corrupt(format!(
                "{} profile takes no parameters, found {} bytes",
                self.name(),
                params.len()
            ))),
            Profile::KvHi | Profile::KvMid | Profile::KvLo => kv::check_params(self, params),
        }
    }

    /// Encodes one layer (raw `dtype` bytes) into its payload; `tuning` replaces a `kv-*`
    /// profile's own (other profiles ignore it).
    pub(crate) fn encode_layer(
        self,
        layer: &[u8],
        dtype: Dtype,
        params: &[u8],
        geom: LayerGeom,
        tuning: Option<&kv::KvTuning>,
        scratch: &mut Scratch,
    ) -> Result<Vec<u8>, CodecError> {
        match self {
            Profile::Lossless => lossless::encode_layer(layer, dtype, params, scratch),
            Profile::Q8 => q8::encode_layer(layer, dtype, geom, scratch),
            Profile::CachegenBaseline => cachegen::encode_layer(layer, dtype, geom, scratch),
            Profile::KvHi | Profile::KvMid | Profile::KvLo => {
                let own;
                let tuning = match tuning {
                    Some(t) => t,
                    None => {
                        own = self.kv_tuning()?;
                        &own
                    }
                };
                kv::encode_layer(tuning, layer, dtype, params, geom, scratch)
            }
        }
    }

    /// Decodes one layer payload into `out`, which holds exactly one layer in `out_dtype`
    /// (the source dtype or another). Must fail (never panic, never allocate beyond a
    /// few layers' worth of scratch) on any payload.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decode_layer(
        self,
        payload: &[u8],
        dtype: Dtype,
        params: &[u8],
        geom: LayerGeom,
        out_dtype: Dtype,
        out: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<(), CodecError> {
        match self {
            Profile::Lossless => lossless::decode_layer(payload, dtype, params, out_dtype, out, scratch),
            Profile::Q8 => q8::decode_layer(payload, geom, out_dtype, out, scratch),
            Profile::CachegenBaseline => {
                cachegen::decode_layer(payload, dtype, geom, out_dtype, out, scratch)
            }
            Profile::KvHi | Profile::KvMid | Profile::KvLo => {
                kv::decode_layer(payload, params, geom, out_dtype, out, scratch)
            }
        }
    }
}

/// Where a layer sits and what it holds: what a profile needs beyond the bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerGeom {
    /// Absolute layer index in the model (the encoder's layer-group schedules use it;
    /// decoders read their choices from the payload instead).
    pub(crate) index: u32,
    /// Layers of the whole model.
    pub(crate) total_layers: u32,
    /// Tokens in the chunk.
    pub(crate) tokens: usize,
    /// Channels per token: `kv_heads * head_dim`.
    pub(crate) channels: usize,
    /// The chunk's first token is its sequence's first (for the encoder's sink tokens).
    pub(crate) starts_sequence: bool,
}

impl LayerGeom {
    /// Elements of K (or of V) in this layer.
    pub(crate) fn part_elems(&self) -> usize {
        self.tokens * self.channels
    }
}

impl FromStr for Profile {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::ALL
            .iter()
            .copied()
            .find(|p| p.name() == s)
            .ok_or_else(|| CodecError::UnknownProfile(format!("{s:?}")))
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-thread working memory reused across layers, so that coding a layer does not
/// allocate once warm.
#[derive(Default)]
pub(crate) struct Scratch {
    /// A byte buffer a profile may use freely (the lossless profile keeps shuffled bytes).
    pub(crate) buf: Vec<u8>,
    /// zstd compression context, created on first use.
    pub(crate) zstd_c: Option<zstd::bulk::Compressor<'static>>,
    /// zstd decompression context, created on first use.
    pub(crate) zstd_d: Option<zstd::bulk::Decompressor<'static>>,
    /// One layer in the source dtype, when decoding to another dtype.
    pub(crate) source: Vec<u8>,
    /// f32 working copy of a layer (encode) or of a row (decode).
    pub(crate) f32s: Vec<f32>,
    /// A second f32 buffer (per-group steps, offsets).
    pub(crate) f32b: Vec<f32>,
    /// Integer working buffer (quantized values, offsets).
    pub(crate) ints: Vec<i32>,
    /// A second integer buffer (predicted residuals, prediction state).
    pub(crate) diffs: Vec<i32>,
    /// A part's prediction weights.
    pub(crate) rho: Vec<u8>,
    /// Symbols of one stream.
    pub(crate) syms: Vec<u8>,
    /// rANS word buffer.
    pub(crate) words: Vec<u16>,
    /// f16 staging for vectorised output conversion.
    pub(crate) halfs: Vec<f16>,
    /// rANS decode table, rebuilt per part.
    pub(crate) dtable: Option<Box<crate::rans::DecodeTable>>,
    /// Positions of escape symbols in a block (vector decoder).
    pub(crate) escapes: Vec<usize>,
}

/// Returns `buf` grown to at least `len` bytes (never shrunk, so reuse is free), cut to
/// exactly `len`.
pub(crate) fn sized(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// Reads `src` (raw `dtype` elements) into `dst` as f32, replacing its contents.
// Hot path (encode): the first pass over every input element.
pub(crate) fn load_f32(src: &[u8], dtype: Dtype, dst: &mut Vec<f32>) {
    dst.clear();
    match dtype {
        Dtype::F16 => {
            // Through an f16 slice: the slice conversion is vectorised (F16C when present).
            // One row-sized staging buffer at a time keeps it in cache.
            let mut halfs = [f16::ZERO; 1024];
            for part in src.chunks(2 * halfs.len()) {
                let n = part.len() / 2;
                for (h, b) in halfs.iter_mut().zip(part.chunks_exact(2)) {
                    *h = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
                let start = dst.len();
                dst.resize(start + n, 0.0);
                halfs[..n].convert_to_f32_slice(&mut dst[start..]);
            }
        }
        Dtype::Bf16 => dst.extend(
            src.chunks_exact(2)
                .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
        ),
        Dtype::F32 => dst.extend(
            src.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
    }
}

/// Writes `src` into `dst` as raw `dtype` elements (`dst.len() == src.len() * size`),
/// rounding to nearest even. `halfs` is staging for the vectorised f16/bf16 conversion.
// Hot path (decode): runs over every output element of the lossy profiles.
pub(crate) fn store_f32(src: &[f32], dtype: Dtype, dst: &mut [u8], halfs: &mut Vec<f16>) {
    match dtype {
        Dtype::F16 => {
            halfs.clear();
            halfs.resize(src.len(), f16::ZERO);
            halfs.convert_from_f32_slice(src);
            for (d, h) in dst.chunks_exact_mut(2).zip(halfs.iter()) {
                d.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        Dtype::Bf16 => {
            for (d, &v) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
            }
        }
        Dtype::F32 => {
            for (d, v) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Test data shared by the profile tests: small tensors with the structure of KV caches
/// (per-channel offsets and scales, occasional outliers), as f32 and in a source dtype.
#[cfg(test)]
pub(crate) mod testdata {
    use proptest::prelude::*;

    use crate::tensor::{Dtype, KvShape, KvTensor, convert};

    /// A deterministic xorshift stream of uniforms in `[-1, 1)` from `seed`.
    pub(crate) fn uniform(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        }
    }

    /// A structured tensor: `(tensor in its dtype, the same values as f32)`.
    pub(crate) fn structured() -> impl Strategy<Value = (KvTensor, Vec<f32>)> {
        (
            1u32..4,
            1u32..40,
            1u32..3,
            1u32..9,
            prop::sample::select(Dtype::ALL),
            any::<u64>(),
        )
            .prop_map(|(layers, tokens, kv_heads, head_dim, dtype, seed)| {
                let shape = KvShape {
                    layers,
                    tokens,
                    kv_heads,
                    head_dim,
                };
                let c = (kv_heads * head_dim) as usize;
                let mut uni = uniform(seed);
                let offsets: Vec<f64> = (0..c).map(|_| 10.0 * uni()).collect();
                let scales: Vec<f64> = (0..c).map(|_| 10f64.powf(3.0 * uni() - 1.0)).collect();
                let n = shape.elements() as usize;
                let f: Vec<f32> = (0..n)
                    .map(|i| {
                        let ch = i % c;
                        let outlier = if uni() > 0.995 { 50.0 } else { 1.0 };
                        (offsets[ch] + scales[ch] * outlier * uni()) as f32
                    })
                    .collect();
                let f32_bytes: Vec<u8> = f.iter().flat_map(|x| x.to_le_bytes()).collect();
                let mut data = vec![0u8; shape.byte_len(dtype).unwrap()];
                convert(&f32_bytes, Dtype::F32, &mut data, dtype).unwrap();
                // The values the codec sees: f32 rounded through the source dtype.
                let mut back = vec![0u8; f32_bytes.len()];
                convert(&data, dtype, &mut back, Dtype::F32).unwrap();
                let seen = back
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                (KvTensor::new(shape, dtype, data).unwrap(), seen)
            })
    }

    /// Decodes `blob` to f32 values.
    pub(crate) fn decoded_f32(blob: &[u8]) -> Vec<f32> {
        let t = crate::decode(blob).unwrap();
        let mut out = vec![0u8; t.shape().byte_len(Dtype::F32).unwrap()];
        crate::decode_into(blob, Dtype::F32, &mut out).unwrap();
        out.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_round_trip() {
        for &p in Profile::ALL {
            assert_eq!(Profile::from_id(p.id()), Ok(p));
            assert_eq!(p.name().parse::<Profile>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
            assert!(!p.description().is_empty());
        }
        assert_eq!(Profile::Lossless.id(), 1);
        assert!(Profile::Lossless.is_lossless());
        assert!(!Profile::DEFAULT_LOSSY.is_lossless());
        assert_eq!("kv-mid".parse::<Profile>(), Ok(Profile::DEFAULT_LOSSY));
        assert!(matches!(Profile::from_id(0), Err(CodecError::UnknownProfile(_))));
        assert!(matches!(
            "q3".parse::<Profile>(),
            Err(CodecError::UnknownProfile(_))
        ));
    }
}
