//! `kvault-nvme-bench`: throughput of the NVMe tier beside `fio` on the same
//! directory, in one run. Writes go through the tier's whole put path
//! (record encoding, io_uring O_DIRECT write, fdatasync, synced RocksDB
//! batch); fio writes with `--direct=1 --fdatasync=1`, the same durability.
//! Reads go through the tier's get path (io_uring O_DIRECT read, header and
//! crc32c check); fio reads with `--direct=1`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use kvault_proto::{ChunkKey, NamespaceId};
use kvault_server::index::Index;
use kvault_server::index::rocks::RocksIndex;
use kvault_server::io::{EngineKind, open_engine};
use kvault_server::metrics::Metrics;
use kvault_server::tier::nvme::{NvmeConfig, NvmeCounters, NvmeTier};
use kvault_server::tier::{ChunkId, StoredChunk, Tenant, Tier, TierKind};
use rand::{Rng, RngCore};

#[derive(Parser)]
#[command(about = "NVMe tier throughput beside fio on the same directory")]
struct Args {
    /// Directory to test (its filesystem is what is measured).
    #[arg(long, default_value = "./nvme-bench")]
    dir: PathBuf,
    /// Chunk sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    sizes: Vec<u64>,
    /// Bytes written per size, in MiB.
    #[arg(long, default_value_t = 512)]
    total_mib: u64,
    /// Random reads per measurement.
    #[arg(long, default_value_t = 256)]
    reads: usize,
}

fn fio(dir: &Path, rw: &str, bs: u64, depth: u32, size_mib: u64, extra: &[&str]) -> anyhow::Result<f64> {
    let out = std::process::Command::new("fio")
        .args([
            "--name=kv",
            "--ioengine=io_uring",
            "--direct=1",
            "--output-format=json",
            "--group_reporting",
        ])
        .arg(format!("--directory={}", dir.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--size={size_mib}M"))
        .args(extra)
        .output()
        .context("running fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio json")?;
    let job = &v["jobs"][0];
    let side = if rw.contains("read") { "read" } else { "write" };
    let bw = job[side]["bw_bytes"].as_f64().context("fio bw_bytes")?;
    Ok(bw / 1e9)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.dir)?;
    let mut rows = Vec::new();
    for &mib in &a.sizes {
        let size = (mib << 20) as usize;
        let n = (a.total_mib / mib).max(8) as usize;
        let tier_dir = a.dir.join(format!("kvault-{mib}"));
        let _ = std::fs::remove_dir_all(&tier_dir);
        let metrics = Metrics::new();
        let index: Arc<dyn Index> = Arc::new(RocksIndex::open(&tier_dir.join("index"))?);
        let tier = NvmeTier::open(
            NvmeConfig {
                dir: tier_dir.clone(),
                capacity: 1 << 40,
                segment_bytes: 1 << 30,
                engine: EngineKind::Uring,
                queue_depth: 64,
                compact_interval: std::time::Duration::from_secs(3600),
            },
            index,
            open_engine(EngineKind::Uring, 64),
            metrics.tier_counters(TierKind::Nvme),
            NvmeCounters {
                corrupt: metrics.nvme_corrupt.clone(),
                compacted_bytes: metrics.nvme_compacted_bytes.clone(),
            },
        )?;
        let tier = Arc::new(tier);
        let mut body = vec![0u8; size];
        rand::rng().fill_bytes(&mut body);
        let body = Bytes::from(body);
        let ids: Vec<ChunkId> = (0..n)
            .map(|i| ChunkId {
                tenant: Tenant::new("bench"),
                key: ChunkKey(*blake3::hash(&(i as u64).to_le_bytes()).as_bytes()),
            })
            .collect();
        let ns = NamespaceId([0; 32]);
        // Writes, one put at a time: each waits for its own durability.
        let t = Instant::now();
        for id in &ids {
            tier.insert(
                id.clone(),
                StoredChunk {
                    ns,
                    blob: body.clone(),
                },
            )
            .await?;
        }
        let write_qd1 = (n * size) as f64 / t.elapsed().as_secs_f64() / 1e9;
        // Random reads at queue depth 1 and 32.
        let mut read = Vec::new();
        for depth in [1usize, 32] {
            let picks: Vec<ChunkId> = (0..a.reads)
                .map(|_| ids[rand::rng().random_range(0..n)].clone())
                .collect();
            let t = Instant::now();
            let got: Vec<usize> = futures::stream::iter(picks)
                .map(|id| {
                    let tier = tier.clone();
                    async move { tier.get(&id).await.map(|c| c.map_or(0, |c| c.blob.len())) }
                })
                .buffer_unordered(depth)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
            if got.iter().any(|l| *l != size) {
                bail!("a read came back short");
            }
            read.push((a.reads * size) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        drop(tier);
        let _ = std::fs::remove_dir_all(&tier_dir);
        let fio_dir = a.dir.join("fio");
        let _ = std::fs::remove_dir_all(&fio_dir);
        std::fs::create_dir_all(&fio_dir)?;
        let total = (n as u64) * mib;
        let fio_write = fio(&fio_dir, "write", mib << 20, 1, total, &["--fdatasync=1"])?;
        let fio_qd1 = fio(&fio_dir, "randread", mib << 20, 1, total, &[])?;
        let fio_qd32 = fio(&fio_dir, "randread", mib << 20, 32, total, &[])?;
        let _ = std::fs::remove_dir_all(&fio_dir);
        rows.push((mib, write_qd1, fio_write, read[0], fio_qd1, read[1], fio_qd32));
    }
    println!();
    println!(
        "NVMe tier vs fio (io_uring, O_DIRECT) on {} — GB/s = 1e9 bytes/s",
        a.dir.display()
    );
    println!(
        "{:>7} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6}",
        "chunk", "write", "fio", "ratio", "rd QD1", "fio", "ratio", "rd QD32", "fio", "ratio"
    );
    for (mib, w, fw, r1, f1, r32, f32_) in rows {
        println!(
            "{:>3} MiB | {:>9.3} {:>9.3} {:>6.2} | {:>9.3} {:>9.3} {:>6.2} | {:>9.3} {:>9.3} {:>6.2}",
            mib,
            w,
            fw,
            w / fw,
            r1,
            f1,
            r1 / f1,
            r32,
            f32_,
            r32 / f32_
        );
    }
    println!(
        "writes: one put at a time, acknowledged after fdatasync + synced index batch; fio: --fdatasync=1, iodepth 1"
    );
    Ok(())
}
