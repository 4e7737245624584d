//! `kvault codec-eval`: what each codec profile costs in model quality, on real KV caches.
//!
//! For each input text: prefill the first `--prefix-tokens` tokens with the model runner,
//! cut the KV cache into `--chunk-tokens` chunks as the store would, encode and decode every
//! chunk with each profile, and score the next `--cont-tokens` tokens with the decoded
//! cache injected. Prints bytes, ratio against fp16, bits per element, relative L2 error of
//! K and of V, and the perplexity against the one with the original cache.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use kvault_client::model::LlamaModel;
use kvault_client::prefix::{place_tokens, slice_tokens};
use kvault_codec::{Dtype, KvTensor, Profile};

#[derive(Debug, Args)]
pub struct CodecEvalArgs {
    /// GGUF model (Llama architecture).
    #[arg(long, default_value = ".models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Text files to evaluate on (each gives its own rows).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Tokens of the prefix whose KV cache is coded (fewer if the text is short).
    #[arg(long, default_value_t = 512)]
    pub prefix_tokens: usize,
    /// Tokens of the continuation scored after the prefix.
    #[arg(long, default_value_t = 128)]
    pub cont_tokens: usize,
    /// Tokens per stored chunk (each chunk is its own container).
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: u32,
    /// Profiles to evaluate, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub profiles: Vec<Profile>,
}

/// A real prefix: its KV cache in f16 (the runner rounds K/V to f16, so this is exact)
/// and the continuation after it.
pub(super) struct RealKv {
    pub kv: KvTensor,
    pub continuation: Vec<u32>,
}

/// Tokenizes `text`, prefills up to `prefix_tokens` of it (leaving `cont_tokens` after).
pub(super) fn real_kv(
    model: &LlamaModel,
    text: &str,
    prefix_tokens: usize,
    cont_tokens: usize,
) -> anyhow::Result<RealKv> {
    // Not `encode_document`: that refuses texts longer than the context, and only the
    // first `prefix_tokens + cont_tokens` tokens are used.
    let mut ids = model.tokenizer().encode(text);
    ids.truncate(prefix_tokens + cont_tokens);
    if ids.len() < cont_tokens + 16 {
        bail!(
            "text has {} tokens, need at least {}",
            ids.len(),
            cont_tokens + 16
        );
    }
    let prefix = prefix_tokens.min(ids.len() - cont_tokens);
    let pre = model.prefill(&ids[..prefix], None)?;
    let mut kv = KvTensor::zeros(pre.kv.shape(), Dtype::F16)?;
    kvault_codec::convert(pre.kv.data(), pre.kv.dtype(), kv.data_mut(), Dtype::F16)?;
    Ok(RealKv {
        kv,
        continuation: ids[prefix..prefix + cont_tokens].to_vec(),
    })
}

/// Encodes `kv` in chunks of `chunk_tokens` tokens with `profile`: the containers.
pub(super) fn encode_chunks(
    kv: &KvTensor,
    profile: Profile,
    chunk_tokens: u32,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let t = kv.shape().tokens;
    (0..t)
        .step_by(chunk_tokens as usize)
        .map(|t0| {
            let chunk = slice_tokens(&kv.view(), t0, (t0 + chunk_tokens).min(t))?;
            Ok(kvault_codec::encode(chunk.view(), profile)?)
        })
        .collect()
}

/// Decodes chunk containers back into one f32 tensor of `kv`'s shape.
pub(super) fn decode_chunks(kv: &KvTensor, blobs: &[Vec<u8>], chunk_tokens: u32) -> anyhow::Result<KvTensor> {
    let mut out = KvTensor::zeros(kv.shape(), Dtype::F32)?;
    for (i, blob) in blobs.iter().enumerate() {
        let part = kvault_codec::decode(blob)?;
        let mut f = KvTensor::zeros(part.shape(), Dtype::F32)?;
        kvault_codec::decode_into(blob, Dtype::F32, f.data_mut())?;
        place_tokens(&mut out, &f.view(), i as u32 * chunk_tokens)?;
    }
    Ok(out)
}

/// Relative L2 error `||x - y|| / ||x||` of K and of V (`x` any dtype, `y` f32).
pub(super) fn rel_l2(x: &KvTensor, y: &KvTensor) -> anyhow::Result<(f64, f64)> {
    let mut xf = vec![0u8; x.shape().byte_len(Dtype::F32)?];
    kvault_codec::convert(x.data(), x.dtype(), &mut xf, Dtype::F32)?;
    let f = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let (xs, ys) = (f(&xf), f(y.data()));
    let part = (x.shape().tokens * x.shape().kv_heads * x.shape().head_dim) as usize;
    let mut acc = [(0f64, 0f64); 2];
    for (i, (a, b)) in xs.chunks_exact(part).zip(ys.chunks_exact(part)).enumerate() {
        let s = &mut acc[i % 2];
        for (&p, &q) in a.iter().zip(b) {
            s.0 += f64::from(p - q).powi(2);
            s.1 += f64::from(p).powi(2);
        }
    }
    Ok(((acc[0].0 / acc[0].1).sqrt(), (acc[1].0 / acc[1].1).sqrt()))
}

pub fn run(a: CodecEvalArgs) -> anyhow::Result<()> {
    let model = LlamaModel::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let profiles = if a.profiles.is_empty() {
        Profile::ALL.to_vec()
    } else {
        a.profiles.clone()
    };
    println!(
        "model {}, chunks of {} tokens, {} continuation tokens scored per text",
        a.model.display(),
        a.chunk_tokens,
        a.cont_tokens
    );
    println!(
        "| text | tokens | profile | bytes | ratio vs fp16 | bits/elem | rel L2 K | rel L2 V | ppl | Δppl |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    // Per profile: (bytes, fp16 bytes, sum of relative Δppl, texts).
    let mut totals = vec![(0usize, 0usize, 0f64, 0usize); profiles.len()];
    for path in &a.input {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let real = real_kv(&model, &text, a.prefix_tokens, a.cont_tokens).with_context(|| name.clone())?;
        let base = model.perplexity(&real.kv, &real.continuation)?;
        let fp16 = real.kv.data().len();
        let elems = fp16 / 2;
        println!(
            "| {name} | {} | fp16 (original) | {fp16} | 1.00x | 16.000 | 0 | 0 | {base:.4} | 0 |",
            real.kv.shape().tokens
        );
        for (p, tot) in profiles.iter().zip(totals.iter_mut()) {
            let blobs = encode_chunks(&real.kv, *p, a.chunk_tokens)?;
            let bytes: usize = blobs.iter().map(Vec::len).sum();
            let back = decode_chunks(&real.kv, &blobs, a.chunk_tokens)?;
            let (ek, ev) = rel_l2(&real.kv, &back)?;
            let ppl = model.perplexity(&back, &real.continuation)?;
            let d = (ppl - base) / base;
            println!(
                "| {name} | {} | {p} | {bytes} | {:.2}x | {:.3} | {ek:.4} | {ev:.4} | {ppl:.4} | {:+.3}% |",
                real.kv.shape().tokens,
                fp16 as f64 / bytes as f64,
                bytes as f64 * 8.0 / elems as f64,
                100.0 * d
            );
            *tot = (tot.0 + bytes, tot.1 + fp16, tot.2 + d, tot.3 + 1);
        }
    }
    println!();
    println!("| profile | ratio vs fp16 (all texts) | bits/elem | mean Δppl |");
    println!("|---|---|---|---|");
    for (p, (bytes, fp16, d, n)) in profiles.iter().zip(&totals) {
        println!(
            "| {p} | {:.2}x | {:.3} | {:+.3}% |",
            *fp16 as f64 / *bytes as f64,
            *bytes as f64 * 16.0 / *fp16 as f64,
            100.0 * d / (*n).max(1) as f64
        );
    }
    Ok(())
}
