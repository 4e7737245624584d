//! `kvault bench codec`: every codec profile side by side on a real KV cache (the model
//! runner's prefill of the input texts): size, error, perplexity change, and CPU encode
//! and decode throughput (GB/s of fp16) at each thread count.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kvault_client::model::LlamaModel;
use kvault_codec::{Dtype, Profile};

use super::codec_eval::{decode_chunks, encode_chunks, real_kv, rel_l2};

#[derive(Debug, Args)]
pub struct BenchCodecArgs {
    /// GGUF model (Llama architecture).
    #[arg(long, default_value = ".models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Text files, concatenated, whose KV cache is measured.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Tokens of KV cache to measure (fewer if the texts are short).
    #[arg(long, default_value_t = 1024)]
    pub tokens: usize,
    /// Tokens after them scored for the perplexity column.
    #[arg(long, default_value_t = 128)]
    pub cont_tokens: usize,
    /// Chunk sizes in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    pub chunk_tokens: Vec<u32>,
    /// Thread counts to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Seconds of work per timing (at least 2 runs each).
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Profiles, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub profiles: Vec<Profile>,
}

/// Runs `f` for about `seconds` (at least twice, after a warm-up); returns seconds per run.
fn time(seconds: f64, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let t = Instant::now();
    let mut n = 0u32;
    while n < 2 || t.elapsed().as_secs_f64() < seconds {
        f()?;
        n += 1;
    }
    Ok(t.elapsed().as_secs_f64() / f64::from(n))
}

pub fn run(a: BenchCodecArgs) -> anyhow::Result<()> {
    let model = LlamaModel::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let mut text = String::new();
    for p in &a.input {
        text.push_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?);
        text.push_str("\n\n");
    }
    let real = real_kv(&model, &text, a.tokens, a.cont_tokens)?;
    let base = model.perplexity(&real.kv, &real.continuation)?;
    let fp16 = real.kv.data().len();
    println!(
        "real KV of {} ({} tokens, shape {}, {:.1} MB fp16); continuation ppl {base:.4} over {} tokens",
        a.model.display(),
        real.kv.shape().tokens,
        real.kv.shape(),
        fp16 as f64 / 1e6,
        a.cont_tokens
    );
    let profiles = if a.profiles.is_empty() {
        Profile::ALL.to_vec()
    } else {
        a.profiles.clone()
    };
    let mut head = "| profile | chunk | ratio vs fp16 | bits/elem | rel L2 K | rel L2 V | Δppl |".to_string();
    for t in &a.threads {
        head.push_str(&format!(" enc GB/s {t}T | dec GB/s {t}T |"));
    }
    println!("{head}");
    println!("{}", "|---".repeat(7 + 2 * a.threads.len()) + "|");
    let pools: Vec<rayon::ThreadPool> = a
        .threads
        .iter()
        .map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build())
        .collect::<Result<_, _>>()?;
    for &chunk in &a.chunk_tokens {
        for &p in &profiles {
            let blobs = encode_chunks(&real.kv, p, chunk)?;
            let bytes: usize = blobs.iter().map(Vec::len).sum();
            let back = decode_chunks(&real.kv, &blobs, chunk)?;
            let (ek, ev) = rel_l2(&real.kv, &back)?;
            let ppl = model.perplexity(&back, &real.continuation)?;
            let mut row = format!(
                "| {p} | {chunk} | {:.2}x | {:.3} | {ek:.4} | {ev:.4} | {:+.3}% |",
                fp16 as f64 / bytes as f64,
                bytes as f64 * 16.0 / fp16 as f64,
                100.0 * (ppl - base) / base
            );
            let shapes: Vec<usize> = blobs
                .iter()
                .map(|b| {
                    Ok(kvault_codec::Container::parse(b)?
                        .header()
                        .shape()
                        .byte_len(Dtype::F16)?)
                })
                .collect::<anyhow::Result<_>>()?;
            let mut outs: Vec<Vec<u8>> = shapes.iter().map(|&n| vec![0u8; n]).collect();
            for pool in &pools {
                let enc = pool.install(|| time(a.seconds, || encode_chunks(&real.kv, p, chunk).map(drop)))?;
                let dec = pool.install(|| {
                    time(a.seconds, || {
                        for (b, o) in blobs.iter().zip(outs.iter_mut()) {
                            kvault_codec::decode_into(b, Dtype::F16, o)?;
                        }
                        Ok(())
                    })
                })?;
                row.push_str(&format!(
                    " {:.2} | {:.2} |",
                    fp16 as f64 / enc / 1e9,
                    fp16 as f64 / dec / 1e9
                ));
            }
            println!("{row}");
        }
    }
    Ok(())
}
