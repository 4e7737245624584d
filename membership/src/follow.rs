//! Following a cluster's membership: read every record under the prefix,
//! then watch it, and publish each new view. When etcd cannot be reached the
//! last view stays in force, marked stale, until etcd answers again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::Result;
use crate::etcd::{Change, Etcd, Kv, WatchBatch};
use crate::record::{Keys, NodeRecord, parse_replicas};

/// The cluster as the records say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Members {
    /// Live nodes by id.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Replication factor per model id, where set.
    pub replicas: BTreeMap<String, u32>,
}

/// What a follower knows now.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The last membership read from etcd.
    pub members: Arc<Members>,
    /// Why etcd could not be read, while it cannot (the members are then
    /// the last known ones); `None` when up to date.
    pub stale: Option<String>,
    /// Whether etcd has been read at least once.
    pub synced: bool,
    /// Records that were present but invalid (skipped), by key.
    pub bad_records: Vec<String>,
    /// etcd failures seen since the follower started.
    pub errors: u64,
}

/// Follows a cluster prefix in the background; stops when dropped.
pub struct Follower {
    rx: watch::Receiver<View>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Follower {
    /// Starts following `prefix` on `etcd` (comma-separated endpoints).
    pub fn start(etcd: &str, prefix: &str) -> Result<Follower> {
        let etcd = Etcd::connect(etcd)?;
        let keys = Keys::new(prefix);
        let (tx, rx) = watch::channel(View::default());
        let task = tokio::spawn(run(etcd, keys, tx));
        Ok(Follower { rx, task })
    }

    /// The current view.
    pub fn view(&self) -> View {
        self.rx.borrow().clone()
    }

    /// A receiver that sees every new view.
    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.rx.clone()
    }
}

/// Parsed state of the records under a prefix.
struct State {
    keys: Keys,
    raw: BTreeMap<String, Vec<u8>>,
}

impl State {
    fn members(&self) -> (Members, Vec<String>) {
        let mut m = Members::default();
        let mut bad = Vec::new();
        let (nodes, replicas) = (self.keys.nodes(), self.keys.replicas());
        for (k, v) in &self.raw {
            if let Some(id) = k.strip_prefix(&nodes) {
                match NodeRecord::from_json(k, v) {
                    Ok(r) if r.id == id => {
                        m.nodes.insert(r.id.clone(), r);
                    }
                    Ok(r) => {
                        warn!(key = %k, id = %r.id, "node record under another id's key; skipped");
                        bad.push(k.clone());
                    }
                    Err(e) => {
                        warn!(error = %e, "skipping node record");
                        bad.push(k.clone());
                    }
                }
            } else if let Some(model) = k.strip_prefix(&replicas) {
                match parse_replicas(k, v) {
                    Ok(n) => {
                        m.replicas.insert(model.to_string(), n);
                    }
                    Err(e) => {
                        warn!(error = %e, "skipping replication factor");
                        bad.push(k.clone());
                    }
                }
            }
        }
        (m, bad)
    }

    fn apply(&mut self, c: Change) {
        match c {
            Change::Put(Kv { key, value, .. }) => {
                self.raw.insert(key, value);
            }
            Change::Delete(key) => {
                self.raw.remove(&key);
            }
        }
    }
}

async fn run(etcd: Etcd, keys: Keys, tx: watch::Sender<View>) {
    let mut backoff = Duration::from_millis(100);
    let mut state = State {
        keys: keys.clone(),
        raw: BTreeMap::new(),
    };
    loop {
        let err = match follow_once(&etcd, &mut state, &tx).await {
            Ok(reason) => {
                info!(reason = %reason, "re-reading cluster membership");
                backoff = Duration::from_millis(100);
                continue;
            }
            Err(e) => e,
        };
        tx.send_modify(|v| {
            if v.stale.is_none() {
                warn!(error = %err, nodes = v.members.nodes.len(), "etcd unreachable: keeping the last known node set");
            }
            v.stale = Some(err.to_string());
            v.errors += 1;
        });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn publish(state: &State, tx: &watch::Sender<View>) {
    let (members, bad) = state.members();
    tx.send_modify(|v| {
        if *v.members != members {
            v.members = Arc::new(members);
        }
        v.stale = None;
        v.synced = true;
        v.bad_records = bad;
    });
}

/// Reads the prefix and watches it until the watch breaks (`Err`) or must be
/// re-read (`Ok(reason)`).
async fn follow_once(etcd: &Etcd, state: &mut State, tx: &watch::Sender<View>) -> Result<String> {
    let root = state.keys.root();
    let (kvs, revision) = etcd.get_prefix(&root).await?;
    state.raw = kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
    // Open the watch before publishing, so a view marked fresh is followed.
    let mut w = etcd.watch_prefix(&root, revision + 1).await?;
    publish(state, tx);
    loop {
        match w.next().await? {
            WatchBatch::Resync(why) => return Ok(why),
            WatchBatch::Changes { changes, .. } => {
                let changed = !changes.is_empty();
                for c in changes {
                    state.apply(c);
                }
                if changed || tx.borrow().stale.is_some() {
                    publish(state, tx);
                }
            }
        }
    }
}
