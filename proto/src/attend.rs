//! Wire helpers of the `Attend` stream: packed little-endian f32 vectors
//! (queries and partial outputs travel as bytes, 4 per element, so a batch
//! of queries costs no per-element protobuf framing).

use bytes::Bytes;

/// Packs f32 values as little-endian bytes.
pub fn f32s_to_le(v: &[f32]) -> Bytes {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(out)
}

/// Unpacks little-endian f32 bytes; `None` when the length is not a multiple of 4.
pub fn f32s_from_le(b: &[u8]) -> Option<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        return None;
    }
    Some(
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_bytes_round_trip() {
        let v = [0.0f32, -1.5, f32::NEG_INFINITY, 3.25e-7];
        let b = f32s_to_le(&v);
        assert_eq!(b.len(), 16);
        assert_eq!(f32s_from_le(&b).unwrap(), v);
        assert!(f32s_from_le(&b[..15]).is_none());
    }
}
