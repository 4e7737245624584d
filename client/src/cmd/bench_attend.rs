//! `kvault bench attend`: storage-side attention, side by side in one run:
//! the attention workers' throughput (GB/s of KV read, every layout) beside
//! this machine's memory bandwidth (STREAM-like copy, triad and read over
//! all cores, before and after the workers), the bytes a decode step puts
//! on the wire against the KV a node would otherwise fetch, and the step
//! latency over loopback at batch 1 and 32.
//!
//! The workers are measured through a real server on loopback with steps
//! large enough (every layer of a long context per step) that the RPC is a
//! few percent of the step, and two streams (`--streams`) each keeping a
//! step in flight, so that the workers do not wait on it; a step reads every
//! byte of its session once, so GB/s is the session's size times steps per
//! second.
//! The layouts take turns over a few rounds and each keeps its best, as
//! other work on a shared machine comes and goes; the run says how much
//! CPU other processes took meanwhile.

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
    /// Seconds of throughput measurement per layout (split over the rounds).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Streams that each keep one throughput step in flight (each opens its own sessions).
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Rounds the layouts take turns in.
    #[arg(long, default_value_t = 3)]
    pub rounds_per_layout: usize,
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

/// STREAM-like bandwidths over all cores, best of 5, in GB/s as STREAM
/// counts them (no write-allocate traffic).
struct Stream {
    /// `c = a`, 16 B per element.
    copy: f64,
    /// `a = b + s·c`, 24 B per element.
    triad: f64,
    /// `Σ a`, 8 B per element: reads only, as the workers do.
    read: f64,
}

/// `n` copies of `x`, advised for transparent huge pages before the first
/// write, as the server does with a session's planes (a fair reference:
/// both sides get the same TLB reach).
fn huge_vec(n: usize, x: f64) -> Vec<f64> {
    let mut v: Vec<f64> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    // SAFETY: the range is this Vec's own untouched allocation; MADV_HUGEPAGE
    // only changes how the kernel backs it, and failure is harmless.
    unsafe {
        libc::madvise(v.as_mut_ptr() as *mut libc::c_void, n * 8, libc::MADV_HUGEPAGE);
    }
    v.resize(n, x);
    v
}

fn stream(n: usize) -> Stream {
    let mut a = huge_vec(n, 1.0);
    let b = huge_vec(n, 2.0);
    let mut c = huge_vec(n, 0.5);
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
    let read = best(&mut || {
        // Eight lanes so that the sum is not one serial chain of adds.
        let s: f64 = a
            .par_chunks(piece)
            .map(|a| {
                let mut lanes = [0f64; 8];
                for x in a.chunks_exact(8) {
                    for i in 0..8 {
                        lanes[i] += x[i];
                    }
                }
                lanes.iter().sum::<f64>()
            })
            .sum();
        std::hint::black_box(s);
    });
    std::hint::black_box((&a, &c));
    let gb = |bytes: usize, s: f64| bytes as f64 * n as f64 / s / 1e9;
    Stream {
        copy: gb(16, copy),
        triad: gb(24, triad),
        read: gb(8, read),
    }
}

/// CPU time used so far, in clock ticks: by every process, and by this one
/// and the server (from `/proc`; `None` where there is no `/proc`).
#[derive(Clone, Copy)]
struct CpuTicks {
    all: u64,
    ours: u64,
    at: Instant,
}

fn cpu_ticks(server: Option<u32>) -> Option<CpuTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    // cpu  user nice system idle iowait irq softirq steal ...
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let all = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    let of = |pid: String| -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let f: Vec<&str> = s.get(s.rfind(')')? + 2..)?.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    let ours = of("self".into())? + server.and_then(|p| of(p.to_string())).unwrap_or(0);
    Some(CpuTicks {
        all,
        ours,
        at: Instant::now(),
    })
}

/// Cores' worth of CPU that processes other than ours used between two readings.
fn others_cores(a: Option<CpuTicks>, b: Option<CpuTicks>) -> Option<f64> {
    let (a, b) = (a?, b?);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let secs = b.at.duration_since(a.at).as_secs_f64();
    if hz <= 0.0 || secs <= 0.0 {
        return None;
    }
    let other = (b.all - a.all).saturating_sub(b.ours - a.ours) as f64;
    Some(other / hz / secs)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
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
///
/// Each stream (with its own copy of the session) keeps a step in flight, as
/// a server with more than one client sees: while one step's queries and
/// partials cross loopback and are encoded, another's keep the workers busy,
/// so the figure is the workers' rate rather than one client's round trip.
async fn throughput(
    conns: &mut [AttendConn],
    session: u64,
    layers: u32,
    tokens: u32,
    seconds: f64,
) -> anyhow::Result<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let qs: Vec<Query> = (0..layers)
        .map(|l| query(session, l, 0..tokens, &mut rng))
        .collect();
    for c in conns.iter_mut() {
        for r in c.step(&qs).await? {
            r?;
        }
    }
    let t = Instant::now();
    let runs = conns.iter_mut().map(|c| steps_until(c, &qs, t, seconds));
    let n: u32 = futures::future::try_join_all(runs).await?.into_iter().sum();
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Runs `qs` as steps on `conn` until `seconds` after `t` (at least twice); returns the count.
async fn steps_until(conn: &mut AttendConn, qs: &[Query], t: Instant, seconds: f64) -> anyhow::Result<u32> {
    let mut n = 0u32;
    while n < 2 || t.elapsed().as_secs_f64() < seconds {
        for r in conn.step(qs).await? {
            r?;
        }
        n += 1;
    }
    Ok(n)
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
    if a.rounds_per_layout == 0 || a.streams == 0 {
        bail!("--rounds-per-layout and --streams must be positive");
    }
    println!("load average (1 min) at the start: {}", load_average());
    let n = a.stream_elems;
    let before = tokio::task::spawn_blocking(move || stream(n)).await?;

    let lay = layout(a.layers);
    let chunks = a.tokens.div_ceil(CHUNK) as usize;
    let dir = tempfile::tempdir()?;
    let kv_bytes = 4 * a.tokens as u64 * (a.layers * KV_HEADS * HEAD_DIM) as u64;
    // Room for the stored chunks, and on each stream for an f16 session of
    // them and the three quantised ones (each at most 0.52 of f16), plus the
    // latency sessions.
    let ram = format!("{}MiB", ((kv_bytes * 2) >> 20) + 256);
    let attend = format!("{}MiB", ((kv_bytes * 5 / 2 * a.streams as u64) >> 20) + 1024);
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
    let mut conns = Vec::with_capacity(a.streams);
    for _ in 0..a.streams {
        conns.push(AttendConn::connect(&client).await?);
    }
    let layouts = [
        ("f16", AttendFormat::F16),
        ("int8", AttendFormat::Int8),
        ("k8v4", AttendFormat::K8v4),
        ("k4v4", AttendFormat::K4v4),
    ];
    let mut opened = Vec::new();
    for (i, (_, format)) in layouts.iter().enumerate() {
        let t = Instant::now();
        let o = conns[0].open(i as u64 + 1, &lay, &keys, *format).await?;
        opened.push((o, t.elapsed()));
        for c in &mut conns[1..] {
            c.open(i as u64 + 1, &lay, &keys, *format).await?;
        }
    }
    let cpu0 = cpu_ticks(server.pid());
    let mut steps = [0f64; 4];
    for _ in 0..a.rounds_per_layout {
        for (i, s) in steps.iter_mut().enumerate() {
            let secs = a.seconds / a.rounds_per_layout as f64;
            *s = s.max(throughput(&mut conns, i as u64 + 1, a.layers, a.tokens, secs).await?);
        }
    }
    let cpu1 = cpu_ticks(server.pid());
    let after = tokio::task::spawn_blocking(move || stream(n)).await?;
    let (triad, read) = (before.triad.max(after.triad), before.read.max(after.read));

    println!();
    println!(
        "memory bandwidth, STREAM-like ({threads} threads, 3 arrays of {}), before and after the workers",
        mib(n as u64 * 8)
    );
    for (name, x, y) in [
        ("copy", before.copy, after.copy),
        ("triad", before.triad, after.triad),
        ("read", before.read, after.read),
    ] {
        println!("  {name:<6} {x:>7.1} / {y:>5.1} GB/s");
    }
    println!();
    println!(
        "attention workers (loopback server, {} streams with a step in flight each; a step = one query of {Q_HEADS} heads on each of {} layers over {} tokens; {chunks} chunks; best of {} rounds)",
        a.streams, a.layers, a.tokens, a.rounds_per_layout
    );
    println!(
        "  {:<6} {:>14} {:>10} {:>13} {:>9} {:>9} {:>8} {:>9} {:>13}",
        "layout",
        "session bytes",
        "open (ms)",
        "B/token/head",
        "GB/s",
        "of triad",
        "of read",
        "Mtok/s",
        "vs f16 tok/s"
    );
    let heads = (a.layers * KV_HEADS) as f64 * a.tokens as f64;
    let f16_rate = steps[0] * a.layers as f64 * a.tokens as f64;
    for (((name, _), (o, open_t)), st) in layouts.iter().zip(&opened).zip(steps) {
        let tok = st * a.layers as f64 * a.tokens as f64;
        // Each step reads every byte of the session once.
        let gbs = st * o.bytes as f64 / 1e9;
        println!(
            "  {:<6} {:>14} {:>10.0} {:>13.1} {:>9.2} {:>9.2} {:>8.2} {:>9.1} {:>12.2}x",
            name,
            mib(o.bytes),
            ms(*open_t),
            o.bytes as f64 / heads,
            gbs,
            gbs / triad,
            gbs / read,
            tok / 1e6,
            tok / f16_rate
        );
    }
    match others_cores(cpu0, cpu1) {
        Some(c) => println!(
            "  other processes used {c:.2} of the {threads} cores during the worker runs (from /proc/stat); load average {}",
            load_average()
        ),
        None => println!("  (no /proc: CPU used by other processes unknown)"),
    }
    for c in conns.iter_mut() {
        for i in 0..layouts.len() {
            c.close(i as u64 + 1).await?;
        }
    }
    // The latency runs need one stream; the others end here.
    let mut conn = conns.into_iter().next().context("no stream")?;

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
        "notes: GB/s is the session's bytes (codes, scales, offsets) times steps per second: a step reads each once;"
    );
    println!(
        "of triad / of read use the better of the two STREAM runs. STREAM counts copy as 16 B, triad as 24 B and read as 8 B per element"
    );
    println!(
        "(no write-allocate traffic). STREAM arrays and session planes are both advised for transparent huge pages."
    );
    println!("The empty-range row is the RPC floor.");
    drop(conn);
    server.stop()?;
    Ok(())
}
