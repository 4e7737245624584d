//! `kvault ask`: answer a question with a document as the prefix, taking
//! the document's KV cache from kvault when it is stored, and show where the
//! time to first token goes.
//!
//! The document's tokens are the prefix (as `kvault warmup` stores them);
//! the question follows as a chat turn. TTFT = lookup + fetch + decode (and
//! injection into the model) + prefill of the uncached rest of the document
//! + prefill of the question and the first token.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use kvault_client::model::{LlamaModel, Session};
use kvault_client::prefix::place_tokens;
use kvault_client::{ChunkStore, Layout};

use super::Store;
use kvault_codec::{Dtype, KvShape, KvTensor};

use super::ServerArgs;
use super::warmup::{cpu, default_model_id};

#[derive(Debug, Clone, Args)]
pub struct AskArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// GGUF model file (Llama architecture).
    #[arg(long, env = "KVAULT_MODEL")]
    pub model: PathBuf,
    /// Model id of the namespace (default: the GGUF file name without `.gguf`).
    #[arg(long)]
    pub model_id: Option<String>,
    /// The document (a text file), used as the prefix.
    #[arg(long)]
    pub input: PathBuf,
    /// The question.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new: usize,
    /// Tokens per chunk of the namespace.
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: u32,
    /// Recompute the prefix even when kvault holds it.
    #[arg(long)]
    pub no_cache: bool,
    /// Leave the stored prefix's KV on the server and have the server compute
    /// attention over it; only the uncached rest, the question and the answer
    /// are held here.
    #[arg(long, conflicts_with = "no_cache")]
    pub offload: bool,
    /// The server's layout of the offloaded KV: f16 is lossless for f16
    /// caches; int8, k8v4 and k4v4 read 0.52, 0.40 and 0.28 of its bytes.
    #[arg(long, value_enum, default_value_t = OffloadLayout::F16, requires = "offload")]
    pub offload_layout: OffloadLayout,
}

/// `--offload-layout`: the attention layouts of `kvault.v1.AttendFormat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OffloadLayout {
    /// f16 keys and values.
    F16,
    /// int8 keys and values.
    Int8,
    /// int8 keys, 4-bit values.
    K8v4,
    /// 4-bit keys and values.
    K4v4,
}

impl OffloadLayout {
    fn format(self) -> kvault_client::attend::AttendFormat {
        use kvault_client::attend::AttendFormat;
        match self {
            OffloadLayout::F16 => AttendFormat::F16,
            OffloadLayout::Int8 => AttendFormat::Int8,
            OffloadLayout::K8v4 => AttendFormat::K8v4,
            OffloadLayout::K4v4 => AttendFormat::K4v4,
        }
    }
}

/// Where the time to first token went.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ttft {
    /// Lookup of the prefix's chunk keys.
    pub lookup: Duration,
    /// Fetching the stored chunks.
    pub fetch: Duration,
    /// Decoding them and injecting them into the model.
    pub decode: Duration,
    /// Prefill of the part of the document that was not stored.
    pub prefill: Duration,
    /// Prefill of the question and the first token.
    pub first_token: Duration,
}

impl Ttft {
    /// The time to first token.
    pub fn total(&self) -> Duration {
        self.lookup + self.fetch + self.decode + self.prefill + self.first_token
    }
}

/// What `ask` did.
#[derive(Debug, Clone)]
pub struct AskReport {
    /// Tokens of the document.
    pub doc_tokens: usize,
    /// Of these, taken from kvault.
    pub cached_tokens: usize,
    /// Encoded bytes fetched.
    pub wire_bytes: u64,
    /// Answer tokens (greedy).
    pub answer: Vec<u32>,
    /// Answer text.
    pub text: String,
    /// The time split.
    pub ttft: Ttft,
    /// With attention offloaded: (attend steps, bytes sent, bytes received).
    pub offload: Option<(u64, u64, u64)>,
}

/// The chat turn that follows the document.
pub fn question_turn(prompt: &str) -> String {
    format!("\n\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
}

/// A stored prefix fetched and decoded, with timings.
pub struct Fetched {
    /// f32 KV of the first `tokens` tokens; `None` when nothing is stored.
    pub kv: Option<KvTensor>,
    /// Tokens covered.
    pub tokens: usize,
    /// Encoded bytes moved.
    pub wire_bytes: u64,
    /// Lookup time.
    pub lookup: Duration,
    /// Get time.
    pub fetch: Duration,
    /// Decode time.
    pub decode: Duration,
}

/// Looks up, fetches and decodes the longest stored prefix of `ids`,
/// timing each step (what [`ChunkStore::get_prefix`] does in one call).
pub async fn fetch_prefix(client: &impl ChunkStore, layout: &Layout, ids: &[u32]) -> anyhow::Result<Fetched> {
    let ct = layout.chunk_tokens as usize;
    let t = Instant::now();
    let keys = kvault_client::chain_keys(&layout.namespace_id(), ids, ct);
    let found = client.lookup(layout, &keys).await?.prefix_chunks;
    let lookup = t.elapsed();
    let mut out = Fetched {
        kv: None,
        tokens: 0,
        wire_bytes: 0,
        lookup,
        fetch: Duration::ZERO,
        decode: Duration::ZERO,
    };
    if found == 0 {
        return Ok(out);
    }
    let t = Instant::now();
    let got = client.get_many(layout, &keys[..found], None).await?;
    out.fetch = t.elapsed();
    let t = Instant::now();
    // Chunks evicted between lookup and get end the prefix there.
    let have = got.iter().take_while(|f| f.is_some()).count();
    let tokens = (have * ct).min(ids.len());
    if tokens == 0 {
        return Ok(out);
    }
    let shape = KvShape {
        layers: layout.layers,
        tokens: tokens as u32,
        kv_heads: layout.kv_heads,
        head_dim: layout.head_dim,
    };
    let mut kv = KvTensor::zeros(shape, Dtype::F32)?;
    for (i, f) in got.iter().take(have).flatten().enumerate() {
        out.wire_bytes += f.blob.len() as u64;
        let part = cpu(|| -> anyhow::Result<KvTensor> {
            let c = kvault_codec::Container::parse(&f.blob)?;
            let want = (tokens - i * ct).min(ct) as u32;
            if c.header().tokens != want {
                bail!("chunk {i} holds {} tokens, expected {want}", c.header().tokens);
            }
            let mut part = KvTensor::zeros(c.header().shape(), Dtype::F32)?;
            kvault_codec::decode_into(&f.blob, Dtype::F32, part.data_mut())?;
            Ok(part)
        })?;
        place_tokens(&mut kv, &part.view(), (i * ct) as u32)?;
    }
    out.decode = t.elapsed();
    out.kv = Some(kv);
    out.tokens = tokens;
    Ok(out)
}

/// How `ask` uses kvault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fetch the stored prefix's KV and attend locally.
    Fetch,
    /// Recompute the whole prefix.
    NoCache,
    /// Leave the stored prefix on the server; it computes attention over it
    /// in this layout.
    Offload(OffloadLayout),
}

/// Answers with the stored prefix's attention computed by the server: the
/// KV never moves; each layer of each step sends queries and gets partials.
async fn ask_offloaded(
    model: &LlamaModel,
    client: &Store,
    layout: &Layout,
    ids: &[u32],
    q: &[u32],
    max_new: usize,
    layout_kind: OffloadLayout,
) -> anyhow::Result<AskReport> {
    use kvault_client::attend::Offload;
    use kvault_client::attend::model::ServerAttention;
    use std::sync::atomic::Ordering;
    let ct = layout.chunk_tokens as usize;
    let mut ttft = Ttft::default();
    let t = Instant::now();
    let keys = kvault_client::chain_keys(&layout.namespace_id(), ids, ct);
    let found = client.lookup(layout, &keys).await?.prefix_chunks;
    ttft.lookup = t.elapsed();
    if found == 0 {
        bail!(
            "the document's prefix is not stored: run `kvault warmup` on it first, or ask without --offload"
        );
    }
    let tokens = (found * ct).min(ids.len());
    // Opening makes the server fetch and decode the chunks: the offload's "fetch".
    let t = Instant::now();
    let (servers, shards) = client.attend_shards(layout, &keys[..found])?;
    let mut off = Offload::connect(&servers).await?;
    let prefix = off
        .open_prefix(layout, &keys[..found], tokens, &shards, layout_kind.format())
        .await?;
    ttft.fetch = t.elapsed();
    let remote = ServerAttention::new(off, prefix, model.config().heads);
    let stats = remote.stats();
    let mut session = model.offloaded_session(tokens, Box::new(remote))?;
    if tokens < ids.len() {
        let t = Instant::now();
        cpu(|| session.feed(&ids[tokens..]))?;
        ttft.prefill = t.elapsed();
    }
    let g = cpu(|| session.generate(q, max_new))?;
    ttft.first_token = g.first_token;
    Ok(AskReport {
        doc_tokens: ids.len(),
        cached_tokens: tokens,
        wire_bytes: 0,
        text: model.tokenizer().decode(&g.tokens),
        answer: g.tokens,
        ttft,
        offload: Some((
            stats.steps.load(Ordering::Relaxed),
            stats.sent.load(Ordering::Relaxed),
            stats.received.load(Ordering::Relaxed),
        )),
    })
}

/// Answers `prompt` about the document `ids`, from kvault's cache when it
/// holds the prefix (unless `mode` says recompute), fetched or attended on the server.
pub async fn ask(
    model: &LlamaModel,
    client: &Store,
    layout: &Layout,
    ids: &[u32],
    prompt: &str,
    max_new: usize,
    mode: Mode,
) -> anyhow::Result<AskReport> {
    let tok = model.tokenizer();
    let q = tok.encode(&question_turn(prompt));
    let context = model.config().context_length;
    if ids.len() + q.len() + max_new > context {
        bail!(
            "document ({} tokens) + question ({}) + answer ({max_new}) exceed the model's context of {context}",
            ids.len(),
            q.len()
        );
    }
    if let Mode::Offload(kind) = mode {
        return ask_offloaded(model, client, layout, ids, &q, max_new, kind).await;
    }
    let mut ttft = Ttft::default();
    let fetched = if mode == Mode::NoCache {
        None
    } else {
        Some(fetch_prefix(client, layout, ids).await?)
    };
    let (mut session, cached, wire_bytes): (Session<'_>, usize, u64) = match fetched {
        Some(f) => {
            ttft.lookup = f.lookup;
            ttft.fetch = f.fetch;
            let t = Instant::now();
            let s = cpu(|| model.session(f.kv.as_ref()))?;
            ttft.decode = f.decode + t.elapsed();
            (s, f.tokens, f.wire_bytes)
        }
        None => (model.session(None)?, 0, 0),
    };
    if cached < ids.len() {
        let t = Instant::now();
        cpu(|| session.feed(&ids[cached..]))?;
        ttft.prefill = t.elapsed();
    }
    let g = cpu(|| session.generate(&q, max_new))?;
    ttft.first_token = g.first_token;
    Ok(AskReport {
        doc_tokens: ids.len(),
        cached_tokens: cached,
        wire_bytes,
        text: tok.decode(&g.tokens),
        answer: g.tokens,
        ttft,
        offload: None,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints the answer and the TTFT split.
pub fn print_report(r: &AskReport) {
    println!("answer: {}", r.text.trim());
    println!("answer tokens: {}", r.answer.len());
    println!("answer ids: {:?}", r.answer);
    if let Some((steps, sent, received)) = r.offload {
        println!(
            "attention offloaded: {} prefix tokens stay on the server; {steps} attend round trips, {sent} bytes sent, {received} received",
            r.cached_tokens
        );
    }
    let t = &r.ttft;
    println!(
        "prefix: {} tokens, {} from kvault ({} bytes fetched), {} prefilled",
        r.doc_tokens,
        r.cached_tokens,
        r.wire_bytes,
        r.doc_tokens - r.cached_tokens
    );
    println!(
        "TTFT {:.1} ms = lookup {:.1} + fetch {:.1} + decode {:.1} + prefill of uncached rest {:.1} + question and first token {:.1}",
        ms(t.total()),
        ms(t.lookup),
        ms(t.fetch),
        ms(t.decode),
        ms(t.prefill),
        ms(t.first_token)
    );
}

pub async fn run(a: AskArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let model = LlamaModel::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let ids = model.encode_document(&text)?;
    let model_id = a.model_id.clone().unwrap_or_else(|| default_model_id(&a.model));
    let layout = model.layout(&model_id, a.chunk_tokens);
    let client = a.server.connect().await?;
    let mode = match (a.no_cache, a.offload) {
        (true, _) => Mode::NoCache,
        (_, true) => Mode::Offload(a.offload_layout),
        _ => Mode::Fetch,
    };
    let r = ask(&model, &client, &layout, &ids, &a.prompt, a.max_new, mode).await?;
    print_report(&r);
    Ok(())
}
