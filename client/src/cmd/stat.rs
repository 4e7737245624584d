//! `kvault stat`.

use clap::Args;
use kvault_client::Tier;
use kvault_client::cluster::NodeStat;
use kvault_proto::pb;

use super::{ServerArgs, Store};

#[derive(Debug, Args)]
pub struct StatArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
    /// Show every node of the cluster: its share of keys and bytes, health and tiers
    /// (the default when --server lists several or --etcd is given).
    #[arg(long)]
    pub cluster: bool,
}

/// Per-tier sums over several servers' counters.
pub fn sum_stats<'a>(stats: impl IntoIterator<Item = &'a pb::StatResponse>) -> pb::StatResponse {
    let mut out = pb::StatResponse::default();
    for s in stats {
        out.namespaces = out.namespaces.max(s.namespaces);
        out.uptime_seconds = out.uptime_seconds.max(s.uptime_seconds);
        if out.version.is_empty() {
            out.version = s.version.clone();
        }
        for t in &s.tiers {
            let o = match out.tiers.iter_mut().find(|o| o.tier == t.tier) {
                Some(o) => o,
                None => {
                    out.tiers.push(pb::TierStat {
                        tier: t.tier,
                        ..Default::default()
                    });
                    out.tiers.last_mut().expect("just pushed")
                }
            };
            o.bytes += t.bytes;
            o.capacity_bytes += t.capacity_bytes;
            o.chunks += t.chunks;
            o.hits += t.hits;
            o.misses += t.misses;
            o.evictions += t.evictions;
            o.segments += t.segments;
            o.live_bytes += t.live_bytes;
        }
    }
    out
}

impl Store {
    /// The server's counters, or their per-tier sums over the cluster's
    /// nodes that answered.
    pub async fn stat(&self) -> anyhow::Result<pb::StatResponse> {
        match self {
            Store::One(c) => Ok(c.stat().await?),
            Store::Cluster(c) => {
                let nodes = c.node_stats().await;
                if nodes.iter().all(|n| n.stat.is_err()) {
                    anyhow::bail!("no node of the cluster answered");
                }
                Ok(sum_stats(nodes.iter().filter_map(|n| n.stat.as_ref().ok())))
            }
        }
    }
}

/// Chunks and bytes a node holds over all its tiers (RAM caches what NVMe
/// holds when both are on, so the larger tier counts).
fn held(s: &pb::StatResponse) -> (u64, u64) {
    s.tiers
        .iter()
        .map(|t| (t.chunks, t.bytes))
        .fold((0, 0), |(c, b), (tc, tb)| (c.max(tc), b.max(tb)))
}

async fn cluster_stat(a: &StatArgs) -> anyhow::Result<()> {
    let m = a
        .server
        .membership()
        .unwrap_or_else(|| kvault_client::Membership::Static(vec![a.server.server.clone()]));
    let cluster = a.server.connect_cluster(m).await?;
    let nodes: Vec<NodeStat> = cluster.node_stats().await;
    let (chunks, bytes) = nodes
        .iter()
        .filter_map(|n| n.stat.as_ref().ok())
        .map(held)
        .fold((0u64, 0u64), |(c, b), (x, y)| (c + x, b + y));
    let source = match cluster.membership() {
        kvault_client::Membership::Static(_) => "static node list".to_string(),
        kvault_client::Membership::Etcd { endpoints, prefix } => {
            format!(
                "etcd {endpoints} prefix {prefix}{}",
                if cluster.is_stale() {
                    " (STALE: etcd unreachable)"
                } else {
                    ""
                }
            )
        }
    };
    if a.json {
        let list: Vec<_> = nodes
            .iter()
            .map(|n| {
                let (c, b) = n.stat.as_ref().map(held).unwrap_or((0, 0));
                serde_json::json!({
                    "id": n.id,
                    "addr": n.addr,
                    "weight": n.weight,
                    "expected_share": n.share,
                    "healthy": n.healthy,
                    "chunks": c,
                    "bytes": b,
                    "chunk_share": if chunks > 0 { c as f64 / chunks as f64 } else { 0.0 },
                    "byte_share": if bytes > 0 { b as f64 / bytes as f64 } else { 0.0 },
                    "error": n.stat.as_ref().err(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"source": source, "stale": cluster.is_stale(), "nodes": list, "chunks": chunks, "bytes": bytes})
        );
        return Ok(());
    }
    println!(
        "cluster: {} nodes ({source}), {chunks} chunks, {bytes} bytes",
        nodes.len()
    );
    println!(
        "{:<28} {:>8} {:>9} {:>10} {:>9} {:>14} {:>9}  tiers",
        "node", "health", "exp.share", "chunks", "share", "bytes", "share"
    );
    for n in &nodes {
        let (c, b) = n.stat.as_ref().map(held).unwrap_or((0, 0));
        let pct = |x: u64, t: u64| {
            if t > 0 {
                format!("{:.1}%", 100.0 * x as f64 / t as f64)
            } else {
                "-".into()
            }
        };
        let tiers = match &n.stat {
            Ok(s) => s
                .tiers
                .iter()
                .map(|t| format!("{} {}/{}", tier_name(t.tier), t.bytes, t.capacity_bytes))
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("error: {e}"),
        };
        println!(
            "{:<28} {:>8} {:>8.1}% {:>10} {:>9} {:>14} {:>9}  {}",
            n.id,
            if n.healthy { "serving" } else { "DOWN" },
            100.0 * n.share,
            c,
            pct(c, chunks),
            b,
            pct(b, bytes),
            tiers
        );
    }
    Ok(())
}

pub async fn stat(a: StatArgs) -> anyhow::Result<()> {
    if a.cluster || a.server.membership().is_some() {
        return cluster_stat(&a).await;
    }
    let client = a.server.connect().await?;
    let s = client.stat().await?;
    if a.json {
        let tiers: Vec<_> = s
            .tiers
            .iter()
            .map(|t| {
                serde_json::json!({
                    "tier": tier_name(t.tier),
                    "bytes": t.bytes,
                    "capacity_bytes": t.capacity_bytes,
                    "chunks": t.chunks,
                    "hits": t.hits,
                    "misses": t.misses,
                    "evictions": t.evictions,
                    "segments": t.segments,
                    "live_bytes": t.live_bytes,
                })
            })
            .collect();
        let v = serde_json::json!({
            "version": s.version,
            "uptime_seconds": s.uptime_seconds,
            "namespaces": s.namespaces,
            "tiers": tiers,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "kvault-server {} up {}s, {} model layouts",
        s.version, s.uptime_seconds, s.namespaces
    );
    println!(
        "{:<6} {:>14} {:>14} {:>6} {:>10} {:>10} {:>10} {:>9} {:>10} {:>9} {:>9}",
        "tier",
        "bytes",
        "capacity",
        "fill",
        "chunks",
        "hits",
        "misses",
        "hit rate",
        "evictions",
        "segments",
        "seg live"
    );
    for t in &s.tiers {
        let fill = if t.capacity_bytes > 0 {
            100.0 * t.bytes as f64 / t.capacity_bytes as f64
        } else {
            0.0
        };
        let reads = t.hits + t.misses;
        let rate = if reads > 0 {
            format!("{:.1}%", 100.0 * t.hits as f64 / reads as f64)
        } else {
            "-".into()
        };
        // Segment fill: the share of segment bytes that live chunks occupy
        // (the rest is dead space the compactor reclaims).
        let (segs, seg_live) = if t.segments > 0 {
            (
                t.segments.to_string(),
                format!("{:.1}%", 100.0 * t.live_bytes as f64 / t.bytes.max(1) as f64),
            )
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{:<6} {:>14} {:>14} {:>5.1}% {:>10} {:>10} {:>10} {:>9} {:>10} {:>9} {:>9}",
            tier_name(t.tier),
            t.bytes,
            t.capacity_bytes,
            fill,
            t.chunks,
            t.hits,
            t.misses,
            rate,
            t.evictions,
            segs,
            seg_live
        );
    }
    Ok(())
}

fn tier_name(v: i32) -> &'static str {
    match Tier::try_from(v) {
        Ok(Tier::Ram) => "ram",
        Ok(Tier::Nvme) => "nvme",
        _ => "?",
    }
}
