//! `kvault warmup`: prefill documents with a real model and store their KV
//! caches, chunk by chunk.
//!
//! Each document is tokenized, its chunk keys looked up first, and only the
//! chunks after the longest stored prefix are computed: the stored prefix is
//! fetched and injected as the model's past, so an interrupted warmup resumes
//! where it stopped and a finished one costs one lookup per document. Every
//! chunk is stored as soon as it is computed. A document that is empty or
//! longer than the model's context is refused before anything is stored.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvault_client::model::LlamaModel;
use kvault_client::{ChunkStore, Layout, kv_file};
use kvault_codec::{Dtype, KvTensor, Profile};

use super::ServerArgs;

#[derive(Debug, Clone, Args)]
pub struct WarmupArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// GGUF model file (Llama architecture), e.g. from scripts/fetch-model.sh.
    #[arg(long, env = "KVAULT_MODEL")]
    pub model: PathBuf,
    /// Model id of the namespace (default: the GGUF file name without `.gguf`).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Documents: text files, directories of them, or JSONL files of `{"id": .., "text": ..}`.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Codec profile (see `kvault profiles`).
    #[arg(long, default_value = "lossless")]
    pub profile: Profile,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: u32,
    /// Also write the first document's KV cache (`kv` f16, `ids`) to this safetensors file.
    #[arg(long)]
    pub dump_kv: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// A document to warm up.
#[derive(Debug, Clone)]
pub struct Document {
    /// Its id (JSONL `id`, else the file path).
    pub id: String,
    /// Its text.
    pub text: String,
}

/// What a warmup did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct WarmupReport {
    /// Documents read.
    pub documents: usize,
    /// Documents whose every chunk was already stored.
    pub already_stored: usize,
    /// Documents refused (empty, too long), with the reason.
    pub refused: Vec<(String, String)>,
    /// Tokens of all accepted documents.
    pub tokens: usize,
    /// Tokens whose KV was already stored (not recomputed).
    pub tokens_cached: usize,
    /// Tokens prefilled here.
    pub tokens_prefilled: usize,
    /// Seconds spent in prefill.
    pub prefill_secs: f64,
    /// Chunks stored.
    pub chunks_stored: usize,
    /// Chunks not stored because their cluster node was down.
    pub chunks_unavailable: usize,
    /// Encoded bytes stored.
    pub bytes_stored: u64,
    /// The same chunks in fp16.
    pub fp16_bytes: u64,
    /// Wall time of the whole warmup.
    pub secs: f64,
}

/// Model id of a GGUF file: its name without `.gguf`.
pub fn default_model_id(model: &Path) -> String {
    model
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| "model".into())
}

/// Reads documents from files, directories (recursively, sorted) and JSONL files.
pub fn read_documents(inputs: &[PathBuf]) -> anyhow::Result<Vec<Document>> {
    let mut files = Vec::new();
    for p in inputs {
        collect_files(p, &mut files)?;
    }
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        if f.extension().is_some_and(|e| e == "jsonl") {
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                #[derive(serde::Deserialize)]
                struct Line {
                    id: Option<serde_json::Value>,
                    text: String,
                }
                let l: Line = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not {{\"id\":..,\"text\":..}}", f.display(), n + 1))?;
                let id = match l.id {
                    Some(serde_json::Value::String(s)) => s,
                    Some(v) => v.to_string(),
                    None => format!("{}:{}", f.display(), n + 1),
                };
                docs.push(Document { id, text: l.text });
            }
        } else {
            docs.push(Document {
                id: f.display().to_string(),
                text,
            });
        }
    }
    Ok(docs)
}

fn collect_files(p: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let meta = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("listing {}", p.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for e in entries {
            if e.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            collect_files(&e, out)?;
        }
    } else {
        out.push(p.to_path_buf());
    }
    Ok(())
}

/// f32 KV from the runner → the namespace's dtype.
pub fn to_dtype(kv: &KvTensor, dtype: Dtype) -> anyhow::Result<KvTensor> {
    if kv.dtype() == dtype {
        return Ok(kv.clone());
    }
    let n = kv.data().len() / kv.dtype().size();
    let mut out = vec![0u8; n * dtype.size()];
    kvault_codec::convert(kv.data(), kv.dtype(), &mut out, dtype)?;
    Ok(KvTensor::new(kv.shape(), dtype, out)?)
}

/// Runs CPU-heavy model work off the async scheduler's other tasks.
pub fn cpu<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn progress(total: u64, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} tokens  {per_sec}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Warms up `docs` into the server behind `client`.
pub async fn warmup(
    a: &WarmupArgs,
    model: &LlamaModel,
    client: &impl ChunkStore,
    docs: &[Document],
) -> anyhow::Result<WarmupReport> {
    let t0 = Instant::now();
    let model_id = a.model_id.clone().unwrap_or_else(|| default_model_id(&a.model));
    let layout = model.layout(&model_id, a.chunk_tokens);
    layout.validate()?;
    let mut report = WarmupReport {
        documents: docs.len(),
        ..Default::default()
    };
    // Tokenize everything first: refusals come before any work, and the
    // progress bar knows its total.
    let mut jobs = Vec::new();
    for d in docs {
        match model.encode_document(&d.text) {
            Ok(ids) => jobs.push((d, ids)),
            Err(e) => report.refused.push((d.id.clone(), e.to_string())),
        }
    }
    report.tokens = jobs.iter().map(|(_, ids)| ids.len()).sum();
    let bar = progress(report.tokens as u64, a.quiet);
    for (n, (doc, ids)) in jobs.iter().enumerate() {
        let dump = if n == 0 { a.dump_kv.as_deref() } else { None };
        let was_stored = warm_one(model, client, &layout, ids, a.profile, dump, &bar, &mut report)
            .await
            .with_context(|| format!("document {}", doc.id))?;
        if was_stored {
            report.already_stored += 1;
        }
    }
    bar.finish_and_clear();
    report.secs = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Stores one document's missing chunks; true when all were stored before.
#[allow(clippy::too_many_arguments)]
async fn warm_one(
    model: &LlamaModel,
    client: &impl ChunkStore,
    layout: &Layout,
    ids: &[u32],
    profile: Profile,
    dump: Option<&Path>,
    bar: &ProgressBar,
    report: &mut WarmupReport,
) -> anyhow::Result<bool> {
    let ct = layout.chunk_tokens as usize;
    let keys = kvault_client::chain_keys(&layout.namespace_id(), ids, ct);
    let found = client.lookup(layout, &keys).await?.prefix_chunks;
    // The stored prefix becomes the model's past (fetched in f32, exact).
    let past = if found > 0 {
        client
            .get_prefix(layout, &ids[..(found * ct).min(ids.len())], Dtype::F32)
            .await?
    } else {
        None
    };
    let start = past.as_ref().map_or(0, |p| p.tokens);
    report.tokens_cached += start;
    bar.inc(start as u64);
    let mut session = model.session(past.as_ref().map(|p| &p.kv))?;
    // `start` is a multiple of the chunk size, or the whole document.
    for (i, key) in keys.iter().enumerate().skip(start.div_ceil(ct)) {
        let (t0, t1) = (i * ct, ((i + 1) * ct).min(ids.len()));
        let p0 = Instant::now();
        let chunk = cpu(|| -> anyhow::Result<KvTensor> {
            session.feed(&ids[t0..t1])?;
            to_dtype(&session.kv_range(t0, t1)?, layout.dtype)
        })?;
        report.prefill_secs += p0.elapsed().as_secs_f64();
        report.tokens_prefilled += t1 - t0;
        // Chunk 0 holds the document's first token, the attention sink.
        let options = kvault_codec::EncodeOptions::sequence_start(i == 0);
        let blob = cpu(|| kvault_codec::encode_with(chunk.view(), profile, options))?;
        report.bytes_stored += blob.len() as u64;
        report.fp16_bytes += (chunk.data().len() / layout.dtype.size() * 2) as u64;
        match client.put(layout, key, Bytes::from(blob)).await {
            Ok(_) => report.chunks_stored += 1,
            // A cluster node that is down: the chunk stays uncached, the warmup goes on.
            Err(kvault_client::ClientError::Unavailable(m)) if client.is_cluster() => {
                tracing::warn!(key = %key, error = %m, "chunk owner unavailable: not stored");
                report.chunks_unavailable += 1;
            }
            Err(e) => return Err(e.into()),
        }
        bar.inc((t1 - t0) as u64);
        bar.set_message(format!(
            "{:.1} MB stored, {} chunks",
            report.bytes_stored as f64 / 1e6,
            report.chunks_stored
        ));
    }
    if let Some(path) = dump {
        let kv = if session.len() == ids.len() {
            to_dtype(&session.kv()?, Dtype::F16)?
        } else {
            bail!("cannot dump the KV of a document whose cache was not fetched whole");
        };
        kv_file::write(path, &kv, ids)?;
    }
    Ok(start == ids.len())
}

pub async fn run(a: WarmupArgs) -> anyhow::Result<()> {
    let docs = read_documents(&a.input)?;
    if docs.is_empty() {
        bail!("no documents in {:?}", a.input);
    }
    let model = LlamaModel::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let client = a.server.connect().await?;
    let r = warmup(&a, &model, &client, &docs).await?;
    print_report(&r);
    if !r.refused.is_empty() {
        bail!("{} of {} documents refused", r.refused.len(), r.documents);
    }
    Ok(())
}

/// Prints a warmup summary.
pub fn print_report(r: &WarmupReport) {
    println!(
        "warmup: {} documents ({} already stored), {} tokens: {} from kvault, {} prefilled",
        r.documents, r.already_stored, r.tokens, r.tokens_cached, r.tokens_prefilled
    );
    if r.tokens_prefilled > 0 {
        println!(
            "prefill: {:.1} s, {:.0} tokens/s",
            r.prefill_secs,
            r.tokens_prefilled as f64 / r.prefill_secs.max(1e-9)
        );
    }
    if r.chunks_stored > 0 {
        println!(
            "stored: {} chunks, {} bytes ({} fp16, ratio {:.3}x)",
            r.chunks_stored,
            r.bytes_stored,
            r.fp16_bytes,
            r.fp16_bytes as f64 / r.bytes_stored.max(1) as f64
        );
    }
    if r.chunks_unavailable > 0 {
        println!(
            "not stored: {} chunks (their cluster node was down)",
            r.chunks_unavailable
        );
    }
    for (id, why) in &r.refused {
        println!("refused: {id}: {why}");
    }
    println!("took {:.1} s", r.secs);
}
