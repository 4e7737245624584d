//! The NVMe tier against real files, a real RocksDB and real server
//! processes: spill past RAM, kill -9 at several points, corrupted and
//! truncated segments, the byte budget with reclamation, and a full disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use kvault_client::local_server::LocalServer;
use kvault_client::{Client, ClientError, Layout, Tier, chain_keys};
use kvault_codec::{Dtype, KvTensor, Profile};
use kvault_tests::{ids, random_kv};

/// Small chunks (4 layers x 2 heads x 64 dims x 256 tokens, ~0.5 MiB) keep the tests quick.
fn layout() -> Layout {
    Layout {
        model_id: "nvme-test".into(),
        layers: 4,
        kv_heads: 2,
        head_dim: 64,
        dtype: Dtype::F16,
        chunk_tokens: 256,
        rope: None,
    }
}

struct Chunk {
    key: kvault_client::ChunkKey,
    kv: KvTensor,
    blob: Bytes,
}

fn chunks(n: u32, seed: u32) -> Vec<Chunk> {
    let l = layout();
    (0..n)
        .map(|i| {
            let kv = random_kv(&l, 256, (seed * 1000 + i) as u64);
            let key = chain_keys(&l.namespace_id(), &ids(256, seed * 1000 + i), 256)[0];
            let blob = Bytes::from(kvault_codec::encode(kv.view(), Profile::Lossless).unwrap());
            Chunk { key, kv, blob }
        })
        .collect()
}

fn start(dir: &Path, extra: &[&str]) -> LocalServer {
    LocalServer::start(dir, extra).expect("start kvault-server")
}

async fn client(s: &LocalServer) -> Client {
    Client::connect(s.url()).await.expect("connect")
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("nvme"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "kvs"))
        .collect();
    v.sort();
    v
}

async fn assert_served(c: &Client, set: &[Chunk]) {
    let keys: Vec<_> = set.iter().map(|c| c.key).collect();
    let got = c.get_many(&layout(), &keys, None).await.unwrap();
    for (i, (f, ch)) in got.iter().zip(set).enumerate() {
        let f = f.as_ref().unwrap_or_else(|| panic!("chunk {i} missing"));
        assert!(
            kvault_codec::decode(&f.blob).unwrap().data() == ch.kv.data(),
            "chunk {i} differs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_past_the_ram_budget_are_served_from_nvme() {
    // Both I/O engines keep the same contract.
    for engine in ["uring", "psync"] {
        spill_to_nvme(engine).await;
    }
}

async fn spill_to_nvme(engine: &str) {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--ram-bytes",
        "4MiB",
        "--nvme-bytes",
        "256MiB",
        "--io-engine",
        engine,
    ];
    let srv = start(dir.path(), &flags);
    let c = client(&srv).await;
    let set = chunks(30, 1);
    for ch in &set {
        assert!(c.put(&layout(), &ch.key, ch.blob.clone()).await.unwrap());
    }
    let st = c.stat().await.unwrap();
    let nvme = st
        .tiers
        .iter()
        .find(|t| t.tier == Tier::Nvme as i32)
        .expect("nvme tier in stat");
    assert_eq!(nvme.chunks, 30);
    assert!(st.tiers[0].bytes <= 4 << 20);
    let tiers = c
        .exists(&layout(), &set.iter().map(|c| c.key).collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(tiers.iter().all(|t| *t != Tier::None));
    assert!(
        tiers.contains(&Tier::Nvme),
        "everything claims RAM under a 4 MiB budget"
    );
    assert_served(&c, &set).await;
    assert!(
        c.stat()
            .await
            .unwrap()
            .tiers
            .iter()
            .any(|t| t.tier == Tier::Nvme as i32 && t.hits > 0)
    );
    // And after a clean restart, straight from disk.
    assert!(srv.stop().unwrap());
    let srv = start(dir.path(), &flags);
    assert_served(&client(&srv).await, &set).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_puts_loses_no_acknowledged_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--ram-bytes",
        "64MiB",
        "--nvme-bytes",
        "512MiB",
        "--segment-bytes",
        "8MiB",
    ];
    let set = chunks(60, 2);
    let mut acked: Vec<usize> = Vec::new();
    let mut next = 0usize;
    // Kill at several points, each time with puts in flight.
    for kill_after in [3usize, 11, 7, 15] {
        let srv = start(dir.path(), &flags);
        let c = client(&srv).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let start_at = next;
        let writer = {
            let c = c.clone();
            let blobs: Vec<_> = set[start_at..]
                .iter()
                .map(|ch| (ch.key, ch.blob.clone()))
                .collect();
            tokio::spawn(async move {
                use futures::StreamExt;
                // Four puts in flight at a time, acknowledgements reported as they come.
                let mut acks = futures::stream::iter(blobs.into_iter().enumerate())
                    .map(|(i, (k, b))| {
                        let c = c.clone();
                        async move { (i, c.put(&layout(), &k, b).await) }
                    })
                    .buffer_unordered(4);
                while let Some((i, r)) = acks.next().await {
                    if r.is_ok() && tx.send(start_at + i).is_err() {
                        break;
                    }
                }
            })
        };
        let mut n = 0;
        while n < kill_after {
            match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                Ok(Some(i)) => {
                    acked.push(i);
                    n += 1;
                }
                _ => break,
            }
        }
        srv.kill().unwrap();
        writer.abort();
        while let Ok(i) = rx.try_recv() {
            acked.push(i);
        }
        next = acked.iter().max().map_or(0, |m| m + 1);
    }
    let srv = start(dir.path(), &flags);
    let c = client(&srv).await;
    let keys: Vec<_> = set.iter().map(|ch| ch.key).collect();
    let got = c.get_many(&layout(), &keys, None).await.unwrap();
    for (i, (f, ch)) in got.iter().zip(&set).enumerate() {
        match f {
            // Present: always exactly what was put (acknowledged or not).
            Some(f) => assert!(
                kvault_codec::decode(&f.blob).unwrap().data() == ch.kv.data(),
                "chunk {i} served wrong"
            ),
            None => assert!(!acked.contains(&i), "acknowledged chunk {i} lost after kill -9"),
        }
    }
    assert!(acked.len() >= 20, "only {} puts acknowledged", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_and_truncated_segments_become_misses() {
    let dir = tempfile::tempdir().unwrap();
    // A RAM tier too small for any chunk: every read comes from disk.
    let flags = [
        "--ram-bytes",
        "256KiB",
        "--nvme-bytes",
        "256MiB",
        "--metrics",
        "127.0.0.1:0",
    ];
    let set = chunks(12, 3);
    {
        let srv = start(dir.path(), &flags);
        let c = client(&srv).await;
        for ch in &set {
            c.put(&layout(), &ch.key, ch.blob.clone()).await.unwrap();
        }
        assert!(srv.stop().unwrap());
    }
    let seg = segments(dir.path()).pop().expect("a segment file");
    let mut bytes = std::fs::read(&seg).unwrap();
    // Flip a payload byte of the first record (header is 64 bytes).
    bytes[64 + 1000] ^= 0xff;
    // Cut the last record in half.
    let cut = bytes.len() - set.last().unwrap().blob.len() / 2;
    bytes.truncate(cut);
    std::fs::write(&seg, &bytes).unwrap();

    let srv = start(dir.path(), &flags);
    let c = client(&srv).await;
    let keys: Vec<_> = set.iter().map(|ch| ch.key).collect();
    let got = c.get_many(&layout(), &keys, None).await.unwrap();
    assert!(got[0].is_none(), "a corrupted chunk was served");
    assert!(got[11].is_none(), "a truncated chunk was served");
    for i in 1..11 {
        let f = got[i].as_ref().unwrap_or_else(|| panic!("intact chunk {i} lost"));
        assert!(kvault_codec::decode(&f.blob).unwrap().data() == set[i].kv.data());
    }
    // Dropped for good, and counted; the server keeps serving.
    assert_eq!(c.exists(&layout(), &keys[..1]).await.unwrap(), vec![Tier::None]);
    let m = srv.metrics.unwrap();
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(m).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        b
    })
    .await
    .unwrap();
    // The truncated record is dropped at startup (its segment is shorter than the index says).
    assert!(body.contains("kvault_nvme_corrupt_total 2"), "{body}");
    assert!(c.health().await.unwrap());
    assert!(c.put(&layout(), &set[0].key, set[0].blob.clone()).await.unwrap());
    assert_served(&c, &set[..1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nvme_budget_holds_and_dead_space_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let cap: u64 = 8 << 20;
    let flags = [
        "--ram-bytes",
        "256KiB",
        "--nvme-bytes",
        "8MiB",
        "--segment-bytes",
        "1MiB",
        "--compact-interval-ms",
        "100",
    ];
    let srv = start(dir.path(), &flags);
    let c = client(&srv).await;
    let set = chunks(40, 4);
    for ch in &set {
        c.put(&layout(), &ch.key, ch.blob.clone()).await.unwrap();
        let st = c.stat().await.unwrap();
        assert!(
            st.tiers[1].bytes <= cap,
            "nvme tier over budget: {}",
            st.tiers[1].bytes
        );
        let on_disk: u64 = segments(dir.path())
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert!(on_disk <= cap, "segment files take {on_disk} bytes");
    }
    let st = c.stat().await.unwrap();
    assert!(st.tiers[1].evictions > 0);
    // Survivors are intact; the oldest went first.
    let keys: Vec<_> = set.iter().map(|ch| ch.key).collect();
    let tiers = c.exists(&layout(), &keys).await.unwrap();
    let alive: Vec<usize> = (0..40).filter(|i| tiers[*i] != Tier::None).collect();
    assert!(alive.contains(&39) && !alive.contains(&0), "alive: {alive:?}");
    let survivors: Vec<Chunk> = chunks(40, 4)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| alive.contains(i))
        .map(|(_, c)| c)
        .collect();
    assert_served(&c, &survivors).await;

    // Delete most survivors: their segments become mostly dead and are compacted.
    let (gone, kept): (Vec<_>, Vec<_>) = survivors.into_iter().enumerate().partition(|(i, _)| i % 4 != 0);
    let gone_keys: Vec<_> = gone.iter().map(|(_, c)| c.key).collect();
    assert_eq!(
        c.delete(&layout(), &gone_keys).await.unwrap() as usize,
        gone_keys.len()
    );
    let before = c.stat().await.unwrap().tiers[1].bytes;
    let mut after = before;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = &c.stat().await.unwrap().tiers[1];
        after = t.bytes;
        if t.bytes < before && t.live_bytes * 2 >= t.bytes {
            break;
        }
    }
    assert!(after < before, "no space reclaimed ({before} -> {after})");
    let kept: Vec<Chunk> = kept.into_iter().map(|(_, c)| c).collect();
    assert_served(&c, &kept).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_put_and_keeps_the_store_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    // A 3 MiB filesystem: room for a few chunks only (tmpfs also exercises the
    // buffered fallback, since it refuses O_DIRECT).
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt)
        .status();
    if !ok.is_ok_and(|s| s.success()) {
        eprintln!("SKIP: cannot mount a small tmpfs here (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let nvme_dir = mnt.join("nvme");
    let flags = [
        "--ram-bytes",
        "256KiB",
        "--nvme-bytes",
        "1GiB",
        "--segment-bytes",
        "64MiB",
        "--nvme-dir",
        nvme_dir.to_str().unwrap(),
    ];
    let srv = start(&dir.path().join("data"), &flags);
    let c = client(&srv).await;
    let set = chunks(12, 5);
    let mut stored = Vec::new();
    let mut failure = None;
    for (i, ch) in set.iter().enumerate() {
        match c.put(&layout(), &ch.key, ch.blob.clone()).await {
            Ok(_) => stored.push(i),
            Err(e) => {
                failure = Some((i, e));
                break;
            }
        }
    }
    let (i, e) = failure.expect("a 3 MiB disk cannot hold 12 chunks of 0.5 MiB");
    assert!(
        matches!(&e, ClientError::TooLarge(m) if m.contains("no space")),
        "{e}"
    );
    assert!(!stored.is_empty());
    // The failed chunk is absent everywhere; the stored ones are intact.
    assert_eq!(
        c.exists(&layout(), &[set[i].key]).await.unwrap(),
        vec![Tier::None]
    );
    let kept: Vec<Chunk> = chunks(12, 5)
        .into_iter()
        .enumerate()
        .filter(|(j, _)| stored.contains(j))
        .map(|(_, c)| c)
        .collect();
    assert_served(&c, &kept).await;
    assert!(c.health().await.unwrap());
    // After a restart the index agrees with the disk.
    assert!(srv.stop().unwrap());
    let srv = start(&dir.path().join("data"), &flags);
    assert_served(&client(&srv).await, &kept).await;
    drop(srv);
}
