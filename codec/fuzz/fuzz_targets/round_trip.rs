//! Encodes arbitrary tensors with every profile: encoding must never panic, and whatever
//! encodes must decode (into every dtype) and slice. Bytes 0..4 pick the shape, the rest
//! are f32 elements (NaNs and infinities included: lossy profiles must refuse them with
//! an error); the high bit of byte 0 encodes the chunk as the start of its sequence. Run with `cargo fuzz run round_trip` from `codec/`.

#![no_main]

use kvault_codec::{Dtype, EncodeOptions, KvShape, KvView, Profile, decode, decode_into, encode_with, slice_layers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((dims, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let shape = KvShape {
        layers: u32::from(dims[0] % 4) + 1,
        tokens: u32::from(dims[1] % 64) + 1,
        kv_heads: u32::from(dims[2] % 4) + 1,
        head_dim: u32::from(dims[3] % 16) + 1,
    };
    let Ok(len) = shape.byte_len(Dtype::F32) else {
        return;
    };
    // Repeat the body to fill the tensor, so short inputs still reach the coders.
    if body.is_empty() {
        return;
    }
    let elems: Vec<u8> = body.iter().copied().cycle().take(len).collect();
    let Ok(view) = KvView::new(shape, Dtype::F32, &elems) else {
        return;
    };
    // The high bit of byte 0: a chunk that starts its sequence (kv-* exception rows).
    let options = EncodeOptions::sequence_start(dims[0] & 0x80 != 0);
    for &profile in Profile::ALL {
        let Ok(blob) = encode_with(view, profile, options) else {
            assert!(!profile.is_lossless(), "lossless must encode anything");
            continue;
        };
        let t = decode(&blob).expect("an encoded blob decodes");
        assert_eq!(t.shape(), shape);
        if profile.is_lossless() {
            assert_eq!(t.data(), &elems[..]);
        }
        for &to in Dtype::ALL {
            let mut out = vec![0u8; shape.byte_len(to).unwrap_or(0)];
            decode_into(&blob, to, &mut out).expect("decode_into");
        }
        let part = slice_layers(&blob, 0..1).expect("slice");
        decode(&part).expect("a slice decodes");
    }
});
