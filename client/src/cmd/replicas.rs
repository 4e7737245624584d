//! `kvault replicas`: the replication factor of a namespace, kept in etcd so
//! that every client and sidecar of the cluster applies the same one.

use anyhow::{Context, bail};
use clap::Args;
use kvault_membership::{Etcd, Keys};

#[derive(Debug, Args)]
pub struct ReplicasArgs {
    /// etcd endpoints (comma-separated).
    #[arg(long, env = "KVAULT_ETCD")]
    pub etcd: String,
    /// The cluster's key prefix in etcd.
    #[arg(long, env = "KVAULT_ETCD_PREFIX", default_value = "/kvault")]
    pub etcd_prefix: String,
    /// The namespace's model id.
    #[arg(long)]
    pub model_id: String,
    /// Store every chunk of the namespace on this many nodes (reads use any of them).
    #[arg(long, conflicts_with = "clear")]
    pub set: Option<u32>,
    /// Back to the clients' default (one copy).
    #[arg(long)]
    pub clear: bool,
}

pub async fn run(a: ReplicasArgs) -> anyhow::Result<()> {
    let etcd = Etcd::connect(&a.etcd)?;
    let key = Keys::new(&a.etcd_prefix).replica(&a.model_id);
    if let Some(n) = a.set {
        if n == 0 || n > kvault_membership::record::MAX_REPLICAS {
            bail!(
                "--set {n}: replicas must be 1..={}",
                kvault_membership::record::MAX_REPLICAS
            );
        }
        etcd.put(&key, n.to_string().into_bytes(), 0)
            .await
            .with_context(|| format!("writing {key}"))?;
    } else if a.clear {
        etcd.delete(&key)
            .await
            .with_context(|| format!("deleting {key}"))?;
    }
    let (kvs, _) = etcd
        .get_prefix(&key)
        .await
        .with_context(|| format!("reading {key}"))?;
    match kvs.iter().find(|kv| kv.key == key) {
        Some(kv) => println!("{} replicas={}", a.model_id, String::from_utf8_lossy(&kv.value)),
        None => println!("{} replicas=default", a.model_id),
    }
    Ok(())
}
