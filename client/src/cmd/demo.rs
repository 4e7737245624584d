//! `kvault demo`: the main job on embedded defaults. Starts a real
//! `kvault-server` process in a temporary directory, writes a KV cache file,
//! imports it, exports it back, checks it bit for bit, and reports figures.
//!
//! Until the model runner lands, the KV cache is synthetic (SmolLM2-135M's
//! shape, with per-channel offsets and smooth token-to-token drift like real
//! keys and values); the demo says so.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use kvault_client::kv_file;
use kvault_client::local_server::LocalServer;
use kvault_codec::{Dtype, KvShape, KvTensor, Profile};
use rand::{Rng, SeedableRng};

use super::ServerArgs;
use super::transfer::{ExportArgs, ImportArgs, export_file, import_file};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Tokens in the demo prefix (not a multiple of 256, so a partial chunk is stored too).
    #[arg(long, default_value_t = 1000)]
    pub tokens: u32,
    /// Keep the working directory (KV files, server data) here instead of a temporary one.
    #[arg(long)]
    pub keep: Option<PathBuf>,
}

/// SmolLM2-135M's KV shape with structure like a real cache: each channel
/// has its own offset and scale (a few are outliers), and each token drifts
/// smoothly from the previous one.
fn synthetic_kv(tokens: u32, seed: u64) -> anyhow::Result<KvTensor> {
    let shape = KvShape {
        layers: 30,
        tokens,
        kv_heads: 3,
        head_dim: 64,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(shape.byte_len(Dtype::F16)?);
    let width = (shape.kv_heads * shape.head_dim) as usize;
    for _layer in 0..shape.layers {
        for kv in 0..2 {
            let offsets: Vec<f32> = (0..width)
                .map(|c| {
                    if kv == 0 && c % 17 == 3 {
                        rng.random_range(-8.0..8.0)
                    } else {
                        rng.random_range(-0.5..0.5)
                    }
                })
                .collect();
            let scales: Vec<f32> = (0..width).map(|_| rng.random_range(0.2..1.5)).collect();
            let mut state = vec![0f32; width];
            for _t in 0..tokens {
                for c in 0..width {
                    state[c] = 0.8 * state[c] + 0.6 * (rng.random::<f32>() - 0.5);
                    let x = offsets[c] + scales[c] * state[c];
                    out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
                }
            }
        }
    }
    Ok(KvTensor::new(shape, Dtype::F16, out)?)
}

fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let work = a.keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    let data_dir = work.join("server-data");
    println!("== kvault demo (work dir {})", work.display());
    let server = LocalServer::start(&data_dir, &["--ram-bytes", "512MiB", "--metrics", "127.0.0.1:0"])
        .context("starting kvault-server")?;
    println!(
        "server      : kvault-server pid {:?} on {}",
        server.pid(),
        server.url()
    );

    let input = work.join("prefix.safetensors");
    let kv = synthetic_kv(a.tokens, 42)?;
    let ids: Vec<u32> = (0..a.tokens).map(|i| (i * 7919 + 13) % 49_152).collect();
    kv_file::write(&input, &kv, &ids)?;
    println!(
        "kv cache    : {} tokens x 30 layers x 3 KV heads x 64 dims, f16 (synthetic, SmolLM2-135M shape) -> {}",
        a.tokens,
        input.display()
    );

    let srv = ServerArgs {
        server: server.url(),
        tenant: None,
        token: None,
        timeout: 60,
    };
    let model_id = "HuggingFaceTB/SmolLM2-135M-Instruct".to_string();
    let import = ImportArgs {
        server: srv.clone(),
        model_id: model_id.clone(),
        file: input.clone(),
        profile: Profile::Lossless,
        chunk_tokens: 256,
        concurrency: 4,
        json: false,
    };
    let (s, put_secs) = import_file(&import).await?;
    println!(
        "import      : chunks={} new={} stored_bytes={} fp16_bytes={}",
        s.chunks, s.new, s.stored_bytes, s.fp16_bytes
    );
    let (again, _) = import_file(&import).await?;
    println!(
        "re-import   : chunks={} new={} (stored chunks are not sent again)",
        again.chunks, again.new
    );
    if again.new != 0 {
        bail!("re-import stored {} chunks again", again.new);
    }

    let out = work.join("exported.safetensors");
    let export = ExportArgs {
        server: srv.clone(),
        model_id: model_id.clone(),
        ids: input.clone(),
        out: out.clone(),
        dtype: Dtype::F16,
    };
    let r = export_file(&export).await?;
    let back = kv_file::read(&out)?;
    let exact = back.kv.data() == kv.data() && back.ids == ids;
    println!(
        "export      : found {} of {} tokens in {} chunks; bit-exact: {}",
        r.tokens_found,
        r.tokens_asked,
        r.chunks,
        if exact { "yes" } else { "NO" }
    );
    if !exact || r.tokens_found != a.tokens as usize {
        bail!("exported cache differs from the imported one");
    }

    // A longer prompt that starts with the cached prefix: the longest cached prefix is found.
    let longer = work.join("longer.safetensors");
    let mut ids2 = ids.clone();
    ids2.extend(0..300u32);
    let kv2 = synthetic_kv(ids2.len() as u32, 7)?;
    kv_file::write(&longer, &kv2, &ids2)?;
    let r2 = export_file(&ExportArgs {
        ids: longer,
        out: work.join("partial.safetensors"),
        ..export
    })
    .await?;
    let full_chunks = (a.tokens / 256) as usize;
    println!(
        "longer ask  : {} tokens asked, {} found ({} whole chunks; the partial last chunk is keyed by its own tokens)",
        r2.tokens_asked, r2.tokens_found, full_chunks
    );
    if r2.tokens_found != full_chunks * 256 {
        bail!(
            "longest-prefix lookup found {} tokens, expected {}",
            r2.tokens_found,
            full_chunks * 256
        );
    }

    let client = srv.connect().await?;
    let stat = client.stat().await?;
    let metrics = server.metrics.map(scrape).transpose()?.unwrap_or_default();
    let stopped = server.stop()?;

    println!();
    println!("figures");
    println!("  fp16 size            {:>12} bytes", s.fp16_bytes);
    println!(
        "  stored (lossless)    {:>12} bytes   ratio {:.3}x vs fp16",
        s.stored_bytes,
        s.fp16_bytes as f64 / s.stored_bytes as f64
    );
    println!(
        "  import (encode+put)  {:>12.1} MB/s of fp16",
        s.fp16_bytes as f64 / put_secs / 1e6
    );
    println!(
        "  export (get+decode)  {:>12.1} MB/s of fp16",
        s.fp16_bytes as f64 / r.seconds / 1e6
    );
    for t in &stat.tiers {
        let reads = t.hits + t.misses;
        println!(
            "  ram tier             {:>12} bytes in {} chunks, hits {} / {} reads",
            t.bytes, t.chunks, t.hits, reads
        );
    }
    let shown: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("kvault_tier_hits_total")
                || l.starts_with("kvault_put_bytes_total")
                || l.starts_with("kvault_requests_total{code=\"ok\",method=\"put\"}")
        })
        .collect();
    for l in shown {
        println!("  metric               {l}");
    }
    println!(
        "  server stop          {}",
        if stopped { "graceful (SIGTERM)" } else { "forced" }
    );
    if !stopped {
        bail!("kvault-server did not shut down gracefully");
    }
    println!("\nOK: stored, fetched back bit-exact, longest prefix found.");
    Ok(())
}
