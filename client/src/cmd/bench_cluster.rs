//! `kvault bench cluster`: several servers as one store, on this machine.
//!
//! Three figures, one run: aggregate Get throughput with 1, 2 and 3 servers
//! (the same chunks, concurrent readers, placement over a static node list);
//! lookup latency of a 128-chunk prefix spread over 3 nodes beside the same
//! lookup on one server; and, with membership in a real etcd, the time from a
//! server's death to clients routing around it (its keys answered as misses
//! at once, and the node gone from placement once its lease expires), beside
//! a graceful stop (lease revoked).
//!
//! All servers, etcd and the clients share this machine's cores: the
//! throughput column shows what placement and parallel fan-out cost and
//! allow, not what separate machines would add.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use kvault_client::local_server::{LocalEtcd, LocalServer};
use kvault_client::{ChunkKey, ChunkStore, Client, Cluster, ClusterConfig, Layout, Membership, chain_keys};
use kvault_codec::{Dtype, KvShape, KvTensor, Profile};
use rand::RngCore;

#[derive(Debug, Args)]
pub struct BenchClusterArgs {
    /// Seconds of reading per throughput measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Concurrent readers in the throughput measurement.
    #[arg(long, default_value_t = 6)]
    pub readers: usize,
    /// Chunks stored for the throughput measurement (SmolLM2-135M-shaped, 256 tokens, 5.9 MB each).
    #[arg(long, default_value_t = 48)]
    pub chunks: usize,
    /// Chunks each Get asks for.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Lookups timed per configuration.
    #[arg(long, default_value_t = 300)]
    pub lookups: usize,
    /// Lease time to live of the servers in etcd, in seconds.
    #[arg(long, default_value_t = 2)]
    pub ttl_secs: u64,
}

fn smol(model_id: &str) -> Layout {
    Layout {
        model_id: model_id.into(),
        layers: 30,
        kv_heads: 3,
        head_dim: 64,
        dtype: Dtype::F16,
        chunk_tokens: 256,
        rope: None,
    }
}

/// One random f16 chunk of `layout` as a lossless container (random bits
/// barely compress, so the bytes moved are about the fp16 size).
fn random_chunk(layout: &Layout, seed: u64) -> anyhow::Result<Bytes> {
    let shape = KvShape {
        layers: layout.layers,
        tokens: layout.chunk_tokens,
        kv_heads: layout.kv_heads,
        head_dim: layout.head_dim,
    };
    let n = shape.elements() as usize;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let vals: Vec<u8> = (0..n)
        .flat_map(|_| {
            half::f16::from_f32((rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 4.0).to_le_bytes()
        })
        .collect();
    let kv = KvTensor::new(shape, Dtype::F16, vals)?;
    Ok(Bytes::from(kvault_codec::encode(kv.view(), Profile::Lossless)?))
}

fn key(layout: &Layout, i: usize) -> ChunkKey {
    ChunkKey::derive(&layout.namespace_id(), None, &[i as u32, 0x6b76])
}

async fn cluster(m: Membership) -> anyhow::Result<Cluster> {
    let mut cfg = ClusterConfig::new(m);
    cfg.nodes.breaker_cool_down = Duration::from_millis(500);
    cfg.sync_timeout = Duration::from_secs(10);
    Ok(Cluster::connect(cfg).await?)
}

/// Aggregate GB/s of `readers` tasks fetching random batches for `seconds`.
async fn read_throughput(
    c: &Cluster,
    layout: &Layout,
    keys: &[ChunkKey],
    a: &BenchClusterArgs,
) -> anyhow::Result<f64> {
    let bytes = Arc::new(AtomicU64::new(0));
    let run = |until: Instant, count: bool| {
        let tasks: Vec<_> = (0..a.readers)
            .map(|r| {
                let (c, layout, keys, bytes) = (c.clone(), layout.clone(), keys.to_vec(), bytes.clone());
                let batch = a.batch.max(1);
                tokio::spawn(async move {
                    let mut i = r * 7;
                    while Instant::now() < until {
                        let ks: Vec<ChunkKey> = (0..batch).map(|j| keys[(i + j * 13) % keys.len()]).collect();
                        i += batch + 1;
                        let got = ChunkStore::get_many(&c, &layout, &ks, None).await?;
                        let n: usize = got.iter().map(|f| f.as_ref().map_or(0, |f| f.blob.len())).sum();
                        if got.iter().any(Option::is_none) {
                            bail!("a stored chunk was missing");
                        }
                        if count {
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        tasks
    };
    // Warm-up: connections, HTTP/2 windows, allocator.
    for t in run(Instant::now() + Duration::from_secs_f64(a.seconds / 5.0), false) {
        t.await??;
    }
    let t0 = Instant::now();
    for t in run(t0 + Duration::from_secs_f64(a.seconds), true) {
        t.await??;
    }
    Ok(bytes.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64() / 1e9)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

async fn lookup_latency(
    s: &impl ChunkStore,
    layout: &Layout,
    keys: &[ChunkKey],
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    for _ in 0..10 {
        s.lookup(layout, keys).await?;
    }
    let mut t = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let s0 = Instant::now();
        let l = s.lookup(layout, keys).await?;
        t.push(s0.elapsed());
        if l.prefix_chunks != keys.len() {
            bail!("lookup found {} of {} chunks", l.prefix_chunks, keys.len());
        }
    }
    t.sort();
    Ok((pct(&t, 0.5), pct(&t, 0.99)))
}

pub async fn run(a: BenchClusterArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = LocalEtcd::start(&dir.path().join("etcd"))
        .context("starting etcd (install Debian's etcd-server: scripts/deps.sh etcd-server)")?;
    let ttl = a.ttl_secs.max(1).to_string();
    let flags = [
        "--ram-bytes",
        "2GiB",
        "--etcd",
        &etcd.url(),
        "--etcd-ttl-secs",
        &ttl,
        "--join-ramp-secs",
        "0",
    ];
    let mut servers = Vec::new();
    for i in 0..3 {
        servers.push(Some(
            LocalServer::start(&dir.path().join(format!("s{i}")), &flags)
                .context("starting kvault-server")?,
        ));
    }
    let urls: Vec<String> = servers.iter().flatten().map(LocalServer::url).collect();
    println!(
        "kvault bench cluster: 3 kvault-server processes, etcd and the clients on this machine's {} cores (shared)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // 1. Aggregate Get throughput.
    println!();
    println!(
        "Get throughput: {} chunks of SmolLM2-135M x 256 tokens ({:.1} MB each, lossless), {} readers, {} chunks per Get",
        a.chunks,
        random_chunk(&smol("x"), 0)?.len() as f64 / 1e6,
        a.readers,
        a.batch
    );
    println!("| servers | GB/s | vs 1 server | chunks per node |");
    println!("|---|---|---|---|");
    let mut base = None;
    for n in 1..=3 {
        let layout = smol(&format!("bench-cluster-{n}"));
        let c = cluster(Membership::Static(urls[..n].to_vec())).await?;
        let keys: Vec<ChunkKey> = (0..a.chunks).map(|i| key(&layout, i)).collect();
        for (i, k) in keys.iter().enumerate() {
            ChunkStore::put(&c, &layout, k, random_chunk(&layout, i as u64)?).await?;
        }
        let routes = c.routes();
        let per: Vec<usize> = urls[..n]
            .iter()
            .map(|u| {
                keys.iter()
                    .filter(|k| routes.owners(k, &layout.model_id)[0] == *u)
                    .count()
            })
            .collect();
        let g = read_throughput(&c, &layout, &keys, &a).await?;
        let b = *base.get_or_insert(g);
        println!("| {n} | {g:.2} | {:.2}x | {per:?} |", g / b);
    }

    // 2. Lookup of a 128-chunk prefix.
    println!();
    let small = Layout {
        model_id: "bench-cluster-lookup".into(),
        layers: 2,
        kv_heads: 1,
        head_dim: 64,
        dtype: Dtype::F16,
        chunk_tokens: 256,
        rope: None,
    };
    let tokens = 128 * 256;
    let ids: Vec<u32> = (0..tokens).map(|i| (i * 7919) % 49_152).collect();
    let shape = KvShape {
        layers: 2,
        tokens,
        kv_heads: 1,
        head_dim: 64,
    };
    let kv = KvTensor::zeros(shape, Dtype::F16)?;
    let keys = chain_keys(&small.namespace_id(), &ids, 256);
    let three = cluster(Membership::Etcd {
        endpoints: etcd.url(),
        prefix: "/kvault".into(),
    })
    .await?;
    if !three
        .wait_routes(Duration::from_secs(10), |r| r.members().len() == 3)
        .await
    {
        bail!("the three servers did not all register in etcd");
    }
    three
        .put_prefix(&small, &kv.view(), &ids, Profile::Lossless, 8)
        .await?;
    let one = Client::connect(urls[0].clone()).await?;
    one.put_prefix(&small, &kv.view(), &ids, Profile::Lossless, 8)
        .await?;
    let (c50, c99) = lookup_latency(&three, &small, &keys, a.lookups).await?;
    let (o50, o99) = lookup_latency(&one, &small, &keys, a.lookups).await?;
    println!(
        "Lookup of a 128-chunk (32k-token) prefix, {} lookups each:",
        a.lookups
    );
    println!("| store | p50 ms | p99 ms |");
    println!("|---|---|---|");
    println!("| 3 nodes (keys spread, one Exists per node in parallel, stitched) | {c50:.3} | {c99:.3} |");
    println!("| 1 server (its own Lookup) | {o50:.3} | {o99:.3} |");

    // 3. A node's death, seen by a client following etcd.
    println!();
    let layout = smol("bench-cluster-death");
    let probe_keys: Vec<ChunkKey> = (0..200).map(|i| key(&layout, i)).collect();
    let routes = three.routes();
    let victim = urls[2].clone();
    let victims: Vec<ChunkKey> = probe_keys
        .iter()
        .filter(|k| routes.owners(k, &layout.model_id)[0] == victim)
        .copied()
        .take(4)
        .collect();
    if victims.is_empty() {
        bail!("no probe key is owned by the third server");
    }
    let t0 = Instant::now();
    if let Some(s) = servers[2].take() {
        s.kill()?;
    }
    // Reads of its keys: how soon are they fast misses instead of failures or waits?
    let mut fast_miss = None;
    while t0.elapsed() < Duration::from_secs(30) {
        let s = Instant::now();
        let got = ChunkStore::get_many(&three, &layout, &victims, None).await?;
        if got.iter().all(Option::is_none) && s.elapsed() < Duration::from_millis(5) {
            fast_miss = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let gone = three
        .wait_routes(Duration::from_secs(30), |r| {
            !r.members().iter().any(|m| m.id == victim)
        })
        .await;
    let removed = t0.elapsed();
    // A graceful stop revokes the lease: the node leaves at once.
    let t1 = Instant::now();
    let leaver = urls[1].clone();
    if let Some(s) = servers[1].take() {
        s.stop()?;
    }
    let left = three
        .wait_routes(Duration::from_secs(30), |r| {
            !r.members().iter().any(|m| m.id == leaver)
        })
        .await;
    let graceful = t1.elapsed();
    println!(
        "Routing around a server (client following etcd, lease TTL {} s):",
        a.ttl_secs
    );
    println!("| event | after ms |");
    println!("|---|---|");
    match fast_miss {
        Some(d) => println!(
            "| kill -9: its keys answered as misses in under 5 ms (breaker open) | {:.0} |",
            d.as_secs_f64() * 1e3
        ),
        None => println!("| kill -9: its keys answered as misses in under 5 ms | not within 30 s |"),
    }
    if gone {
        println!(
            "| kill -9: node out of placement (lease expired) | {:.0} |",
            removed.as_secs_f64() * 1e3
        );
    } else {
        println!("| kill -9: node out of placement | not within 30 s |");
    }
    if left {
        println!(
            "| SIGTERM: node out of placement (lease revoked) | {:.0} |",
            graceful.as_secs_f64() * 1e3
        );
    } else {
        println!("| SIGTERM: node out of placement | not within 30 s |");
    }
    Ok(())
}
