//! The model runner's remote attention backed by kvault servers: a prefix
//! opened with [`Offload::open_prefix`] serves the attention over the
//! positions the runner does not hold.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::runtime::Handle;

use super::{Offload, Partial, PrefixId, Request};
use crate::model::{ModelError, RemoteAttention};

/// Wire and step counters of a [`ServerAttention`], readable while the session owns it.
#[derive(Debug, Default)]
pub struct OffloadStats {
    /// Attend step round trips.
    pub steps: AtomicU64,
    /// Bytes sent (encoded step messages).
    pub sent: AtomicU64,
    /// Bytes received.
    pub received: AtomicU64,
}

/// Remote attention over an opened prefix, for [`crate::model::LlamaModel::offloaded_session`].
/// Must run on a multi-thread tokio runtime (it waits on the network from the model's thread).
pub struct ServerAttention {
    off: Offload,
    prefix: PrefixId,
    heads: usize,
    handle: Handle,
    stats: Arc<OffloadStats>,
}

impl ServerAttention {
    /// Wraps an opened prefix for a model with `heads` query heads; call inside the runtime.
    pub fn new(off: Offload, prefix: PrefixId, heads: usize) -> ServerAttention {
        ServerAttention {
            off,
            prefix,
            heads,
            handle: Handle::current(),
            stats: Arc::default(),
        }
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<OffloadStats> {
        self.stats.clone()
    }
}

impl RemoteAttention for ServerAttention {
    fn attend(&mut self, layer: usize, q: &[f32], t: usize, scale: f32) -> Result<Vec<Partial>, ModelError> {
        let per = q.len() / t.max(1);
        if t == 0 || per * t != q.len() || !per.is_multiple_of(self.heads) {
            return Err(ModelError::Remote(format!(
                "{} query values are not {t} tokens of {} heads",
                q.len(),
                self.heads
            )));
        }
        let range = 0..self.off.tokens(self.prefix);
        let reqs: Vec<Request<'_>> = q
            .chunks_exact(per)
            .map(|qt| Request {
                prefix: self.prefix,
                layer: layer as u32,
                q: qt,
                q_heads: self.heads,
                scale,
                range: range.clone(),
                local: None,
            })
            .collect();
        let (handle, off) = (&self.handle, &mut self.off);
        // The model runs on a runtime thread (inside `block_in_place`): wait
        // for the servers without stalling the runtime's other tasks.
        let r = tokio::task::block_in_place(|| handle.block_on(off.attend(&reqs)))
            .map_err(|e| ModelError::Remote(e.to_string()))?;
        let (s, rcv) = self.off.last_wire();
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.sent.fetch_add(s, Ordering::Relaxed);
        self.stats.received.fetch_add(rcv, Ordering::Relaxed);
        Ok(r)
    }
}
