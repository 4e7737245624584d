//! Synthetic KV caches with the structure of real ones, for tests and benchmarks of
//! shapes no bundled model has (a Llama-3-8B-shaped cache): keys with per-channel offsets
//! and scales and a few outlier channels, values with per-token magnitudes, rare outlier
//! elements, an attention sink at token 0 (keys far from every other token's, as the
//! first token of a real sequence has; `kv-*` codecs store such rows exactly), and keys
//! that follow their previous token's in three channels of four (as RoPE's slow channels
//! do; `kv-*` codecs predict such residuals). Codec
//! quality is judged on real caches elsewhere; these only have to exercise every path of
//! the decoders at realistic sizes and symbol statistics.

use half::f16;
use kvault_codec::{Dtype, KvShape, KvTensor};
use rayon::prelude::*;

/// A deterministic f16 KV-like tensor of `shape` from `seed`.
pub fn kv_like(shape: KvShape, seed: u64) -> KvTensor {
    let c = (shape.kv_heads * shape.head_dim) as usize;
    let t = shape.tokens as usize;
    let mut data = vec![0u8; shape.elements() as usize * 2];
    data.par_chunks_mut((t * c * 2).max(1))
        .enumerate()
        .for_each(|(part, out)| {
            let is_value = part % 2 == 1;
            let mut s = (seed ^ (part as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
            let mut next = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            let mut walk = vec![0f32; c];
            for (i, o) in out.chunks_exact_mut(2).enumerate() {
                let (tok, ch) = (i / c, i % c);
                // A sum of two uniforms: a triangular, roughly bell-shaped variate in [-1, 1].
                let r = next();
                let u = ((r & 0xFFFF) as f32 + ((r >> 16) & 0xFFFF) as f32) / 65535.0 - 1.0;
                let u = if !is_value && ch % 4 != 0 {
                    walk[ch] = 0.8 * walk[ch] + 0.6 * u;
                    walk[ch]
                } else {
                    u
                };
                let v = if is_value {
                    u * (0.5 + ((tok * 7) % 11) as f32 * 0.1)
                } else {
                    let outlier = if ch % 61 == 3 { 12.0 } else { 1.0 };
                    let scale = (0.5 + (ch % 5) as f32 * 0.4) * outlier;
                    // The sink: several of the channel's spreads away, in every channel.
                    let u = if tok == 0 {
                        8.0 + 4.0 * (ch % 3) as f32 + u
                    } else {
                        u
                    };
                    u * scale + ((ch % 9) as f32 - 4.0) * 0.3
                };
                let v = if (r >> 40) % 499 == 0 { v * 30.0 } else { v };
                o.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
            }
        });
    // The shape is valid by construction of the callers; an invalid one is their bug.
    KvTensor::new(shape, Dtype::F16, data).unwrap_or_else(|e| panic!("synthetic shape {shape:?}: {e}"))
}

/// `n` deterministic values in [-1, 1) from `seed` (queries and plain caches for the
/// attention tests and benchmark), computed in parallel.
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            // splitmix64 of (seed, i): every element on its own, so any split agrees.
            let mut x = (i as u64 ^ seed.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            x ^= x >> 29;
            x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x ^= x >> 32;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// `t` (f16, canonical layout) cut along its tokens into chunks of `tokens` (the last one
/// shorter), as a store would hold a long prefix.
pub fn split(t: &KvTensor, tokens: u32) -> Vec<KvTensor> {
    let s = t.shape();
    let row = (s.kv_heads * s.head_dim) as usize * t.dtype().size();
    (0..s.tokens)
        .step_by(tokens.max(1) as usize)
        .map(|start| {
            let n = tokens.min(s.tokens - start);
            let sub = KvShape { tokens: n, ..s };
            let mut data = Vec::with_capacity(sub.elements() as usize * t.dtype().size());
            for slot in 0..(2 * s.layers) as usize {
                let base = (slot * s.tokens as usize + start as usize) * row;
                data.extend_from_slice(&t.data()[base..base + n as usize * row]);
            }
            // A token range of a valid tensor is a valid tensor.
            KvTensor::new(sub, t.dtype(), data).unwrap_or_else(|e| panic!("sub-shape {sub:?}: {e}"))
        })
        .collect()
}
