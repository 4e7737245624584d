//! `kvault import`, `kvault export`, `kvault rm`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use kvault_client::prefix::PutSummary;
use kvault_client::{ChunkKey, ChunkStore, Layout, kv_file};
use kvault_codec::{Dtype, Profile};

use super::ServerArgs;

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Model id the cache belongs to (its layout is taken from the file).
    #[arg(long)]
    pub model_id: String,
    /// Safetensors file with `kv` [layers, 2, tokens, kv_heads, head_dim] and `ids` [tokens].
    #[arg(long)]
    pub file: PathBuf,
    /// Codec profile (see `kvault profiles`).
    #[arg(long, default_value = "lossless")]
    pub profile: Profile,
    /// Tokens per chunk; a trailing partial chunk is stored too.
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: u32,
    /// Puts in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Model id to fetch under (its layout is asked from the server).
    #[arg(long)]
    pub model_id: String,
    /// Safetensors file whose `ids` tensor holds the prefix's token ids.
    #[arg(long)]
    pub ids: PathBuf,
    /// Output safetensors file (`kv` and `ids` of the tokens found).
    #[arg(long)]
    pub out: PathBuf,
    /// Element type of the written `kv`.
    #[arg(long, default_value = "f16")]
    pub dtype: Dtype,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Model id the keys live under.
    #[arg(long)]
    pub model_id: String,
    /// Delete every chunk of the prefix whose token ids this safetensors file holds (`ids`).
    #[arg(long, conflicts_with = "key")]
    pub ids: Option<PathBuf>,
    /// Chunk keys to delete (64 hex chars each).
    #[arg(long)]
    pub key: Vec<String>,
}

/// Imports a KV file; returns the summary (the demo reuses this).
pub async fn import_file(a: &ImportArgs) -> anyhow::Result<(PutSummary, f64)> {
    let f = kv_file::read(&a.file)?;
    let s = f.kv.shape();
    let layout = Layout {
        model_id: a.model_id.clone(),
        layers: s.layers,
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        dtype: f.kv.dtype(),
        chunk_tokens: a.chunk_tokens,
        rope: None,
    };
    layout.validate()?;
    let client = a.server.connect().await?;
    let t = Instant::now();
    let summary = client
        .put_prefix(&layout, &f.kv.view(), &f.ids, a.profile, a.concurrency)
        .await
        .with_context(|| format!("storing {}", a.file.display()))?;
    Ok((summary, t.elapsed().as_secs_f64()))
}

pub async fn import(a: ImportArgs) -> anyhow::Result<()> {
    let (s, _) = import_file(&a).await?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "chunks={} new={} stored_bytes={} fp16_bytes={} unavailable={}",
            s.chunks, s.new, s.stored_bytes, s.fp16_bytes, s.unavailable
        );
    }
    Ok(())
}

/// What an export found.
pub struct ExportReport {
    pub tokens_found: usize,
    pub tokens_asked: usize,
    pub chunks: usize,
    pub wire_bytes: u64,
    pub seconds: f64,
}

/// Exports the cached prefix of the ids in `a.ids` (the demo reuses this).
pub async fn export_file(a: &ExportArgs) -> anyhow::Result<ExportReport> {
    let ids = kv_file::read_ids(&a.ids)?;
    if ids.is_empty() {
        bail!("{}: tensor `ids` is empty", a.ids.display());
    }
    let client = a.server.connect().await?;
    let layout = client
        .describe_model(&a.model_id)
        .await
        .with_context(|| format!("model id {:?}", a.model_id))?;
    let t = Instant::now();
    let got = client.get_prefix(&layout, &ids, a.dtype).await?;
    let seconds = t.elapsed().as_secs_f64();
    let Some(p) = got else {
        return Ok(ExportReport {
            tokens_found: 0,
            tokens_asked: ids.len(),
            chunks: 0,
            wire_bytes: 0,
            seconds,
        });
    };
    kv_file::write(&a.out, &p.kv, &ids[..p.tokens])?;
    Ok(ExportReport {
        tokens_found: p.tokens,
        tokens_asked: ids.len(),
        chunks: p.chunks,
        wire_bytes: p.wire_bytes,
        seconds,
    })
}

pub async fn export(a: ExportArgs) -> anyhow::Result<()> {
    let r = export_file(&a).await?;
    if r.tokens_found == 0 {
        println!(
            "found 0 of {} tokens: nothing cached, {} not written",
            r.tokens_asked,
            a.out.display()
        );
    } else {
        println!(
            "found {} of {} tokens ({} chunks, {} bytes fetched in {:.3} s) -> {}",
            r.tokens_found,
            r.tokens_asked,
            r.chunks,
            r.wire_bytes,
            r.seconds,
            a.out.display()
        );
    }
    Ok(())
}

fn parse_hex_key(s: &str) -> anyhow::Result<ChunkKey> {
    if s.len() != 64 {
        bail!("key {s:?} must be 64 hex characters");
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).with_context(|| format!("key {s:?} is not hex"))?;
    }
    Ok(ChunkKey(k))
}

pub async fn rm(a: RmArgs) -> anyhow::Result<()> {
    let client = a.server.connect().await?;
    let layout = client.describe_model(&a.model_id).await?;
    let keys: Vec<ChunkKey> = match &a.ids {
        Some(p) => {
            let ids = kv_file::read_ids(p)?;
            kvault_client::chain_keys(&layout.namespace_id(), &ids, layout.chunk_tokens as usize)
        }
        None => a
            .key
            .iter()
            .map(|k| parse_hex_key(k))
            .collect::<anyhow::Result<_>>()?,
    };
    if keys.is_empty() {
        bail!("nothing to delete: give --ids FILE or --key HEX");
    }
    let n = client.delete(&layout, &keys).await?;
    println!("deleted={n} requested={}", keys.len());
    Ok(())
}
