//! `kvault bench codec`: every codec profile side by side on real KV caches (the model
//! runner's prefill of the input texts): size, error, quality (Δppl and the KL divergence
//! of next-token distributions, see `codec_eval.rs`), and CPU encode and decode throughput
//! (GB/s of fp16) at each thread count.
//!
//! Each text is cut into up to `--windows` windows of `--tokens` + `--cont-tokens` tokens,
//! back to back from its start (as `codec-eval` does), so that every kind of text weighs
//! alike rather than the longest one filling the windows; sizes, errors and quality are
//! pooled over all windows, speeds are timed on the first window's cache.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kvault_client::model::LlamaModel;
use kvault_codec::{Dtype, Profile};

use super::codec_eval::{L2, Reference, Variant, Windows, decode_chunks, encode_chunks, real_kv, windows};

#[derive(Debug, Args)]
pub struct BenchCodecArgs {
    /// GGUF model (Llama architecture).
    #[arg(long, default_value = ".models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Text files whose KV caches are measured (windows are cut from each).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Tokens of KV cache per window (fewer if the texts are short).
    #[arg(long, default_value_t = 1024)]
    pub tokens: usize,
    /// Tokens after each window's cache scored for the quality columns.
    #[arg(long, default_value_t = 256)]
    pub cont_tokens: usize,
    /// Windows per text at most (as many as each text holds; a text too short for one
    /// gives one with a shorter prefix).
    #[arg(long, default_value_t = 1)]
    pub windows: usize,
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
    /// Folder that keeps each window's prefilled cache (as `codec-eval --kv-cache`).
    #[arg(long)]
    pub kv_cache: Option<PathBuf>,
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

/// One row of the table: a profile at a chunk size, pooled over windows.
#[derive(Default)]
struct Row {
    bytes: usize,
    fp16: usize,
    l2: L2,
    quality: Windows,
}

pub fn run(a: BenchCodecArgs) -> anyhow::Result<()> {
    let model = LlamaModel::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let mut wins = Vec::new();
    for p in &a.input {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        wins.extend(
            windows(&model, &text, a.tokens, a.cont_tokens, a.windows)
                .with_context(|| format!("cutting windows of {}", p.display()))?,
        );
    }
    let profiles = Variant::list(&a.profiles, &[]);
    let mut rows: Vec<Row> = (0..a.chunk_tokens.len() * profiles.len())
        .map(|_| Row::default())
        .collect();
    let mut first = None;
    let mut base = Windows::default();
    for (w, (prefix, cont)) in wins.iter().enumerate() {
        eprintln!(
            "window {}/{}: prefill of {} tokens",
            w + 1,
            wins.len(),
            prefix.len()
        );
        let real = real_kv(&model, &a.model, prefix, cont, a.kv_cache.as_deref())?;
        let reference = Reference::new(&model, &real)?;
        // The original cache scored against itself: KL 0, Δppl 0 (a check on the harness).
        base.push(reference.score(&model, &real.kv, &real.continuation)?);
        for (ci, &chunk) in a.chunk_tokens.iter().enumerate() {
            for (pi, p) in profiles.iter().enumerate() {
                let row = &mut rows[ci * profiles.len() + pi];
                let blobs = encode_chunks(&real.kv, p, chunk)?;
                row.bytes += blobs.iter().map(Vec::len).sum::<usize>();
                row.fp16 += real.kv.data().len();
                let back = decode_chunks(&real.kv, &blobs, chunk)?;
                row.l2.add(&real.kv, &back)?;
                row.quality
                    .push(reference.score(&model, &back, &real.continuation)?);
            }
        }
        if first.is_none() {
            first = Some(real);
        }
    }
    let Some(real) = first else {
        anyhow::bail!("no window to measure");
    };
    let fp16 = real.kv.data().len();
    let scored = base.total();
    println!(
        "real KV of {}: {} windows of {} + {} tokens (shape of the first {}, {:.1} MB fp16); \
         original ppl {:.4} over {} scored tokens; original vs itself: Δppl {}, KL {}",
        a.model.display(),
        wins.len(),
        real.kv.shape().tokens,
        a.cont_tokens,
        real.kv.shape(),
        fp16 as f64 / 1e6,
        scored.ppl_ref(),
        scored.tokens_scored(),
        base.dppl_cell(),
        base.kl_cell(),
    );
    println!("speeds: GB/s of fp16 KV, timed on the first window's cache");
    println!();
    let mut head =
        "| profile | chunk | ratio vs fp16 | bits/elem | rel L2 K | rel L2 V | Δppl | KL nats/token |"
            .to_string();
    for t in &a.threads {
        head.push_str(&format!(" enc GB/s {t}T | dec GB/s {t}T |"));
    }
    println!("{head}");
    println!("{}", "|---".repeat(8 + 2 * a.threads.len()) + "|");
    let pools: Vec<rayon::ThreadPool> = a
        .threads
        .iter()
        .map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build())
        .collect::<Result<_, _>>()?;
    for (ci, &chunk) in a.chunk_tokens.iter().enumerate() {
        for (pi, p) in profiles.iter().enumerate() {
            let r = &rows[ci * profiles.len() + pi];
            let (ek, ev) = r.l2.rel();
            let mut line = format!(
                "| {p} | {chunk} | {:.2}x | {:.3} | {ek:.4} | {ev:.4} | {} | {} |",
                r.fp16 as f64 / r.bytes as f64,
                r.bytes as f64 * 16.0 / r.fp16 as f64,
                r.quality.dppl_cell(),
                r.quality.kl_cell(),
            );
            let blobs = encode_chunks(&real.kv, p, chunk)?;
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
                line.push_str(&format!(
                    " {:.2} | {:.2} |",
                    fp16 as f64 / enc / 1e9,
                    fp16 as f64 / dec / 1e9
                ));
            }
            println!("{line}");
        }
    }
    // The comparison: the default lossy profile against cachegen-baseline.
    let find = |ci: usize, p: Profile| {
        profiles
            .iter()
            .position(|q| q.profile() == Some(p))
            .map(|pi| &rows[ci * profiles.len() + pi])
    };
    println!();
    for (ci, &chunk) in a.chunk_tokens.iter().enumerate() {
        if let (Some(ours), Some(cg)) = (
            find(ci, Profile::DEFAULT_LOSSY),
            find(ci, Profile::CachegenBaseline),
        ) {
            let (qo, qc) = (ours.quality.total(), cg.quality.total());
            println!(
                "chunk {chunk}: {} is {:.2}x smaller than cachegen-baseline; Δppl {:+.3}% vs {:+.3}%, KL {:.5} vs {:.5}",
                Profile::DEFAULT_LOSSY,
                cg.bytes as f64 / ours.bytes as f64,
                100.0 * qo.dppl(),
                100.0 * qc.dppl(),
                qo.kl(),
                qc.kl(),
            );
        }
    }
    Ok(())
}
