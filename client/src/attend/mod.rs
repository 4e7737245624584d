//! Attention offload, client side: decode attention computed by the
//! servers that hold a prefix's KV, merged exactly with the node's own part.
//!
//! [`AttendConn`] is one `Attend` stream to one server: open sessions on
//! chunk ranges, send batched steps, get partials back. [`Offload`] spans
//! several servers: a prefix's chunks may be spread over them in disjoint
//! chunk ranges; [`Offload::attend`] fans a batch of queries out to every
//! server that covers part of each query's range (one message per server),
//! and merges their partials with an optional local partial
//! ([`merge::merge`]). Start at [`Offload::open_prefix`].

pub mod merge;
#[cfg(feature = "model")]
pub mod model;

use std::ops::Range;

use kvault_proto::attend::{f32s_from_le, f32s_to_le};
use kvault_proto::pb::{self, attend_request, attend_response};
use kvault_proto::{ChunkKey, Layout};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::client::Client;
use crate::error::{ClientError, Result};

pub use merge::{MergeError, Partial, local_partial, merge};
pub use pb::AttendFormat;

/// Query bytes per step message: well under the 4 MiB message limit.
const STEP_BYTES: usize = 2 << 20;

/// What a server holds of an opened session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Tokens the session covers.
    pub tokens: usize,
    /// Server memory it holds.
    pub bytes: u64,
}

/// One query token of one session and layer.
#[derive(Debug, Clone)]
pub struct Query {
    /// The session (as opened on this stream).
    pub session_id: u64,
    /// Layer.
    pub layer: u32,
    /// Query heads.
    pub q_heads: u32,
    /// Dimension of a head.
    pub head_dim: u32,
    /// Softmax scale.
    pub scale: f32,
    /// Tokens of the session to cover.
    pub range: Range<u32>,
    /// Post-RoPE query, `[q_heads][head_dim]`.
    pub q: Vec<f32>,
}

/// An `Attend` stream to one server.
pub struct AttendConn {
    tx: mpsc::Sender<pb::AttendRequest>,
    rx: tonic::Streaming<pb::AttendResponse>,
    next_step: u64,
    /// Wire bytes of the last step, both ways (encoded message lengths).
    pub last_wire: (u64, u64),
}

fn item_error(e: &pb::AttendError) -> ClientError {
    ClientError::from(Status::new(Code::from(e.code), e.message.clone()))
}

impl AttendConn {
    /// Opens the stream.
    pub async fn connect(client: &Client) -> Result<AttendConn> {
        let (tx, rx) = mpsc::channel(4);
        let rx = client.attend_raw(ReceiverStream::new(rx)).await?;
        Ok(AttendConn {
            tx,
            rx,
            next_step: 1,
            last_wire: (0, 0),
        })
    }

    async fn call(&mut self, msg: attend_request::Msg) -> Result<attend_response::Msg> {
        self.tx
            .send(pb::AttendRequest { msg: Some(msg) })
            .await
            .map_err(|_| ClientError::Unavailable("attend stream closed".into()))?;
        match self.rx.message().await? {
            Some(pb::AttendResponse { msg: Some(m) }) => Ok(m),
            Some(_) => Err(ClientError::Protocol("empty attend response".into())),
            None => Err(ClientError::Unavailable("attend stream ended".into())),
        }
    }

    /// Opens session `session_id` over the chunks `keys` (in token order).
    pub async fn open(
        &mut self,
        session_id: u64,
        layout: &Layout,
        keys: &[ChunkKey],
        format: AttendFormat,
    ) -> Result<Opened> {
        let open = pb::AttendOpen {
            session_id,
            namespace: Some(layout.to_proto()),
            keys: keys.iter().map(|k| bytes::Bytes::copy_from_slice(&k.0)).collect(),
            format: format as i32,
        };
        match self.call(attend_request::Msg::Open(open)).await? {
            attend_response::Msg::Opened(o) if o.session_id == session_id => match o.error {
                Some(e) => Err(item_error(&e)),
                None => Ok(Opened {
                    tokens: o.tokens as usize,
                    bytes: o.bytes,
                }),
            },
            other => Err(ClientError::Protocol(format!(
                "open of session {session_id} answered {other:?}"
            ))),
        }
    }

    /// Closes a session; false when it was not open.
    pub async fn close(&mut self, session_id: u64) -> Result<bool> {
        match self
            .call(attend_request::Msg::Close(pb::AttendClose { session_id }))
            .await?
        {
            attend_response::Msg::Closed(c) if c.session_id == session_id => Ok(c.closed),
            other => Err(ClientError::Protocol(format!("close answered {other:?}"))),
        }
    }

    /// Sends queries (in as few messages as the size limit allows) and
    /// returns one result per query, in order.
    pub async fn step(&mut self, queries: &[Query]) -> Result<Vec<Result<Partial>>> {
        use prost::Message;
        let mut out = Vec::with_capacity(queries.len());
        self.last_wire = (0, 0);
        let mut i = 0;
        while i < queries.len() {
            let mut j = i;
            let mut bytes = 0;
            while j < queries.len() && (j == i || bytes + queries[j].q.len() * 4 <= STEP_BYTES) {
                bytes += queries[j].q.len() * 4;
                j += 1;
            }
            let batch = &queries[i..j];
            let step_id = self.next_step;
            self.next_step += 1;
            let step = pb::AttendStep {
                step_id,
                queries: batch
                    .iter()
                    .map(|q| pb::AttendQuery {
                        session_id: q.session_id,
                        layer: q.layer,
                        q_heads: q.q_heads,
                        head_dim: q.head_dim,
                        scale: q.scale,
                        start: q.range.start,
                        end: q.range.end,
                        q: f32s_to_le(&q.q),
                    })
                    .collect(),
            };
            let req = attend_request::Msg::Step(step);
            self.last_wire.0 += pb::AttendRequest {
                msg: Some(req.clone()),
            }
            .encoded_len() as u64;
            let r = match self.call(req).await? {
                attend_response::Msg::Step(r) if r.step_id == step_id && r.partials.len() == batch.len() => r,
                other => {
                    return Err(ClientError::Protocol(format!(
                        "step {step_id} of {} queries answered {other:?}",
                        batch.len()
                    )));
                }
            };
            self.last_wire.1 += pb::AttendResponse {
                msg: Some(attend_response::Msg::Step(r.clone())),
            }
            .encoded_len() as u64;
            for (q, p) in batch.iter().zip(r.partials) {
                out.push(partial_from_wire(q, p));
            }
            i = j;
        }
        Ok(out)
    }
}

fn partial_from_wire(q: &Query, p: pb::AttendPartial) -> Result<Partial> {
    if let Some(e) = p.error {
        return Err(item_error(&e));
    }
    let (h, d) = (q.q_heads as usize, q.head_dim as usize);
    let o = f32s_from_le(&p.o).ok_or_else(|| ClientError::Protocol("partial o is not whole f32s".into()))?;
    Partial::new(h, d, o, p.lse).map_err(|e| ClientError::Protocol(format!("partial: {e}")))
}

/// Which chunks of a prefix one server covers.
#[derive(Debug, Clone)]
pub struct Shard {
    /// Index of the server in the [`Offload`].
    pub server: usize,
    /// Chunk indices `[start, end)` of the prefix it holds.
    pub chunks: Range<usize>,
}

/// A handle on a prefix opened with [`Offload::open_prefix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixId(usize);

struct Part {
    server: usize,
    session_id: u64,
    /// Absolute tokens of the prefix this session covers.
    tokens: Range<usize>,
}

struct PrefixState {
    layout: Layout,
    tokens: usize,
    parts: Vec<Part>,
}

/// One attention request against an opened prefix.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The prefix.
    pub prefix: PrefixId,
    /// Layer.
    pub layer: u32,
    /// Post-RoPE query `[q_heads][head_dim]`.
    pub q: &'a [f32],
    /// Query heads.
    pub q_heads: usize,
    /// Softmax scale.
    pub scale: f32,
    /// Tokens of the prefix to cover (absolute positions).
    pub range: Range<usize>,
    /// The node's own partial over tokens outside the prefix, merged in.
    pub local: Option<&'a Partial>,
}

/// Attention offloaded to several servers, each holding part of the prefixes.
pub struct Offload {
    conns: Vec<AttendConn>,
    prefixes: Vec<PrefixState>,
    next_session: u64,
}

impl Offload {
    /// One `Attend` stream per server.
    pub async fn connect(servers: &[Client]) -> Result<Offload> {
        let mut conns = Vec::with_capacity(servers.len());
        for c in servers {
            conns.push(AttendConn::connect(c).await?);
        }
        Ok(Offload {
            conns,
            prefixes: Vec::new(),
            next_session: 1,
        })
    }

    /// Wire bytes (sent, received) of the last [`Offload::attend`], over all servers.
    pub fn last_wire(&self) -> (u64, u64) {
        self.conns
            .iter()
            .fold((0, 0), |(a, b), c| (a + c.last_wire.0, b + c.last_wire.1))
    }

    /// Opens a prefix of `tokens` tokens with chunk keys `keys`, spread over
    /// the servers as `shards` (disjoint chunk ranges that together cover
    /// every key). Fails with `NotFound` when a server lacks a chunk.
    pub async fn open_prefix(
        &mut self,
        layout: &Layout,
        keys: &[ChunkKey],
        tokens: usize,
        shards: &[Shard],
        format: AttendFormat,
    ) -> Result<PrefixId> {
        let ct = layout.chunk_tokens as usize;
        if keys.len() != tokens.div_ceil(ct) {
            return Err(ClientError::InvalidArgument(format!(
                "{} keys do not name {tokens} tokens in chunks of {ct}",
                keys.len()
            )));
        }
        let mut sorted: Vec<&Shard> = shards.iter().collect();
        sorted.sort_by_key(|s| s.chunks.start);
        let mut next = 0;
        for s in &sorted {
            if s.chunks.start != next || s.chunks.end <= s.chunks.start || s.server >= self.conns.len() {
                return Err(ClientError::InvalidArgument(format!(
                    "shards must be non-empty, disjoint chunk ranges on known servers covering 0..{}; got {:?}",
                    keys.len(),
                    shards
                )));
            }
            next = s.chunks.end;
        }
        if next != keys.len() {
            return Err(ClientError::InvalidArgument(format!(
                "shards cover chunks 0..{next} of 0..{}",
                keys.len()
            )));
        }
        let mut parts = Vec::with_capacity(sorted.len());
        for s in sorted {
            let session_id = self.next_session;
            self.next_session += 1;
            let t0 = s.chunks.start * ct;
            let t1 = (s.chunks.end * ct).min(tokens);
            let opened = self.conns[s.server]
                .open(session_id, layout, &keys[s.chunks.clone()], format)
                .await?;
            if opened.tokens != t1 - t0 {
                return Err(ClientError::Protocol(format!(
                    "server {} holds {} tokens of chunks {:?}, expected {}",
                    s.server,
                    opened.tokens,
                    s.chunks,
                    t1 - t0
                )));
            }
            parts.push(Part {
                server: s.server,
                session_id,
                tokens: t0..t1,
            });
        }
        self.prefixes.push(PrefixState {
            layout: layout.clone(),
            tokens,
            parts,
        });
        Ok(PrefixId(self.prefixes.len() - 1))
    }

    /// Tokens of an opened prefix.
    pub fn tokens(&self, p: PrefixId) -> usize {
        self.prefixes.get(p.0).map_or(0, |s| s.tokens)
    }

    /// Attention for a batch of requests: one step message per server
    /// covering everything it holds of every request, then an exact merge
    /// per request of the servers' partials and the local one.
    pub async fn attend(&mut self, reqs: &[Request<'_>]) -> Result<Vec<Partial>> {
        // Per server: the queries to send and, for each, the request it serves.
        let mut per: Vec<(Vec<Query>, Vec<usize>)> =
            (0..self.conns.len()).map(|_| Default::default()).collect();
        for (ri, r) in reqs.iter().enumerate() {
            let p = self
                .prefixes
                .get(r.prefix.0)
                .ok_or_else(|| ClientError::InvalidArgument(format!("unknown prefix {:?}", r.prefix)))?;
            let d = p.layout.head_dim as usize;
            if r.range.start > r.range.end || r.range.end > p.tokens {
                return Err(ClientError::InvalidArgument(format!(
                    "range {:?} is outside the prefix's {} tokens",
                    r.range, p.tokens
                )));
            }
            if r.q.len() != r.q_heads * d {
                return Err(ClientError::InvalidArgument(format!(
                    "query of {} values is not {} heads x {d}",
                    r.q.len(),
                    r.q_heads
                )));
            }
            for part in &p.parts {
                let a = r.range.start.max(part.tokens.start);
                let b = r.range.end.min(part.tokens.end);
                if a >= b {
                    continue;
                }
                per[part.server].0.push(Query {
                    session_id: part.session_id,
                    layer: r.layer,
                    q_heads: r.q_heads as u32,
                    head_dim: d as u32,
                    scale: r.scale,
                    range: (a - part.tokens.start) as u32..(b - part.tokens.start) as u32,
                    q: r.q.to_vec(),
                });
                per[part.server].1.push(ri);
            }
        }
        let futs = self
            .conns
            .iter_mut()
            .zip(per.iter())
            .map(|(c, (qs, _))| async move {
                if qs.is_empty() {
                    c.last_wire = (0, 0);
                    Ok(Vec::new())
                } else {
                    c.step(qs).await
                }
            });
        let answers = futures::future::try_join_all(futs).await?;
        let mut got: Vec<Vec<Partial>> = reqs.iter().map(|_| Vec::new()).collect();
        for (ans, (_, owners)) in answers.into_iter().zip(per) {
            for (a, ri) in ans.into_iter().zip(owners) {
                got[ri].push(a?);
            }
        }
        reqs.iter()
            .zip(got)
            .map(|(r, mut parts)| {
                let d = self.prefixes[r.prefix.0].layout.head_dim as usize;
                if let Some(l) = r.local {
                    parts.push(l.clone());
                }
                if parts.is_empty() {
                    return Ok(Partial::empty(r.q_heads, d));
                }
                let refs: Vec<&Partial> = parts.iter().collect();
                merge(&refs).map_err(|e| ClientError::InvalidArgument(format!("merging partials: {e}")))
            })
            .collect()
    }
}
