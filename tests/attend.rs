//! Attention offload against real server processes: partials from 1, 2 and
//! 3 servers (each holding some chunks of a prefix) merged with a local
//! partial equal full attention computed in f64 on the same KV; bad inputs
//! get clear errors while the stream keeps serving.
//!
//! Tolerances (stated once, checked everywhere):
//! - f16 layout: the servers read exactly the stored f16 values and work in
//!   f32, so `|o − ref| ≤ 1e-5·(1 + max|v|)` (measured worst about 2e-6 at max|v| = 4) and `|lse − ref| ≤ 1e-4·(1 + |ref|)`.
//! - Quantised layouts (`server/src/attend/layout.rs`). With `M_c = max_t |k_tc|`
//!   over the prefix (each server's key groups of 128 tokens have a range
//!   within ±M_c) and `a_c = scale·|q_c|·M_c`:
//!   - int8 keys (int8, k8v4): step ≤ `M_c/127`, rounding ≤ `M_c/254`, so a
//!     score moves by at most `ε_k = Σ_c a_c/254`; the query, folded with the
//!     steps, is rounded to integers of at most `A = 32767` (for these head
//!     dims) against codes of at most 127: `ε_q = 127·D·max_c a_c/(127·2A)`;
//!   - 4-bit keys (k4v4): step ≤ `2M_c/15`, `ε_k = Σ_c a_c/15`; integers of
//!     at most 127 against codes centred within ±8: `ε_q = 8·D·max_c(2a_c/15)/(2·127)`;
//!   - with `ε = ε_k + ε_q`, softmax weights move by a factor within `e^{±2ε}`;
//!   - int8 values: rounding ≤ `max|v|/254`; the block's weights rounded to
//!     integers of at most 32767, codes of at most 127: ≤ `16·max|v|/65534`;
//!   - 4-bit values: step ≤ `2·max|v|/15`, rounding ≤ `max|v|/15`; weights
//!     rounded to 8 bits against codes within ±8: ≤ `16·8·(2·max|v|/15)/510`
//!     (each 16-token block's error is at most that times its largest
//!     weight, and the largest weights of the blocks sum to at most `l`);
//!   - hence `|o − ref| ≤ (e^{2ε} − 1)·max|v| + (value terms) + 2e-4` and
//!     `|lse − ref| ≤ ε + 1e-4`.

use std::ops::Range;

use bytes::Bytes;
use kvault_client::attend::{
    AttendConn, AttendFormat, Offload, Partial, Query, Request, Shard, local_partial,
};
use kvault_client::prefix::slice_tokens;
use kvault_client::{ChunkStore, Client, ClientError, Layout, chain_keys};
use kvault_codec::{Dtype, KvShape, KvTensor, Profile};
use kvault_tests::{TestServer, ids, random_kv};
use rand::{Rng, SeedableRng};

/// The canonical KV of a tensor as f32.
fn f32s(kv: &KvTensor) -> Vec<f32> {
    let mut out = vec![0u8; kv.shape().byte_len(Dtype::F32).unwrap()];
    kvault_codec::convert(kv.data(), kv.dtype(), &mut out, Dtype::F32).unwrap();
    out.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Element (layer, K or V, token, head, dim) of canonical f32 KV.
fn at(kv: &[f32], s: &KvShape, l: usize, p: usize, t: usize, h: usize, d: usize) -> f32 {
    let (tk, kvh, hd) = (s.tokens as usize, s.kv_heads as usize, s.head_dim as usize);
    kv[(((l * 2 + p) * tk + t) * kvh + h) * hd + d]
}

/// Full attention in f64 over the tokens `sets` (disjoint ranges).
fn reference(
    kv: &[f32],
    s: &KvShape,
    l: usize,
    q: &[f32],
    q_heads: usize,
    scale: f64,
    sets: &[Range<usize>],
) -> (Vec<f64>, Vec<f64>) {
    let (kvh, hd) = (s.kv_heads as usize, s.head_dim as usize);
    let g = q_heads / kvh;
    let mut o = vec![0f64; q_heads * hd];
    let mut lse = vec![f64::NEG_INFINITY; q_heads];
    for h in 0..q_heads {
        let toks: Vec<usize> = sets.iter().flat_map(|r| r.clone()).collect();
        if toks.is_empty() {
            continue;
        }
        let sc: Vec<f64> = toks
            .iter()
            .map(|&t| {
                scale
                    * (0..hd)
                        .map(|d| q[h * hd + d] as f64 * at(kv, s, l, 0, t, h / g, d) as f64)
                        .sum::<f64>()
            })
            .collect();
        let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = sc.iter().map(|x| (x - m).exp()).sum();
        for (i, &t) in toks.iter().enumerate() {
            let p = (sc[i] - m).exp() / sum;
            for d in 0..hd {
                o[h * hd + d] += p * at(kv, s, l, 1, t, h / g, d) as f64;
            }
        }
        lse[h] = m + sum.ln();
    }
    (o, lse)
}

/// The node's partial over tokens `r` of layer `l` (head-major, as the model runner holds them).
fn local(
    kv: &[f32],
    s: &KvShape,
    l: usize,
    q: &[f32],
    q_heads: usize,
    scale: f32,
    r: Range<usize>,
) -> Partial {
    let (kvh, hd) = (s.kv_heads as usize, s.head_dim as usize);
    let pick = |p: usize| -> Vec<f32> {
        (0..kvh)
            .flat_map(|h| r.clone().flat_map(move |t| (0..hd).map(move |d| (h, t, d))))
            .map(|(h, t, d)| at(kv, s, l, p, t, h, d))
            .collect()
    };
    local_partial(q, q_heads, hd, kvh, &pick(0), &pick(1), scale).unwrap()
}

/// Stores chunk `i` of the prefix on each server in `on[i]`.
async fn store_chunks(
    clients: &[Client],
    layout: &Layout,
    prefix: &KvTensor,
    ids: &[u32],
    on: &[Vec<usize>],
) {
    let ct = layout.chunk_tokens;
    let keys = chain_keys(&layout.namespace_id(), ids, ct as usize);
    for (i, key) in keys.iter().enumerate() {
        let t0 = i as u32 * ct;
        let t1 = (t0 + ct).min(prefix.shape().tokens);
        let part = slice_tokens(&prefix.view(), t0, t1).unwrap();
        let blob = Bytes::from(kvault_codec::encode(part.view(), Profile::Lossless).unwrap());
        for &s in &on[i] {
            clients[s].put(layout, key, blob.clone()).await.unwrap();
        }
    }
}

/// Per-query bound on the `(o, lse)` error of the quantised layouts (see
/// the file's doc).
#[allow(clippy::too_many_arguments)]
fn quant_bound(
    kv: &[f32],
    s: &KvShape,
    l: usize,
    q: &[f32],
    q_heads: usize,
    scale: f64,
    prefix: usize,
    format: AttendFormat,
) -> (f64, f64) {
    let (kvh, hd) = (s.kv_heads as usize, s.head_dim as usize);
    let g = q_heads / kvh;
    let four_bit_keys = format == AttendFormat::K4v4;
    let mut eps = 0f64;
    for h in 0..q_heads {
        let a: Vec<f64> = (0..hd)
            .map(|d| {
                let m = (0..prefix)
                    .map(|t| at(kv, s, l, 0, t, h / g, d).abs())
                    .fold(0f32, f32::max) as f64;
                scale * (q[h * hd + d] as f64).abs() * m
            })
            .collect();
        let amax = a.iter().copied().fold(0.0, f64::max);
        let e = if four_bit_keys {
            a.iter().sum::<f64>() / 15.0 + 8.0 * hd as f64 * (2.0 * amax / 15.0) / (2.0 * 127.0)
        } else {
            a.iter().sum::<f64>() / 254.0 + 127.0 * hd as f64 * (amax / 127.0) / (2.0 * 32767.0)
        };
        eps = eps.max(e);
    }
    let vmax = (0..prefix)
        .flat_map(|t| (0..kvh).flat_map(move |h| (0..hd).map(move |d| (t, h, d))))
        .map(|(t, h, d)| at(kv, s, l, 1, t, h, d).abs())
        .fold(0f32, f32::max) as f64;
    let values = if format == AttendFormat::Int8 {
        vmax / 254.0 + 16.0 * vmax / 65534.0
    } else {
        vmax / 15.0 + 16.0 * 8.0 * (2.0 * vmax / 15.0) / 510.0
    };
    ((2.0 * eps).exp_m1() * vmax + values + 2e-4, eps + 1e-4)
}

struct Case<'a> {
    kv: &'a [f32],
    shape: KvShape,
    prefix: usize,
    q_heads: usize,
    format: AttendFormat,
}

/// Runs every layer × range through `off` and checks against the f64 reference.
async fn check(
    off: &mut Offload,
    p: kvault_client::attend::PrefixId,
    c: &Case<'_>,
    ranges: &[Range<usize>],
    seed: u64,
) -> f64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (hd, total) = (c.shape.head_dim as usize, c.shape.tokens as usize);
    let scale = 1.0 / (hd as f32).sqrt();
    let vmax = c.kv.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let mut worst = 0f64;
    for l in 0..c.shape.layers as usize {
        let qs: Vec<Vec<f32>> = ranges
            .iter()
            .map(|_| {
                (0..c.q_heads * hd)
                    .map(|_| rng.random_range(-2.0f32..2.0))
                    .collect()
            })
            .collect();
        let locals: Vec<Partial> = qs
            .iter()
            .map(|q| local(c.kv, &c.shape, l, q, c.q_heads, scale, c.prefix..total))
            .collect();
        let reqs: Vec<Request<'_>> = ranges
            .iter()
            .zip(&qs)
            .zip(&locals)
            .map(|((r, q), lp)| Request {
                prefix: p,
                layer: l as u32,
                q,
                q_heads: c.q_heads,
                scale,
                range: r.clone(),
                local: Some(lp),
            })
            .collect();
        let got = off.attend(&reqs).await.unwrap();
        for ((r, q), g) in ranges.iter().zip(&qs).zip(&got) {
            let (ro, rl) = reference(
                c.kv,
                &c.shape,
                l,
                q,
                c.q_heads,
                scale as f64,
                &[r.clone(), c.prefix..total],
            );
            let (tol_o, tol_l) = match c.format {
                AttendFormat::Int8 | AttendFormat::K8v4 | AttendFormat::K4v4 => {
                    quant_bound(c.kv, &c.shape, l, q, c.q_heads, scale as f64, c.prefix, c.format)
                }
                _ => (1e-5 * (1.0 + vmax), 1e-4),
            };
            for (i, (a, b)) in g.o.iter().zip(&ro).enumerate() {
                let e = (*a as f64 - b).abs();
                worst = worst.max(e);
                assert!(
                    e <= tol_o,
                    "layer {l} range {r:?} o[{i}] = {a}, reference {b} (tolerance {tol_o})"
                );
            }
            for (h, (a, b)) in g.lse.iter().zip(&rl).enumerate() {
                let tol = tol_l * (1.0 + b.abs());
                assert!(
                    (*a as f64 - b).abs() <= tol,
                    "layer {l} range {r:?} lse[{h}] = {a}, reference {b}"
                );
            }
        }
    }
    worst
}

/// Random KV, GQA and MHA, 83-token prefix (not a multiple of the 16-token
/// chunks) plus 5 local tokens, spread over 1, 2 and 3 servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_partials_equal_full_attention_random_kv() {
    let servers: Vec<TestServer> = (0..3).map(|_| TestServer::start(&[])).collect();
    let mut clients = Vec::new();
    for s in &servers {
        clients.push(s.client().await);
    }
    for (kvh, q_heads) in [(2u32, 6usize), (4, 4)] {
        let layout = Layout {
            model_id: format!("attend/random-{kvh}-{q_heads}"),
            layers: 2,
            kv_heads: kvh,
            head_dim: 32,
            dtype: Dtype::F16,
            chunk_tokens: 16,
            rope: None,
        };
        let (prefix, total) = (83usize, 88u32);
        let kv = random_kv(&layout, total, kvh as u64);
        let pre = slice_tokens(&kv.view(), 0, prefix as u32).unwrap();
        let tok = ids(prefix as u32, kvh);
        // Server 0 holds every chunk, server 1 chunks 2.., server 2 chunks 4.. .
        let on: Vec<Vec<usize>> = (0..6).map(|i| (0..3).filter(|s| i >= 2 * s).collect()).collect();
        store_chunks(&clients, &layout, &pre, &tok, &on).await;
        let keys = chain_keys(&layout.namespace_id(), &tok, 16);
        let kvf = f32s(&kv);
        let spreads: [Vec<Shard>; 3] = [
            vec![Shard {
                server: 0,
                chunks: 0..6,
            }],
            vec![
                Shard {
                    server: 0,
                    chunks: 0..3,
                },
                Shard {
                    server: 1,
                    chunks: 3..6,
                },
            ],
            vec![
                Shard {
                    server: 0,
                    chunks: 0..2,
                },
                Shard {
                    server: 1,
                    chunks: 2..4,
                },
                Shard {
                    server: 2,
                    chunks: 4..6,
                },
            ],
        ];
        let mut off = Offload::connect(&clients).await.unwrap();
        let ranges = [0..prefix, 17..70, 0..0, 40..41, 31..33];
        for (n, shards) in spreads.iter().enumerate() {
            for format in [
                AttendFormat::F16,
                AttendFormat::Int8,
                AttendFormat::K8v4,
                AttendFormat::K4v4,
            ] {
                let p = off
                    .open_prefix(&layout, &keys, prefix, shards, format)
                    .await
                    .unwrap();
                assert_eq!(off.tokens(p), prefix);
                let case = Case {
                    kv: &kvf,
                    shape: kv.shape(),
                    prefix,
                    q_heads,
                    format,
                };
                let worst = check(&mut off, p, &case, &ranges, n as u64).await;
                eprintln!(
                    "kv_heads {kvh} q_heads {q_heads}, {} servers, {format:?}: worst |o - ref| {worst:.2e}",
                    n + 1
                );
            }
        }
    }
}

/// Real SmolLM2 KV (a prefill of a real text), GQA 9 over 3 heads, over 2
/// servers and a local tail; queries are the model's own keys, so the
/// attention is as peaked as in the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_partials_equal_full_attention_smollm2_kv() {
    let model = kvault_client::model::LlamaModel::load(kvault_tests::model_path()).unwrap();
    let text = "The quick brown fox jumps over the lazy dog. A storage service keeps the KV cache of long \
                prompts so that later requests can skip the prefill, and a worker beside the storage can \
                compute attention over it without moving the cache at all.";
    let tok = model.encode_document(text).unwrap();
    let total = tok.len();
    assert!(total > 40, "{total} tokens");
    let pf = model.prefill(&tok, None).unwrap();
    let mut f16 = vec![0u8; pf.kv.shape().byte_len(Dtype::F16).unwrap()];
    kvault_codec::convert(pf.kv.data(), Dtype::F32, &mut f16, Dtype::F16).unwrap();
    let kv = KvTensor::new(pf.kv.shape(), Dtype::F16, f16).unwrap();
    let layout = model.layout("attend/smollm2", 16);
    let prefix = total - 7;
    let ids = &tok[..prefix];
    let pre = slice_tokens(&kv.view(), 0, prefix as u32).unwrap();
    let chunks = prefix.div_ceil(16);
    let servers: Vec<TestServer> = (0..2).map(|_| TestServer::start(&[])).collect();
    let mut clients = Vec::new();
    for s in &servers {
        clients.push(s.client().await);
    }
    let on: Vec<Vec<usize>> = (0..chunks).map(|i| vec![usize::from(i >= 1)]).collect();
    store_chunks(&clients, &layout, &pre, ids, &on).await;
    let keys = chain_keys(&layout.namespace_id(), ids, 16);
    let mut off = Offload::connect(&clients).await.unwrap();
    let shards = [
        Shard {
            server: 0,
            chunks: 0..1,
        },
        Shard {
            server: 1,
            chunks: 1..chunks,
        },
    ];
    let p = off
        .open_prefix(&layout, &keys, prefix, &shards, AttendFormat::F16)
        .await
        .unwrap();
    let kvf = f32s(&kv);
    let s = kv.shape();
    let (q_heads, hd) = (9usize, 64usize);
    let scale = 0.125f32;
    let vmax = kvf.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    for l in [0usize, 7, 29] {
        // Query head h: the last token's key of its KV head (self-similar, peaked attention).
        let q: Vec<f32> = (0..q_heads)
            .flat_map(|h| (0..hd).map(move |d| (h, d)))
            .map(|(h, d)| at(&kvf, &s, l, 0, total - 1, h / 3, d))
            .collect();
        let lp = local(&kvf, &s, l, &q, q_heads, scale, prefix..total);
        for r in [0..prefix, 5..prefix - 3, 0..0] {
            let got = off
                .attend(&[Request {
                    prefix: p,
                    layer: l as u32,
                    q: &q,
                    q_heads,
                    scale,
                    range: r.clone(),
                    local: Some(&lp),
                }])
                .await
                .unwrap();
            let (ro, rl) = reference(
                &kvf,
                &s,
                l,
                &q,
                q_heads,
                scale as f64,
                &[r.clone(), prefix..total],
            );
            for (a, b) in got[0].o.iter().zip(&ro) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-5 * (1.0 + vmax),
                    "layer {l} {r:?}: {a} vs {b}"
                );
            }
            for (a, b) in got[0].lse.iter().zip(&rl) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "layer {l} {r:?}: lse {a} vs {b}"
                );
            }
        }
    }
}

fn query(session_id: u64, q_heads: u32, head_dim: u32, range: Range<u32>, fill: f32) -> Query {
    Query {
        session_id,
        layer: 1,
        q_heads,
        head_dim,
        scale: 0.2,
        range,
        q: vec![fill; (q_heads * head_dim) as usize],
    }
}

fn code(r: &Result<Partial, ClientError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(ClientError::InvalidArgument(_)) => "invalid_argument",
        Err(ClientError::NotFound(_)) => "not_found",
        Err(ClientError::TooLarge(_)) => "resource_exhausted",
        Err(_) => "other",
    }
}

/// Wrong head count or dim, unknown prefix or session, a range past the
/// prefix, NaN in a query: each refused with a clear message, while the
/// valid queries of the same step, and later steps, are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clear_errors_and_the_stream_goes_on() {
    let server = TestServer::start(&["--attend-bytes", "1MiB", "--attend-idle-secs", "1"]);
    let client = server.client().await;
    let layout = Layout {
        model_id: "attend/bad".into(),
        layers: 2,
        kv_heads: 2,
        head_dim: 16,
        dtype: Dtype::F16,
        chunk_tokens: 8,
        rope: None,
    };
    let kv = random_kv(&layout, 20, 1);
    let tok = ids(20, 1);
    client
        .put_prefix(&layout, &kv.view(), &tok, Profile::Lossless, 1)
        .await
        .unwrap();
    let keys = chain_keys(&layout.namespace_id(), &tok, 8);
    let mut conn = AttendConn::connect(&client).await.unwrap();
    let opened = conn.open(1, &layout, &keys, AttendFormat::F16).await.unwrap();
    assert_eq!(opened.tokens, 20);

    // Unknown prefix: keys that were never stored.
    let other = chain_keys(&layout.namespace_id(), &ids(20, 99), 8);
    let e = conn
        .open(2, &layout, &other, AttendFormat::F16)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::NotFound(m) if m.contains("chunk 0") && m.contains("not stored")),
        "{e}"
    );
    // Unknown model id.
    let unknown = Layout {
        model_id: "attend/never-stored".into(),
        ..layout.clone()
    };
    let e = conn
        .open(3, &unknown, &keys, AttendFormat::F16)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::NotFound(_)), "{e}");
    // A session id already open.
    let e = conn.open(1, &layout, &keys, AttendFormat::F16).await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");

    let mut nan = query(1, 4, 16, 0..20, 0.5);
    nan.q[17] = f32::NAN;
    let batch = vec![
        query(1, 4, 16, 0..20, 0.5),                       // fine
        query(1, 3, 16, 0..20, 0.5),                       // 3 heads over 2 KV heads
        query(1, 4, 8, 0..20, 0.5),                        // head dim 8, prefix has 16
        query(1, 4, 16, 0..21, 0.5),                       // past the 20 tokens
        query(1, 4, 16, Range { start: 12, end: 4 }, 0.5), // reversed range
        nan,                                               // NaN in the query
        query(9, 4, 16, 0..20, 0.5),                       // no such session
        query(1, 4, 16, 20..20, 0.5),                      // empty range: fine
    ];
    let got = conn.step(&batch).await.unwrap();
    let codes: Vec<&str> = got.iter().map(code).collect();
    assert_eq!(
        codes,
        [
            "ok",
            "invalid_argument",
            "invalid_argument",
            "invalid_argument",
            "invalid_argument",
            "invalid_argument",
            "not_found",
            "ok"
        ]
    );
    let msg = |i: usize| got[i].as_ref().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg(1).contains("multiple of the prefix's 2 KV heads"),
        "{}",
        msg(1)
    );
    assert!(msg(2).contains("head_dim 8"), "{}", msg(2));
    assert!(
        msg(3).contains("0..21") && msg(3).contains("20 tokens"),
        "{}",
        msg(3)
    );
    assert!(msg(5).contains("not finite"), "{}", msg(5));
    assert!(msg(6).contains("session 9"), "{}", msg(6));
    let empty = got[7].as_ref().unwrap();
    assert!(empty.lse.iter().all(|l| *l == f32::NEG_INFINITY) && empty.o.iter().all(|x| *x == 0.0));
    let first = got[0].as_ref().unwrap().clone();
    assert!(first.lse.iter().all(|l| l.is_finite()));

    // The same stream still serves, and answers the same.
    let again = conn.step(&[query(1, 4, 16, 0..20, 0.5)]).await.unwrap();
    assert_eq!(again[0].as_ref().unwrap(), &first);

    // The memory budget (1 MiB) refuses a session that does not fit.
    let big = Layout {
        model_id: "attend/big".into(),
        layers: 4,
        kv_heads: 8,
        head_dim: 64,
        dtype: Dtype::F16,
        chunk_tokens: 256,
        rope: None,
    };
    let bkv = random_kv(&big, 300, 2);
    let btok = ids(300, 2);
    client
        .put_prefix(&big, &bkv.view(), &btok, Profile::Lossless, 1)
        .await
        .unwrap();
    let bkeys = chain_keys(&big.namespace_id(), &btok, 256);
    let e = conn.open(4, &big, &bkeys, AttendFormat::F16).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::TooLarge(m) if m.contains("budget")),
        "{e}"
    );

    // A chunk evicted (here: deleted) before the open: a clear NotFound.
    assert_eq!(client.delete(&layout, &keys[2..]).await.unwrap(), 1);
    let e = conn.open(5, &layout, &keys, AttendFormat::F16).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::NotFound(m) if m.contains("chunk 2")),
        "{e}"
    );
    // The session opened before keeps its decoded copy.
    assert!(conn.step(&[query(1, 4, 16, 0..20, 0.5)]).await.unwrap()[0].is_ok());

    // Idle past the 1 s expiry: the session is gone, with a message that says so.
    tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
    let r = conn.step(&[query(1, 4, 16, 0..20, 0.5)]).await.unwrap();
    assert!(
        matches!(&r[0], Err(ClientError::NotFound(m)) if m.contains("expired")),
        "{:?}",
        r[0]
    );
    assert!(!conn.close(1).await.unwrap());
}

/// The model decodes with the stored prefix's attention computed by the
/// servers (2 of them, lossless f16 layout) and produces the same greedy
/// tokens as with the prefix's KV fetched and attended locally; the part of
/// the document past the last full chunk is prefilled locally in both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offloaded_decode_gives_the_same_greedy_tokens() {
    use kvault_client::attend::model::ServerAttention;
    let model = kvault_client::model::LlamaModel::load(kvault_tests::model_path()).unwrap();
    let doc = "Four score and seven years ago our fathers brought forth on this continent, a new nation, \
               conceived in Liberty, and dedicated to the proposition that all men are created equal. Now \
               we are engaged in a great civil war, testing whether that nation can long endure.";
    let tok = model.encode_document(doc).unwrap();
    let prompt = model
        .tokenizer()
        .encode("\n\n<|im_start|>user\nWhat is this text about?<|im_end|>\n<|im_start|>assistant\n");
    let ct = 16usize;
    let chunks = tok.len() / ct;
    let prefix = chunks * ct;
    assert!(chunks >= 2 && prefix < tok.len(), "{} tokens", tok.len());
    let pf = model.prefill(&tok[..prefix], None).unwrap();
    let mut f16 = vec![0u8; pf.kv.shape().byte_len(Dtype::F16).unwrap()];
    kvault_codec::convert(pf.kv.data(), Dtype::F32, &mut f16, Dtype::F16).unwrap();
    let kv16 = KvTensor::new(pf.kv.shape(), Dtype::F16, f16).unwrap();
    let layout = model.layout("attend/offload-decode", ct as u32);
    let servers: Vec<TestServer> = (0..2).map(|_| TestServer::start(&[])).collect();
    let mut clients = Vec::new();
    for s in &servers {
        clients.push(s.client().await);
    }
    let split = chunks / 2;
    let on: Vec<Vec<usize>> = (0..chunks).map(|i| vec![usize::from(i >= split)]).collect();
    store_chunks(&clients, &layout, &kv16, &tok[..prefix], &on).await;

    let local = tokio::task::block_in_place(|| {
        let mut s = model.session(Some(&pf.kv)).unwrap();
        s.feed(&tok[prefix..]).unwrap();
        s.generate(&prompt, 8).unwrap().tokens
    });
    let keys = chain_keys(&layout.namespace_id(), &tok[..prefix], ct);
    let mut off = Offload::connect(&clients).await.unwrap();
    let shards = [
        Shard {
            server: 0,
            chunks: 0..split,
        },
        Shard {
            server: 1,
            chunks: split..chunks,
        },
    ];
    let p = off
        .open_prefix(&layout, &keys, prefix, &shards, AttendFormat::F16)
        .await
        .unwrap();
    let remote = ServerAttention::new(off, p, model.config().heads);
    let stats = remote.stats();
    let offloaded = tokio::task::block_in_place(|| {
        let mut s = model.offloaded_session(prefix, Box::new(remote)).unwrap();
        s.feed(&tok[prefix..]).unwrap();
        s.generate(&prompt, 8).unwrap().tokens
    });
    assert!(!local.is_empty());
    assert_eq!(offloaded, local);
    // One round trip per layer per forward step: the rest, the prompt, then each new token.
    let steps = stats.steps.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(steps as usize, 30 * (2 + local.len() - 1), "{steps}");
}
