//! Retries with exponential backoff and jitter, for transient failures only.

use std::future::Future;
use std::time::Duration;

use crate::error::Result;

/// How often and how patiently to retry a transient failure.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// Delay before the first retry; doubled each time.
    pub base_delay: Duration,
    /// Upper bound for one delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        RetryPolicy {
            attempts: 1,
            ..Default::default()
        }
    }

    /// Delay before retry number `n` (0-based): exponential, with up to 50% jitter
    /// so that many clients hitting one restart do not retry in lockstep.
    pub fn delay(&self, n: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << n.min(16));
        let d = exp.min(self.max_delay);
        let jitter = rand::random::<f64>() * 0.5;
        d.mul_f64(1.0 - jitter)
    }

    /// Runs `op` until it succeeds, fails with a non-transient error, or the
    /// attempts are used up. `op` must be idempotent (every kvault call is).
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut n = 0;
        loop {
            match op().await {
                Err(e) if e.is_transient() && n + 1 < self.attempts => {
                    let d = self.delay(n);
                    tracing::debug!(error = %e, attempt = n + 1, delay_ms = d.as_millis() as u64, "transient failure, retrying");
                    tokio::time::sleep(d).await;
                    n += 1;
                }
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ClientError;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn retries_transient_then_succeeds() {
        let calls = AtomicU32::new(0);
        let p = RetryPolicy {
            base_delay: Duration::from_millis(1),
            ..Default::default()
        };
        let r = p
            .run(|| async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(ClientError::Unavailable("down".into()))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn never_retries_a_refusal() {
        let calls = AtomicU32::new(0);
        let r: Result<()> = RetryPolicy::default()
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(ClientError::InvalidArgument("bad shape".into()))
            })
            .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn gives_up_after_attempts() {
        let calls = AtomicU32::new(0);
        let p = RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(1),
            ..Default::default()
        };
        let r: Result<()> = p
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(ClientError::Unavailable("down".into()))
            })
            .await;
        assert!(matches!(r, Err(ClientError::Unavailable(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn delay_is_bounded() {
        let p = RetryPolicy::default();
        for n in 0..40 {
            assert!(p.delay(n) <= p.max_delay);
        }
    }
}
