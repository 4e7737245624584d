//! Copy-forward: chunks read from a previous owner are written to their
//! current owner in the background, at a bounded rate, so a node that joins
//! fills up gradually instead of being swamped.

use std::sync::Weak;
use std::time::Duration;

use bytes::Bytes;
use kvault_proto::{ChunkKey, Layout};
use std::time::Instant;
use tokio::sync::mpsc;

use super::Inner;

/// One chunk to copy to the current owners that missed it.
pub(crate) struct CopyJob {
    pub layout: Layout,
    pub key: ChunkKey,
    pub blob: Bytes,
    pub targets: Vec<String>,
    pub tenant: Option<String>,
}

/// The queue's sending side.
pub(crate) struct Copier {
    tx: mpsc::Sender<CopyJob>,
}

impl Copier {
    /// A queue of at most `queue` waiting copies.
    pub fn new(queue: usize) -> (Copier, mpsc::Receiver<CopyJob>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        (Copier { tx }, rx)
    }

    /// Queues a copy; false when the queue is full (the copy is dropped: the
    /// chunk stays readable at its previous owner until the grace ends).
    pub fn offer(&self, job: CopyJob) -> bool {
        self.tx.try_send(job).is_ok()
    }
}

/// A token bucket over bytes: at most `rate` per second on average, bursts
/// up to one second's worth (or one chunk, whichever is larger).
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate: rate.max(1) as f64,
            tokens: rate.max(1) as f64,
            at: Instant::now(),
        }
    }

    /// How long to wait before `bytes` may go.
    fn take(&mut self, bytes: usize) -> Duration {
        self.take_at(Instant::now(), bytes)
    }

    fn take_at(&mut self, now: Instant, bytes: usize) -> Duration {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

pub(crate) async fn run(inner: Weak<Inner>, mut rx: mpsc::Receiver<CopyJob>, rate: u64) {
    let mut bucket = Bucket::new(rate);
    while let Some(job) = rx.recv().await {
        let wait = bucket.take(job.blob.len() * job.targets.len());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let Some(me) = inner.upgrade() else { return };
        let routes = me.routes.read().unwrap_or_else(|p| p.into_inner()).clone();
        for id in &job.targets {
            let addr = routes.addr(id).unwrap_or(id);
            let outcome = match me.pool.get(id, addr) {
                Ok(node) => {
                    let (layout, key, blob) = (&job.layout, &job.key, job.blob.clone());
                    me.pool
                        .call(
                            &node,
                            "copy",
                            job.tenant.as_deref(),
                            me.pool.request_timeout(),
                            |c| async move { c.put(layout, key, blob).await },
                        )
                        .await
                }
                Err(e) => Err(super::NodeError::Unreachable {
                    node: id.clone(),
                    message: e.to_string(),
                }),
            };
            match outcome {
                Ok(_) => {
                    me.metrics.copy_forward.with_label_values(&["copied"]).inc();
                    me.metrics.copy_forward_bytes.inc_by(job.blob.len() as u64);
                }
                Err(e) => {
                    tracing::debug!(key = %job.key, node = %id, error = %e, "copy-forward failed");
                    me.metrics.copy_forward.with_label_values(&["failed"]).inc();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Bucket;
    use std::time::Duration;

    #[test]
    fn the_bucket_bounds_the_rate() {
        let mut b = Bucket::new(1000);
        let t = b.at;
        assert_eq!(b.take_at(t, 1000), Duration::ZERO, "one second's burst");
        let w = b.take_at(t, 500);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-6, "{w:?}");
        // Two seconds later: refilled to the cap (one second's worth), not beyond.
        let t2 = t + Duration::from_secs(2);
        assert_eq!(b.take_at(t2, 500), Duration::ZERO);
        assert_eq!(b.take_at(t2, 500), Duration::ZERO);
        assert!(b.take_at(t2, 100) > Duration::ZERO);
    }
}
