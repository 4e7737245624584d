//! `kvault.v1.Sidecar`: the shared-memory data path (GetInto, leases) and
//! Prefetch.
//!
//! GetInto fetches chunks like Get, then decodes them straight into a
//! lease's slots of the shared region (one pass: container to the engine's
//! dtype, no intermediate buffer) and answers only where each landed. The
//! engine maps the region file once and reads tensors in place.

use std::sync::Arc;
use std::time::Instant;

use kvault_codec::{Container, Dtype, KvShape};
use kvault_proto::model::{dtype_from_proto, dtype_to_proto, keys_from_wire};
use kvault_proto::pb::sidecar_server::Sidecar;
use kvault_proto::pb::{self};
use kvault_proto::{ChunkKey, LayerSpan, Layout};
use kvault_server::error::ServerError;
use rayon::prelude::*;
use tonic::{Request, Response, Status};

use crate::chunks::Got;
use crate::region::{LeaseInfo, Region, RegionError, RunKey};
use crate::service::{Shared, timed};

/// Offsets of chunks in a lease are aligned to this many bytes (cache lines
/// and any SIMD load the engine uses).
const ALIGN: u64 = 256;

impl From<RegionError> for Status {
    fn from(e: RegionError) -> Status {
        let m = e.to_string();
        match e {
            RegionError::SlotOutOfRange { .. } => Status::out_of_range(m),
            RegionError::NotInLease { .. } | RegionError::DoesNotFit { .. } | RegionError::Empty => {
                Status::invalid_argument(m)
            }
            RegionError::Expired(_)
            | RegionError::UnknownLease(_)
            | RegionError::Busy(_)
            | RegionError::ReadOnly(_) => Status::failed_precondition(m),
            RegionError::TooLarge { .. } | RegionError::NoSpace { .. } => Status::resource_exhausted(m),
        }
    }
}

fn lease_msg(l: LeaseInfo) -> pb::LeaseInfo {
    pb::LeaseInfo {
        lease_id: l.id,
        first_slot: l.first_slot,
        slot_count: l.slot_count,
        offset: l.offset,
        bytes: l.bytes,
        expires_in_ms: l.expires_in.as_millis().min(u32::MAX as u128) as u32,
    }
}

/// Where each chunk of a cached decoded run lies, relative to the run's start.
pub type RunMeta = Vec<Placed>;

/// One decoded chunk of a run.
#[derive(Debug, Clone, Copy)]
pub struct Placed {
    /// Index of its key in the request.
    pub index: usize,
    /// Offset from the start of the run.
    pub rel: u64,
    /// Decoded bytes.
    pub len: u64,
    /// Tokens of the chunk.
    pub tokens: u32,
}

/// Names a GetInto's output: the same tenant, keys, layers and dtype give
/// the same bytes (keys are content hashes), so the decoded run can be reused.
fn run_key(
    tenant: &str,
    ns: &kvault_proto::NamespaceId,
    keys: &[ChunkKey],
    span: LayerSpan,
    dtype: Dtype,
    prefix_only: bool,
) -> RunKey {
    let mut h = blake3::Hasher::new();
    h.update(b"kvault-sidecar-run-v1\0");
    h.update(&(tenant.len() as u32).to_le_bytes());
    h.update(tenant.as_bytes());
    h.update(&ns.0);
    h.update(&span.start.to_le_bytes());
    h.update(&span.end.to_le_bytes());
    h.update(&[dtype as u8, prefix_only as u8]);
    h.update(&(keys.len() as u32).to_le_bytes());
    for k in keys {
        h.update(&k.0);
    }
    *h.finalize().as_bytes()
}

/// The Sidecar service.
pub struct SidecarShm {
    shared: Arc<Shared>,
    region: Option<Arc<Region<RunMeta>>>,
}

/// A chunk to decode: its container and where it goes (relative to the
/// start of the write).
struct Job {
    index: usize,
    got: Got,
    rel: u64,
    len: u64,
    tokens: u32,
}

impl SidecarShm {
    /// A service over the shared state and the region (None: shared memory off).
    pub fn new(shared: Arc<Shared>, region: Option<Arc<Region<RunMeta>>>) -> SidecarShm {
        SidecarShm { shared, region }
    }

    fn region(&self) -> Result<&Arc<Region<RunMeta>>, Status> {
        self.region.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this sidecar runs without a shared region (start it with --shm-bytes)",
            )
        })
    }

    async fn do_get_into(&self, req: Request<pb::GetIntoRequest>) -> Result<pb::GetIntoResponse, Status> {
        let region = self.region()?.clone();
        let s = &self.shared;
        let tenant = s.tenant(&req)?;
        let req = req.into_inner();
        let layout = Layout::from_wire(req.namespace).map_err(ServerError::from)?;
        let keys = keys_from_wire(&req.keys).map_err(ServerError::from)?;
        let span = match req.layers {
            Some(r) => LayerSpan::new(r.start, r.end, layout.layers).map_err(ServerError::from)?,
            None => LayerSpan {
                start: 0,
                end: layout.layers,
            },
        };
        let out_dtype = if req.out_dtype == pb::Dtype::Unspecified as i32 {
            layout.dtype
        } else {
            dtype_from_proto(req.out_dtype).map_err(ServerError::from)?
        };
        // Check the target before any fetch: a bad lease or slot costs nothing.
        if req.lease_id != 0 {
            if req.first_slot >= region.slots() {
                return Err(RegionError::SlotOutOfRange {
                    slot: req.first_slot,
                    slots: region.slots(),
                }
                .into());
            }
            region.lease_info(req.lease_id)?;
        }
        // Hot path: the same request decoded before and still in the region
        // is answered with offsets alone (a read-only lease pins it).
        let rkey = run_key(
            tenant.as_str(),
            &layout.namespace_id(),
            &keys,
            span,
            out_dtype,
            req.prefix_only,
        );
        if req.lease_id == 0
            && let Some((lease, meta)) = region.pin_run(&rkey, req.lease_ms)
        {
            s.metrics.shm_run_hits.inc();
            let mut chunks = vec![pb::ChunkPlacement::default(); keys.len()];
            for p in meta.iter() {
                chunks[p.index] = pb::ChunkPlacement {
                    found: true,
                    offset: lease.offset + p.rel,
                    length: p.len,
                    tokens: p.tokens,
                    layer_start: span.start,
                    layer_count: span.end - span.start,
                    local: true,
                };
            }
            return Ok(pb::GetIntoResponse {
                lease: Some(lease_msg(lease)),
                chunks,
                dtype: dtype_to_proto(out_dtype) as i32,
            });
        }
        let mut got = s.chunks.get(&tenant, &layout, &keys).await?;
        if req.prefix_only
            && let Some(cut) = got.iter().position(|g| g.is_none())
        {
            for g in &mut got[cut..] {
                *g = None;
            }
        }
        // Lay the chunks out from their headers (sizes in the output dtype).
        let mut jobs = Vec::new();
        let mut total = 0u64;
        for (index, g) in got.into_iter().enumerate() {
            let Some(g) = g else { continue };
            let c =
                Container::parse(&g.blob).map_err(|e| Status::data_loss(format!("chunk {index}: {e}")))?;
            let h = c.header();
            if h.total_layers != layout.layers
                || h.layer_start > span.start
                || h.layer_range().end < span.end
                || h.kv_heads != layout.kv_heads
                || h.head_dim != layout.head_dim
                || h.tokens == 0
                || h.tokens > layout.chunk_tokens
            {
                return Err(Status::data_loss(format!(
                    "chunk {index} does not match its namespace (layers {}..{} of {}, {} tokens)",
                    h.layer_start,
                    h.layer_range().end,
                    h.total_layers,
                    h.tokens
                )));
            }
            let shape = KvShape {
                layers: span.end - span.start,
                tokens: h.tokens,
                kv_heads: h.kv_heads,
                head_dim: h.head_dim,
            };
            let len = shape
                .byte_len(out_dtype)
                .map_err(|e| Status::invalid_argument(e.to_string()))? as u64;
            let rel = total.next_multiple_of(ALIGN);
            total = rel + len;
            jobs.push(Job {
                index,
                tokens: h.tokens,
                got: g,
                rel,
                len,
            });
        }
        let mut placements: Vec<pb::ChunkPlacement> = vec![pb::ChunkPlacement::default(); keys.len()];
        if jobs.is_empty() {
            // Nothing to write: no lease is taken (an existing one is untouched).
            let lease = match req.lease_id {
                0 => None,
                id => Some(lease_msg(region.lease_info(id)?)),
            };
            return Ok(pb::GetIntoResponse {
                lease,
                chunks: placements,
                dtype: dtype_to_proto(out_dtype) as i32,
            });
        }
        let mut guard = match req.lease_id {
            0 => region.lease_for_write(total, req.lease_ms)?,
            id => region.write_into(id, req.first_slot, total)?,
        };
        let base = guard.offset();
        // Decoding is CPU work over MiBs: off the async threads. Chunks are
        // decoded one after another, each with its layers in parallel.
        let (guard, jobs, written) = tokio::task::spawn_blocking(move || {
            let buf = guard.buf();
            let r = decode_all(&jobs, buf, span, out_dtype);
            (guard, jobs, r)
        })
        .await
        .map_err(|e| Status::internal(format!("decode task failed: {e}")))?;
        // On error the guard drops here and frees a fresh lease.
        written?;
        // Only complete answers are kept: a run with misses would hide
        // chunks stored later.
        let lease = if jobs.len() == keys.len() {
            let meta: RunMeta = jobs
                .iter()
                .map(|j| Placed {
                    index: j.index,
                    rel: j.rel,
                    len: j.len,
                    tokens: j.tokens,
                })
                .collect();
            guard.finish_cached(rkey, meta)?
        } else {
            guard.finish()?
        };
        for j in &jobs {
            placements[j.index] = pb::ChunkPlacement {
                found: true,
                offset: base + j.rel,
                length: j.len,
                tokens: j.tokens,
                layer_start: span.start,
                layer_count: span.end - span.start,
                local: j.got.local,
            };
        }
        s.metrics.shm_bytes.inc_by(total);
        Ok(pb::GetIntoResponse {
            lease: Some(lease_msg(lease)),
            chunks: placements,
            dtype: dtype_to_proto(out_dtype) as i32,
        })
    }

    async fn do_prefetch(&self, req: Request<pb::PrefetchRequest>) -> Result<pb::PrefetchResponse, Status> {
        let s = self.shared.clone();
        let tenant = s.tenant(&req)?;
        let req = req.into_inner();
        let layout = Layout::from_wire(req.namespace).map_err(ServerError::from)?;
        let keys = keys_from_wire(&req.keys).map_err(ServerError::from)?;
        let ns = layout.namespace_id();
        let (local, todo): (Vec<_>, Vec<_>) = keys
            .into_iter()
            .partition(|k| s.chunks.is_local(&tenant, &ns, *k));
        s.metrics
            .prefetch
            .with_label_values(&["local"])
            .inc_by(local.len() as u64);
        let already_local = local.len() as u32;
        let work = async move {
            let got = s.chunks.get(&tenant, &layout, &todo).await?;
            let fetched = got.iter().filter(|g| g.is_some()).count() as u32;
            let missing = todo.len() as u32 - fetched;
            s.metrics
                .prefetch
                .with_label_values(&["fetched"])
                .inc_by(fetched as u64);
            s.metrics
                .prefetch
                .with_label_values(&["missing"])
                .inc_by(missing as u64);
            Ok::<_, Status>((fetched, missing))
        };
        if req.background {
            tokio::spawn(async move {
                if let Err(e) = work.await {
                    tracing::warn!(error = %e, "background prefetch failed");
                }
            });
            return Ok(pb::PrefetchResponse {
                already_local,
                fetched: 0,
                missing: 0,
            });
        }
        let (fetched, missing) = work.await?;
        Ok(pb::PrefetchResponse {
            already_local,
            fetched,
            missing,
        })
    }
}

/// Decodes every job's layers `span` into `buf` at its offset.
fn decode_all(jobs: &[Job], buf: &mut [u8], span: LayerSpan, out_dtype: Dtype) -> Result<(), Status> {
    for j in jobs {
        let out = &mut buf[j.rel as usize..(j.rel + j.len) as usize];
        let c = Container::parse(&j.got.blob).map_err(|e| Status::data_loss(e.to_string()))?;
        let h = c.header();
        let whole = h.layer_start == span.start && h.layer_count == span.end - span.start;
        let r = if whole {
            kvault_codec::decode_into(&j.got.blob, out_dtype, out)
        } else {
            let layer_bytes = (j.len / (span.end - span.start) as u64) as usize;
            let first = span.start - h.layer_start;
            out.par_chunks_mut(layer_bytes)
                .enumerate()
                .try_for_each(|(i, o)| c.decode_layer_into(first + i as u32, out_dtype, o))
        };
        r.map_err(|e| Status::data_loss(format!("chunk {}: {e}", j.index)))?;
    }
    Ok(())
}

#[tonic::async_trait]
impl Sidecar for SidecarShm {
    async fn region_info(
        &self,
        req: Request<pb::RegionInfoRequest>,
    ) -> Result<Response<pb::RegionInfoResponse>, Status> {
        timed!(self.shared.metrics, "region_info", async {
            self.shared.tenant(&req)?;
            let r = self.region()?;
            let st = r.stats();
            Ok::<_, Status>(pb::RegionInfoResponse {
                path: r.path().display().to_string(),
                region_bytes: r.len(),
                slot_bytes: r.slot_bytes(),
                slots: r.slots(),
                free_slots: st.free_slots,
                default_lease_ms: r.default_lease().as_millis() as u32,
                max_lease_ms: r.max_lease().as_millis() as u32,
            })
        })
    }

    async fn lease(&self, req: Request<pb::LeaseRequest>) -> Result<Response<pb::LeaseInfo>, Status> {
        timed!(self.shared.metrics, "lease", async {
            let r = self.region()?;
            let q = req.into_inner();
            Ok::<_, Status>(lease_msg(r.lease(q.bytes, q.lease_ms)?))
        })
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::LeaseInfo>, Status> {
        timed!(self.shared.metrics, "renew", async {
            let r = self.region()?;
            let q = req.into_inner();
            Ok::<_, Status>(lease_msg(r.renew(q.lease_id, q.lease_ms)?))
        })
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        timed!(self.shared.metrics, "release", async {
            let r = self.region()?;
            r.release(req.into_inner().lease_id)?;
            Ok::<_, Status>(pb::ReleaseResponse {})
        })
    }

    async fn get_into(
        &self,
        req: Request<pb::GetIntoRequest>,
    ) -> Result<Response<pb::GetIntoResponse>, Status> {
        let t = Instant::now();
        let r = self.do_get_into(req).await;
        let code = r.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        self.shared
            .metrics
            .request("get_into", code, t.elapsed().as_secs_f64());
        r.map(Response::new)
    }

    async fn prefetch(
        &self,
        req: Request<pb::PrefetchRequest>,
    ) -> Result<Response<pb::PrefetchResponse>, Status> {
        timed!(self.shared.metrics, "prefetch", self.do_prefetch(req))
    }
}
