//! Writes a seed corpus for the fuzz targets (`codec/fuzz`): one valid container per
//! profile, shape and sequence position, so that libFuzzer starts from inputs that pass
//! the container checksum and reaches every profile's decoder (the `kv-*` payload formats
//! 1 to 4 among them: key rows from 512 tokens, exception rows at a sequence start,
//! predicted residuals on keys that follow their previous token's).
//!
//! `cargo run --release -p kvault-codec --example fuzz_seeds -- DIR`

use std::path::PathBuf;

use half::f16;
use kvault_codec::{Dtype, EncodeOptions, KvShape, KvTensor, Profile, encode_with};

/// A small f16 cache whose keys drift along tokens (an AR(1) walk per channel) with rare
/// outliers, and whose values are independent per token.
fn cache(shape: KvShape, seed: u64) -> KvTensor {
    let (t, c) = (shape.tokens as usize, (shape.kv_heads * shape.head_dim) as usize);
    let mut s = seed | 1;
    let mut uni = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    };
    let mut walk = vec![0f32; c];
    let data = (0..shape.elements() as usize)
        .flat_map(|i| {
            let (part, ch) = (i / (t * c), i % c);
            let v = if part % 2 == 0 {
                walk[ch] = 0.8 * walk[ch] + uni();
                walk[ch] * (1.0 + (ch % 5) as f32)
            } else {
                uni()
            };
            let v = if uni() > 0.995 { v * 50.0 } else { v };
            f16::from_f32(v).to_bits().to_le_bytes()
        })
        .collect();
    // The shapes below are valid.
    KvTensor::new(shape, Dtype::F16, data).expect("a valid shape")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: fuzz_seeds DIR")?);
    std::fs::create_dir_all(&dir)?;
    let shapes = [(2, 7, 1, 8), (2, 40, 2, 8), (1, 600, 1, 16), (2, 33, 3, 4)];
    let mut n = 0;
    for profile in Profile::ALL.iter().copied() {
        for (i, &(layers, tokens, kv_heads, head_dim)) in shapes.iter().enumerate() {
            let shape = KvShape {
                layers,
                tokens,
                kv_heads,
                head_dim,
            };
            let kv = cache(shape, i as u64 + 1);
            for start in [false, true] {
                let blob = encode_with(kv.view(), profile, EncodeOptions::sequence_start(start))?;
                let name = format!(
                    "{}-{tokens}x{}-{}.bin",
                    profile.name(),
                    kv_heads * head_dim,
                    u8::from(start)
                );
                std::fs::write(dir.join(name), blob)?;
                n += 1;
            }
        }
    }
    println!("{n} seeds in {}", dir.display());
    Ok(())
}
