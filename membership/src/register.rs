//! A server's membership: its record in etcd under a lease kept alive in
//! the background, re-created when the lease is lost, revoked on shutdown.

use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::etcd::Etcd;
use crate::record::{Keys, NodeRecord};
use crate::{MembershipError, Result};

/// How a server registers.
#[derive(Debug, Clone)]
pub struct RegisterConfig {
    /// etcd endpoints (comma-separated).
    pub etcd: String,
    /// Cluster prefix in etcd.
    pub prefix: String,
    /// What to register.
    pub record: NodeRecord,
    /// Lease time to live: how long after the server's death its record
    /// stays. Refreshed every third of it.
    pub ttl: Duration,
}

/// A running registration. Dropping it stops the keep-alive without
/// revoking (the record then expires with its lease); [`Registration::leave`]
/// revokes at once.
pub struct Registration {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    state: watch::Receiver<bool>,
}

enum Ended {
    /// Asked to stop; the lease to revoke.
    Stop(i64),
}

impl Registration {
    /// Starts registering in the background. Never waits on etcd: a server
    /// must come up (and serve direct clients) while etcd is down, and joins
    /// the cluster once etcd answers.
    pub fn start(cfg: RegisterConfig) -> Result<Registration> {
        cfg.record
            .validate()
            .map_err(|reason| MembershipError::BadRecord {
                key: Keys::new(&cfg.prefix).node(&cfg.record.id),
                reason,
            })?;
        let etcd = Etcd::connect(&cfg.etcd)?;
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let (state_tx, state) = watch::channel(false);
        let task = tokio::spawn(async move {
            let key = Keys::new(&cfg.prefix).node(&cfg.record.id);
            let mut backoff = Duration::from_millis(100);
            loop {
                match session(&etcd, &cfg, &key, &state_tx, &mut stop_rx).await {
                    Ok(Ended::Stop(lease)) => {
                        if let Err(e) = etcd.revoke(lease).await {
                            warn!(error = %e, "could not revoke the membership lease; it will expire");
                        } else {
                            info!(key = %key, "left the cluster");
                        }
                        return;
                    }
                    Err(e) => {
                        let _ = state_tx.send(false);
                        warn!(key = %key, error = %e, "cluster registration lost; retrying");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut stop_rx => return,
                }
                backoff = (backoff * 2).min(cfg.ttl / 3).max(Duration::from_millis(100));
            }
        });
        Ok(Registration {
            stop: Some(stop_tx),
            task: Some(task),
            state,
        })
    }

    /// Whether the record is in etcd under a live lease (as last seen).
    pub fn is_registered(&self) -> bool {
        *self.state.borrow()
    }

    /// Waits until registered, or `timeout`; whether it is.
    pub async fn wait_registered(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.state.wait_for(|r| *r))
            .await
            .is_ok()
    }

    /// Leaves the cluster: revokes the lease (the record goes at once).
    pub async fn leave(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            // Revocation is bounded by the etcd call timeout.
            let _ = t.await;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// One lease's life: grant, put the record, refresh until lost or stopped.
async fn session(
    etcd: &Etcd,
    cfg: &RegisterConfig,
    key: &str,
    state: &watch::Sender<bool>,
    stop: &mut oneshot::Receiver<()>,
) -> Result<Ended> {
    let lease = etcd.grant(cfg.ttl).await?;
    let mut ka = etcd.keep_alive(lease).await?;
    etcd.put(key, cfg.record.to_json(), lease).await?;
    let _ = state.send(true);
    info!(key = %key, lease = format_args!("{lease:x}"), ttl_s = cfg.ttl.as_secs(), "registered in the cluster");
    let period = (cfg.ttl / 3).max(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = &mut *stop => return Ok(Ended::Stop(lease)),
        }
        ka.refresh().await?;
    }
}
