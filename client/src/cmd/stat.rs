//! `kvault stat`.

use clap::Args;
use kvault_client::Tier;

use super::ServerArgs;

#[derive(Debug, Args)]
pub struct StatArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn stat(a: StatArgs) -> anyhow::Result<()> {
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
