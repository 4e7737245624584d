//! `kvault demo`: the main job on embedded defaults, with a real model.
//!
//! Starts a real `kvault-server` process in a temporary directory, asks
//! SmolLM2-135M a question about a bundled public-domain text with nothing
//! cached (the model prefills the whole document), warms the document up
//! into kvault, asks again (the document's KV cache now comes from kvault),
//! checks that both answers are identical, exports the stored cache and
//! checks it bit for bit against the one the model computed, and prints the
//! TTFT table and storage figures.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use kvault_client::kv_file;
use kvault_client::local_server::LocalServer;
use kvault_client::model::LlamaModel;
use kvault_codec::{Dtype, Profile};

use super::ServerArgs;
use super::ask::{AskReport, Mode, ask};
use super::transfer::{ExportArgs, export_file};
use super::warmup::{WarmupArgs, default_model_id, print_report, read_documents, warmup};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// GGUF model (scripts/fetch-model.sh fetches SmolLM2-135M-Instruct).
    #[arg(
        long,
        env = "KVAULT_MODEL",
        default_value = ".models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    pub model: PathBuf,
    /// The document warmed up and asked about.
    #[arg(long, default_value = "data/texts/gettysburg-address.txt")]
    pub input: PathBuf,
    /// The question.
    #[arg(
        long,
        default_value = "Who gave this speech, and what does he ask the living to do?"
    )]
    pub prompt: String,
    /// Most answer tokens.
    #[arg(long, default_value_t = 48)]
    pub max_new: usize,
    /// Codec profile of the stored cache.
    #[arg(long, default_value = "lossless")]
    pub profile: Profile,
    /// Keep the working directory (server data, KV dump) here instead of a temporary one.
    #[arg(long)]
    pub keep: Option<PathBuf>,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ttft_row(name: &str, r: &AskReport) {
    let t = &r.ttft;
    println!(
        "  {name:<22} {:>7} {:>9.1} {:>8.1} {:>8.1} {:>9.1} {:>10.1} {:>9.1} ms",
        r.cached_tokens,
        ms(t.lookup),
        ms(t.fetch),
        ms(t.decode),
        ms(t.prefill),
        ms(t.first_token),
        ms(t.total())
    );
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    if !a.model.is_file() {
        bail!(
            "model {} not found: run scripts/fetch-model.sh (scripts/demo.sh does) or pass --model",
            a.model.display()
        );
    }
    let tmp = tempfile::tempdir()?;
    let work = a.keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    println!("== kvault demo (work dir {})", work.display());
    let server = LocalServer::start(&work.join("server-data"), &["--ram-bytes", "512MiB"])
        .context("starting kvault-server")?;
    println!(
        "server   : kvault-server pid {:?} on {}",
        server.pid(),
        server.url()
    );
    let srv = ServerArgs::url(server.url(), 120);
    let client = srv.connect().await?;

    let t = std::time::Instant::now();
    let model = LlamaModel::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let c = model.config();
    println!(
        "model    : {} ({} layers, {} heads / {} KV heads x {} dims, rope base {}, context {}), loaded in {:.1} s",
        a.model.display(),
        c.layers,
        c.heads,
        c.kv_heads,
        c.head_dim,
        c.rope_theta,
        c.context_length,
        t.elapsed().as_secs_f64()
    );
    let docs = read_documents(std::slice::from_ref(&a.input))?;
    let Some(doc) = docs.first() else {
        bail!("{}: no document", a.input.display());
    };
    let ids = model.encode_document(&doc.text)?;
    let model_id = default_model_id(&a.model);
    let layout = model.layout(&model_id, 256);
    println!("document : {} ({} tokens)", a.input.display(), ids.len());
    println!("question : {}", a.prompt);

    println!("\n-- 1. ask, nothing cached: the model prefills the whole document");
    let cold = ask(&model, &client, &layout, &ids, &a.prompt, a.max_new, Mode::Fetch).await?;
    println!("answer   : {}", cold.text.trim());
    if cold.cached_tokens != 0 {
        bail!("a fresh server already held {} tokens", cold.cached_tokens);
    }

    println!("\n-- 2. warm the document up into kvault");
    let dump = work.join("document-kv.safetensors");
    let wa = WarmupArgs {
        server: srv.clone(),
        model: a.model.clone(),
        model_id: Some(model_id.clone()),
        input: vec![a.input.clone()],
        profile: a.profile,
        chunk_tokens: 256,
        dump_kv: Some(dump.clone()),
        quiet: true,
    };
    let w = warmup(&wa, &model, &client, &docs).await?;
    print_report(&w);

    println!("\n-- 3. ask again: the document's KV cache comes from kvault");
    let warm = ask(&model, &client, &layout, &ids, &a.prompt, a.max_new, Mode::Fetch).await?;
    println!("answer   : {}", warm.text.trim());
    if warm.cached_tokens != ids.len() {
        bail!(
            "kvault held {} of {} tokens after warmup",
            warm.cached_tokens,
            ids.len()
        );
    }
    let same = warm.answer == cold.answer;
    println!(
        "answers  : {}",
        if same {
            "identical, token for token"
        } else {
            "DIFFERENT"
        }
    );

    println!("\n-- 4. export the stored cache and compare it with the model's");
    let exported = work.join("exported.safetensors");
    let r = export_file(&ExportArgs {
        server: srv.clone(),
        model_id: model_id.clone(),
        ids: dump.clone(),
        out: exported.clone(),
        dtype: Dtype::F16,
    })
    .await?;
    let (want, got) = (kv_file::read(&dump)?, kv_file::read(&exported)?);
    let exact = want.kv.data() == got.kv.data() && want.ids == got.ids;
    println!(
        "export   : {} of {} tokens in {} chunks, {:.1} ms; bit-exact with the model's cache: {}",
        r.tokens_found,
        r.tokens_asked,
        r.chunks,
        r.seconds * 1e3,
        if exact { "yes" } else { "NO" }
    );

    let stat = client.stat().await?;
    let stopped = stop(server)?;

    println!("\nTTFT (time to first token), {} tokens of document", ids.len());
    println!(
        "  {:<22} {:>7} {:>9} {:>8} {:>8} {:>9} {:>10} {:>12}",
        "", "cached", "lookup", "fetch", "decode", "prefill", "1st token", "TTFT"
    );
    ttft_row("cold (recompute)", &cold);
    ttft_row("cached (kvault RAM)", &warm);
    println!(
        "  speedup {:.1}x; NVMe tier and longer prefixes: kvault bench ttft",
        cold.ttft.total().as_secs_f64() / warm.ttft.total().as_secs_f64().max(1e-9)
    );
    println!("\nstorage");
    println!(
        "  stored ({})  {} bytes for {} bytes of fp16 KV (ratio {:.3}x)",
        a.profile.name(),
        w.bytes_stored,
        w.fp16_bytes,
        w.fp16_bytes as f64 / w.bytes_stored.max(1) as f64
    );
    for t in &stat.tiers {
        println!(
            "  ram tier  {} bytes in {} chunks, hits {} / {} reads",
            t.bytes,
            t.chunks,
            t.hits,
            t.hits + t.misses
        );
    }
    println!(
        "  server stop  {}",
        if stopped { "graceful (SIGTERM)" } else { "forced" }
    );
    if !same || !exact || !stopped {
        bail!(
            "demo checks failed (answers identical: {same}, export exact: {exact}, graceful stop: {stopped})"
        );
    }
    println!("\nOK: answered from recompute and from kvault identically; stored cache bit-exact.");
    Ok(())
}

fn stop(server: LocalServer) -> anyhow::Result<bool> {
    Ok(server.stop()?)
}
