//! The container: one self-describing binary blob per KV chunk.
//!
//! Layout, all integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `KVLT` |
//! | 4 | 2 | version (u16, currently 1) |
//! | 6 | 1 | profile id (u8, see [`Profile`]) |
//! | 7 | 1 | dtype id of the source tensor (u8, see [`Dtype`]) |
//! | 8 | 2 | flags (u16, must be 0) |
//! | 10 | 2 | reserved (u16, must be 0) |
//! | 12 | 4 | total_layers: layers of the model the chunk belongs to |
//! | 16 | 4 | layer_start: absolute index of the first layer stored here |
//! | 20 | 4 | layer_count: layers stored here (>= 1) |
//! | 24 | 4 | tokens |
//! | 28 | 4 | kv_heads |
//! | 32 | 4 | head_dim |
//! | 36 | 4 | params_len (<= 1 MiB) |
//! | 40 | params_len | profile parameters (empty for `lossless`) |
//! | … | 16 × layer_count | layer table: (offset u64, len u64) per layer; offsets are relative to the payload start, contiguous and in order |
//! | … | Σ len | payload: the encoded layers, back to back |
//! | end − 4 | 4 | crc32c of every byte before it |
//!
//! A container may hold a sub-range of a model's layers (`layer_start .. layer_start +
//! layer_count` inside `0 .. total_layers`), so a server can cut and serve a layer range
//! with [`slice_layers`] without decoding. [`Container::parse`] checks everything above,
//! the checksum included, before it hands out a single payload byte; it never allocates
//! more than the layer table.

use std::ops::Range;

use crate::error::CodecError;
use crate::profile::Profile;
use crate::tensor::{Dtype, KvShape, LIMITS};

/// The four bytes every container starts with.
pub const MAGIC: [u8; 4] = *b"KVLT";
/// The container format version this build writes and reads.
pub const VERSION: u16 = 1;

/// Bytes before the profile parameters.
const FIXED_HEADER_LEN: usize = 40;
/// Bytes per layer table entry.
const TABLE_ENTRY_LEN: usize = 16;
/// Bytes of the trailing checksum.
const CHECKSUM_LEN: usize = 4;

/// The decoded header of a container.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Header {
    /// Format version (always [`VERSION`] for parsed and written containers).
    pub version: u16,
    /// How the layers are encoded.
    pub profile: Profile,
    /// Dtype of the source tensor.
    pub dtype: Dtype,
    /// Layers of the whole model the chunk belongs to.
    pub total_layers: u32,
    /// Absolute index of the first layer stored.
    pub layer_start: u32,
    /// Number of layers stored.
    pub layer_count: u32,
    /// Tokens per layer.
    pub tokens: u32,
    /// KV heads.
    pub kv_heads: u32,
    /// Head dimension.
    pub head_dim: u32,
    /// Profile parameters; empty for lossless.
    pub params: Vec<u8>,
}

impl Header {
    /// The shape of the stored tensor (`layers` = `layer_count`).
    pub fn shape(&self) -> KvShape {
        KvShape {
            layers: self.layer_count,
            tokens: self.tokens,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// The absolute layer indices stored.
    pub fn layer_range(&self) -> Range<u32> {
        self.layer_start..self.layer_start.saturating_add(self.layer_count)
    }
}

/// A parsed, fully validated container borrowing the blob it came from.
#[derive(Clone, Debug)]
pub struct Container<'a> {
    header: Header,
    /// Byte range of each layer inside `payload`.
    layers: Vec<Range<usize>>,
    payload: &'a [u8],
}

impl<'a> Container<'a> {
    /// Parses and fully validates: magic, version, field limits, table bounds, checksum.
    ///
    /// Length errors come first (so a cut-off blob reads as [`CodecError::Truncated`]),
    /// then the checksum (so damage reads as [`CodecError::ChecksumMismatch`]), then the
    /// meaning of the fields (so an intact blob from a newer writer reads as, say,
    /// [`CodecError::UnknownProfile`]).
    pub fn parse(blob: &'a [u8]) -> Result<Self, CodecError> {
        let prefix = &blob[..blob.len().min(MAGIC.len())];
        if prefix != &MAGIC[..prefix.len()] {
            let mut found = [0u8; 4];
            found[..prefix.len()].copy_from_slice(prefix);
            return Err(CodecError::BadMagic { found });
        }
        let mut r = Reader {
            blob,
            pos: MAGIC.len(),
        };
        let version = r.u16()?;
        if version != VERSION {
            return Err(CodecError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let profile_id = r.u8()?;
        let dtype_id = r.u8()?;
        let flags = r.u16()?;
        let reserved = r.u16()?;
        let total_layers = r.u32()?;
        let layer_start = r.u32()?;
        let layer_count = r.u32()?;
        let tokens = r.u32()?;
        let kv_heads = r.u32()?;
        let head_dim = r.u32()?;
        let params_len = r.u32()?;
        debug_assert_eq!(r.pos, FIXED_HEADER_LEN);

        // Bound what the length fields may make us read or allocate.
        if params_len > LIMITS.max_params_len {
            return Err(CodecError::TooLarge {
                what: "params_len",
                value: params_len.into(),
                limit: LIMITS.max_params_len.into(),
            });
        }
        if layer_count > LIMITS.max_layers {
            return Err(CodecError::TooLarge {
                what: "layer_count",
                value: layer_count.into(),
                limit: LIMITS.max_layers.into(),
            });
        }
        let params = r.bytes(params_len as usize)?;
        let mut table = Vec::with_capacity(layer_count as usize);
        let mut payload_len: u64 = 0;
        for _ in 0..layer_count {
            let offset = r.u64()?;
            let len = r.u64()?;
            table.push((offset, len));
            payload_len = payload_len
                .checked_add(len)
                .ok_or_else(|| CodecError::Corrupt("layer lengths overflow".into()))?;
        }
        let needed = (r.pos as u64)
            .saturating_add(payload_len)
            .saturating_add(CHECKSUM_LEN as u64);
        let got = blob.len() as u64;
        if got < needed {
            return Err(CodecError::Truncated { needed, got });
        }
        if got > needed {
            return Err(CodecError::Corrupt(format!(
                "{} bytes after the end of the container",
                got - needed
            )));
        }
        // `needed` equals the blob length, so these fit in usize.
        let payload = r.bytes(payload_len as usize)?;
        let body_len = blob.len() - CHECKSUM_LEN;
        let stored = u32::from_le_bytes(r.array()?);
        let actual = crc32c::crc32c(&blob[..body_len]);
        if stored != actual {
            return Err(CodecError::ChecksumMismatch {
                expected: stored,
                actual,
            });
        }

        if flags != 0 {
            return Err(CodecError::UnsupportedFlags(flags));
        }
        if reserved != 0 {
            return Err(CodecError::Corrupt(format!(
                "reserved header field is {reserved:#06x}, must be 0"
            )));
        }
        let profile = Profile::from_id(profile_id)?;
        let dtype = Dtype::from_u8(dtype_id)?;
        if total_layers > LIMITS.max_layers {
            return Err(CodecError::TooLarge {
                what: "total_layers",
                value: total_layers.into(),
                limit: LIMITS.max_layers.into(),
            });
        }
        if layer_count == 0 {
            return Err(CodecError::BadShape("layer_count is 0".into()));
        }
        if layer_start
            .checked_add(layer_count)
            .is_none_or(|end| end > total_layers)
        {
            return Err(CodecError::Corrupt(format!(
                "layers {layer_start}+{layer_count} exceed total_layers {total_layers}"
            )));
        }
        let header = Header {
            version,
            profile,
            dtype,
            total_layers,
            layer_start,
            layer_count,
            tokens,
            kv_heads,
            head_dim,
            params: params.to_vec(),
        };
        // Dims within limits and the decoded size bounded, before anyone allocates for it.
        header.shape().checked_byte_len(dtype)?;
        profile.check_params(dtype, params)?;

        let mut layers = Vec::with_capacity(table.len());
        let mut expected_offset: u64 = 0;
        for (i, (offset, len)) in table.into_iter().enumerate() {
            if offset != expected_offset {
                return Err(CodecError::Corrupt(format!(
                    "layer {i} starts at {offset}, expected {expected_offset} (table must be contiguous)"
                )));
            }
            // Sum of all lens equals the payload length, so these fit in usize.
            let end = offset + len;
            layers.push(offset as usize..end as usize);
            expected_offset = end;
        }
        Ok(Container {
            header,
            layers,
            payload,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The encoded bytes of layer `i`, counted from the first stored layer
    /// (`0..layer_count`, not absolute).
    ///
    /// # Panics
    /// If `i >= layer_count`.
    pub fn layer_payload(&self, i: u32) -> &'a [u8] {
        let payload: &'a [u8] = self.payload;
        &payload[self.layers[i as usize].clone()]
    }

    /// Decodes layer `i` (relative, `0..layer_count`) alone into `out` in `out_dtype`;
    /// `out.len()` must be one layer: `2 * tokens * kv_heads * head_dim * out_dtype.size()`.
    pub fn decode_layer_into(&self, i: u32, out_dtype: Dtype, out: &mut [u8]) -> Result<(), CodecError> {
        if i >= self.header.layer_count {
            let start = self.header.layer_start;
            return Err(CodecError::LayerRange {
                start: start.saturating_add(i),
                end: start.saturating_add(i).saturating_add(1),
                available_start: start,
                available_end: self.header.layer_range().end,
            });
        }
        let expected = self.header.shape().layer_byte_len(out_dtype)?;
        if out.len() != expected {
            return Err(CodecError::BufferSize {
                expected,
                got: out.len(),
            });
        }
        crate::with_scratch(|scratch| crate::decode_layer(self, i, out_dtype, out, scratch))
    }
}

/// The profile a container says it uses, read from its header alone (no checksum, no
/// other validation): enough to choose a decoder before the full parse.
pub fn peek_profile(blob: &[u8]) -> Result<Profile, CodecError> {
    let prefix = &blob[..blob.len().min(MAGIC.len())];
    if prefix != MAGIC {
        let mut found = [0u8; 4];
        found[..prefix.len()].copy_from_slice(prefix);
        return Err(CodecError::BadMagic { found });
    }
    match blob.get(MAGIC.len() + 2) {
        Some(&id) => Profile::from_id(id),
        None => Err(CodecError::Truncated {
            needed: FIXED_HEADER_LEN as u64,
            got: blob.len() as u64,
        }),
    }
}

/// Re-packs the given absolute layer range of a container as a new, valid container (new checksum). Errors if the range is empty or not inside the blob's layers.
///
/// Payload bytes are copied as they are: no layer is decoded.
pub fn slice_layers(blob: &[u8], layers: Range<u32>) -> Result<Vec<u8>, CodecError> {
    let c = Container::parse(blob)?;
    let have = c.header.layer_range();
    if layers.is_empty() || layers.start < have.start || layers.end > have.end {
        return Err(CodecError::LayerRange {
            start: layers.start,
            end: layers.end,
            available_start: have.start,
            available_end: have.end,
        });
    }
    let header = Header {
        layer_start: layers.start,
        layer_count: layers.end - layers.start,
        ..c.header.clone()
    };
    let rel = (layers.start - have.start)..(layers.end - have.start);
    let payloads: Vec<&[u8]> = rel.map(|i| c.layer_payload(i)).collect();
    Ok(write(&header, &payloads))
}

/// Serialises a container. The caller guarantees `header` is valid and that there is one
/// payload per stored layer; the version written is always [`VERSION`].
pub(crate) fn write(header: &Header, layers: &[impl AsRef<[u8]>]) -> Vec<u8> {
    debug_assert_eq!(layers.len(), header.layer_count as usize);
    let payload_len: usize = layers.iter().map(|l| l.as_ref().len()).sum();
    let len =
        FIXED_HEADER_LEN + header.params.len() + TABLE_ENTRY_LEN * layers.len() + payload_len + CHECKSUM_LEN;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(header.profile.id());
    out.push(header.dtype as u8);
    out.extend_from_slice(&0u16.to_le_bytes()); // flags
    out.extend_from_slice(&0u16.to_le_bytes()); // reserved
    for v in [
        header.total_layers,
        header.layer_start,
        header.layer_count,
        header.tokens,
        header.kv_heads,
        header.head_dim,
        header.params.len() as u32,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&header.params);
    let mut offset = 0u64;
    for l in layers {
        let n = l.as_ref().len() as u64;
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        offset += n;
    }
    for l in layers {
        out.extend_from_slice(l.as_ref());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len(), len);
    out
}

/// Bounds-checked little-endian cursor over an untrusted blob.
struct Reader<'a> {
    blob: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let blob: &'a [u8] = self.blob;
        let end = self.pos.checked_add(n).filter(|&e| e <= blob.len());
        match end {
            Some(end) => {
                let s = &blob[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(CodecError::Truncated {
                needed: (self.pos as u64).saturating_add(n as u64),
                got: blob.len() as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KvView, decode, encode};
    use proptest::prelude::*;

    const SHAPE: KvShape = KvShape {
        layers: 4,
        tokens: 5,
        kv_heads: 2,
        head_dim: 8,
    };

    fn sample_blob(dtype: Dtype) -> Vec<u8> {
        let len = SHAPE.byte_len(dtype).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        encode(KvView::new(SHAPE, dtype, &data).unwrap(), Profile::Lossless).unwrap()
    }

    /// Overwrites bytes at `at` and fixes the checksum, so only the field check can object.
    fn patched(blob: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut b = blob.to_vec();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        refresh_crc(&mut b);
        b
    }

    fn refresh_crc(b: &mut [u8]) {
        let n = b.len() - 4;
        let crc = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn header_fields_round_trip() {
        let header = Header {
            version: VERSION,
            profile: Profile::Lossless,
            dtype: Dtype::Bf16,
            total_layers: 30,
            layer_start: 7,
            layer_count: 3,
            tokens: 256,
            kv_heads: 3,
            head_dim: 64,
            params: Vec::new(),
        };
        let payloads: [&[u8]; 3] = [b"abc", b"", b"defgh"];
        let blob = write(&header, &payloads);
        let c = Container::parse(&blob).unwrap();
        assert_eq!(c.header(), &header);
        assert_eq!(c.header().layer_range(), 7..10);
        assert_eq!(c.header().shape().layers, 3);
        for (i, p) in payloads.iter().enumerate() {
            assert_eq!(c.layer_payload(i as u32), *p);
        }
        assert_eq!(&blob[..4], b"KVLT");
        assert_eq!(u16::from_le_bytes([blob[4], blob[5]]), VERSION);
    }

    #[test]
    fn limits_refused_before_allocation() {
        let blob = sample_blob(Dtype::F16);
        // tokens at offset 24: twice the limit.
        let bad = patched(&blob, 24, &(1u32 << 21).to_le_bytes());
        let err = Container::parse(&bad).unwrap_err();
        assert!(
            matches!(err, CodecError::TooLarge { what: "tokens", .. }),
            "{err}"
        );
        assert!(decode(&bad).is_err());
        // Every dim at its limit: 2^57 elements, far beyond max_decoded_bytes.
        let mut huge = blob.clone();
        huge[24..28].copy_from_slice(&LIMITS.max_tokens.to_le_bytes());
        huge[28..32].copy_from_slice(&LIMITS.max_kv_heads.to_le_bytes());
        huge[32..36].copy_from_slice(&LIMITS.max_head_dim.to_le_bytes());
        refresh_crc(&mut huge);
        let err = decode(&huge).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { .. }), "{err}");
        // A params_len of 4 GiB is refused without reading it.
        let err = Container::parse(&patched(&blob, 36, &u32::MAX.to_le_bytes())).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::TooLarge {
                    what: "params_len",
                    ..
                }
            ),
            "{err}"
        );
        let err = Container::parse(&patched(&blob, 20, &u32::MAX.to_le_bytes())).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::TooLarge {
                    what: "layer_count",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn each_field_check_fires() {
        let blob = sample_blob(Dtype::F32);
        assert!(Container::parse(&blob).is_ok());
        type Check = fn(&CodecError) -> bool;
        let cases: Vec<(Vec<u8>, Check)> = vec![
            (patched(&blob, 0, b"KVLX"), |e| {
                matches!(e, CodecError::BadMagic { .. })
            }),
            (patched(&blob, 4, &2u16.to_le_bytes()), |e| {
                matches!(e, CodecError::UnsupportedVersion { found: 2, .. })
            }),
            (patched(&blob, 6, &[9]), |e| {
                matches!(e, CodecError::UnknownProfile(_))
            }),
            (patched(&blob, 7, &[0]), |e| {
                matches!(e, CodecError::UnknownDtype(_))
            }),
            (patched(&blob, 8, &1u16.to_le_bytes()), |e| {
                matches!(e, CodecError::UnsupportedFlags(1))
            }),
            (patched(&blob, 10, &1u16.to_le_bytes()), |e| {
                matches!(e, CodecError::Corrupt(_))
            }),
            // layer_start 1 + 4 layers > total_layers 4.
            (patched(&blob, 16, &1u32.to_le_bytes()), |e| {
                matches!(e, CodecError::Corrupt(_))
            }),
            (patched(&blob, 12, &5000u32.to_le_bytes()), |e| {
                matches!(
                    e,
                    CodecError::TooLarge {
                        what: "total_layers",
                        ..
                    }
                )
            }),
            (patched(&blob, 32, &0u32.to_le_bytes()), |e| {
                matches!(e, CodecError::BadShape(_))
            }),
            // First table entry's offset (table starts at 40) not 0.
            (patched(&blob, 40, &1u64.to_le_bytes()), |e| {
                matches!(e, CodecError::Corrupt(_))
            }),
        ];
        for (i, (bad, expect)) in cases.iter().enumerate() {
            let err = Container::parse(bad).unwrap_err();
            assert!(expect(&err), "case {i}: {err}");
        }
        // Short garbage is a bad magic, not a truncation.
        assert!(matches!(
            Container::parse(b"{}"),
            Err(CodecError::BadMagic { .. })
        ));
        assert!(matches!(
            Container::parse(b"KV"),
            Err(CodecError::Truncated { .. })
        ));
        // Trailing bytes.
        let mut long = blob.clone();
        long.push(0);
        assert!(matches!(Container::parse(&long), Err(CodecError::Corrupt(_))));
    }

    #[test]
    fn lossless_refuses_params() {
        let mut header = Container::parse(&sample_blob(Dtype::F16))
            .unwrap()
            .header()
            .clone();
        header.params = vec![1, 2, 3];
        header.layer_count = 1;
        let blob = write(&header, &[b"x"]);
        assert!(matches!(Container::parse(&blob), Err(CodecError::Corrupt(_))));
    }

    #[test]
    fn payload_damage_is_a_checksum_mismatch() {
        let mut blob = sample_blob(Dtype::F16);
        let n = blob.len();
        blob[n - 10] ^= 0x40;
        assert!(matches!(
            Container::parse(&blob),
            Err(CodecError::ChecksumMismatch { .. })
        ));
        assert!(matches!(decode(&blob), Err(CodecError::ChecksumMismatch { .. })));
    }

    #[test]
    fn slice_layers_checks_the_range() {
        let blob = sample_blob(Dtype::F16);
        for r in [0..0, 2..2, 3..5, 4..5, 5..6] {
            assert!(
                matches!(slice_layers(&blob, r.clone()), Err(CodecError::LayerRange { .. })),
                "{r:?}"
            );
        }
        let part = slice_layers(&blob, 1..3).unwrap();
        let c = Container::parse(&part).unwrap();
        assert_eq!(c.header().layer_range(), 1..3);
        assert_eq!(c.header().total_layers, 4);
        // Ranges are absolute: slicing the slice outside 1..3 fails, inside works.
        assert!(slice_layers(&part, 0..1).is_err());
        assert!(slice_layers(&part, 2..3).is_ok());
    }

    fn exercise(bytes: &[u8]) {
        let _ = Container::parse(bytes);
        let _ = decode(bytes);
        let _ = slice_layers(bytes, 0..1);
        let _ = slice_layers(bytes, 1..3);
        let mut out = vec![0u8; 4096];
        let _ = crate::decode_into(bytes, Dtype::F32, &mut out);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            exercise(&bytes);
            // Again behind a plausible fixed header, so the table and payload checks run.
            let mut framed = sample_blob(Dtype::F16)[..40].to_vec();
            framed.extend_from_slice(&bytes);
            exercise(&framed);
            refresh_crc_if_long(&mut framed);
            exercise(&framed);
        }

        #[test]
        fn one_byte_changed_is_an_error(
            dtype in prop::sample::select(Dtype::ALL),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let blob = sample_blob(dtype);
            let mut bad = blob.clone();
            let at = at.index(blob.len());
            bad[at] ^= xor;
            exercise(&bad);
            let err = Container::parse(&bad).unwrap_err();
            prop_assert!(decode(&bad).is_err());
            prop_assert!(slice_layers(&bad, 0..1).is_err());
            // Payload and checksum bytes are covered by nothing but the checksum.
            let payload_start = 40 + 16 * SHAPE.layers as usize;
            if at >= payload_start {
                let is_checksum = matches!(err, CodecError::ChecksumMismatch { .. });
                prop_assert!(is_checksum, "{}", err);
            }
        }

        #[test]
        fn truncation_is_an_error(dtype in prop::sample::select(Dtype::ALL), cut in any::<prop::sample::Index>()) {
            let blob = sample_blob(dtype);
            let short = &blob[..cut.index(blob.len())];
            exercise(short);
            prop_assert!(Container::parse(short).is_err());
            prop_assert!(decode(short).is_err());
        }
    }

    fn refresh_crc_if_long(b: &mut [u8]) {
        if b.len() >= 44 {
            refresh_crc(b);
        }
    }
}
