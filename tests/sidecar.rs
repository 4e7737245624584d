//! End-to-end behaviour of `kvault-sidecar` in front of two real
//! `kvault-server` processes: reads upstream then local, bit-exact over the
//! socket and through shared memory; upstream killed and restarted; hostile
//! callers of the shared region.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvault_client::local_server::LocalServer;
use kvault_client::prefix::slice_tokens;
use kvault_client::{ChunkStore, Client, Layout, Placement, chain_keys};
use kvault_codec::{Dtype, KvTensor, Profile};
use kvault_proto::pb;
use kvault_proto::pb::sidecar_client::SidecarClient;
use kvault_tests::{TestServer, TestSidecar, ids, metric_sum, random_kv, scrape, smol_layout};
use tonic::Code;

type Shm = SidecarClient<tonic::transport::Channel>;

fn shm(c: &Client) -> Shm {
    SidecarClient::new(c.channel())
}

fn wire(keys: &[kvault_proto::ChunkKey]) -> Vec<Bytes> {
    keys.iter().map(|k| Bytes::copy_from_slice(&k.0)).collect()
}

/// The canonical bytes of chunk `i` (tokens i*ct..) of `kv`.
fn chunk_bytes(kv: &KvTensor, layout: &Layout, i: usize) -> Vec<u8> {
    let ct = layout.chunk_tokens;
    let t0 = i as u32 * ct;
    let t1 = (t0 + ct).min(kv.shape().tokens);
    slice_tokens(&kv.view(), t0, t1).unwrap().into_data()
}

fn read_region(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let f = std::fs::File::open(path).expect("open region");
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).expect("read region");
    buf
}

async fn get_into(s: &mut Shm, layout: &Layout, keys: &[kvault_proto::ChunkKey]) -> pb::GetIntoResponse {
    s.get_into(pb::GetIntoRequest {
        namespace: Some(layout.to_proto()),
        keys: wire(keys),
        lease_ms: 60_000,
        ..Default::default()
    })
    .await
    .expect("get_into")
    .into_inner()
}

/// Stores chunks straight at their owning upstream (as placement puts them),
/// bypassing any sidecar.
async fn put_placed(urls: &[String], layout: &Layout, kv: &KvTensor, ids: &[u32]) {
    let p = Placement::uniform(urls.iter().cloned()).unwrap();
    let keys = chain_keys(&layout.namespace_id(), ids, layout.chunk_tokens as usize);
    for (i, k) in keys.iter().enumerate() {
        let c = slice_tokens(
            &kv.view(),
            i as u32 * layout.chunk_tokens,
            ((i as u32 + 1) * layout.chunk_tokens).min(ids.len() as u32),
        )
        .unwrap();
        let blob = Bytes::from(kvault_codec::encode(c.view(), Profile::Lossless).unwrap());
        let owner = Client::connect(urls[p.owner(k)].clone()).await.unwrap();
        owner.put(layout, k, blob).await.unwrap();
    }
}

async fn local_hits(c: &Client) -> (u64, u64) {
    let s = c.stat().await.unwrap();
    (s.tiers[0].hits, s.tiers[0].misses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_upstream_then_hit_locally_bit_exact_on_both_paths() {
    let a = TestServer::start(&[]);
    let b = TestServer::start(&[]);
    let urls = vec![a.url(), b.url()];
    let layout = smol_layout("sidecar-e2e", Dtype::F16, 64);
    let (kv1, ids1) = (random_kv(&layout, 300, 1), ids(300, 1));
    let (kv2, ids2) = (random_kv(&layout, 256, 2), ids(256, 2));

    // Writes go through a first sidecar to the owning upstream.
    let mut writer = TestSidecar::start(&urls, &["--ram-bytes", "64MiB"]);
    let wc = writer.client().await;
    for (kv, ids) in [(&kv1, &ids1), (&kv2, &ids2)] {
        let put = wc
            .put_prefix(&layout, &kv.view(), ids, Profile::Lossless, 2)
            .await
            .unwrap();
        assert_eq!(put.new, put.chunks);
    }
    let placement = Placement::uniform(urls.clone()).unwrap();
    let direct = [a.client().await, b.client().await];
    let keys1 = chain_keys(&layout.namespace_id(), &ids1, 64);
    let keys2 = chain_keys(&layout.namespace_id(), &ids2, 64);
    // (Ports are random, so which upstream owns what varies by run; the
    // placement unit tests cover balance.)
    for k in keys1.iter().chain(&keys2) {
        let o = placement.owner(k);
        for (i, c) in direct.iter().enumerate() {
            let held = c.exists(&layout, &[*k]).await.unwrap()[0] != pb::Tier::None;
            assert_eq!(held, i == o, "key {k} must live on its owner {o} only");
        }
    }
    assert!(writer.stop());

    // A fresh sidecar: empty cache, region of 64 MiB.
    let sc = TestSidecar::start(&urls, &["--ram-bytes", "64MiB", "--shm-bytes", "64MiB"]);
    let c = sc.client().await;
    let mut s = shm(&c);
    let info = s
        .region_info(pb::RegionInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let region = Path::new(&info.path).to_path_buf();
    assert_eq!(info.region_bytes, 64 << 20);

    // Prefix 1: bytes path first (upstream), then shared memory (local).
    let got = c
        .get_prefix(&layout, &ids1, Dtype::F16)
        .await
        .unwrap()
        .expect("cached");
    assert_eq!(got.tokens, 300);
    assert!(got.kv.data() == kv1.data(), "bytes path, upstream read differs");
    let (hits, misses) = local_hits(&c).await;
    assert_eq!(hits, 0, "first read must go upstream");
    assert!(misses >= keys1.len() as u64);
    let r = get_into(&mut s, &layout, &keys1).await;
    assert_eq!(r.chunks.len(), keys1.len());
    for (i, p) in r.chunks.iter().enumerate() {
        assert!(p.found && p.local, "chunk {i} should be a local hit: {p:?}");
        assert_eq!(
            read_region(&region, p.offset, p.length),
            chunk_bytes(&kv1, &layout, i),
            "shm chunk {i}"
        );
    }
    assert!(local_hits(&c).await.0 >= keys1.len() as u64);

    // Prefix 2: shared memory first (upstream), then bytes (local).
    let r = get_into(&mut s, &layout, &keys2).await;
    for (i, p) in r.chunks.iter().enumerate() {
        assert!(p.found && !p.local, "chunk {i} should come from upstream: {p:?}");
        assert_eq!(p.tokens, 64);
        assert_eq!(
            read_region(&region, p.offset, p.length),
            chunk_bytes(&kv2, &layout, i),
            "shm chunk {i}"
        );
    }
    // The same request again is served from the decoded run in the region:
    // same offsets, a second read-only lease on it, bytes still exact.
    let again = get_into(&mut s, &layout, &keys2).await;
    let (l1, l2) = (r.lease.unwrap(), again.lease.unwrap());
    assert_ne!(l1.lease_id, l2.lease_id);
    assert_eq!(l1.offset, l2.offset);
    for (i, (p, q)) in r.chunks.iter().zip(&again.chunks).enumerate() {
        assert!(q.found && q.local);
        assert_eq!((p.offset, p.length), (q.offset, q.length));
        assert_eq!(
            read_region(&region, q.offset, q.length),
            chunk_bytes(&kv2, &layout, i)
        );
    }
    let before = local_hits(&c).await.0;
    let got = c
        .get_prefix(&layout, &ids2, Dtype::F16)
        .await
        .unwrap()
        .expect("cached");
    assert!(got.kv.data() == kv2.data(), "bytes path, local read differs");
    assert_eq!(local_hits(&c).await.0 - before, keys2.len() as u64);

    // Prefetch warms the cache ahead of use: afterwards every chunk is local.
    let (kv3, ids3) = (random_kv(&layout, 192, 3), ids(192, 3));
    put_placed(&urls, &layout, &kv3, &ids3).await;
    let keys3 = chain_keys(&layout.namespace_id(), &ids3, 64);
    let pf = s
        .prefetch(pb::PrefetchRequest {
            namespace: Some(layout.to_proto()),
            keys: wire(&keys3),
            background: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((pf.already_local, pf.fetched, pf.missing), (0, 3, 0));
    let pf = s
        .prefetch(pb::PrefetchRequest {
            namespace: Some(layout.to_proto()),
            keys: wire(&keys3),
            background: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pf.already_local, 3);
    let r = get_into(&mut s, &layout, &keys3).await;
    for (i, p) in r.chunks.iter().enumerate() {
        assert!(p.found && p.local, "prefetched chunk {i} should be local: {p:?}");
        assert_eq!(
            read_region(&region, p.offset, p.length),
            chunk_bytes(&kv3, &layout, i)
        );
    }

    // A layer range decoded to f32 lands as exactly those layers, converted.
    let r = s
        .get_into(pb::GetIntoRequest {
            namespace: Some(layout.to_proto()),
            keys: wire(&keys2[..1]),
            layers: Some(pb::LayerRange { start: 5, end: 9 }),
            out_dtype: pb::Dtype::F32 as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let p = &r.chunks[0];
    assert_eq!((p.layer_start, p.layer_count), (5, 4));
    let src = chunk_bytes(&kv2, &layout, 0);
    let per_layer = src.len() / 30;
    let mut want = vec![0u8; per_layer * 4 * 2];
    kvault_codec::convert(
        &src[5 * per_layer..9 * per_layer],
        Dtype::F16,
        &mut want,
        Dtype::F32,
    )
    .unwrap();
    assert_eq!(read_region(&region, p.offset, p.length), want);

    // Release gives the slots back; a released lease is unknown afterwards.
    let id = r.lease.unwrap().lease_id;
    s.release(pb::ReleaseRequest { lease_id: id }).await.unwrap();
    let e = s.release(pb::ReleaseRequest { lease_id: id }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_local_hits_served_misses_fast_then_recovery() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut ups: Vec<LocalServer> = dirs
        .iter()
        .map(|d| LocalServer::start(d.path(), &[]).unwrap())
        .collect();
    let addrs: Vec<String> = ups.iter().map(|u| u.addr.to_string()).collect();
    let urls: Vec<String> = ups.iter().map(|u| u.url()).collect();
    let sc = TestSidecar::start(
        &urls,
        &[
            "--ram-bytes",
            "64MiB",
            "--lookup-deadline-ms",
            "50",
            "--breaker-failures",
            "2",
            "--breaker-cool-down-ms",
            "300",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let metrics = sc.proc.as_ref().unwrap().metrics.expect("metrics address");
    // Both upstream connections were opened at start, before any Lookup
    // (whose deadline must not go on connection set-up).
    let text = scrape(metrics).await;
    let warmed: f64 = urls
        .iter()
        .map(|u| {
            let name =
                format!(r#"kvault_sidecar_upstream_calls_total{{node="{u}",op="health",outcome="ok"}}"#);
            metric_sum(&text, &name)
        })
        .sum();
    assert_eq!(warmed, 2.0, "{text}");
    let c = sc.client().await;
    let layout = smol_layout("sidecar-down", Dtype::F16, 64);
    let (kv1, ids1) = (random_kv(&layout, 256, 11), ids(256, 11));
    let (kv2, ids2) = (random_kv(&layout, 256, 12), ids(256, 12));
    let keys2 = chain_keys(&layout.namespace_id(), &ids2, 64);
    // Prefix 1 goes through the sidecar (so it is cached there); prefix 2
    // only upstream.
    c.put_prefix(&layout, &kv1.view(), &ids1, Profile::Lossless, 2)
        .await
        .unwrap();
    put_placed(&urls, &layout, &kv2, &ids2).await;
    assert_eq!(c.lookup(&layout, &keys2).await.unwrap().prefix_chunks, 4);

    for u in ups.drain(..) {
        u.kill().unwrap();
    }
    // Local hits are still served, bit-exact.
    let got = c
        .get_prefix(&layout, &ids1, Dtype::F16)
        .await
        .unwrap()
        .expect("local hit");
    assert!(got.kv.data() == kv1.data());
    // Misses answer within the deadline (generous bound: a loaded CI box),
    // and fail fast once the breakers open.
    for round in 0..4 {
        let t = Instant::now();
        let l = c.lookup(&layout, &keys2).await.unwrap();
        let took = t.elapsed();
        assert_eq!(l.prefix_chunks, 0, "round {round}");
        assert!(
            took < Duration::from_millis(1000),
            "lookup took {took:?} with upstream down"
        );
        let t = Instant::now();
        let g = c.get_many(&layout, &keys2, None).await.unwrap();
        assert!(g.iter().all(|f| f.is_none()), "a down upstream is a miss");
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "get took {:?}",
            t.elapsed()
        );
    }
    let text = scrape(metrics).await;
    let upstream_lines: String = text
        .lines()
        .filter(|l| l.contains("upstream"))
        .collect::<Vec<_>>()
        .join("\n");
    // Every upstream that owns one of the missed keys was tried and opened
    // (ports are random, so that is one or both).
    let p = Placement::uniform(urls.clone()).unwrap();
    let mut asked: Vec<usize> = keys2.iter().map(|k| p.owner(k)).collect();
    asked.sort_unstable();
    asked.dedup();
    let n = asked.len() as f64;
    assert!(
        metric_sum(&text, "kvault_sidecar_upstream_breaker_opened_total") >= n,
        "{upstream_lines}"
    );
    assert!(
        metric_sum(&text, "kvault_sidecar_upstream_breaker_state") >= n,
        "breakers of {n} upstreams open:\n{upstream_lines}"
    );
    assert!(metric_sum(&text, "kvault_sidecar_lookup_degraded_total") >= 1.0);
    assert!(metric_sum(&text, "kvault_sidecar_upstream_misses_total") >= 1.0);

    // Upstreams come back on the same addresses (RAM tier: empty again);
    // the sidecar recovers on its own.
    let ups: Vec<LocalServer> = dirs
        .iter()
        .zip(&addrs)
        .map(|(d, a)| LocalServer::start_at(d.path(), a, &[]).unwrap())
        .collect();
    put_placed(&urls, &layout, &kv2, &ids2).await;
    let t = Instant::now();
    loop {
        let l = c.lookup(&layout, &keys2).await.unwrap();
        if l.prefix_chunks == 4 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "sidecar did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = c
        .get_prefix(&layout, &ids2, Dtype::F16)
        .await
        .unwrap()
        .expect("after recovery");
    assert!(got.kv.data() == kv2.data());
    let text = scrape(metrics).await;
    assert_eq!(
        metric_sum(&text, "kvault_sidecar_upstream_breaker_state"),
        0.0,
        "{text}"
    );
    for u in ups {
        assert!(u.stop().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_callers_get_clear_errors_and_other_slots_survive() {
    let a = TestServer::start(&[]);
    let b = TestServer::start(&[]);
    let urls = vec![a.url(), b.url()];
    // 8 slots of 1 MiB; a 16-token SmolLM2 chunk is 360 KiB.
    let sc = TestSidecar::start(
        &urls,
        &[
            "--ram-bytes",
            "64MiB",
            "--shm-bytes",
            "8MiB",
            "--slot-bytes",
            "1MiB",
            "--lease-ms",
            "200",
        ],
    );
    let c = sc.client().await;
    let mut s = shm(&c);
    let layout = smol_layout("sidecar-hostile", Dtype::F16, 16);
    let n = 40;
    let (kv, ids) = (random_kv(&layout, 16 * n, 5), ids(16 * n, 5));
    c.put_prefix(&layout, &kv.view(), &ids, Profile::Lossless, 4)
        .await
        .unwrap();
    let keys = chain_keys(&layout.namespace_id(), &ids, 16);
    let info = s
        .region_info(pb::RegionInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let region = Path::new(&info.path).to_path_buf();
    assert_eq!(info.slots, 8);

    let req = |lease_id: u64, first_slot: u32, ks: &[kvault_proto::ChunkKey]| pb::GetIntoRequest {
        namespace: Some(layout.to_proto()),
        keys: wire(ks),
        lease_id,
        first_slot,
        ..Default::default()
    };
    // A good lease (the engine's own slot) holding chunk 0, long-lived.
    let good_lease = s
        .lease(pb::LeaseRequest {
            bytes: 1,
            lease_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(good_lease.slot_count, 1);
    let good = s
        .get_into(req(good_lease.lease_id, good_lease.first_slot, &keys[..1]))
        .await
        .unwrap()
        .into_inner();
    let good_chunk = good.chunks[0];
    let want = chunk_bytes(&kv, &layout, 0);
    assert_eq!(read_region(&region, good_chunk.offset, good_chunk.length), want);
    // A shared decoded run (GetInto without a lease) is read-only.
    let shared = get_into(&mut s, &layout, &keys[2..3]).await.lease.unwrap();
    let e = s
        .get_into(req(shared.lease_id, shared.first_slot, &keys[1..2]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("read-only"), "{e}");
    s.release(pb::ReleaseRequest {
        lease_id: shared.lease_id,
    })
    .await
    .unwrap();
    // Slot index out of range.
    let e = s
        .get_into(req(good_lease.lease_id, 9999, &keys[1..2]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    assert!(e.message().contains("outside the region's 8 slots"), "{e}");
    // A slot inside the region but not the caller's.
    let e = s
        .get_into(req(good_lease.lease_id, 5, &keys[1..2]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("not held by lease"), "{e}");
    // A lease too small for what is asked.
    let e = s
        .get_into(req(good_lease.lease_id, 0, &keys[1..5]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // More than the region holds, as a GetInto and as a lease.
    let e = s.get_into(req(0, 0, &keys)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("region holds"), "{e}");
    let e = s
        .lease(pb::LeaseRequest {
            bytes: 1 << 40,
            lease_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    // An expired lease (default 200 ms here), and one never granted.
    let short = s
        .lease(pb::LeaseRequest {
            bytes: 1 << 20,
            lease_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let e = s
        .get_into(req(short.lease_id, short.first_slot, &keys[1..2]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("expired"), "{e}");
    let e = s
        .renew(pb::RenewRequest {
            lease_id: short.lease_id,
            lease_ms: 1000,
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("expired"), "{e}");
    let e = s.release(pb::ReleaseRequest { lease_id: 42 }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("unknown"), "{e}");
    // A malformed key.
    let mut bad = req(0, 0, &keys[..1]);
    bad.keys = vec![Bytes::from_static(&[1; 31])];
    let e = s.get_into(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // The good lease is intact: its bytes unchanged, still renewable, and
    // its slots were never handed out (the expired lease's were, and came back).
    assert_eq!(read_region(&region, good_chunk.offset, good_chunk.length), want);
    let renewed = s
        .renew(pb::RenewRequest {
            lease_id: good_lease.lease_id,
            lease_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.first_slot, good_lease.first_slot);
    let info = s
        .region_info(pb::RegionInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    // Free: all but the good lease and the (unpinned, evictable) cached run.
    assert_eq!(
        info.free_slots,
        8 - good_lease.slot_count - shared.slot_count,
        "expired slots come back"
    );
    // The cached run gives way when space is needed: a lease of every other slot fits.
    let big = s
        .lease(pb::LeaseRequest {
            bytes: (8 - good_lease.slot_count as u64) << 20,
            lease_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    s.release(pb::ReleaseRequest {
        lease_id: big.lease_id,
    })
    .await
    .unwrap();
    // Writing more into the good lease (from its first slot) works and
    // leaves the bytes exactly right.
    let r = s
        .get_into(req(good_lease.lease_id, good_lease.first_slot, &keys[1..2]))
        .await
        .unwrap()
        .into_inner();
    let p = &r.chunks[0];
    assert_eq!(p.offset, good_lease.offset);
    assert_eq!(
        read_region(&region, p.offset, p.length),
        chunk_bytes(&kv, &layout, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_answers_within_its_deadline_when_an_upstream_hangs() {
    // An upstream that accepts connections and never answers (a hung
    // process, a black-holed network), beside a real one.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_url = format!("http://{}", hole.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hole.incoming().flatten() {
            held.push(c);
        }
    });
    let real = TestServer::start(&[]);
    let urls = vec![real.url(), hole_url];
    let sc = TestSidecar::start(
        &urls,
        &[
            "--ram-bytes",
            "64MiB",
            "--lookup-deadline-ms",
            "50",
            "--transfer-timeout-ms",
            "500",
            "--breaker-cool-down-ms",
            "60000",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let metrics = sc.proc.as_ref().unwrap().metrics.expect("metrics address");
    let c = sc.client().await;
    let layout = smol_layout("sidecar-hang", Dtype::F16, 64);
    // 32 keys: the chance that none belongs to the hung upstream is 2^-32.
    let keys = chain_keys(&layout.namespace_id(), &ids(64 * 32, 8), 64);
    let p = Placement::uniform(urls.clone()).unwrap();
    assert!(
        keys.iter().any(|k| p.owner(k) == 1),
        "some keys must belong to the hung upstream"
    );
    for round in 0..5 {
        let t = Instant::now();
        let l = c.lookup(&layout, &keys).await.unwrap();
        let took = t.elapsed();
        assert_eq!(l.prefix_chunks, 0);
        // 50 ms deadline; the bound leaves room for a loaded CI machine.
        assert!(
            took < Duration::from_millis(500),
            "round {round}: lookup took {took:?}"
        );
    }
    // The timeouts opened the hung upstream's breaker: a Get now misses at once.
    let t = Instant::now();
    let g = c.get_many(&layout, &keys, None).await.unwrap();
    assert!(g.iter().all(|f| f.is_none()));
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "get took {:?}",
        t.elapsed()
    );
    let text = scrape(metrics).await;
    assert!(metric_sum(&text, "kvault_sidecar_lookup_degraded_total") >= 5.0);
    assert!(
        text.contains("outcome=\"timeout\""),
        "timeouts are counted:\n{text}"
    );
    assert_eq!(
        metric_sum(&text, "kvault_sidecar_upstream_breaker_opened_total"),
        1.0
    );
}

/// `kvault sidecar ...` runs the sidecar binary (exec, same arguments);
/// `kvault stat --sidecar PATH` then talks to it over its socket.
#[test]
fn cli_runs_the_sidecar_and_talks_to_it_over_its_socket() {
    use std::io::{BufRead, BufReader};
    let srv = TestServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let mut child = std::process::Command::new(kvault_tests::bin("kvault"))
        .args([
            "sidecar",
            "--upstream",
            &srv.url(),
            "--ram-bytes",
            "32MiB",
            "--socket",
        ])
        .arg(&sock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kvault sidecar");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    assert!(first.starts_with("kvault-sidecar socket"), "{first}");
    let o = kvault_tests::kvault(&["stat", "--json", "--sidecar", sock.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("sidecar"), "{text}");
    child.kill().unwrap();
    child.wait().unwrap();
    // A missing socket is a clear, fast failure.
    let o = kvault_tests::kvault(&["stat", "--sidecar", dir.path().join("nope").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unavailable"));
}

/// Whether python3 can import what the example needs, installing it with
/// `scripts/py-deps.sh` (pip) when it cannot yet.
fn python_ready() -> Result<(), String> {
    let ok = || {
        std::process::Command::new("python3")
            .args(["-c", "import grpc, grpc_tools, numpy"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ok() {
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/py-deps.sh"))
        .output()
        .map_err(|e| format!("running scripts/py-deps.sh: {e}"))?;
    if ok() {
        Ok(())
    } else {
        Err(format!(
            "python3 lacks grpcio/grpcio-tools/numpy and pip could not install them: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The f16 payload of a `.npy` file written by numpy (little-endian, C order).
fn npy_payload(bytes: &[u8]) -> (&[u8], String) {
    assert_eq!(&bytes[..6], b"\x93NUMPY", "not a .npy file");
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = String::from_utf8_lossy(&bytes[start..start + hlen]).to_string();
    (&bytes[start + hlen..], header)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_reads_the_kv_the_rust_client_returns() {
    if let Err(why) = python_ready() {
        eprintln!("SKIPPED python_example_reads_the_kv_the_rust_client_returns: {why}");
        return;
    }
    let a = TestServer::start(&[]);
    let b = TestServer::start(&[]);
    let urls = vec![a.url(), b.url()];
    let sc = TestSidecar::start(&urls, &["--ram-bytes", "64MiB", "--shm-bytes", "32MiB"]);
    let c = sc.client().await;
    let layout = smol_layout("sidecar-python", Dtype::F16, 128);
    // Three whole chunks and a partial one stored; the lookup covers more
    // keys than are stored, so the prefix ends early.
    let (kv, ids) = (random_kv(&layout, 450, 21), ids(450, 21));
    put_placed(&urls, &layout, &kv, &ids).await;
    let mut longer = ids.clone();
    longer.extend(ids.iter().map(|t| t + 1));
    let keys = chain_keys(&layout.namespace_id(), &longer, 128);
    let hex: Vec<String> = keys.iter().map(|k| k.to_hex()).collect();

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = sc.dir.path().join("kv.npy");
    let run = std::process::Command::new("python3")
        .arg(root.join("examples/python/sidecar_numpy.py"))
        .args(["--socket", sc.proc.as_ref().unwrap().socket.to_str().unwrap()])
        .args(["--proto-dir", root.join("proto").to_str().unwrap()])
        .args([
            "--model-id",
            &layout.model_id,
            "--layers",
            "30",
            "--kv-heads",
            "3",
            "--head-dim",
            "64",
        ])
        .args([
            "--dtype",
            "f16",
            "--chunk-tokens",
            "128",
            "--keys",
            &hex.join(","),
        ])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .expect("run python3");
    assert!(
        run.status.success(),
        "python example failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary = String::from_utf8_lossy(&run.stdout);
    assert!(summary.contains("\"prefix_chunks\": 3"), "{summary}");
    assert!(summary.contains("\"tokens\": 384"), "{summary}");
    // What the Rust client gets for the same prefix through the same sidecar.
    let got = c
        .get_prefix(&layout, &longer, Dtype::F16)
        .await
        .unwrap()
        .expect("cached");
    assert_eq!(got.tokens, 384);
    let bytes = std::fs::read(&out).unwrap();
    let (payload, header) = npy_payload(&bytes);
    assert!(
        header.contains("'<f2'") && header.contains("(30, 2, 384, 3, 64)"),
        "{header}"
    );
    assert!(
        payload == got.kv.data(),
        "numpy KV differs from the Rust client's"
    );
    assert!(
        payload == slice_tokens(&kv.view(), 0, 384).unwrap().data(),
        "and from what was stored"
    );
}
