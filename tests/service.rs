//! End-to-end behaviour of a real `kvault-server` process through the client library.

use bytes::Bytes;
use kvault_client::{ChunkStore, Client, ClientError, Tier, chain_keys};
use kvault_codec::{Dtype, Profile};
use kvault_tests::{TestServer, ids, random_kv, smol_layout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossless_round_trip_is_bit_exact_for_every_dtype() {
    let srv = TestServer::start(&[]);
    let client = srv.client().await;
    for (i, dtype) in [Dtype::F16, Dtype::Bf16, Dtype::F32].into_iter().enumerate() {
        let layout = smol_layout(&format!("rt-{dtype}"), dtype, 256);
        // 700 tokens: two whole chunks and a partial one.
        let kv = random_kv(&layout, 700, i as u64);
        let ids = ids(700, i as u32);
        let put = client
            .put_prefix(&layout, &kv.view(), &ids, Profile::Lossless, 3)
            .await
            .unwrap();
        assert_eq!((put.chunks, put.new), (3, 3));
        let got = client
            .get_prefix(&layout, &ids, dtype)
            .await
            .unwrap()
            .expect("cached");
        assert_eq!(got.tokens, 700);
        assert_eq!(got.kv.shape(), kv.shape());
        assert!(got.kv.data() == kv.data(), "{dtype}: fetched KV differs");
    }
    assert!(srv.proc.unwrap().stop().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_range_get_returns_exactly_those_layers() {
    let srv = TestServer::start(&[]);
    let client = srv.client().await;
    let layout = smol_layout("layers", Dtype::F16, 256);
    let kv = random_kv(&layout, 256, 9);
    let ids = ids(256, 9);
    client
        .put_prefix(&layout, &kv.view(), &ids, Profile::Lossless, 1)
        .await
        .unwrap();
    let keys = chain_keys(&layout.namespace_id(), &ids, 256);
    let got = client.get_layers(&layout, &keys, 5..9).await.unwrap();
    let blob = got[0].clone().expect("stored");
    let part = kvault_codec::decode(&blob).unwrap();
    assert_eq!(part.shape().layers, 4);
    let per_layer = kv.data().len() / 30;
    assert!(part.data() == &kv.data()[5 * per_layer..9 * per_layer]);
    // A range outside the model is refused.
    let err = client.get_layers(&layout, &keys, 28..31).await.unwrap_err();
    assert!(matches!(err, ClientError::Model(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_answers_the_longest_stored_prefix() {
    let srv = TestServer::start(&[]);
    let client = srv.client().await;
    let layout = smol_layout("prefix", Dtype::F16, 128);
    let ids = ids(128 * 6, 3);
    let kv = random_kv(&layout, 128 * 6, 3);
    let keys = chain_keys(&layout.namespace_id(), &ids, 128);
    for k in [0usize, 1, 4] {
        let part = kvault_client::prefix::slice_tokens(&kv.view(), 0, (128 * k.max(1)) as u32).unwrap();
        if k > 0 {
            client
                .put_prefix(&layout, &part.view(), &ids[..128 * k], Profile::Lossless, 2)
                .await
                .unwrap();
        }
        let l = client.lookup(&layout, &keys).await.unwrap();
        assert_eq!(l.prefix_chunks, k, "after storing {k} chunks");
        assert!(l.tiers[..k].iter().all(|t| *t == Tier::Ram));
        assert!(l.tiers[k..].iter().all(|t| *t == Tier::None));
    }
    // A gap: the sixth chunk alone does not extend the prefix.
    let tail = kvault_client::prefix::slice_tokens(&kv.view(), 640, 768).unwrap();
    let blob = Bytes::from(kvault_codec::encode(tail.view(), Profile::Lossless).unwrap());
    assert!(client.put(&layout, &keys[5], blob).await.unwrap());
    let l = client.lookup(&layout, &keys).await.unwrap();
    assert_eq!(l.prefix_chunks, 4);
    assert_eq!(l.tiers[5], Tier::Ram);
    // The fetched prefix stops at the gap.
    let got = client
        .get_prefix(&layout, &ids, Dtype::F16)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.tokens, 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_budget_and_serves_survivors_intact() {
    let budget: u64 = 8 << 20;
    let srv = TestServer::start(&["--ram-bytes", "8MiB"]);
    let client = srv.client().await;
    let layout = smol_layout("evict", Dtype::F16, 64);
    // 40 chunks of ~1.4 MiB each (64 tokens x 30 layers x 2 x 3 x 64 x 2 bytes), 56 MiB in all.
    let mut stored = Vec::new();
    for i in 0..40u32 {
        let kv = random_kv(&layout, 64, 100 + i as u64);
        let ids = ids(64, 1000 + i);
        let key = chain_keys(&layout.namespace_id(), &ids, 64)[0];
        let blob = Bytes::from(kvault_codec::encode(kv.view(), Profile::Lossless).unwrap());
        assert!(client.put(&layout, &key, blob).await.unwrap());
        let st = client.stat().await.unwrap();
        assert!(
            st.tiers[0].bytes <= budget,
            "RAM tier over budget: {} > {budget}",
            st.tiers[0].bytes
        );
        stored.push((key, kv));
    }
    let st = client.stat().await.unwrap();
    assert!(st.tiers[0].evictions > 0, "nothing evicted");
    assert_eq!(st.tiers[0].chunks + st.tiers[0].evictions, 40);
    let keys: Vec<_> = stored.iter().map(|(k, _)| *k).collect();
    let present = client.exists(&layout, &keys).await.unwrap();
    let fetched = client.get_many(&layout, &keys, None).await.unwrap();
    let mut survivors = 0;
    for ((t, f), (_, kv)) in present.iter().zip(&fetched).zip(&stored) {
        match (t, f) {
            (Tier::Ram, Some(f)) => {
                survivors += 1;
                assert!(kvault_codec::decode(&f.blob).unwrap().data() == kv.data());
            }
            (Tier::None, None) => {}
            other => panic!("exists and get disagree: {other:?}"),
        }
    }
    assert_eq!(survivors as u64, st.tiers[0].chunks);
    // The budget is used, not just respected: at least half of it holds chunks.
    assert!(
        st.tiers[0].bytes >= budget / 2,
        "only {} bytes kept of an {budget} budget",
        st.tiers[0].bytes
    );
    assert!(survivors >= 3, "kept only {survivors} chunks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_of_one_key_leave_one_intact_copy() {
    let srv = TestServer::start(&[]);
    let client = srv.client().await;
    let layout = smol_layout("race", Dtype::F16, 256);
    let ids = ids(256, 77);
    let key = chain_keys(&layout.namespace_id(), &ids, 256)[0];
    // Two different valid bodies race for the same key.
    let a = random_kv(&layout, 256, 1);
    let b = random_kv(&layout, 256, 2);
    let blob_a = Bytes::from(kvault_codec::encode(a.view(), Profile::Lossless).unwrap());
    let blob_b = Bytes::from(kvault_codec::encode(b.view(), Profile::Lossless).unwrap());
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (c, l) = (client.clone(), layout.clone());
        let blob = if i % 2 == 0 {
            blob_a.clone()
        } else {
            blob_b.clone()
        };
        tasks.push(tokio::spawn(async move { c.put(&l, &key, blob).await }));
    }
    let mut stored = 0;
    for t in tasks {
        stored += t.await.unwrap().unwrap() as u32;
    }
    assert!(stored >= 1);
    let st = client.stat().await.unwrap();
    assert_eq!(st.tiers[0].chunks, 1);
    let got = client.get(&layout, &key).await.unwrap().unwrap();
    let data = kvault_codec::decode(&got).unwrap();
    assert!(
        data.data() == a.data() || data.data() == b.data(),
        "stored copy is neither body"
    );
    // Re-putting now is a no-op.
    assert!(!client.put(&layout, &key, blob_a.clone()).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_chunk_travels_in_pieces() {
    let srv = TestServer::start(&["--ram-bytes", "512MiB"]);
    let client = srv.client().await;
    let layout = kvault_client::Layout {
        model_id: "big".into(),
        layers: 32,
        kv_heads: 8,
        head_dim: 128,
        dtype: Dtype::F16,
        chunk_tokens: 512,
        rope: None,
    };
    let kv = random_kv(&layout, 256, 5); // 32 MiB of f16 ...
    let ids = ids(512, 5);
    let kv512 = {
        // ... doubled to 512 tokens: 64 MiB.
        let mut t = kvault_codec::KvTensor::zeros(
            kvault_codec::KvShape {
                tokens: 512,
                ..kv.shape()
            },
            Dtype::F16,
        )
        .unwrap();
        kvault_client::prefix::place_tokens(&mut t, &kv.view(), 0).unwrap();
        kvault_client::prefix::place_tokens(&mut t, &kv.view(), 256).unwrap();
        t
    };
    assert_eq!(kv512.data().len(), 64 << 20);
    let put = client
        .put_prefix(&layout, &kv512.view(), &ids, Profile::Lossless, 1)
        .await
        .unwrap();
    assert_eq!(put.new, 1);
    let got = client
        .get_prefix(&layout, &ids, Dtype::F16)
        .await
        .unwrap()
        .unwrap();
    assert!(got.kv.data() == kv512.data());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_keys() {
    let srv = TestServer::start(&[]);
    let layout = smol_layout("tenants", Dtype::F16, 256);
    let connect = |t: &str| {
        let mut cfg = kvault_client::ClientConfig::new(srv.url());
        cfg.tenant = Some(t.to_string());
        Client::connect_with(cfg)
    };
    let alice = connect("alice").await.unwrap();
    let bob = connect("bob").await.unwrap();
    let kv = random_kv(&layout, 256, 4);
    let ids = ids(256, 4);
    alice
        .put_prefix(&layout, &kv.view(), &ids, Profile::Lossless, 1)
        .await
        .unwrap();
    let keys = chain_keys(&layout.namespace_id(), &ids, 256);
    assert_eq!(alice.lookup(&layout, &keys).await.unwrap().prefix_chunks, 1);
    assert_eq!(bob.lookup(&layout, &keys).await.unwrap().prefix_chunks, 0);
    assert!(bob.get(&layout, &keys[0]).await.unwrap().is_none());
    assert_eq!(bob.delete(&layout, &keys).await.unwrap(), 0);
    assert_eq!(alice.lookup(&layout, &keys).await.unwrap().prefix_chunks, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_layout_binding_survives_restart() {
    let mut srv = TestServer::start(&[]);
    let layout = smol_layout("persisted", Dtype::F16, 256);
    let kv = random_kv(&layout, 100, 8);
    srv.client()
        .await
        .put_prefix(&layout, &kv.view(), &ids(100, 8), Profile::Lossless, 1)
        .await
        .unwrap();
    srv.restart(&[]);
    let client = srv.client().await;
    assert_eq!(client.describe_model("persisted").await.unwrap(), layout);
    // Same model id, other layout: refused with a clear error, nothing stored.
    let other = smol_layout("persisted", Dtype::Bf16, 256);
    let kv2 = random_kv(&other, 100, 8);
    let err = client
        .put_prefix(&other, &kv2.view(), &ids(100, 9), Profile::Lossless, 1)
        .await
        .unwrap_err();
    match err {
        ClientError::LayoutMismatch(m) => assert!(m.contains("dtype=f16") && m.contains("dtype=bf16"), "{m}"),
        e => panic!("expected a layout mismatch, got {e}"),
    }
    assert_eq!(client.stat().await.unwrap().tiers[0].chunks, 0);
    assert!(matches!(
        client.describe_model("never-seen").await,
        Err(ClientError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_graceful_shutdown() {
    let mut srv = TestServer::start(&["--metrics", "127.0.0.1:0"]);
    let client = srv.client().await;
    assert!(client.health().await.unwrap());
    let layout = smol_layout("metrics", Dtype::F16, 256);
    let kv = random_kv(&layout, 256, 1);
    let ids = ids(256, 1);
    client
        .put_prefix(&layout, &kv.view(), &ids, Profile::Lossless, 1)
        .await
        .unwrap();
    client
        .get_prefix(&layout, &ids, Dtype::F16)
        .await
        .unwrap()
        .unwrap();
    let keys = chain_keys(&layout.namespace_id(), &kvault_tests::ids(256, 2), 256);
    assert!(client.get(&layout, &keys[0]).await.unwrap().is_none());
    let addr = srv.proc.as_ref().unwrap().metrics.expect("metrics address");
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        b
    })
    .await
    .unwrap();
    for want in [
        "kvault_tier_hits_total{tier=\"ram\"} 1",
        "kvault_tier_misses_total{tier=\"ram\"} 1",
        "kvault_tier_chunks{tier=\"ram\"} 1",
        "kvault_request_duration_seconds_bucket{method=\"put\"",
        "kvault_requests_total{code=\"ok\",method=\"get\"} 2",
    ] {
        assert!(body.contains(want), "metrics lack {want:?}:\n{body}");
    }
    assert!(srv.stop(), "SIGTERM should stop the server cleanly");
}
