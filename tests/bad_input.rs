//! Bad input gets a clear error and changes nothing, against a real server.

use bytes::Bytes;
use kvault_client::{ChunkStore, Client, ClientConfig, ClientError, RetryPolicy, Tier, chain_keys};
use kvault_codec::{Dtype, Profile};
use kvault_proto::pb::kv_vault_client::KvVaultClient;
use kvault_proto::pb::{self, put_request};
use kvault_tests::{TestServer, ids, random_kv, smol_layout};
use tonic::Code;

fn body(layout: &kvault_client::Layout, tokens: u32, seed: u64) -> Bytes {
    Bytes::from(kvault_codec::encode(random_kv(layout, tokens, seed).view(), Profile::Lossless).unwrap())
}

async fn raw(url: &str) -> KvVaultClient<tonic::transport::Channel> {
    KvVaultClient::connect(url.to_string())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Sends a hand-made Put stream.
async fn raw_put(url: &str, msgs: Vec<pb::PutRequest>) -> Result<pb::PutResponse, tonic::Status> {
    raw(url)
        .await
        .put(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

fn header(layout: &kvault_client::Layout, key: &[u8], total: u64) -> pb::PutRequest {
    pb::PutRequest {
        msg: Some(put_request::Msg::Header(pb::PutHeader {
            namespace: Some(layout.to_proto()),
            key: Bytes::copy_from_slice(key),
            total_len: total,
        })),
    }
}

fn piece(b: Bytes) -> pb::PutRequest {
    pb::PutRequest {
        msg: Some(put_request::Msg::Piece(b)),
    }
}

/// A body as 1 MiB pieces, like a well-behaved client sends it.
fn pieces(b: Bytes) -> Vec<pb::PutRequest> {
    (0..b.len())
        .step_by(1 << 20)
        .map(|o| piece(b.slice(o..(o + (1 << 20)).min(b.len()))))
        .collect()
}

async fn chunks_stored(c: &Client) -> u64 {
    c.stat().await.unwrap().tiers[0].chunks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_of_the_wrong_shape_is_refused() {
    let srv = TestServer::start(&[]);
    let client = srv.client().await;
    let layout = smol_layout("shape", Dtype::F16, 256);
    let key = chain_keys(&layout.namespace_id(), &ids(10, 1), 256)[0];
    for (what, wrong) in [
        (
            "kv_heads",
            kvault_client::Layout {
                kv_heads: 4,
                ..layout.clone()
            },
        ),
        (
            "head_dim",
            kvault_client::Layout {
                head_dim: 32,
                ..layout.clone()
            },
        ),
        (
            "layers",
            kvault_client::Layout {
                layers: 29,
                ..layout.clone()
            },
        ),
        (
            "dtype",
            kvault_client::Layout {
                dtype: Dtype::Bf16,
                ..layout.clone()
            },
        ),
    ] {
        let err = client.put(&layout, &key, body(&wrong, 10, 1)).await.unwrap_err();
        match err {
            ClientError::InvalidArgument(m) => assert!(m.contains(what), "{what}: {m}"),
            e => panic!("{what}: expected invalid argument, got {e}"),
        }
    }
    // More tokens than the namespace's chunk size.
    let small = smol_layout("shape-small", Dtype::F16, 8);
    let err = client.put(&small, &key, body(&small, 9, 1)).await.unwrap_err();
    assert!(err.to_string().contains("tokens"), "{err}");
    assert_eq!(client.exists(&layout, &[key]).await.unwrap(), vec![Tier::None]);
    assert_eq!(chunks_stored(&client).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_and_truncated_bodies_are_refused() {
    let srv = TestServer::start(&[]);
    let client = srv.client().await;
    let layout = smol_layout("corrupt", Dtype::F16, 256);
    let key = chain_keys(&layout.namespace_id(), &ids(256, 2), 256)[0];
    let good = body(&layout, 256, 2);

    // One flipped byte in the payload: the container checksum catches it.
    let mut bad = good.to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    let err = client.put(&layout, &key, Bytes::from(bad)).await.unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");

    // A body shorter than its header says.
    let short = good.slice(..good.len() - 100);
    let mut msgs = vec![header(&layout, &key.0, good.len() as u64)];
    msgs.extend(pieces(short));
    let st = raw_put(&srv.url(), msgs).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("ended after"), "{}", st.message());

    // A body longer than its header says.
    let st = raw_put(
        &srv.url(),
        vec![header(&layout, &key.0, 10), piece(good.slice(..20))],
    )
    .await
    .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{}", st.message());

    // A truncated container, announced with its true (short) length.
    let cut = good.slice(..good.len() / 3);
    let err = client.put(&layout, &key, cut).await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err}");

    // No header, two headers, a bad key.
    let st = raw_put(&srv.url(), vec![piece(good.slice(..10))])
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    let st = raw_put(
        &srv.url(),
        vec![header(&layout, &key.0, 20), header(&layout, &key.0, 20)],
    )
    .await
    .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    let st = raw_put(
        &srv.url(),
        vec![header(&layout, &[1; 31], 20), piece(good.slice(..20))],
    )
    .await
    .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("32 bytes"), "{}", st.message());

    assert_eq!(chunks_stored(&client).await, 0, "a refused put stored something");
    // The good body still goes in afterwards.
    assert!(client.put(&layout, &key, good).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_messages_and_chunks_are_refused() {
    let srv = TestServer::start(&["--max-chunk-bytes", "8MiB"]);
    let client = srv.client().await;
    let layout = smol_layout("oversize", Dtype::F16, 256);
    let key = chain_keys(&layout.namespace_id(), &ids(256, 3), 256)[0];
    // A single 6 MiB message: over the server's message limit.
    let big = Bytes::from(vec![0u8; 6 << 20]);
    let st = raw_put(
        &srv.url(),
        vec![header(&layout, &key.0, big.len() as u64), piece(big)],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(st.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{st:?}"
    );
    // A declared chunk size over --max-chunk-bytes.
    let st = raw_put(&srv.url(), vec![header(&layout, &key.0, 9 << 20)])
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted);
    assert!(st.message().contains("outside"), "{}", st.message());
    assert_eq!(chunks_stored(&client).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_are_misses_not_errors() {
    let srv = TestServer::start(&[]);
    let client = srv.client().await;
    let layout = smol_layout("unknown", Dtype::F16, 256);
    let keys = chain_keys(&layout.namespace_id(), &ids(600, 4), 256);
    assert!(client.get(&layout, &keys[0]).await.unwrap().is_none());
    assert!(
        client
            .get_many(&layout, &keys, None)
            .await
            .unwrap()
            .iter()
            .all(Option::is_none)
    );
    assert_eq!(client.lookup(&layout, &keys).await.unwrap().prefix_chunks, 0);
    assert_eq!(client.delete(&layout, &keys).await.unwrap(), 0);
    assert!(
        client
            .get_prefix(&layout, &ids(600, 4), Dtype::F16)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_arguments() {
    let srv = TestServer::start(&[]);
    let mut rpc = raw(&srv.url()).await;
    let layout = smol_layout("malformed", Dtype::F16, 256);
    // No namespace.
    let st = rpc
        .lookup(pb::LookupRequest {
            namespace: None,
            keys: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("namespace"));
    // Zero layers.
    let mut ns = layout.to_proto();
    ns.layers = 0;
    let st = rpc
        .lookup(pb::LookupRequest {
            namespace: Some(ns),
            keys: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    // A key of the wrong length.
    let st = rpc
        .exists(pb::ExistsRequest {
            namespace: Some(layout.to_proto()),
            keys: vec![Bytes::from_static(b"short")],
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    // A layer range past the model.
    let st = rpc
        .get(pb::GetRequest {
            namespace: Some(layout.to_proto()),
            keys: vec![Bytes::from(vec![0u8; 32])],
            layers: Some(pb::LayerRange { start: 10, end: 40 }),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("layer range"), "{}", st.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "s3cret-token-for-alice alice\n").unwrap();
    let srv = TestServer::start(&["--tokens-file", tokens.to_str().unwrap()]);
    let connect = |token: Option<&str>| {
        let mut cfg = ClientConfig::new(srv.url());
        cfg.token = token.map(str::to_string);
        cfg.retry = RetryPolicy::none();
        Client::connect_with(cfg)
    };
    let layout = smol_layout("auth", Dtype::F16, 256);
    let keys = chain_keys(&layout.namespace_id(), &ids(256, 5), 256);
    for bad in [None, Some("wrong-token-of-some-length")] {
        let c = connect(bad).await.unwrap();
        let err = c.lookup(&layout, &keys).await.unwrap_err();
        assert!(matches!(err, ClientError::Unauthenticated(_)), "{err}");
        let err = c.put(&layout, &keys[0], body(&layout, 256, 5)).await.unwrap_err();
        assert!(matches!(err, ClientError::Unauthenticated(_)), "{err}");
        assert!(matches!(c.stat().await, Err(ClientError::Unauthenticated(_))));
    }
    let good = connect(Some("s3cret-token-for-alice")).await.unwrap();
    assert!(good.put(&layout, &keys[0], body(&layout, 256, 5)).await.unwrap());
    assert_eq!(good.lookup(&layout, &keys).await.unwrap().prefix_chunks, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = ClientConfig::new(format!("http://127.0.0.1:{port}"));
    cfg.retry = RetryPolicy {
        attempts: 2,
        base_delay: std::time::Duration::from_millis(10),
        ..Default::default()
    };
    let err = Client::connect_with(cfg)
        .await
        .err()
        .expect("nothing listens there");
    assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
    let err = Client::connect("not a url").await.err().unwrap();
    assert!(matches!(err, ClientError::InvalidEndpoint { .. }), "{err}");
}
