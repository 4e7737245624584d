//! A circuit breaker per node: after a run of failures the node is treated
//! as down and calls to it fail at once (a miss, not a hang); after a
//! cool-down one probe call is let through, and its success closes the
//! breaker again. This is how clients and sidecars keep misses fast while a
//! server is gone and recover without a restart when it returns.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Breaker position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls fail fast until the cool-down ends.
    Open,
    /// One probe call is in flight; others fail fast.
    HalfOpen,
}

impl BreakerState {
    /// Gauge value: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

struct Inner {
    state: BreakerState,
    failures: u32,
    opened_at: Option<Instant>,
}

/// One node's breaker.
pub struct Breaker {
    threshold: u32,
    cool_down: Duration,
    inner: Mutex<Inner>,
}

/// Whether a call may go to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead.
    Yes,
    /// Go ahead: this call is the probe after a cool-down.
    Probe,
    /// Fail fast.
    No,
}

impl Breaker {
    /// Opens after `threshold` consecutive failures; probes every `cool_down`.
    pub fn new(threshold: u32, cool_down: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cool_down,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                opened_at: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain fields, no invariant spans an unwind: a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current position (an open breaker past its cool-down still reads open
    /// until a call probes it).
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Asks to make a call.
    pub fn admit(&self) -> Admit {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Admit {
        let mut g = self.lock();
        match g.state {
            BreakerState::Closed => Admit::Yes,
            BreakerState::HalfOpen => Admit::No,
            BreakerState::Open => {
                if g.opened_at
                    .is_some_and(|t| now.duration_since(t) >= self.cool_down)
                {
                    g.state = BreakerState::HalfOpen;
                    Admit::Probe
                } else {
                    Admit::No
                }
            }
        }
    }

    /// Records a successful call: closes the breaker.
    pub fn success(&self) {
        let mut g = self.lock();
        g.state = BreakerState::Closed;
        g.failures = 0;
        g.opened_at = None;
    }

    /// Records a failed call (unreachable or timed out; not a refusal of the
    /// request, which says the node is up). Returns true when this
    /// failure opened the breaker.
    pub fn failure(&self) -> bool {
        self.failure_at(Instant::now())
    }

    fn failure_at(&self, now: Instant) -> bool {
        let mut g = self.lock();
        g.failures = g.failures.saturating_add(1);
        let open = match g.state {
            BreakerState::HalfOpen => true,
            BreakerState::Closed => g.failures >= self.threshold,
            BreakerState::Open => false,
        };
        if open {
            g.state = BreakerState::Open;
            g.opened_at = Some(now);
        }
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_fails_fast() {
        let b = Breaker::new(3, Duration::from_secs(1));
        let t = Instant::now();
        assert!(!b.failure_at(t));
        assert!(!b.failure_at(t));
        assert_eq!(b.admit_at(t), Admit::Yes);
        assert!(b.failure_at(t));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit_at(t + Duration::from_millis(500)), Admit::No);
    }

    #[test]
    fn success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(1));
        let t = Instant::now();
        b.failure_at(t);
        b.success();
        assert!(!b.failure_at(t));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn one_probe_after_cool_down_then_close_or_reopen() {
        let b = Breaker::new(1, Duration::from_millis(100));
        let t = Instant::now();
        b.failure_at(t);
        let later = t + Duration::from_millis(150);
        assert_eq!(b.admit_at(later), Admit::Probe);
        // Others wait for the probe's outcome.
        assert_eq!(b.admit_at(later), Admit::No);
        assert!(b.failure_at(later), "a failed probe reopens");
        assert_eq!(b.admit_at(later + Duration::from_millis(50)), Admit::No);
        assert_eq!(b.admit_at(later + Duration::from_millis(150)), Admit::Probe);
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit_at(later), Admit::Yes);
    }
}
