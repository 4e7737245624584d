//! `kvault bench attend`: storage-side attention, side by side in one run:
//! the attention workers' throughput (GB/s of KV read, f16 and int8
//! layouts) beside this machine's memory bandwidth (STREAM-like copy and
//! triad), the bytes a decode step puts on the wire against the KV a node
//! would otherwise fetch, and the step latency over loopback at batch 1 and 32.
//!
//! The workers are measured through a real server on loopback with steps
//! large enough (every layer of a long context per step) that the RPC costs
//! well under a percent of the step.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use half::f16;
use kvault_client::attend::{AttendConn, AttendFormat, Query};
use kvault_client::local_server::LocalServer;
use kvault_client::{Client, Layout, chain_keys};
use kvault_codec::{Dtype, KvShape, KvTensor, Profile};
use kvault_proto::pb;
use prost::Message;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

#[derive(Debug, Args)]
pub struct BenchAttendArgs {
    /// Context tokens of the throughput run.
    #[arg(long, default_value_t = 32_768)]
    pub tokens: u32,
    /// Layers stored (each query of a step reads one layer; a step asks for all of them).
    #[arg(long, default_value_t = 8)]
    pub layers: u32,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Context tokens per sequence of the latency runs.
    #[arg(long, default_value_t = 1024)]
    pub latency_tokens: u32,
    /// Round trips per latency measurement.
    #[arg(long, default_value_t = 200)]
    pub rounds: usize,
    /// Elements of each STREAM array (f64); the default, 3 x 512 MiB, is far past any cache.
    #[arg(long, default_value_t = 1 << 26)]
    pub stream_elems: usize,
}

/// Llama-3-8B attention shape.
const Q_HEADS: u32 = 32;
const KV_HEADS: u32 = 8;
const HEAD_DIM: u32 = 128;
const MODEL_LAYERS: u64 = 32;
const CHUNK: u32 = 256;

fn layout(layers: u32) -> Layout {
    Layout {
        model_id: "bench/attend-llama-3-8b-shape".into(),
        layers,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        dtype: Dtype::F16,
        chunk_tokens: CHUNK,
        rope: None,
    }
}

/// STREAM-like copy (`c = a`, 16 B per element) and triad (`a = b + s·c`,
/// 24 B per element) over all cores, best of 5; GB/s as STREAM counts them.
fn stream(n: usize) -> (f64, f64) {
    let mut a = vec![1.0f64; n];
    let b = vec![2.0f64; n];
    let mut c = vec![0.5f64; n];
    let piece = (n / (4 * rayon::current_num_threads())).max(1 << 16);
    let best = |f: &mut dyn FnMut()| {
        f();
        (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let copy = best(&mut || {
        c.par_chunks_mut(piece)
            .zip(a.par_chunks(piece))
            .for_each(|(c, a)| c.copy_from_slice(a));
    });
    let triad = best(&mut || {
        a.par_chunks_mut(piece)
            .zip(b.par_chunks(piece).zip(c.par_chunks(piece)))
            .for_each(|(a, (b, c))| {
                for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                    *x = y + 3.0 * z;
                }
            })
    });
    std::hint::black_box((&a, &c));
    let gb = |bytes: usize, s: f64| bytes as f64 * n as f64 / s / 1e9;
    (gb(16, copy), gb(24, triad))
}

/// Random f16 KV chunks (a few distinct ones, reused under every key).
fn chunk_blobs(layers: u32, distinct: usize) -> anyhow::Result<Vec<Bytes>> {
    let shape = KvShape {
        layers,
        tokens: CHUNK,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
    };
    (0..distinct)
        .into_par_iter()
        .map(|i| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
            let data: Vec<u8> = (0..shape.elements())
                .flat_map(|_| f16::from_f32(rng.random_range(-2.0f32..2.0)).to_le_bytes())
                .collect();
            let t = KvTensor::new(shape, Dtype::F16, data)?;
            Ok(Bytes::from(kvault_codec::encode(t.view(), Profile::Lossless)?))
        })
        .collect()
}

fn query(session_id: u64, layer: u32, range: std::ops::Range<u32>, rng: &mut impl Rng) -> Query {
    Query {
        session_id,
        layer,
        q_heads: Q_HEADS,
        head_dim: HEAD_DIM,
        scale: 1.0 / (HEAD_DIM as f32).sqrt(),
        range,
        q: (0..Q_HEADS * HEAD_DIM)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect(),
    }
}

/// Runs whole-context steps on `session` for about `seconds`; returns steps per second.
async fn throughput(
    conn: &mut AttendConn,
    session: u64,
    layers: u32,
    tokens: u32,
    seconds: f64,
) -> anyhow::Result<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let qs: Vec<Query> = (0..layers)
        .map(|l| query(session, l, 0..tokens, &mut rng))
        .collect();
    for r in conn.step(&qs).await? {
        r?;
    }
    let t = Instant::now();
    let mut n = 0u32;
    while n < 3 || t.elapsed().as_secs_f64() < seconds {
        for r in conn.step(&qs).await? {
            r?;
        }
        n += 1;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Per-layer round trips of `batch` queries (one per session), cycling the layers.
async fn latency(
    conn: &mut AttendConn,
    sessions: &[u64],
    layers: u32,
    range: std::ops::Range<u32>,
    rounds: usize,
) -> anyhow::Result<(Duration, Duration, u64)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut times = Vec::with_capacity(rounds);
    let mut wire = 0;
    for i in 0..rounds + 10 {
        let layer = i as u32 % layers;
        let qs: Vec<Query> = sessions
            .iter()
            .map(|s| query(*s, layer, range.clone(), &mut rng))
            .collect();
        let t = Instant::now();
        for r in conn.step(&qs).await? {
            r?;
        }
        // The first rounds warm connections and caches up.
        if i >= 10 {
            times.push(t.elapsed());
            wire = conn.last_wire.0 + conn.last_wire.1;
        }
    }
    times.sort();
    Ok((times[times.len() / 2], times[times.len() * 99 / 100], wire))
}

/// Encoded bytes, both ways, of one layer's Attend step for `batch` sequences
/// (gRPC adds 5 bytes of framing per message).
fn step_wire(batch: usize) -> (u64, u64) {
    let q = pb::AttendQuery {
        session_id: 1,
        layer: 31,
        q_heads: Q_HEADS,
        head_dim: HEAD_DIM,
        scale: 0.088,
        start: 0,
        end: 32_768,
        q: vec![0u8; (Q_HEADS * HEAD_DIM * 4) as usize].into(),
    };
    let req = pb::AttendRequest {
        msg: Some(pb::attend_request::Msg::Step(pb::AttendStep {
            step_id: 1_000_000,
            queries: vec![q; batch],
        })),
    };
    let p = pb::AttendPartial {
        o: vec![0u8; (Q_HEADS * HEAD_DIM * 4) as usize].into(),
        lse: vec![0.0; Q_HEADS as usize],
        error: None,
    };
    let resp = pb::AttendResponse {
        msg: Some(pb::attend_response::Msg::Step(pb::AttendStepResult {
            step_id: 1_000_000,
            partials: vec![p; batch],
        })),
    };
    (req.encoded_len() as u64 + 5, resp.encoded_len() as u64 + 5)
}

fn mib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub async fn run(a: BenchAttendArgs) -> anyhow::Result<()> {
    if a.tokens == 0 || a.layers == 0 || a.latency_tokens == 0 || a.latency_tokens > a.tokens {
        bail!("--tokens, --layers and --latency-tokens must be positive, latency tokens at most --tokens");
    }
    let threads = rayon::current_num_threads();
    println!(
        "kvault bench attend: Llama-3-8B attention shape ({Q_HEADS} query heads, {KV_HEADS} KV heads, head dim {HEAD_DIM}), {threads} cores"
    );
    let n = a.stream_elems;
    let (copy, triad) = tokio::task::spawn_blocking(move || stream(n)).await?;
    println!();
    println!(
        "memory bandwidth, STREAM-like ({threads} threads, 3 arrays of {})",
        mib(n as u64 * 8)
    );
    println!("  copy   {copy:>7.1} GB/s");
    println!("  triad  {triad:>7.1} GB/s");

    let lay = layout(a.layers);
    let chunks = a.tokens.div_ceil(CHUNK) as usize;
    let dir = tempfile::tempdir()?;
    let kv_bytes = 4 * a.tokens as u64 * (a.layers * KV_HEADS * HEAD_DIM) as u64;
    // Room for the stored chunks plus an f16 and an int8 session of them.
    let ram = format!("{}MiB", ((kv_bytes * 2) >> 20) + 256);
    let attend = format!("{}MiB", ((kv_bytes * 2) >> 20) + 1024);
    let server = LocalServer::start(
        &dir.path().join("data"),
        &[
            "--ram-bytes",
            &ram,
            "--attend-bytes",
            &attend,
            "--attend-idle-secs",
            "3600",
        ],
    )
    .context("starting kvault-server")?;
    let client = Client::connect(server.url()).await?;
    let blobs = tokio::task::spawn_blocking({
        let layers = a.layers;
        move || chunk_blobs(layers, 4)
    })
    .await??;
    let ids: Vec<u32> = (0..a.tokens)
        .map(|i| i.wrapping_mul(2_654_435_761) % 49_152)
        .collect();
    let keys = chain_keys(&lay.namespace_id(), &ids, CHUNK as usize);
    // A trailing partial chunk would need its own blob: keep whole chunks.
    if !a.tokens.is_multiple_of(CHUNK) {
        bail!("--tokens must be a multiple of {CHUNK}");
    }
    for (i, k) in keys.iter().enumerate() {
        client.put(&lay, k, blobs[i % blobs.len()].clone()).await?;
    }
    let mut conn = AttendConn::connect(&client).await?;
    let t = Instant::now();
    let f = conn.open(1, &lay, &keys, AttendFormat::F16).await?;
    let open_f16 = t.elapsed();
    let t = Instant::now();
    let q = conn.open(2, &lay, &keys, AttendFormat::Int8).await?;
    let open_q = t.elapsed();
    let t = Instant::now();
    let q4 = conn.open(3, &lay, &keys, AttendFormat::K8v4).await?;
    let open_q4 = t.elapsed();

    println!();
    println!(
        "attention workers (loopback server; a step = one query of {Q_HEADS} heads on each of {} layers over {} tokens; {chunks} chunks)",
        a.layers, a.tokens
    );
    println!(
        "  {:<6} {:>14} {:>12} {:>14} {:>10} {:>16} {:>10} {:>12}",
        "layout",
        "session bytes",
        "open (ms)",
        "B/token/head",
        "GB/s",
        "of triad / copy",
        "Mtok/s",
        "vs f16 tok/s"
    );
    let mut f16_rate = 0.0;
    for (name, sid, opened, open_t, per_tok) in [
        ("f16", 1u64, f, open_f16, 4 * HEAD_DIM as u64),
        ("int8", 2, q, open_q, 2 * HEAD_DIM as u64 + 4),
        ("k8v4", 3, q4, open_q4, HEAD_DIM as u64 * 3 / 2 + 4),
    ] {
        let steps = throughput(&mut conn, sid, a.layers, a.tokens, a.seconds).await?;
        let tok = steps * a.layers as f64 * a.tokens as f64;
        let gbs = tok * (KV_HEADS as u64 * per_tok) as f64 / 1e9;
        if sid == 1 {
            f16_rate = tok;
        }
        println!(
            "  {:<6} {:>14} {:>12.0} {:>14} {:>10.2} {:>7.2} / {:<6.2} {:>10.1} {:>11.2}x",
            name,
            mib(opened.bytes),
            ms(open_t),
            per_tok,
            gbs,
            gbs / triad,
            gbs / copy,
            tok / 1e6,
            tok / f16_rate
        );
    }
    conn.close(1).await?;
    conn.close(2).await?;
    conn.close(3).await?;

    // Wire against KV, Llama-3-8B at 32k tokens, all 32 layers of one decode step.
    let ctx = 32_768u64;
    let kv_fetch = MODEL_LAYERS * 2 * ctx * (KV_HEADS * HEAD_DIM) as u64 * 2;
    println!();
    println!(
        "bytes per decode step, Llama-3-8B shape (32 layers) at 32k tokens (real message encodings + 5 B gRPC framing each)"
    );
    println!(
        "  {:<8} {:>14} {:>14} {:>14} {:>18} {:>12}",
        "batch", "sent / seq", "received / seq", "total / seq", "KV f16 / seq", "KV / wire"
    );
    for batch in [1usize, 32] {
        let (s, r) = step_wire(batch);
        let per = MODEL_LAYERS * (s + r) / batch as u64;
        println!(
            "  {:<8} {:>14} {:>14} {:>14} {:>18} {:>11.0}x",
            batch,
            mib(MODEL_LAYERS * s / batch as u64),
            mib(MODEL_LAYERS * r / batch as u64),
            mib(per),
            mib(kv_fetch),
            kv_fetch as f64 / per as f64
        );
    }

    // Latency: 32 sessions over the first latency_tokens of the prefix.
    let lchunks = a.latency_tokens.div_ceil(CHUNK) as usize;
    let ltok = (lchunks as u32 * CHUNK).min(a.tokens);
    let sessions: Vec<u64> = (100..132).collect();
    for s in &sessions {
        conn.open(*s, &lay, &keys[..lchunks], AttendFormat::F16).await?;
    }
    println!();
    println!(
        "step latency over loopback (f16 layout, {ltok}-token context per sequence, one Attend message per layer, {} rounds)",
        a.rounds
    );
    println!(
        "  {:<20} {:>12} {:>12} {:>22} {:>16}",
        "batch", "layer p50 ms", "layer p99 ms", "token (32 layers) ms", "wire / layer"
    );
    for (label, batch, range) in [
        ("1, empty range", 1usize, 0..0),
        ("1", 1, 0..ltok),
        ("32", 32, 0..ltok),
    ] {
        let (p50, p99, wire) = latency(&mut conn, &sessions[..batch], a.layers, range, a.rounds).await?;
        println!(
            "  {:<20} {:>12.3} {:>12.3} {:>22.2} {:>16}",
            label,
            ms(p50),
            ms(p99),
            ms(p50) * MODEL_LAYERS as f64,
            mib(wire)
        );
    }
    println!();
    println!(
        "notes: GB/s counts the KV bytes the workers must read per token and KV head (f16: 4·D; int8: 2·D + a 4 B value scale; k8v4: 1.5·D + 4);"
    );
    println!(
        "STREAM counts copy as 16 B and triad as 24 B per element (no write-allocate traffic). The empty-range row is the RPC floor."
    );
    drop(conn);
    server.stop()?;
    Ok(())
}
