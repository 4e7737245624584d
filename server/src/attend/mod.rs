//! Storage-side decode attention: the `Attend` stream.
//!
//! A node opens a session on a stored prefix (or the part of it this server
//! holds); the chunks are fetched from the store and decoded once into an
//! attention-ready layout ([`session`]). Each step then carries queries of
//! any sessions and layers; workers ([`kernel`]) answer each with the
//! normalised partial output and its log-sum-exp, which the node merges
//! with the partials of other servers and its own recent tokens.
//!
//! Errors of one open or query go back in that item's slot: the stream and
//! its other sessions keep working. Only a broken stream protocol (an empty
//! message) ends the stream.

pub mod kernel;
pub mod layout;
pub mod session;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvault_proto::Layout;
use kvault_proto::attend::{f32s_from_le, f32s_to_le};
use kvault_proto::model::keys_from_wire;
use kvault_proto::pb::{self, attend_request, attend_response};
use rayon::prelude::*;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use crate::metrics::Metrics;
use crate::store::Store;
use crate::tier::{ChunkId, Tenant};

pub use session::{Format, Session, SessionTable};

use kernel::State;

/// Why one open or query failed. Sent back in its slot as a gRPC code and message.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum AttendError {
    /// The request is malformed or does not fit the session.
    #[error("{0}")]
    InvalidArgument(String),
    /// The prefix, a chunk of it, or the session is not there.
    #[error("{0}")]
    NotFound(String),
    /// The session memory budget is spent.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A stored chunk could not be decoded.
    #[error("{0}")]
    DataLoss(String),
    /// The server failed (a task died).
    #[error("{0}")]
    Internal(String),
}

impl AttendError {
    /// The gRPC code this error travels as.
    pub fn code(&self) -> Code {
        match self {
            AttendError::InvalidArgument(_) => Code::InvalidArgument,
            AttendError::NotFound(_) => Code::NotFound,
            AttendError::ResourceExhausted(_) => Code::ResourceExhausted,
            AttendError::DataLoss(_) => Code::DataLoss,
            AttendError::Internal(_) => Code::Internal,
        }
    }

    fn to_wire(&self) -> pb::AttendError {
        pb::AttendError {
            code: self.code() as i32,
            message: self.to_string(),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            AttendError::InvalidArgument(_) => "invalid_argument",
            AttendError::NotFound(_) => "not_found",
            AttendError::ResourceExhausted(_) => "resource_exhausted",
            AttendError::DataLoss(_) => "data_loss",
            AttendError::Internal(_) => "internal",
        }
    }
}

/// Most query heads one query may carry.
const MAX_Q_HEADS: u32 = 1024;
/// Tokens of one worker task at least: smaller pieces cost more in merging than they gain.
/// A multiple of the key group, as every piece boundary is.
const MIN_TASK_TOKENS: usize = 4 * layout::KEY_GROUP;
/// Worker tasks a step aims at per thread.
const TASKS_PER_THREAD: usize = 16;

/// The attention side of the server: sessions and the stream handler.
pub struct Attend {
    store: Arc<Store>,
    table: Arc<SessionTable>,
    metrics: Arc<Metrics>,
    next_stream: AtomicU64,
}

/// A query checked against its session, ready for the workers.
struct Prepared {
    session: Arc<Session>,
    layer: usize,
    q_heads: usize,
    scale: f32,
    start: usize,
    end: usize,
    q: Vec<f32>,
}

impl Attend {
    /// Sessions over `store`, at most `budget` bytes of them, dropped after `idle` unused.
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>, budget: u64, idle: Duration) -> Attend {
        Attend {
            store,
            table: Arc::new(SessionTable::new(budget, idle)),
            metrics,
            next_stream: AtomicU64::new(1),
        }
    }

    /// The session table (for the expiry sweeper and tests).
    pub fn table(&self) -> &Arc<SessionTable> {
        &self.table
    }

    /// Drops idle sessions and refreshes the gauges.
    pub fn sweep(&self) {
        let n = self.table.expire();
        if n > 0 {
            self.metrics.attend_expired.inc_by(n as u64);
        }
        self.refresh_gauges();
    }

    fn refresh_gauges(&self) {
        let (n, bytes) = self.table.usage();
        self.metrics.attend_sessions.set(n as i64);
        self.metrics.attend_session_bytes.set(bytes as i64);
    }

    /// Serves one `Attend` stream: one response per request, in order.
    pub fn serve(
        self: &Arc<Self>,
        tenant: Tenant,
        mut input: Streaming<pb::AttendRequest>,
    ) -> ReceiverStream<Result<pb::AttendResponse, Status>> {
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            loop {
                let msg = match input.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "attend stream broke");
                        break;
                    }
                };
                let out = match msg.msg {
                    Some(attend_request::Msg::Open(o)) => {
                        attend_response::Msg::Opened(this.open(&tenant, stream, o).await)
                    }
                    Some(attend_request::Msg::Step(s)) => {
                        attend_response::Msg::Step(this.step(stream, s).await)
                    }
                    Some(attend_request::Msg::Close(c)) => {
                        let closed = this.table.remove((stream, c.session_id));
                        this.refresh_gauges();
                        attend_response::Msg::Closed(pb::AttendClosed {
                            session_id: c.session_id,
                            closed,
                        })
                    }
                    None => {
                        let _ = tx
                            .send(Err(Status::invalid_argument(
                                "attend message must hold an open, a step or a close",
                            )))
                            .await;
                        break;
                    }
                };
                let resp = pb::AttendResponse { msg: Some(out) };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
            this.table.remove_stream(stream);
            this.refresh_gauges();
        });
        ReceiverStream::new(rx)
    }

    async fn open(&self, tenant: &Tenant, stream: u64, o: pb::AttendOpen) -> pb::AttendOpened {
        let id = o.session_id;
        let t = Instant::now();
        let r = self.do_open(tenant, stream, o).await;
        self.refresh_gauges();
        match r {
            Ok(s) => {
                self.metrics.attend_opens.inc();
                tracing::debug!(
                    session = id,
                    tokens = s.tokens,
                    bytes = s.bytes(),
                    ms = t.elapsed().as_millis() as u64,
                    "attention session opened"
                );
                pb::AttendOpened {
                    session_id: id,
                    tokens: s.tokens as u32,
                    bytes: s.bytes(),
                    error: None,
                }
            }
            Err(e) => {
                self.metrics
                    .attend_errors
                    .with_label_values(&["open", e.label()])
                    .inc();
                tracing::debug!(session = id, error = %e, "attention open refused");
                pb::AttendOpened {
                    session_id: id,
                    tokens: 0,
                    bytes: 0,
                    error: Some(e.to_wire()),
                }
            }
        }
    }

    async fn do_open(
        &self,
        tenant: &Tenant,
        stream: u64,
        o: pb::AttendOpen,
    ) -> Result<Arc<Session>, AttendError> {
        let bad = |e: String| AttendError::InvalidArgument(e);
        let layout = Layout::from_wire(o.namespace).map_err(|e| bad(e.to_string()))?;
        match self.store.namespaces().check(&layout) {
            Ok(true) => {}
            Ok(false) => {
                return Err(AttendError::NotFound(format!(
                    "model id {:?} has no stored chunks on this server",
                    layout.model_id
                )));
            }
            Err(e) => return Err(AttendError::InvalidArgument(e.to_string())),
        }
        let keys = keys_from_wire(&o.keys).map_err(|e| bad(e.to_string()))?;
        if keys.is_empty() {
            return Err(bad("an attention session needs at least one chunk key".into()));
        }
        let format = match pb::AttendFormat::try_from(o.format) {
            Ok(pb::AttendFormat::Unspecified | pb::AttendFormat::F16) => Format::F16,
            Ok(pb::AttendFormat::Int8) => Format::Int8,
            Ok(pb::AttendFormat::K8v4) => Format::K8V4,
            Ok(pb::AttendFormat::K4v4) => Format::K4V4,
            Err(_) => return Err(bad(format!("unknown attention format {}", o.format))),
        };
        // Reserve for full chunks before fetching: the real size is known after parsing.
        let most = format.session_bytes(&layout, keys.len() as u64 * layout.chunk_tokens as u64);
        let key = (stream, o.session_id);
        self.table.reserve(key, most)?;
        let built = self.fetch_and_build(tenant, &layout, &keys, format).await;
        match built {
            Ok(s) => {
                let s = Arc::new(s);
                self.table.install(key, s.clone());
                Ok(s)
            }
            Err(e) => {
                self.table.remove(key);
                Err(e)
            }
        }
    }

    async fn fetch_and_build(
        &self,
        tenant: &Tenant,
        layout: &Layout,
        keys: &[kvault_proto::ChunkKey],
        format: Format,
    ) -> Result<Session, AttendError> {
        let ns = layout.namespace_id();
        let mut blobs = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            let id = ChunkId {
                tenant: tenant.clone(),
                key: *key,
            };
            let got = self
                .store
                .get(&id, &ns)
                .await
                .map_err(|e| AttendError::Internal(format!("reading chunk {i} ({key}): {e}")))?;
            match got {
                Some((_, c)) => blobs.push(c.blob),
                None => {
                    return Err(AttendError::NotFound(format!(
                        "chunk {i} ({key}) of the prefix is not stored on this server (never put, or evicted)"
                    )));
                }
            }
        }
        let layout = layout.clone();
        tokio::task::spawn_blocking(move || Session::build(&layout, &blobs, format))
            .await
            .map_err(|e| AttendError::Internal(format!("decode task failed: {e}")))?
    }

    fn prepare(&self, stream: u64, q: pb::AttendQuery) -> Result<Prepared, AttendError> {
        let bad = AttendError::InvalidArgument;
        let session = self.table.get((stream, q.session_id)).ok_or_else(|| {
            AttendError::NotFound(format!(
                "session {} is not open on this stream (never opened, closed, or expired after idling)",
                q.session_id
            ))
        })?;
        let s = &session;
        if q.layer as usize >= s.layers {
            return Err(bad(format!(
                "layer {} outside the model's {} layers",
                q.layer, s.layers
            )));
        }
        if q.head_dim as usize != s.head_dim {
            return Err(bad(format!(
                "head_dim {} does not match the prefix's {}",
                q.head_dim, s.head_dim
            )));
        }
        if q.q_heads == 0 || q.q_heads > MAX_Q_HEADS || !(q.q_heads as usize).is_multiple_of(s.kv_heads) {
            return Err(bad(format!(
                "q_heads {} must be a positive multiple of the prefix's {} KV heads (at most {MAX_Q_HEADS})",
                q.q_heads, s.kv_heads
            )));
        }
        let want = q.q_heads as usize * s.head_dim * 4;
        if q.q.len() != want {
            return Err(bad(format!(
                "q holds {} bytes; {} heads x {} dims of f32 are {want}",
                q.q.len(),
                q.q_heads,
                s.head_dim
            )));
        }
        if !q.scale.is_finite() || q.scale <= 0.0 {
            return Err(bad(format!(
                "softmax scale {} must be finite and positive",
                q.scale
            )));
        }
        if q.start > q.end || q.end as usize > s.tokens {
            return Err(bad(format!(
                "token range {}..{} is outside the session's {} tokens",
                q.start, q.end, s.tokens
            )));
        }
        let qv = f32s_from_le(&q.q).ok_or_else(|| bad("q is not whole f32 values".into()))?;
        if let Some(i) = qv.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!(
                "query element {i} (head {}) is not finite",
                i / s.head_dim
            )));
        }
        Ok(Prepared {
            session,
            layer: q.layer as usize,
            q_heads: q.q_heads as usize,
            scale: q.scale,
            start: q.start as usize,
            end: q.end as usize,
            q: qv,
        })
    }

    async fn step(&self, stream: u64, s: pb::AttendStep) -> pb::AttendStepResult {
        let t = Instant::now();
        let n = s.queries.len();
        let mut slots: Vec<Result<Prepared, AttendError>> =
            s.queries.into_iter().map(|q| self.prepare(stream, q)).collect();
        let ready: Vec<(usize, Prepared)> = slots
            .iter_mut()
            .enumerate()
            .filter(|(_, r)| r.is_ok())
            .filter_map(|(i, r)| {
                std::mem::replace(r, Err(AttendError::Internal(String::new())))
                    .ok()
                    .map(|p| (i, p))
            })
            .collect();
        let bytes: u64 = ready
            .iter()
            .map(|(_, p)| p.session.head(p.layer, 0).bytes_read(p.start, p.end) * p.session.kv_heads as u64)
            .sum();
        let computed = tokio::task::spawn_blocking(move || {
            let out = compute(&ready);
            (ready, out)
        })
        .await;
        let mut partials: Vec<Option<pb::AttendPartial>> = vec![None; n];
        match computed {
            Ok((ready, outs)) => {
                for ((i, _), (o, lse)) in ready.iter().zip(outs) {
                    partials[*i] = Some(pb::AttendPartial {
                        o: f32s_to_le(&o),
                        lse,
                        error: None,
                    });
                }
            }
            Err(e) => {
                let err = AttendError::Internal(format!("attention task failed: {e}"));
                for p in partials.iter_mut() {
                    *p = Some(error_partial(&err));
                }
            }
        }
        let mut ok = 0u64;
        let partials = partials
            .into_iter()
            .zip(slots)
            .map(|(p, slot)| match (p, slot) {
                (Some(p), _) => {
                    ok += 1;
                    p
                }
                (None, Err(e)) => {
                    self.metrics
                        .attend_errors
                        .with_label_values(&["query", e.label()])
                        .inc();
                    error_partial(&e)
                }
                (None, Ok(_)) => error_partial(&AttendError::Internal("query was not computed".into())),
            })
            .collect();
        self.metrics.attend_queries.inc_by(ok);
        self.metrics.attend_kv_bytes.inc_by(bytes);
        self.metrics
            .attend_step_seconds
            .observe(t.elapsed().as_secs_f64());
        pb::AttendStepResult {
            step_id: s.step_id,
            partials,
        }
    }
}

fn error_partial(e: &AttendError) -> pb::AttendPartial {
    pb::AttendPartial {
        o: Default::default(),
        lse: Vec::new(),
        error: Some(e.to_wire()),
    }
}

/// Computes every prepared query: `(o[q_heads][head_dim], lse[q_heads])`
/// each. Work is split over (query, KV head, token piece) so that a single
/// long query still uses every core; pieces of one head merge exactly.
fn compute(ready: &[(usize, Prepared)]) -> Vec<(Vec<f32>, Vec<f32>)> {
    let threads = rayon::current_num_threads().max(1);
    let heads_total: usize = ready.iter().map(|(_, p)| p.session.kv_heads).sum();
    // Pieces per (query, head): enough tasks for every thread many times over, so
    // that a step's last tasks (it ends when all do) are short beside the step.
    let want = (TASKS_PER_THREAD * threads).div_ceil(heads_total.max(1));
    let mut tasks = Vec::new();
    for (qi, (_, p)) in ready.iter().enumerate() {
        let len = p.end - p.start;
        // Boundaries on key groups: a piece then quantises each group's query once.
        let piece = len
            .div_ceil(want)
            .next_multiple_of(layout::KEY_GROUP)
            .max(MIN_TASK_TOKENS);
        for h in 0..p.session.kv_heads {
            let mut a = p.start;
            loop {
                let b = ((a / layout::KEY_GROUP + piece / layout::KEY_GROUP) * layout::KEY_GROUP).min(p.end);
                tasks.push((qi, h, a, b));
                if b >= p.end {
                    break;
                }
                a = b;
            }
        }
    }
    let states: Vec<State> = tasks
        .par_iter()
        .map(|&(qi, h, a, b)| {
            let p = &ready[qi].1;
            let d = p.session.head_dim;
            let g = p.q_heads / p.session.kv_heads;
            let mut st = State::new(g, d);
            kernel::attend(
                p.session.head(p.layer, h),
                &p.q[h * g * d..(h + 1) * g * d],
                p.scale,
                a,
                b,
                &mut st,
            );
            st
        })
        .collect();
    let mut out: Vec<(Vec<f32>, Vec<f32>)> = ready
        .iter()
        .map(|(_, p)| (vec![0f32; p.q_heads * p.session.head_dim], vec![0f32; p.q_heads]))
        .collect();
    let mut i = 0;
    while i < tasks.len() {
        let (qi, h, ..) = tasks[i];
        let mut st = states[i].clone();
        let mut j = i + 1;
        while j < tasks.len() && tasks[j].0 == qi && tasks[j].1 == h {
            st.merge(&states[j]);
            j += 1;
        }
        let p = &ready[qi].1;
        let (d, g) = (p.session.head_dim, p.q_heads / p.session.kv_heads);
        let (o, lse) = &mut out[qi];
        st.finish(&mut o[h * g * d..(h + 1) * g * d], &mut lse[h * g..(h + 1) * g]);
        i = j;
    }
    out
}
