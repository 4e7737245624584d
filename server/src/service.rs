//! The `kvault.v1.KvVault` gRPC service: validates requests at the edge,
//! then calls the [`Store`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use kvault_proto::model::keys_from_wire;
use kvault_proto::pb::kv_vault_server::KvVault;
use kvault_proto::pb::{self, get_response, put_request};
use kvault_proto::{ChunkKey, LayerSpan, Layout, PIECE_BYTES};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::attend::Attend;
use crate::auth::Auth;
use crate::error::ServerError;
use crate::metrics::Metrics;
use crate::store::{Store, verify_chunk};
use crate::tier::{ChunkId, Tenant, TierKind};

/// Shared state of the service.
pub struct KvService {
    store: Arc<Store>,
    attend: Arc<Attend>,
    auth: Arc<Auth>,
    metrics: Arc<Metrics>,
    /// Bounds the bytes of puts being received at once (in KiB permits), so
    /// many concurrent large puts cannot exhaust memory.
    put_budget: Arc<Semaphore>,
    put_budget_kib: u32,
    started: Instant,
}

impl KvService {
    /// A service over `store`; at most `inflight_put_bytes` of bodies are buffered at once.
    pub fn new(
        store: Arc<Store>,
        attend: Arc<Attend>,
        auth: Arc<Auth>,
        metrics: Arc<Metrics>,
        inflight_put_bytes: u64,
    ) -> KvService {
        let kib = (inflight_put_bytes / 1024).clamp(1, u32::MAX as u64 / 2) as u32;
        KvService {
            store,
            attend,
            auth,
            metrics,
            put_budget: Arc::new(Semaphore::new(kib as usize)),
            put_budget_kib: kib,
            started: Instant::now(),
        }
    }

    fn tenant<T>(&self, req: &Request<T>) -> Result<Tenant, ServerError> {
        self.auth.tenant(req.metadata())
    }

    /// Parses the namespace and checks it against the model's registered layout.
    fn layout(&self, ns: Option<pb::Namespace>) -> Result<Layout, ServerError> {
        let layout = Layout::from_wire(ns)?;
        self.store.namespaces().check(&layout)?;
        Ok(layout)
    }

    async fn do_put(&self, req: Request<Streaming<pb::PutRequest>>) -> Result<pb::PutResponse, Status> {
        let tenant = self.tenant(&req)?;
        let mut stream = req.into_inner();
        let header = match stream.message().await?.and_then(|m| m.msg) {
            Some(put_request::Msg::Header(h)) => h,
            _ => {
                return Err(self.reject(
                    "protocol",
                    ServerError::Protocol("put stream must start with a header".into()),
                ));
            }
        };
        let layout = Layout::from_wire(header.namespace).map_err(|e| self.reject("namespace", e.into()))?;
        let key = ChunkKey::from_slice(&header.key).map_err(|e| self.reject("key", e.into()))?;
        let total = header.total_len;
        let max = self.store.max_chunk_bytes();
        if total == 0 || total > max {
            return Err(self.reject(
                "size",
                ServerError::TooLarge(format!("declared chunk size {total} bytes is outside 1..={max}")),
            ));
        }
        // First use of a model binds its layout durably (file I/O: off the runtime).
        if !self
            .store
            .namespaces()
            .check(&layout)
            .map_err(|e| self.reject("layout", e))?
        {
            let store = self.store.clone();
            let l = layout.clone();
            tokio::task::spawn_blocking(move || store.namespaces().register(&l))
                .await
                .map_err(|e| Status::internal(format!("registry task failed: {e}")))?
                .map_err(|e| self.reject("layout", e))?;
        }
        let ns = layout.namespace_id();
        let id = ChunkId { tenant, key };
        if self.store.locate(&id, &ns).is_some() {
            // Re-putting a stored key is a no-op: answer before reading the body.
            self.metrics.put_noops.inc();
            return Ok(pb::PutResponse {
                stored: false,
                bytes: total,
            });
        }

        let kib = total.div_ceil(1024).min(self.put_budget_kib as u64) as u32;
        let _permit = self
            .put_budget
            .acquire_many(kib)
            .await
            .map_err(|_| Status::from(ServerError::ShuttingDown))?;
        let mut body = BytesMut::with_capacity(total as usize);
        while let Some(m) = stream.message().await? {
            match m.msg {
                Some(put_request::Msg::Piece(p)) => {
                    if body.len() as u64 + p.len() as u64 > total {
                        return Err(self.reject(
                            "length",
                            ServerError::Protocol(format!("body is longer than the declared {total} bytes")),
                        ));
                    }
                    body.extend_from_slice(&p);
                }
                _ => {
                    return Err(self.reject(
                        "protocol",
                        ServerError::Protocol("a put carries one header".into()),
                    ));
                }
            }
        }
        if body.len() as u64 != total {
            return Err(self.reject(
                "length",
                ServerError::Protocol(format!("body ended after {} of {total} bytes", body.len())),
            ));
        }
        let blob = body.freeze();
        // Verification reads every byte (checksum): off the runtime threads.
        let (l, b) = (layout.clone(), blob.clone());
        tokio::task::spawn_blocking(move || verify_chunk(&l, &b))
            .await
            .map_err(|e| Status::internal(format!("verify task failed: {e}")))?
            .map_err(|e| self.reject("invalid_chunk", e))?;
        let stored = self
            .store
            .put(id, ns, blob)
            .await
            .map_err(|e| self.reject("store", e))?;
        if stored {
            self.metrics.put_bytes.inc_by(total);
        } else {
            self.metrics.put_noops.inc();
        }
        tracing::debug!(key = %key, bytes = total, stored, "put");
        Ok(pb::PutResponse { stored, bytes: total })
    }

    fn reject(&self, reason: &str, e: ServerError) -> Status {
        self.metrics.put_rejected.with_label_values(&[reason]).inc();
        tracing::debug!(reason, error = %e, "put rejected");
        e.into()
    }

    async fn do_get(&self, req: Request<pb::GetRequest>) -> Result<GetStream, Status> {
        let tenant = self.tenant(&req)?;
        let req = req.into_inner();
        let layout = self.layout(req.namespace)?;
        let keys = keys_from_wire(&req.keys).map_err(ServerError::from)?;
        let span = req
            .layers
            .map(|r| LayerSpan::new(r.start, r.end, layout.layers))
            .transpose()
            .map_err(ServerError::from)?;
        let ns = layout.namespace_id();
        let whole = span.is_none_or(|s| s.start == 0 && s.end == layout.layers);
        let (tx, rx) = mpsc::channel::<Result<pb::GetResponse, Status>>(8);
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            for (index, key) in keys.into_iter().enumerate() {
                let id = ChunkId {
                    tenant: tenant.clone(),
                    key,
                };
                let found = match store.get(&id, &ns).await {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let Some((tier, chunk)) = found else {
                    if !send_missing(&tx, index).await {
                        return;
                    }
                    continue;
                };
                let span = span.filter(|_| !whole);
                let Some(sent) = send_chunk(&tx, index, tier, chunk.blob, span, &key.to_string()).await
                else {
                    return;
                };
                metrics.get_bytes.inc_by(sent);
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Tier of each wire key under the request's tenant and namespace (`None` where absent).
    fn tiers_of<T>(
        &self,
        req: &Request<T>,
        ns: Option<pb::Namespace>,
        keys: &[bytes::Bytes],
    ) -> Result<Vec<i32>, Status> {
        let tenant = self.tenant(req)?;
        let ns = self.layout(ns)?.namespace_id();
        let keys = keys_from_wire(keys).map_err(ServerError::from)?;
        Ok(keys
            .into_iter()
            .map(|key| {
                let id = ChunkId {
                    tenant: tenant.clone(),
                    key,
                };
                self.store
                    .locate(&id, &ns)
                    .map_or(pb::Tier::None, |t| t.to_proto()) as i32
            })
            .collect())
    }

    async fn do_lookup(&self, req: Request<pb::LookupRequest>) -> Result<pb::LookupResponse, Status> {
        let tiers = self.tiers_of(&req, req.get_ref().namespace.clone(), &req.get_ref().keys)?;
        let prefix = tiers.iter().take_while(|t| **t != pb::Tier::None as i32).count();
        Ok(pb::LookupResponse {
            prefix_chunks: prefix as u32,
            tiers,
        })
    }

    async fn do_exists(&self, req: Request<pb::ExistsRequest>) -> Result<pb::ExistsResponse, Status> {
        let tiers = self.tiers_of(&req, req.get_ref().namespace.clone(), &req.get_ref().keys)?;
        Ok(pb::ExistsResponse { tiers })
    }

    async fn do_delete(&self, req: Request<pb::DeleteRequest>) -> Result<pb::DeleteResponse, Status> {
        let tenant = self.tenant(&req)?;
        let req = req.into_inner();
        let layout = self.layout(req.namespace)?;
        let keys = keys_from_wire(&req.keys).map_err(ServerError::from)?;
        let ns = layout.namespace_id();
        let mut deleted = 0;
        for key in keys {
            let id = ChunkId {
                tenant: tenant.clone(),
                key,
            };
            // Only the caller's namespace: a key under another layout is not theirs to drop.
            if self.store.locate(&id, &ns).is_some() && self.store.delete(&id).await? {
                deleted += 1;
            }
        }
        Ok(pb::DeleteResponse { deleted })
    }

    fn do_describe(
        &self,
        req: Request<pb::DescribeModelRequest>,
    ) -> Result<pb::DescribeModelResponse, Status> {
        self.tenant(&req)?;
        let model_id = req.into_inner().model_id;
        match self.store.namespaces().layout_of(&model_id) {
            Some(l) => Ok(pb::DescribeModelResponse {
                namespace: Some(l.to_proto()),
            }),
            None => Err(Status::not_found(format!(
                "model id {model_id:?} has no registered layout"
            ))),
        }
    }

    fn do_stat<T>(&self, req: &Request<T>) -> Result<pb::StatResponse, Status> {
        self.tenant(req)?;
        let tiers = self
            .store
            .stats()
            .into_iter()
            .map(|(kind, s)| pb::TierStat {
                tier: kind.to_proto() as i32,
                bytes: s.bytes,
                capacity_bytes: s.capacity_bytes,
                chunks: s.chunks,
                hits: s.hits,
                misses: s.misses,
                evictions: s.evictions,
                segments: s.segments,
                live_bytes: s.live_bytes,
            })
            .collect();
        Ok(pb::StatResponse {
            tiers,
            namespaces: self.store.namespaces().len() as u32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
        })
    }
}

fn header_msg(h: pb::GetChunkHeader) -> pb::GetResponse {
    pb::GetResponse {
        msg: Some(get_response::Msg::Header(h)),
    }
}

/// A Get stream's sender.
pub type GetSender = mpsc::Sender<Result<pb::GetResponse, Status>>;

/// Sends the "not found" header of chunk `index` on a Get stream; false once the receiver
/// is gone.
pub async fn send_missing(tx: &GetSender, index: usize) -> bool {
    let header = pb::GetChunkHeader {
        index: index as u32,
        found: false,
        ..Default::default()
    };
    tx.send(Ok(header_msg(header))).await.is_ok()
}

/// Sends found chunk `index` on a Get stream (the server's and the sidecar's): re-packed to
/// `span` first when given (off the runtime threads), then its header and its body in
/// `PIECE_BYTES` pieces that are slices of `blob` (no copy). Returns the body bytes sent, or
/// `None` once the stream is over (receiver gone, or a failure sent as the last message;
/// `what` names the chunk in it).
pub async fn send_chunk(
    tx: &GetSender,
    index: usize,
    tier: TierKind,
    blob: Bytes,
    span: Option<LayerSpan>,
    what: &str,
) -> Option<u64> {
    let body = match span {
        Some(s) => {
            match tokio::task::spawn_blocking(move || kvault_codec::slice_layers(&blob, s.range())).await {
                Ok(Ok(v)) => Bytes::from(v),
                Ok(Err(e)) => {
                    let _ = tx
                        .send(Err(Status::data_loss(format!("stored chunk {what}: {e}"))))
                        .await;
                    return None;
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("slice task failed: {e}"))))
                        .await;
                    return None;
                }
            }
        }
        None => blob,
    };
    let header = pb::GetChunkHeader {
        index: index as u32,
        found: true,
        tier: tier.to_proto() as i32,
        total_len: body.len() as u64,
    };
    tx.send(Ok(header_msg(header))).await.ok()?;
    // Hot path: pieces are slices of the stored buffer, no copy here.
    let mut off = 0;
    while off < body.len() {
        let end = (off + PIECE_BYTES).min(body.len());
        let piece = pb::GetResponse {
            msg: Some(get_response::Msg::Piece(body.slice(off..end))),
        };
        tx.send(Ok(piece)).await.ok()?;
        off = end;
    }
    Some(body.len() as u64)
}

type AttendStream = Pin<Box<dyn Stream<Item = Result<pb::AttendResponse, Status>> + Send + 'static>>;

type GetStream = Pin<Box<dyn Stream<Item = Result<pb::GetResponse, Status>> + Send + 'static>>;

/// Runs a handler under the request timer, recording its outcome.
macro_rules! timed {
    ($self:ident, $method:literal, $body:expr) => {{
        let mut t = $self.metrics.request($method);
        let r = $body.await;
        t.finish(&r);
        r.map(Response::new)
    }};
}

#[tonic::async_trait]
impl KvVault for KvService {
    async fn lookup(&self, req: Request<pb::LookupRequest>) -> Result<Response<pb::LookupResponse>, Status> {
        timed!(self, "lookup", self.do_lookup(req))
    }

    async fn put(
        &self,
        req: Request<Streaming<pb::PutRequest>>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        timed!(self, "put", self.do_put(req))
    }

    type GetStream = GetStream;

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<GetStream>, Status> {
        timed!(self, "get", self.do_get(req))
    }

    async fn exists(&self, req: Request<pb::ExistsRequest>) -> Result<Response<pb::ExistsResponse>, Status> {
        timed!(self, "exists", self.do_exists(req))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        timed!(self, "delete", self.do_delete(req))
    }

    async fn stat(&self, req: Request<pb::StatRequest>) -> Result<Response<pb::StatResponse>, Status> {
        timed!(self, "stat", async { self.do_stat(&req) })
    }

    async fn describe_model(
        &self,
        req: Request<pb::DescribeModelRequest>,
    ) -> Result<Response<pb::DescribeModelResponse>, Status> {
        timed!(self, "describe_model", async { self.do_describe(req) })
    }

    type AttendStream = AttendStream;

    async fn attend(
        &self,
        req: Request<Streaming<pb::AttendRequest>>,
    ) -> Result<Response<AttendStream>, Status> {
        timed!(self, "attend", async {
            let tenant = self.tenant(&req)?;
            let s: AttendStream = Box::pin(self.attend.serve(tenant, req.into_inner()));
            Ok::<_, Status>(s)
        })
    }
}
