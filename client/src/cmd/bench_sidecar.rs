//! `kvault bench sidecar`: fetching one chunk through a local sidecar (shared
//! memory and socket bytes) beside a direct gRPC Get from the upstream
//! server, in one run, for a 256-token SmolLM2-135M chunk and a 256-token
//! Llama-3-8B-shaped chunk.
//!
//! Every path is measured on a local hit of the sidecar (warmed first):
//! - `shm GetInto + Release`: the engine's usual call (no lease of its own):
//!   the first call decodes the chunk into the shared region, later ones pin
//!   that decoded run and answer offsets only; the engine reads in place and
//!   releases. `shm GetInto, own lease` decodes into the engine's own lease
//!   on every call (the cost of a first read, without the fetch).
//! - `socket Get`: the container bytes over the Unix socket; `+ decode`
//!   adds the client-side decode to fp16, which the engine needs anyway.
//! - `direct Get`: the container bytes from the server over loopback TCP
//!   (what an engine without a sidecar does); `+ decode` likewise.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use kvault_client::local_server::{LocalServer, LocalSidecar};
use kvault_client::{Client, Layout};
use kvault_codec::{Dtype, KvShape, KvTensor, Profile};
use kvault_proto::pb;
use kvault_proto::pb::sidecar_client::SidecarClient;
use rand::{Rng, SeedableRng};

#[derive(Debug, Args)]
pub struct BenchSidecarArgs {
    /// Seconds of calls per measurement.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Codec profile the chunks are stored with.
    #[arg(long, default_value = "lossless")]
    pub profile: String,
}

fn shapes() -> Vec<(&'static str, Layout)> {
    let l = |id: &str, layers, kv_heads, head_dim| Layout {
        model_id: id.into(),
        layers,
        kv_heads,
        head_dim,
        dtype: Dtype::F16,
        chunk_tokens: 256,
        rope: None,
    };
    vec![
        ("SmolLM2-135M", l("bench/smollm2-135m", 30, 3, 64)),
        ("Llama-3-8B", l("bench/llama-3-8b-shape", 32, 8, 128)),
    ]
}

/// KV of smooth random values (as real caches are: not white noise).
fn kv_for(layout: &Layout, seed: u64) -> anyhow::Result<KvTensor> {
    let shape = KvShape {
        layers: layout.layers,
        tokens: layout.chunk_tokens,
        kv_heads: layout.kv_heads,
        head_dim: layout.head_dim,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f: Vec<u8> = (0..shape.elements())
        .flat_map(|_| (rng.random::<f32>() * 4.0 - 2.0).to_le_bytes())
        .collect();
    let mut out = vec![0u8; shape.byte_len(Dtype::F16)?];
    kvault_codec::convert(&f, Dtype::F32, &mut out, Dtype::F16)?;
    Ok(KvTensor::new(shape, Dtype::F16, out)?)
}

/// Latencies of one path.
struct Row {
    path: &'static str,
    lat: Vec<Duration>,
}

impl Row {
    fn pct(&self, p: f64) -> Duration {
        let mut v = self.lat.clone();
        v.sort_unstable();
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

async fn measure<F, Fut>(seconds: f64, mut f: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    // Warm-up: first-use costs (allocator, page faults, HTTP/2 windows).
    let w = Instant::now();
    while w.elapsed().as_secs_f64() < seconds / 5.0 {
        f().await?;
    }
    let mut lat = Vec::new();
    let t = Instant::now();
    while lat.len() < 20 || t.elapsed().as_secs_f64() < seconds {
        let s = Instant::now();
        f().await?;
        lat.push(s.elapsed());
    }
    Ok(lat)
}

fn decode(blob: &[u8], out: &mut [u8]) -> anyhow::Result<()> {
    kvault_codec::decode_into(blob, Dtype::F16, out)?;
    Ok(())
}

pub async fn run(a: BenchSidecarArgs) -> anyhow::Result<()> {
    let profile: Profile = a.profile.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = tempfile::tempdir()?;
    let server = LocalServer::start(&dir.path().join("data"), &["--ram-bytes", "1GiB"])?;
    let sidecar = LocalSidecar::start(
        &[server.url()],
        &dir.path().join("sidecar.sock"),
        &[
            "--ram-bytes",
            "512MiB",
            "--shm-bytes",
            "256MiB",
            "--shm",
            dir.path().join("region").to_str().context("temp path")?,
        ],
    )?;
    let direct = Client::connect(server.url()).await?;
    let local = Client::connect(sidecar.url()).await?;
    let mut shm = SidecarClient::new(local.channel());
    let mut table = Vec::new();
    for (name, layout) in shapes() {
        let kv = kv_for(&layout, 7)?;
        let raw = kv.data().len();
        let blob = Bytes::from(kvault_codec::encode(kv.view(), profile)?);
        let ids: Vec<u32> = (0..layout.chunk_tokens).collect();
        let key = kvault_client::chain_keys(&layout.namespace_id(), &ids, 256)[0];
        direct.put(&layout, &key, blob.clone()).await?;
        // Warm the sidecar: the chunk becomes a local hit.
        local
            .get(&layout, &key)
            .await?
            .context("sidecar cannot fetch the chunk")?;
        let lease = shm
            .lease(pb::LeaseRequest {
                bytes: raw as u64,
                lease_ms: 600_000,
            })
            .await?
            .into_inner();
        let req = pb::GetIntoRequest {
            namespace: Some(layout.to_proto()),
            keys: vec![Bytes::copy_from_slice(&key.0)],
            lease_id: lease.lease_id,
            first_slot: lease.first_slot,
            ..Default::default()
        };
        // Check once that the region holds exactly the KV (lossless) before timing.
        let r = shm.get_into(req.clone()).await?.into_inner();
        let p = r.chunks.first().context("no placement")?;
        if !p.found || !p.local || p.length as usize != raw {
            bail!("GetInto answered {p:?}");
        }
        if profile.is_lossless() {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(sidecar.region.as_ref().context("no region")?)?;
            let mut back = vec![0u8; raw];
            f.read_exact_at(&mut back, p.offset)?;
            if back != kv.data() {
                bail!("{name}: region bytes differ from the stored KV");
            }
        }
        let out = std::cell::RefCell::new(vec![0u8; raw]);
        let mut rows = Vec::new();
        let lat = measure(a.seconds, || {
            let mut s = shm.clone();
            let req = req.clone();
            async move {
                s.get_into(req).await?;
                Ok(())
            }
        })
        .await?;
        rows.push(Row {
            path: "shm GetInto, own lease (decode)",
            lat,
        });
        // The engine's usual call: no lease of its own, so the decoded run
        // stays in the region and later calls pin it; released after use.
        let shared = pb::GetIntoRequest {
            lease_id: 0,
            first_slot: 0,
            ..req.clone()
        };
        let lat = measure(a.seconds, || {
            let mut s = shm.clone();
            let req = shared.clone();
            async move {
                let r = s.get_into(req).await?.into_inner();
                let p = r.chunks.first().context("no placement")?;
                if !p.found || p.length as usize != raw {
                    bail!("GetInto answered {p:?}");
                }
                let lease_id = r.lease.context("no lease")?.lease_id;
                s.release(pb::ReleaseRequest { lease_id }).await?;
                Ok(())
            }
        })
        .await?;
        rows.push(Row {
            path: "shm GetInto + Release",
            lat,
        });
        for (path, client) in [("sidecar socket Get", &local), ("direct upstream Get", &direct)] {
            let lat = measure(a.seconds, || async {
                client.get(&layout, &key).await?.context("chunk vanished")?;
                Ok(())
            })
            .await?;
            rows.push(Row { path, lat });
            let lat = measure(a.seconds, || async {
                let b = client.get(&layout, &key).await?.context("chunk vanished")?;
                // One output buffer for every call, as an engine's KV pool.
                decode(&b, &mut out.borrow_mut())
            })
            .await?;
            let path = if path.starts_with("sidecar") {
                "sidecar socket Get + decode"
            } else {
                "direct upstream Get + decode"
            };
            rows.push(Row { path, lat });
        }
        shm.release(pb::ReleaseRequest {
            lease_id: lease.lease_id,
        })
        .await?;
        table.push((name, raw, blob.len(), rows));
    }
    let stopped = sidecar.stop()? & server.stop()?;

    println!();
    println!(
        "One chunk (256 tokens, fp16 out), local sidecar hit vs direct upstream Get; profile {}; {} cores",
        profile.name(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!(
        "{:<14} {:<32} {:>9} {:>9} {:>9} {:>10} {:>12} {:>14}",
        "chunk", "path", "p50 ms", "p99 ms", "ops/s", "GB/s fp16", "vs Get p50", "vs Get+dec p50"
    );
    for (name, raw, enc, rows) in &table {
        let get = rows
            .iter()
            .find(|r| r.path == "direct upstream Get")
            .map(|r| r.pct(0.5));
        let getd = rows
            .iter()
            .find(|r| r.path == "direct upstream Get + decode")
            .map(|r| r.pct(0.5));
        for r in rows {
            let p50 = r.pct(0.5);
            let total: Duration = r.lat.iter().sum();
            let ops = r.lat.len() as f64 / total.as_secs_f64();
            let ratio = |d: Option<Duration>| {
                d.map_or("n/a".into(), |d| {
                    format!("{:.1}x", d.as_secs_f64() / p50.as_secs_f64())
                })
            };
            println!(
                "{:<14} {:<32} {:>9.3} {:>9.3} {:>9.0} {:>10.2} {:>12} {:>14}",
                format!("{name}"),
                r.path,
                p50.as_secs_f64() * 1e3,
                r.pct(0.99).as_secs_f64() * 1e3,
                ops,
                ops * *raw as f64 / 1e9,
                ratio(get),
                ratio(getd)
            );
        }
        println!("{:<14} ({} fp16 bytes, {} stored bytes)", "", raw, enc);
    }
    if !stopped {
        eprintln!("warning: a process did not stop cleanly");
    }
    Ok(())
}
