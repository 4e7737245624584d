//! Size, error and speed of every codec profile on **synthetic** KV caches with the
//! structure real ones have (per-channel key offsets, a few outlier channels, smooth drift
//! along tokens, a large first "sink" token). Synthetic data says nothing reliable about
//! model quality; use it for speed and for comparing profiles on equal footing.
//!
//! `cargo run --release -p kvault-codec --example codec_bench -- [tokens] [chunks] [profile]`
//! (defaults: 256-token chunks, 8 chunks, SmolLM2-135M shape: 30 layers, 3 KV heads,
//! head dim 64). With `KVAULT_REAL_KV=F.safetensors` (an f16 tensor `kv` of shape
//! `[layers, 2, tokens, kv_heads, head_dim]`, as `kvault codec-eval --kv-cache` keeps them)
//! the chunks are cut from that real cache instead (as many as it holds, at most `chunks`).

use std::time::Instant;

use half::f16;
use kvault_codec::{Dtype, KvShape, KvView, Profile, decode_into, encode};

/// xorshift64* + Box-Muller: deterministic, dependency-free normals.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// One chunk of structured synthetic KV in f32, canonical layout.
fn synthetic(shape: KvShape, seed: u64, first_chunk: bool) -> Vec<f32> {
    let (l, t, c) = (
        shape.layers as usize,
        shape.tokens as usize,
        (shape.kv_heads * shape.head_dim) as usize,
    );
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x1234_5678_9ABC_DEF1));
    let mut out = vec![0f32; l * 2 * t * c];
    for layer in 0..l {
        // Channel structure is a property of the model: seeded by layer only.
        let mut model = Rng(1000 + layer as u64);
        for kv in 0..2 {
            let is_key = kv == 0;
            let offset: Vec<f64> = (0..c)
                .map(|_| {
                    if is_key {
                        1.5 * model.normal()
                    } else {
                        0.2 * model.normal()
                    }
                })
                .collect();
            let mut scale: Vec<f64> = (0..c)
                .map(|_| (0.5 * model.normal()).exp() * if is_key { 0.8 } else { 0.5 })
                .collect();
            for _ in 0..c / 48 {
                let ch = (model.uniform() * c as f64) as usize % c;
                scale[ch] *= 6.0;
            }
            let mut drift = vec![0f64; c];
            let base = (layer * 2 + kv) * t * c;
            for tok in 0..t {
                let token_mag = if is_key { 1.0 } else { (0.4 * rng.normal()).exp() };
                let sink = if first_chunk && tok == 0 { 8.0 } else { 1.0 };
                for ch in 0..c {
                    drift[ch] = 0.95 * drift[ch] + 0.31 * rng.normal();
                    let x =
                        offset[ch] + scale[ch] * token_mag * sink * (0.6 * drift[ch] + 0.8 * rng.normal());
                    out[base + tok * c + ch] = x as f32;
                }
            }
        }
    }
    out
}

fn to_f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect()
}

fn f16_bytes_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let tokens: u32 = args.next().map_or(256, |a| a.parse().expect("tokens"));
    let chunks: usize = args.next().map_or(8, |a| a.parse().expect("chunks"));
    let only: Option<Profile> = args.next().map(|a| a.parse().expect("profile"));
    let shape = KvShape {
        layers: 30,
        tokens,
        kv_heads: 3,
        head_dim: 64,
    };
    let real = std::env::var("KVAULT_REAL_KV").ok();
    let (shape, data): (KvShape, Vec<Chunk>) = match &real {
        None => (
            shape,
            (0..chunks)
                .map(|i| {
                    let f = synthetic(shape, i as u64, i == 0);
                    let b = to_f16_bytes(&f);
                    // Error is measured against what the codec was given: the f16 values.
                    (f16_bytes_to_f32(&b), b)
                })
                .collect(),
        ),
        Some(path) => real_chunks(path, tokens, chunks),
    };
    let fp16_bytes: usize = data.iter().map(|(_, b)| b.len()).sum();
    println!(
        "{} KV, shape {shape}, {} chunks, {:.1} MB fp16",
        real.as_deref().unwrap_or("synthetic structured"),
        data.len(),
        fp16_bytes as f64 / 1e6
    );
    println!(
        "| profile | ratio vs fp16 | bits/elem | rel L2 K | rel L2 V | enc GB/s 1T | dec GB/s 1T | enc GB/s 2T | dec GB/s 2T |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &profile in Profile::ALL.iter().filter(|&&p| only.is_none_or(|o| o == p)) {
        let blobs: Vec<Vec<u8>> = data
            .iter()
            .map(|(_, b)| encode(KvView::new(shape, Dtype::F16, b).expect("view"), profile).expect("encode"))
            .collect();
        let enc_bytes: usize = blobs.iter().map(Vec::len).sum();
        let mut out = vec![0u8; shape.byte_len(Dtype::F16).expect("len")];
        let (mut se, mut so, mut sv, mut sov) = (0f64, 0f64, 0f64, 0f64);
        let part = (shape.tokens * shape.kv_heads * shape.head_dim) as usize;
        for ((orig, _), blob) in data.iter().zip(&blobs) {
            decode_into(blob, Dtype::F16, &mut out).expect("decode");
            let got = f16_bytes_to_f32(&out);
            for (i, (o, g)) in orig.chunks_exact(part).zip(got.chunks_exact(part)).enumerate() {
                let (e, n) = o.iter().zip(g).fold((0f64, 0f64), |(e, n), (&x, &y)| {
                    (e + f64::from(x - y).powi(2), n + f64::from(x).powi(2))
                });
                if i % 2 == 0 {
                    se += e;
                    so += n;
                } else {
                    sv += e;
                    sov += n;
                }
            }
        }
        let mut speeds = Vec::new();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let reps = if profile == Profile::CachegenBaseline {
                1
            } else {
                3
            };
            let enc = pool.install(|| {
                best_of(reps, || {
                    for (_, b) in &data {
                        std::hint::black_box(
                            encode(KvView::new(shape, Dtype::F16, b).expect("view"), profile)
                                .expect("encode"),
                        );
                    }
                })
            });
            let dec = pool.install(|| {
                best_of(reps, || {
                    for blob in &blobs {
                        decode_into(blob, Dtype::F16, &mut out).expect("decode");
                    }
                })
            });
            speeds.push(fp16_bytes as f64 / enc / 1e9);
            speeds.push(fp16_bytes as f64 / dec / 1e9);
        }
        let elems = fp16_bytes as f64 / 2.0;
        println!(
            "| {} | {:.2}x | {:.3} | {:.4} | {:.4} | {:.2} | {:.2} | {:.2} | {:.2} |",
            profile.name(),
            fp16_bytes as f64 / enc_bytes as f64,
            enc_bytes as f64 * 8.0 / elems,
            (se / so).sqrt(),
            (sv / sov).sqrt(),
            speeds[0],
            speeds[1],
            speeds[2],
            speeds[3],
        );
    }
}

/// A chunk as f32 values (what errors are measured against) and as the f16 bytes coded.
type Chunk = (Vec<f32>, Vec<u8>);

/// Chunks of `tokens` tokens cut from the real cache in safetensors file `path`.
fn real_chunks(path: &str, tokens: u32, chunks: usize) -> (KvShape, Vec<Chunk>) {
    let bytes = std::fs::read(path).expect("reading the real KV file");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("header length")) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).expect("utf-8 header");
    // The header is JSON; only the "kv" entry's shape and offsets are needed.
    let entry = &header[header.find("\"kv\"").expect("a tensor kv")..];
    let nums = |key: &str| -> Vec<usize> {
        let at = entry.find(key).expect(key) + key.len();
        let list = &entry[at..];
        let list = &list[list.find('[').expect("[") + 1..list.find(']').expect("]")];
        list.split(',')
            .map(|x| x.trim().parse().expect("number"))
            .collect()
    };
    let (dims, offs) = (nums("\"shape\""), nums("\"data_offsets\""));
    let kv = &bytes[8 + n + offs[0]..8 + n + offs[1]];
    let (l, t, c) = (dims[0], dims[2], dims[3] * dims[4]);
    let shape = KvShape {
        layers: l as u32,
        tokens,
        kv_heads: dims[3] as u32,
        head_dim: dims[4] as u32,
    };
    let tk = tokens as usize;
    let data = (0..(t / tk).min(chunks))
        .map(|i| {
            let mut b = Vec::with_capacity(l * 2 * tk * c * 2);
            for slot in 0..l * 2 {
                let at = (slot * t + i * tk) * c * 2;
                b.extend_from_slice(&kv[at..at + tk * c * 2]);
            }
            (f16_bytes_to_f32(&b), b)
        })
        .collect();
    (shape, data)
}

/// Fastest of `reps` runs of `f`, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
