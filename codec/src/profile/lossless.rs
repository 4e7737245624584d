//! The `lossless` profile: per layer, byte-shuffle the source elements and compress them
//! with zstd level 1. Decoding gives back the source bits exactly. No parameters.

use crate::error::CodecError;
use crate::profile::{Scratch, sized};
use crate::shuffle::{shuffle, unshuffle};
use crate::tensor::Dtype;

/// zstd level: level 1 already gets nearly all of the gain on shuffled floats and keeps
/// encoding well above 500 MB/s per core.
const ZSTD_LEVEL: i32 = 1;

pub(super) fn encode_layer(
    layer: &[u8],
    dtype: Dtype,
    _params: &[u8],
    scratch: &mut Scratch,
) -> Result<Vec<u8>, CodecError> {
    let compressor = match &mut scratch.zstd_c {
        Some(c) => c,
        slot => slot.insert(
            zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| CodecError::Compression(e.to_string()))?,
        ),
    };
    let shuffled = sized(&mut scratch.buf, layer.len());
    shuffle(layer, shuffled, dtype.size());
    compressor
        .compress(shuffled)
        .map_err(|e| CodecError::Compression(e.to_string()))
}

pub(super) fn decode_layer(
    payload: &[u8],
    dtype: Dtype,
    params: &[u8],
    out_dtype: Dtype,
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<(), CodecError> {
    if out_dtype == dtype {
        return decode_source(payload, dtype, params, out, scratch);
    }
    // Decode in the source dtype, then convert: the shuffle works on source elements.
    let len = out.len() / out_dtype.size() * dtype.size();
    let mut source = std::mem::take(&mut scratch.source);
    let result = decode_source(payload, dtype, params, sized(&mut source, len), scratch)
        .and_then(|()| crate::tensor::convert(&source[..len], dtype, out, out_dtype));
    scratch.source = source;
    result
}

/// Decodes into `out`, exactly one layer in the source dtype.
fn decode_source(
    payload: &[u8],
    dtype: Dtype,
    _params: &[u8],
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<(), CodecError> {
    let decompressor = match &mut scratch.zstd_d {
        Some(d) => d,
        slot => {
            slot.insert(zstd::bulk::Decompressor::new().map_err(|e| CodecError::Compression(e.to_string()))?)
        }
    };
    let expected = out.len();
    let shuffled = sized(&mut scratch.buf, expected);
    // The destination is exactly one layer: a frame that would decode to more fails here
    // instead of growing a buffer.
    let got = decompressor
        .decompress_to_buffer(payload, shuffled)
        .map_err(|e| CodecError::Corrupt(format!("lossless layer: {e}")))?;
    if got != expected {
        return Err(CodecError::Corrupt(format!(
            "lossless layer decoded to {got} bytes, expected {expected}"
        )));
    }
    unshuffle(shuffled, out, dtype.size());
    Ok(())
}
