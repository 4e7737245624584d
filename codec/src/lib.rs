//! `kvault-codec` turns KV-cache tensors into compact, self-describing, checksummed blobs
//! and back. It holds the KV tensor model ([`KvShape`], [`Dtype`], [`KvView`], [`KvTensor`]
//! in `tensor.rs`), the container format ([`Container`], [`slice_layers`] in
//! `container.rs`, byte layout documented there), the entropy coder (`rans.rs`) and the
//! codec profiles (one module per profile under `profile/`: `lossless`, `q8`,
//! `cachegen-baseline` for comparison, and the `kv-hi`/`kv-mid`/`kv-lo` quantize + rANS
//! profiles, `kv-mid` being [`Profile::DEFAULT_LOSSY`]).
//!
//! It is not a storage layer: no I/O, no async, no knowledge of keys, tenants or the wire
//! protocol. Every function works on byte slices in memory, and every parser of untrusted
//! bytes returns a [`CodecError`] rather than panicking, looping or allocating without
//! bound (see [`tensor::LIMITS`]).
//!
//! Start reading at [`encode`] and [`decode_into`] below, then `container.rs` for the
//! format and `profile/mod.rs` for how a profile plugs in.

#![warn(missing_docs)]

pub mod container;
pub mod error;
pub mod plan;
pub mod profile;
pub mod rans;
#[cfg(target_arch = "x86_64")]
mod rans_avx2;
mod shuffle;
pub mod tensor;

use rayon::prelude::*;

pub use container::{Container, Header, peek_profile, slice_layers};
pub use error::CodecError;
pub use profile::{KvTuning, Profile};
pub use tensor::{Dtype, KvShape, KvTensor, KvView, convert};

use container::VERSION;
use profile::{LayerGeom, Scratch};

/// Encodes a whole KV tensor with a profile into a container (layers encoded in parallel with rayon).
///
/// The container stores all of the tensor's layers: `total_layers = layer_count =
/// shape.layers`, `layer_start = 0`.
pub fn encode(view: KvView<'_>, profile: Profile) -> Result<Vec<u8>, CodecError> {
    encode_inner(view, profile, None, false)
}

/// What an encoder may know about a chunk beyond its tensor ([`encode_with`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct EncodeOptions<'a> {
    /// The `kv-*` encoder's choices instead of the profile's own (as [`encode_tuned`]).
    pub tuning: Option<&'a KvTuning>,
    /// The chunk's first token is the first of its sequence (position 0), as chunk 0 of a
    /// stored prefix is: `kv-*` profiles then store the attention-sink token's key rows
    /// exactly ([`KvTuning::sink_tokens`]). Other profiles ignore it.
    pub starts_sequence: bool,
}

impl EncodeOptions<'static> {
    /// The profile's own choices, for a chunk that starts its sequence or not (chunk 0 of
    /// a prefix does).
    pub fn sequence_start(starts_sequence: bool) -> Self {
        EncodeOptions {
            tuning: None,
            starts_sequence,
        }
    }
}

/// Encodes like [`encode`] (or [`encode_tuned`] with a tuning), with what `options` tell
/// about the chunk.
pub fn encode_with(
    view: KvView<'_>,
    profile: Profile,
    options: EncodeOptions<'_>,
) -> Result<Vec<u8>, CodecError> {
    if let Some(t) = options.tuning {
        if KvTuning::of(profile).is_none() {
            return Err(CodecError::UnknownProfile(format!(
                "{profile} takes no kv tuning"
            )));
        }
        t.check()?;
    }
    encode_inner(view, profile, options.tuning, options.starts_sequence)
}

/// Encodes like [`encode`] with a `kv-*` profile but the encoder's choices of `tuning`
/// instead of the profile's own (see [`KvTuning`]); the container decodes with the same
/// decoders as any other of that profile. Fails for profiles that are not `kv-*` and for
/// a tuning out of range.
pub fn encode_tuned(view: KvView<'_>, profile: Profile, tuning: &KvTuning) -> Result<Vec<u8>, CodecError> {
    let options = EncodeOptions {
        tuning: Some(tuning),
        starts_sequence: false,
    };
    encode_with(view, profile, options)
}

fn encode_inner(
    view: KvView<'_>,
    profile: Profile,
    tuning: Option<&KvTuning>,
    starts_sequence: bool,
) -> Result<Vec<u8>, CodecError> {
    let shape = view.shape();
    let dtype = view.dtype();
    shape.checked_byte_len(dtype)?;
    let params = profile.params(&view, tuning, starts_sequence)?;
    let layer_bytes = shape.layer_byte_len(dtype)?;
    let layers: Vec<Vec<u8>> = view
        .data()
        .par_chunks(layer_bytes)
        .enumerate()
        .map(|(i, layer)| {
            // `i < shape.layers <= LIMITS.max_layers`, so it fits in u32.
            let geom = LayerGeom {
                starts_sequence,
                ..geom(&shape, i as u32, shape.layers)
            };
            with_scratch(|scratch| profile.encode_layer(layer, dtype, &params, geom, tuning, scratch))
        })
        .collect::<Result<_, _>>()?;
    let header = Header {
        version: VERSION,
        profile,
        dtype,
        total_layers: shape.layers,
        layer_start: 0,
        layer_count: shape.layers,
        tokens: shape.tokens,
        kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        params,
    };
    Ok(container::write(&header, &layers))
}

/// The geometry of absolute layer `index` of a tensor of `shape`.
fn geom(shape: &KvShape, index: u32, total_layers: u32) -> LayerGeom {
    LayerGeom {
        index,
        total_layers,
        tokens: shape.tokens as usize,
        channels: shape.kv_heads as usize * shape.head_dim as usize,
        starts_sequence: false,
    }
}

/// Decodes a container into its source dtype (shape.layers = the container's layer_count).
pub fn decode(blob: &[u8]) -> Result<KvTensor, CodecError> {
    let c = Container::parse(blob)?;
    let header = c.header();
    // Parse bounded the size; zeroed memory comes from calloc, so a hostile header that
    // claims a large tensor costs no touched memory before its payload fails to decode.
    let mut tensor = KvTensor::zeros(header.shape(), header.dtype)?;
    decode_layers(&c, header.dtype, tensor.data_mut())?;
    Ok(tensor)
}

/// Decodes straight into a caller buffer in `out_dtype` (converting when it differs from the source dtype); `out.len()` must equal shape.byte_len(out_dtype).
pub fn decode_into(blob: &[u8], out_dtype: Dtype, out: &mut [u8]) -> Result<(), CodecError> {
    let c = Container::parse(blob)?;
    let expected = c.header().shape().byte_len(out_dtype)?;
    if out.len() != expected {
        return Err(CodecError::BufferSize {
            expected,
            got: out.len(),
        });
    }
    decode_layers(&c, out_dtype, out)
}

/// Decodes every layer of `c` into `out` (sized for `out_dtype`), one rayon task per layer.
fn decode_layers(c: &Container<'_>, out_dtype: Dtype, out: &mut [u8]) -> Result<(), CodecError> {
    let layer_bytes = c.header().shape().layer_byte_len(out_dtype)?;
    out.par_chunks_mut(layer_bytes)
        .enumerate()
        .try_for_each(|(i, layer_out)| {
            // `i < layer_count <= LIMITS.max_layers`, so it fits in u32.
            with_scratch(|scratch| decode_layer(c, i as u32, out_dtype, layer_out, scratch))
        })
}

thread_local! {
    /// Per-thread working memory, kept between calls: fresh buffers for every layer cost
    /// page faults that dominated small chunks and serialised threads in the kernel. It
    /// holds at most about one layer of f32 values per thread that ever coded a layer.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch (a fresh one if it is already in use).
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Decodes layer `i` (relative) of `c` into `out`, exactly one layer in `out_dtype`.
pub(crate) fn decode_layer(
    c: &Container<'_>,
    i: u32,
    out_dtype: Dtype,
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<(), CodecError> {
    let h = c.header();
    let payload = c.layer_payload(i);
    let geom = geom(&h.shape(), h.layer_start.saturating_add(i), h.total_layers);
    h.profile
        .decode_layer(payload, h.dtype, &h.params, geom, out_dtype, out, scratch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tensor_strategy() -> impl Strategy<Value = KvTensor> {
        (
            1u32..5,
            1u32..9,
            1u32..4,
            1u32..9,
            prop::sample::select(Dtype::ALL),
        )
            .prop_flat_map(|(layers, tokens, kv_heads, head_dim, dtype)| {
                let shape = KvShape {
                    layers,
                    tokens,
                    kv_heads,
                    head_dim,
                };
                let len = shape.byte_len(dtype).unwrap();
                prop::collection::vec(any::<u8>(), len)
                    .prop_map(move |data| KvTensor::new(shape, dtype, data).unwrap())
            })
    }

    fn converted(t: &KvTensor, to: Dtype) -> Vec<u8> {
        let mut out = vec![0u8; t.shape().byte_len(to).unwrap()];
        convert(t.data(), t.dtype(), &mut out, to).unwrap();
        out
    }

    proptest! {
        #[test]
        fn lossless_round_trip_is_bit_exact(t in tensor_strategy()) {
            let blob = encode(t.view(), Profile::Lossless)?;
            let back = decode(&blob)?;
            prop_assert_eq!(&back, &t);
            for &to in Dtype::ALL {
                let mut out = vec![0xAAu8; t.shape().byte_len(to)?];
                decode_into(&blob, to, &mut out)?;
                prop_assert_eq!(out, converted(&t, to), "decode_into {}", to);
            }
        }

        #[test]
        fn slices_decode_to_the_same_layers(
            t in tensor_strategy(),
            a in any::<prop::sample::Index>(),
            b in any::<prop::sample::Index>(),
            to in prop::sample::select(Dtype::ALL),
        ) {
            let layers = t.shape().layers as usize;
            let (a, b) = (a.index(layers), b.index(layers));
            let range = a.min(b) as u32..a.max(b) as u32 + 1;
            let blob = encode(t.view(), Profile::Lossless)?;
            let part = slice_layers(&blob, range.clone())?;
            let c = Container::parse(&part)?;
            prop_assert_eq!(c.header().layer_range(), range.clone());
            let layer_bytes = t.shape().layer_byte_len(t.dtype())?;
            let want = &t.data()[range.start as usize * layer_bytes..range.end as usize * layer_bytes];
            let got = decode(&part)?;
            prop_assert_eq!(got.shape().layers, range.len() as u32);
            prop_assert_eq!(got.data(), want);
            // A single layer, decoded alone, in another dtype.
            let whole = converted(&t, to);
            let out_layer = t.shape().layer_byte_len(to)?;
            let mut one = vec![0u8; out_layer];
            c.decode_layer_into(0, to, &mut one)?;
            let first = range.start as usize * out_layer;
            prop_assert_eq!(&one[..], &whole[first..first + out_layer]);
        }
    }

    proptest! {
        #[test]
        fn every_profile_slices_and_converts_consistently(
            (t, _) in profile::testdata::structured(),
            profile in prop::sample::select(Profile::ALL),
            a in any::<prop::sample::Index>(),
            b in any::<prop::sample::Index>(),
        ) {
            let blob = encode(t.view(), profile)?;
            let whole = decode(&blob)?;
            prop_assert_eq!(whole.shape(), t.shape());
            // Every output dtype is the f32 output rounded once.
            let mut f32_out = vec![0u8; t.shape().byte_len(Dtype::F32)?];
            decode_into(&blob, Dtype::F32, &mut f32_out)?;
            for &to in Dtype::ALL {
                let mut out = vec![0u8; t.shape().byte_len(to)?];
                decode_into(&blob, to, &mut out)?;
                let mut want = vec![0u8; out.len()];
                convert(&f32_out, Dtype::F32, &mut want, to)?;
                prop_assert_eq!(out, want, "{} to {}", profile, to);
            }
            // A layer range decodes to the same bytes as those layers of the whole.
            let layers = t.shape().layers as usize;
            let (a, b) = (a.index(layers), b.index(layers));
            let range = a.min(b) as u32..a.max(b) as u32 + 1;
            let part = decode(&slice_layers(&blob, range.clone())?)?;
            let lb = t.shape().layer_byte_len(t.dtype())?;
            prop_assert_eq!(part.data(), &whole.data()[range.start as usize * lb..range.end as usize * lb]);
        }

        #[test]
        fn damaged_payloads_never_panic(
            (t, _) in profile::testdata::structured(),
            profile in prop::sample::select(Profile::ALL),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
            cut in any::<prop::sample::Index>(),
        ) {
            let blob = encode(t.view(), profile)?;
            let c = Container::parse(&blob)?;
            let payload_start = blob.len() - 4 - (0..c.header().layer_count).map(|i| c.layer_payload(i).len()).sum::<usize>();
            let params_start = 40;
            // A flipped byte in the params or a payload, checksum fixed up, so only the
            // profile's own parsing stands between it and the decoder.
            let mut bad = blob.clone();
            let lo = params_start.min(payload_start);
            let i = lo + at.index(blob.len() - 4 - lo);
            bad[i] ^= xor;
            refresh_crc(&mut bad);
            let _ = decode(&bad);
            let mut out = vec![0u8; t.shape().byte_len(Dtype::F16)?];
            let _ = decode_into(&bad, Dtype::F16, &mut out);
            // The first layer's payload cut short: the table is rewritten to match, so
            // the container parses and the profile must see the cut.
            let first = c.layer_payload(0).len();
            if first > 0 {
                let keep = cut.index(first);
                let mut header = c.header().clone();
                header.layer_count = 1;
                header.total_layers = header.total_layers.max(1);
                let short = container::write(&header, &[&c.layer_payload(0)[..keep]]);
                prop_assert!(decode(&short).is_err(), "{} accepted a layer cut to {} of {} bytes", profile, keep, first);
            }
        }
    }

    fn refresh_crc(b: &mut [u8]) {
        let n = b.len() - 4;
        let crc = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
    }

    fn shape() -> KvShape {
        KvShape {
            layers: 3,
            tokens: 16,
            kv_heads: 2,
            head_dim: 32,
        }
    }

    #[test]
    fn decode_into_checks_buffer_size() {
        let t = KvTensor::zeros(shape(), Dtype::F16).unwrap();
        let blob = encode(t.view(), Profile::Lossless).unwrap();
        let expected = shape().byte_len(Dtype::F32).unwrap();
        let mut out = vec![0u8; expected - 2];
        assert_eq!(
            decode_into(&blob, Dtype::F32, &mut out),
            Err(CodecError::BufferSize {
                expected,
                got: expected - 2
            })
        );
        let c = Container::parse(&blob).unwrap();
        assert!(matches!(
            c.decode_layer_into(0, Dtype::F16, &mut [0u8; 3]),
            Err(CodecError::BufferSize { .. })
        ));
        assert!(matches!(
            c.decode_layer_into(3, Dtype::F16, &mut [0u8; 3]),
            Err(CodecError::LayerRange { .. })
        ));
    }

    #[test]
    fn lossless_compresses_smooth_f16() {
        let s = shape();
        let data: Vec<u8> = (0..s.elements())
            .flat_map(|i| half::f16::from_f32((i as f32 * 0.01).sin()).to_le_bytes())
            .collect();
        let view = KvView::new(s, Dtype::F16, &data).unwrap();
        let blob = encode(view, Profile::Lossless).unwrap();
        assert!(
            blob.len() < data.len() * 3 / 4,
            "{} vs {}",
            blob.len(),
            data.len()
        );
        assert_eq!(decode(&blob).unwrap().data(), &data[..]);
    }

    #[test]
    fn layer_payload_corruption_is_caught_by_the_decoder_too() {
        // Damage inside a zstd frame with a fixed-up checksum must still be an error.
        let t = KvTensor::new(
            shape(),
            Dtype::F16,
            vec![7u8; shape().byte_len(Dtype::F16).unwrap()],
        )
        .unwrap();
        let blob = encode(t.view(), Profile::Lossless).unwrap();
        let c = Container::parse(&blob).unwrap();
        let first = c.layer_payload(0).len();
        // Cut the first layer's frame short by rewriting the table: layer 0 loses its last
        // byte, layer 1 gains it.
        let mut bad = blob.clone();
        let table = 40;
        bad[table + 8..table + 16].copy_from_slice(&(first as u64 - 1).to_le_bytes());
        bad[table + 16..table + 24].copy_from_slice(&(first as u64 - 1).to_le_bytes());
        let second = c.layer_payload(1).len() as u64 + 1;
        bad[table + 24..table + 32].copy_from_slice(&second.to_le_bytes());
        let n = bad.len() - 4;
        let crc = crc32c::crc32c(&bad[..n]);
        bad[n..].copy_from_slice(&crc.to_le_bytes());
        assert!(Container::parse(&bad).is_ok());
        assert!(matches!(decode(&bad), Err(CodecError::Corrupt(_))));
    }
}
