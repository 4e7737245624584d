//! `kvault bench get`: Get throughput of the RAM tier over loopback, beside
//! the two baselines that matter: a plain TCP copy of the same bytes (the
//! transport ceiling) and Redis serving the same values.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use kvault_client::local_server::LocalServer;
use kvault_client::{Client, Layout};
use kvault_codec::{Dtype, KvShape, KvTensor, Profile};
use rand::RngCore;

#[derive(Debug, Args)]
pub struct BenchGetArgs {
    /// Chunk sizes to measure, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "4,16,64")]
    pub sizes: Vec<u64>,
    /// Seconds of transfer per measurement.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Skip the Redis column (e.g. when `redis-server` is not installed).
    #[arg(long)]
    pub no_redis: bool,
}

/// Llama-3-8B-shaped chunk layout: 32 layers x 2 x 8 heads x 128 dims x 2 bytes = 128 KiB per token.
fn layout() -> Layout {
    Layout {
        model_id: "bench/llama-3-8b-shape".into(),
        layers: 32,
        kv_heads: 8,
        head_dim: 128,
        dtype: Dtype::F16,
        chunk_tokens: 512,
        rope: None,
    }
}

/// Runs `f` repeatedly for about `seconds` (at least 3 times), after a
/// warm-up of a fifth of that (first-use costs: allocator, page faults,
/// HTTP/2 window growth); returns GB/s.
fn measure(seconds: f64, bytes: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let w = Instant::now();
    while w.elapsed().as_secs_f64() < seconds / 5.0 {
        f()?;
    }
    let t = Instant::now();
    let mut n = 0u64;
    while n < 3 || t.elapsed().as_secs_f64() < seconds {
        f()?;
        n += 1;
    }
    Ok(n as f64 * bytes as f64 / t.elapsed().as_secs_f64() / 1e9)
}

async fn measure_async<F, Fut>(seconds: f64, bytes: usize, mut f: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let w = Instant::now();
    while w.elapsed().as_secs_f64() < seconds / 5.0 {
        f().await?;
    }
    let t = Instant::now();
    let mut n = 0u64;
    while n < 3 || t.elapsed().as_secs_f64() < seconds {
        f().await?;
        n += 1;
    }
    Ok(n as f64 * bytes as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// Plain TCP over loopback: a thread answers each 1-byte request with the whole payload.
fn tcp_ceiling(payload: Vec<u8>, seconds: f64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let len = payload.len();
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut req = [0u8; 1];
        while s.read_exact(&mut req).is_ok() {
            s.write_all(&payload)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut buf = vec![0u8; len];
    let gbps = measure(seconds, len, || {
        c.write_all(&[1])?;
        c.read_exact(&mut buf)?;
        Ok(())
    })?;
    drop(c);
    let _ = server.join();
    Ok(gbps)
}

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(dir: &Path) -> anyhow::Result<(Redis, u16)> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--proto-max-bulk-len", "1gb", "--protected-mode", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context(
            "starting redis-server (install it with `apt-get install redis-server`, or pass --no-redis)",
        )?;
    let r = Redis(child);
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((r, port));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("redis-server did not start listening on port {port}")
}

pub async fn run(a: BenchGetArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let max = a.sizes.iter().copied().max().unwrap_or(64);
    let ram = format!("{}MiB", (max * 4).max(256) + 64);
    let chunk_max = format!("{}MiB", max + 16);
    let server = LocalServer::start(
        dir.path(),
        &["--ram-bytes", &ram, "--max-chunk-bytes", &chunk_max],
    )?;
    let client = Client::connect(server.url()).await?;
    let redis = if a.no_redis {
        None
    } else {
        Some(start_redis(dir.path())?)
    };
    let mut redis_conn = match &redis {
        Some((_, port)) => {
            let c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
            Some(c.get_multiplexed_async_connection().await?)
        }
        None => None,
    };
    let layout = layout();
    let mut rows = Vec::new();
    for &mib in &a.sizes {
        let tokens = (mib * 8) as u32;
        if tokens == 0 || tokens > layout.chunk_tokens {
            bail!("size {mib} MiB: sizes must be 1..=64 MiB");
        }
        let shape = KvShape {
            layers: layout.layers,
            tokens,
            kv_heads: layout.kv_heads,
            head_dim: layout.head_dim,
        };
        let mut data = vec![0u8; shape.byte_len(Dtype::F16)?];
        rand::rng().fill_bytes(&mut data);
        let kv = KvTensor::new(shape, Dtype::F16, data)?;
        let blob = bytes::Bytes::from(kvault_codec::encode(kv.view(), Profile::Lossless)?);
        let ids: Vec<u32> = (0..tokens).map(|i| i + 1_000_000 * mib as u32).collect();
        let key = kvault_client::chain_keys(&layout.namespace_id(), &ids, layout.chunk_tokens as usize)[0];
        client.put(&layout, &key, blob.clone()).await?;
        let len = blob.len();

        let kv_gbps = measure_async(a.seconds, len, || async {
            let got = client.get(&layout, &key).await?.context("chunk vanished")?;
            if got.len() != len {
                bail!("got {} bytes, stored {len}", got.len());
            }
            Ok(())
        })
        .await?;
        let payload = blob.to_vec();
        let secs = a.seconds;
        let tcp_gbps = tokio::task::spawn_blocking(move || tcp_ceiling(payload, secs)).await??;
        let redis_gbps = match redis_conn.as_mut() {
            Some(conn) => {
                let rkey = format!("chunk-{mib}");
                redis::cmd("SET")
                    .arg(&rkey)
                    .arg(blob.as_ref())
                    .query_async::<()>(conn)
                    .await?;
                let g = measure_async(a.seconds, len, || {
                    let mut c = conn.clone();
                    let rkey = rkey.clone();
                    async move {
                        let v: Vec<u8> = redis::cmd("GET").arg(&rkey).query_async(&mut c).await?;
                        if v.len() != len {
                            bail!("redis returned {} bytes", v.len());
                        }
                        Ok(())
                    }
                })
                .await?;
                Some(g)
            }
            None => None,
        };
        rows.push((mib, kv_gbps, tcp_gbps, redis_gbps));
    }
    let stopped = server.stop()?;
    drop(redis);

    println!();
    println!(
        "Get throughput, one stream, loopback, RAM tier (GB/s = 1e9 bytes/s); this machine: {} cores",
        num_cpus()
    );
    println!(
        "{:>9} {:>12} {:>12} {:>12} {:>11} {:>13}",
        "chunk", "kvault", "tcp copy", "redis", "kvault/tcp", "kvault/redis"
    );
    for (mib, kv, tcp, redis) in rows {
        let (r, ratio) = match redis {
            Some(r) => (format!("{r:.2}"), format!("{:.2}", kv / r)),
            None => ("n/a".into(), "n/a".into()),
        };
        println!(
            "{:>6} MiB {:>12.2} {:>12.2} {:>12} {:>11.2} {:>13}",
            mib,
            kv,
            tcp,
            r,
            kv / tcp,
            ratio
        );
    }
    if !stopped {
        eprintln!("warning: kvault-server did not stop cleanly");
    }
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
