//! The `q8` profile: 8-bit per-channel min/max quantization, no entropy coding. The fast,
//! simple baseline: about 2x smaller than fp16, and decoding is one multiply-add per
//! element.
//!
//! For each of K and V and each channel `c` (over the chunk's tokens): `lo = min x`,
//! `step = (max x - lo) / 255` (f32), `q = round((x - lo) / step)` in `0..=255`, decoded
//! as `lo + q * step`.
//!
//! **Error bound**: `|x - x̂| <= step/2 + 2^-20 * max(|x|, |lo|)` for every element (the
//! second term covers f32 rounding of the division and the multiply-add), plus the
//! rounding of the output dtype when it is narrower than f32.
//!
//! Layer payload (little-endian), for K then V: `channels` f32 `lo`, `channels` f32
//! `step`, then `tokens * channels` u8 codes in canonical `[token][channel]` order.
//! No header parameters.

use crate::error::CodecError;
use crate::plan::{LayerPlace, Q8Part, Q8Plan, index, input_offset};
use crate::profile::payload::PayloadReader;
use crate::profile::{LayerGeom, Scratch, load_f32, store_f32};
use crate::tensor::Dtype;

pub(super) fn encode_layer(
    layer: &[u8],
    dtype: Dtype,
    geom: LayerGeom,
    scratch: &mut Scratch,
) -> Result<Vec<u8>, CodecError> {
    load_f32(layer, dtype, &mut scratch.f32s);
    let (c, n) = (geom.channels, geom.part_elems());
    let mut out = Vec::with_capacity(2 * (8 * c + n));
    for part in scratch.f32s.chunks_exact(n) {
        let mut lo = vec![f32::INFINITY; c];
        let mut hi = vec![f32::NEG_INFINITY; c];
        for row in part.chunks_exact(c) {
            for ((l, h), &x) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                if !x.is_finite() {
                    return Err(CodecError::Unencodable {
                        profile: "q8",
                        what: "a non-finite element",
                    });
                }
                *l = l.min(x);
                *h = h.max(x);
            }
        }
        let steps: Vec<f32> = lo.iter().zip(&hi).map(|(&l, &h)| (h - l) / 255.0).collect();
        if steps.iter().any(|s| !s.is_finite()) {
            return Err(CodecError::Unencodable {
                profile: "q8",
                what: "a channel whose range overflows f32",
            });
        }
        for v in lo.iter().chain(&steps) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        // Hot path (encode).
        for row in part.chunks_exact(c) {
            out.extend(row.iter().zip(&lo).zip(&steps).map(|((&x, &l), &s)| {
                if s > 0.0 {
                    ((x - l) / s).round().clamp(0.0, 255.0) as u8
                } else {
                    0
                }
            }));
        }
    }
    Ok(out)
}

pub(super) fn decode_layer(
    payload: &[u8],
    geom: LayerGeom,
    out_dtype: Dtype,
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<(), CodecError> {
    let (c, n) = (geom.channels, geom.part_elems());
    let expected = 2 * (8 * c + n);
    if payload.len() != expected {
        return Err(CodecError::Corrupt(format!(
            "q8 layer payload is {} bytes, expected {expected}",
            payload.len()
        )));
    }
    let mut r = PayloadReader::new(payload, "q8");
    let row_bytes = c * out_dtype.size();
    let mut lo = Vec::with_capacity(c);
    let mut steps = Vec::with_capacity(c);
    for out_part in out.chunks_exact_mut(n * out_dtype.size()) {
        lo.clear();
        steps.clear();
        for _ in 0..c {
            lo.push(r.f32()?);
        }
        for _ in 0..c {
            steps.push(r.f32()?);
        }
        let codes = r.take(n)?;
        let row = &mut scratch.f32s;
        row.clear();
        row.resize(c, 0.0);
        // Hot path (decode): one multiply-add per element, vectorisable.
        for (q, o) in codes.chunks_exact(c).zip(out_part.chunks_exact_mut(row_bytes)) {
            for (((x, &q), &l), &s) in row.iter_mut().zip(q).zip(&lo).zip(&steps) {
                *x = l + f32::from(q) * s;
            }
            store_f32(row, out_dtype, o, &mut scratch.halfs);
        }
    }
    r.finish()
}

/// Adds one layer's parts to a decode plan (see `plan.rs`), with the checks of
/// [`decode_layer`].
pub(crate) fn plan_layer(payload: &[u8], place: LayerPlace, plan: &mut Q8Plan) -> Result<(), CodecError> {
    let (c, n) = (place.channels, place.tokens * place.channels);
    let expected = 2 * (8 * c + n);
    if payload.len() != expected {
        return Err(CodecError::Corrupt(format!(
            "q8 layer payload is {} bytes, expected {expected}",
            payload.len()
        )));
    }
    let mut r = PayloadReader::new(payload, "q8");
    for kind in 0..2u32 {
        let param_start = index(plan.lo_step.len())?;
        for _ in 0..2 * c {
            plan.lo_step.push(r.f32()?);
        }
        let codes = r.take(n)?;
        plan.parts.push(Q8Part {
            out_slot: place.out_slot + kind,
            token_offset: place.token_offset,
            tokens: place.tokens as u32,
            param_start,
            data_offset: input_offset(payload, codes, place.payload_offset),
        });
    }
    r.finish()
}

#[cfg(test)]
mod tests {
    use crate::Profile;
    use crate::profile::testdata::{decoded_f32, structured};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip_within_half_a_step((t, seen) in structured()) {
            let blob = crate::encode(t.view(), Profile::Q8)?;
            let got = decoded_f32(&blob);
            let s = t.shape();
            let (tk, c) = (s.tokens as usize, (s.kv_heads * s.head_dim) as usize);
            for (xp, yp) in seen.chunks_exact(tk * c).zip(got.chunks_exact(tk * c)) {
                for ch in 0..c {
                    let col = || (0..tk).map(|ti| xp[ti * c + ch]);
                    let lo = col().fold(f32::INFINITY, f32::min);
                    let hi = col().fold(f32::NEG_INFINITY, f32::max);
                    let step = f64::from(hi - lo) / 255.0;
                    for ti in 0..tk {
                        let (x, y) = (xp[ti * c + ch], yp[ti * c + ch]);
                        let bound = step / 2.0 + 2f64.powi(-20) * f64::from(x.abs().max(lo.abs()));
                        prop_assert!(f64::from(x - y).abs() <= bound, "{x} vs {y}, bound {bound}");
                    }
                }
            }
        }
    }
}
