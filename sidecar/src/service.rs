//! `kvault.v1.KvVault` served by the sidecar: the same API as a server, so
//! an engine (or `kvault ask --sidecar`) talks to it unchanged.
//!
//! Reads come from the local cache or the owning upstream; writes go
//! through to the owner before they are acknowledged; `Lookup` and `Exists`
//! never wait on upstream longer than the lookup deadline and answer from
//! local knowledge when it runs out.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::Stream;
use kvault_proto::model::keys_from_wire;
use kvault_proto::pb::kv_vault_server::KvVault;
use kvault_proto::pb::{self, put_request};
use kvault_proto::{ChunkKey, LayerSpan, Layout};
use kvault_server::auth::Auth;
use kvault_server::error::ServerError;
use kvault_server::service::{send_chunk, send_missing};
use kvault_server::store::verify_chunk;
use kvault_server::tier::{Tenant, TierKind};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::chunks::Chunks;
use crate::metrics::Metrics;

/// State shared by the sidecar's two services.
pub struct Shared {
    /// Local cache and upstreams.
    pub chunks: Chunks,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Longest a Lookup or Exists waits on upstream.
    pub lookup_deadline: Duration,
    /// Largest chunk accepted by Put.
    pub max_chunk_bytes: u64,
    /// Bounds Put bodies buffered at once (KiB permits).
    pub put_budget: Semaphore,
    /// Put budget in KiB.
    pub put_budget_kib: u32,
    /// Tenant resolution (the `x-kvault-tenant` entry; local callers are trusted).
    pub auth: Auth,
    /// Start time, for Stat.
    pub started: Instant,
    /// The shared region, when on (a Delete drops its decoded runs).
    pub region: Option<Arc<crate::region::Region<crate::shm::RunMeta>>>,
}

impl Shared {
    /// The tenant a request acts for.
    pub fn tenant<T>(&self, req: &Request<T>) -> Result<Tenant, Status> {
        Ok(self.auth.tenant(req.metadata())?)
    }

    /// Tiers of `keys`: local ones answer at once; the rest are asked of
    /// the owners under the lookup deadline, and unknown when it passes.
    pub async fn tiers(
        &self,
        tenant: &Tenant,
        layout: &Layout,
        keys: &[ChunkKey],
        prefix: bool,
    ) -> Vec<pb::Tier> {
        let ns = layout.namespace_id();
        let mut tiers: Vec<pb::Tier> = keys
            .iter()
            .map(|k| {
                if self.chunks.is_local(tenant, &ns, *k) {
                    pb::Tier::Ram
                } else {
                    pb::Tier::None
                }
            })
            .collect();
        // For a prefix only the keys after the locally held run matter.
        let from = if prefix {
            tiers.iter().take_while(|t| **t != pb::Tier::None).count()
        } else {
            0
        };
        let ask: Vec<usize> = (from..keys.len())
            .filter(|&i| tiers[i] == pb::Tier::None)
            .collect();
        if ask.is_empty() {
            return tiers;
        }
        let want: Vec<ChunkKey> = ask.iter().map(|&i| keys[i]).collect();
        let answers = self
            .chunks
            .upstreams
            .exists(tenant.as_str(), layout, &want, self.lookup_deadline)
            .await;
        let mut degraded = false;
        for (&i, a) in ask.iter().zip(answers) {
            match a {
                Some(t) => tiers[i] = t,
                None => degraded = true,
            }
        }
        if degraded {
            self.metrics.lookup_degraded.inc();
        }
        tiers
    }
}

/// The KvVault service of the sidecar.
pub struct SidecarKv {
    shared: Arc<Shared>,
}

impl SidecarKv {
    /// A service over the shared state.
    pub fn new(shared: Arc<Shared>) -> SidecarKv {
        SidecarKv { shared }
    }

    async fn do_lookup(&self, req: Request<pb::LookupRequest>) -> Result<pb::LookupResponse, Status> {
        let s = &self.shared;
        let tenant = s.tenant(&req)?;
        let req = req.into_inner();
        let layout = Layout::from_wire(req.namespace).map_err(ServerError::from)?;
        let keys = keys_from_wire(&req.keys).map_err(ServerError::from)?;
        let tiers = s.tiers(&tenant, &layout, &keys, true).await;
        let prefix = tiers.iter().take_while(|t| **t != pb::Tier::None).count();
        Ok(pb::LookupResponse {
            prefix_chunks: prefix as u32,
            tiers: tiers.into_iter().map(|t| t as i32).collect(),
        })
    }

    async fn do_exists(&self, req: Request<pb::ExistsRequest>) -> Result<pb::ExistsResponse, Status> {
        let s = &self.shared;
        let tenant = s.tenant(&req)?;
        let req = req.into_inner();
        let layout = Layout::from_wire(req.namespace).map_err(ServerError::from)?;
        let keys = keys_from_wire(&req.keys).map_err(ServerError::from)?;
        let tiers = s.tiers(&tenant, &layout, &keys, false).await;
        Ok(pb::ExistsResponse {
            tiers: tiers.into_iter().map(|t| t as i32).collect(),
        })
    }

    async fn do_put(&self, req: Request<Streaming<pb::PutRequest>>) -> Result<pb::PutResponse, Status> {
        let s = &self.shared;
        let tenant = s.tenant(&req)?;
        let mut stream = req.into_inner();
        let header = match stream.message().await?.and_then(|m| m.msg) {
            Some(put_request::Msg::Header(h)) => h,
            _ => return Err(Status::invalid_argument("put stream must start with a header")),
        };
        let layout = Layout::from_wire(header.namespace).map_err(ServerError::from)?;
        let key = ChunkKey::from_slice(&header.key).map_err(ServerError::from)?;
        let total = header.total_len;
        if total == 0 || total > s.max_chunk_bytes {
            return Err(Status::resource_exhausted(format!(
                "declared chunk size {total} bytes is outside 1..={}",
                s.max_chunk_bytes
            )));
        }
        let kib = total.div_ceil(1024).min(s.put_budget_kib as u64) as u32;
        let _permit = s
            .put_budget
            .acquire_many(kib)
            .await
            .map_err(|_| Status::unavailable("sidecar is shutting down"))?;
        let mut body = BytesMut::with_capacity(total as usize);
        while let Some(m) = stream.message().await? {
            match m.msg {
                Some(put_request::Msg::Piece(p)) if body.len() as u64 + p.len() as u64 <= total => {
                    body.extend_from_slice(&p)
                }
                Some(put_request::Msg::Piece(_)) => {
                    return Err(Status::invalid_argument(format!(
                        "body is longer than the declared {total} bytes"
                    )));
                }
                _ => return Err(Status::invalid_argument("a put carries one header")),
            }
        }
        if body.len() as u64 != total {
            return Err(Status::invalid_argument(format!(
                "body ended after {} of {total} bytes",
                body.len()
            )));
        }
        let blob = body.freeze();
        // Checked here as the server would, so a bad chunk never enters the
        // local cache; the checksum pass runs off the runtime threads.
        let (l, b) = (layout.clone(), blob.clone());
        tokio::task::spawn_blocking(move || verify_chunk(&l, &b))
            .await
            .map_err(|e| Status::internal(format!("verify task failed: {e}")))??;
        let stored = s.chunks.put(&tenant, &layout, key, blob).await?;
        Ok(pb::PutResponse { stored, bytes: total })
    }

    async fn do_get(&self, req: Request<pb::GetRequest>) -> Result<GetStream, Status> {
        let s = self.shared.clone();
        let tenant = s.tenant(&req)?;
        let req = req.into_inner();
        let layout = Layout::from_wire(req.namespace).map_err(ServerError::from)?;
        let keys = keys_from_wire(&req.keys).map_err(ServerError::from)?;
        let span = req
            .layers
            .map(|r| LayerSpan::new(r.start, r.end, layout.layers))
            .transpose()
            .map_err(ServerError::from)?;
        let whole = span.is_none_or(|sp| sp.start == 0 && sp.end == layout.layers);
        let got = s.chunks.get(&tenant, &layout, &keys).await?;
        let (tx, rx) = mpsc::channel::<Result<pb::GetResponse, Status>>(8);
        tokio::spawn(async move {
            for (index, g) in got.into_iter().enumerate() {
                let Some(g) = g else {
                    if !send_missing(&tx, index).await {
                        return;
                    }
                    continue;
                };
                let span = span.filter(|_| !whole);
                let what = format!("{index}");
                if send_chunk(&tx, index, TierKind::Ram, g.blob, span, &what)
                    .await
                    .is_none()
                {
                    return;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn do_delete(&self, req: Request<pb::DeleteRequest>) -> Result<pb::DeleteResponse, Status> {
        let s = &self.shared;
        let tenant = s.tenant(&req)?;
        let req = req.into_inner();
        let layout = Layout::from_wire(req.namespace).map_err(ServerError::from)?;
        let keys = keys_from_wire(&req.keys).map_err(ServerError::from)?;
        for k in &keys {
            s.chunks.forget(&tenant, *k).await;
        }
        // Decoded runs are indexed by request, not by key: drop them all
        // (deletes are rare) so no GetInto serves a deleted chunk.
        if let Some(r) = &s.region {
            r.forget_runs();
        }
        let deleted = s.chunks.upstreams.delete(tenant.as_str(), &layout, &keys).await?;
        Ok(pb::DeleteResponse { deleted })
    }

    fn do_stat(&self) -> pb::StatResponse {
        let st = self.shared.chunks.local_stats();
        pb::StatResponse {
            tiers: vec![pb::TierStat {
                tier: pb::Tier::Ram as i32,
                bytes: st.bytes,
                capacity_bytes: st.capacity_bytes,
                chunks: st.chunks,
                hits: st.hits,
                misses: st.misses,
                evictions: st.evictions,
                segments: 0,
                live_bytes: st.live_bytes,
            }],
            namespaces: 0,
            version: format!("sidecar {}", env!("CARGO_PKG_VERSION")),
            uptime_seconds: self.shared.started.elapsed().as_secs(),
        }
    }

    async fn do_describe(
        &self,
        req: Request<pb::DescribeModelRequest>,
    ) -> Result<pb::DescribeModelResponse, Status> {
        let s = &self.shared;
        let tenant = s.tenant(&req)?;
        let model_id = req.into_inner().model_id;
        let l = s
            .chunks
            .upstreams
            .describe_model(
                tenant.as_str(),
                &model_id,
                s.lookup_deadline.max(Duration::from_secs(1)),
            )
            .await?;
        Ok(pb::DescribeModelResponse {
            namespace: Some(l.to_proto()),
        })
    }
}

type GetStream = Pin<Box<dyn Stream<Item = Result<pb::GetResponse, Status>> + Send + 'static>>;

/// Runs a handler, recording its outcome and latency.
macro_rules! timed {
    ($metrics:expr, $method:literal, $body:expr) => {{
        let t = Instant::now();
        let r = $body.await;
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        $metrics.request($method, code, t.elapsed().as_secs_f64());
        r.map(Response::new)
    }};
}
pub(crate) use timed;

#[tonic::async_trait]
impl KvVault for SidecarKv {
    async fn lookup(&self, req: Request<pb::LookupRequest>) -> Result<Response<pb::LookupResponse>, Status> {
        timed!(self.shared.metrics, "lookup", self.do_lookup(req))
    }

    async fn put(
        &self,
        req: Request<Streaming<pb::PutRequest>>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        timed!(self.shared.metrics, "put", self.do_put(req))
    }

    type GetStream = GetStream;
    type AttendStream = Pin<Box<dyn Stream<Item = Result<pb::AttendResponse, Status>> + Send + 'static>>;

    /// Attention offload runs where the KV lives: a node opens `Attend` sessions on the
    /// storage servers themselves (`kvault_client::attend::Offload` places a prefix's chunks
    /// over them); the sidecar's local cache holds containers, not attention-ready layouts.
    async fn attend(
        &self,
        _req: Request<Streaming<pb::AttendRequest>>,
    ) -> Result<Response<Self::AttendStream>, Status> {
        Err(Status::unimplemented(
            "the sidecar does not serve Attend: open attention sessions on the kvault servers directly",
        ))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<GetStream>, Status> {
        timed!(self.shared.metrics, "get", self.do_get(req))
    }

    async fn exists(&self, req: Request<pb::ExistsRequest>) -> Result<Response<pb::ExistsResponse>, Status> {
        timed!(self.shared.metrics, "exists", self.do_exists(req))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        timed!(self.shared.metrics, "delete", self.do_delete(req))
    }

    async fn stat(&self, req: Request<pb::StatRequest>) -> Result<Response<pb::StatResponse>, Status> {
        timed!(self.shared.metrics, "stat", async {
            self.shared.tenant(&req)?;
            Ok::<_, Status>(self.do_stat())
        })
    }

    async fn describe_model(
        &self,
        req: Request<pb::DescribeModelRequest>,
    ) -> Result<Response<pb::DescribeModelResponse>, Status> {
        timed!(self.shared.metrics, "describe_model", self.do_describe(req))
    }
}
