//! A small etcd v3 client: the key, watch and lease calls membership needs,
//! over tonic with the generated code of `proto/etcd.proto`.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::{MembershipError, Result};

/// Generated etcd API types and clients.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;

/// Deadline of every unary etcd call: membership must notice a hung etcd
/// quickly and fall back to what it knows.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A lazily connected handle on an etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    channel: Channel,
    endpoints: String,
}

/// One key-value pair as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key (UTF-8 for kvault's keys; lossily decoded otherwise).
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of its last modification.
    pub mod_revision: i64,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The key was created or changed.
    Put(Kv),
    /// The key was deleted (or its lease expired).
    Delete(String),
}

/// The end of a range that covers every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): etcd reads "\0" as "to the end of the keyspace".
    vec![0]
}

/// Codes that mean "etcd is not answering" rather than "etcd said no".
fn unavailable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
    )
}

fn status_err(op: &'static str, s: tonic::Status) -> MembershipError {
    if unavailable(&s) {
        MembershipError::Unavailable {
            op,
            message: s.message().to_string(),
        }
    } else {
        MembershipError::Etcd { op, status: s }
    }
}

/// Runs a unary call under [`CALL_TIMEOUT`].
async fn timed<T>(
    op: &'static str,
    f: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(status_err(op, s)),
        Err(_) => Err(MembershipError::Unavailable {
            op,
            message: format!("no answer within {} ms", CALL_TIMEOUT.as_millis()),
        }),
    }
}

impl Etcd {
    /// A handle on the etcd members at `endpoints` (comma-separated
    /// `host:port` or `http://host:port`). Connects on first use and
    /// reconnects by itself, so it can be made while etcd is down.
    pub fn connect(endpoints: &str) -> Result<Etcd> {
        let mut eps = Vec::new();
        for raw in endpoints.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let url = if raw.contains("://") {
                raw.to_string()
            } else {
                format!("http://{raw}")
            };
            let ep = Endpoint::from_shared(url)
                .map_err(|e| MembershipError::BadEndpoint {
                    endpoint: raw.to_string(),
                    reason: e.to_string(),
                })?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                // Pings find a hung or partitioned etcd while a watch is silent.
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true);
            eps.push(ep);
        }
        if eps.is_empty() {
            return Err(MembershipError::BadEndpoint {
                endpoint: endpoints.to_string(),
                reason: "no endpoint given".into(),
            });
        }
        let channel = if eps.len() == 1 {
            eps.remove(0).connect_lazy()
        } else {
            Channel::balance_list(eps.into_iter())
        };
        Ok(Etcd {
            channel,
            endpoints: endpoints.to_string(),
        })
    }

    /// The endpoints as given.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Every key under `prefix`, and the store revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<Kv>, i64)> {
        let mut kv = KvClient::new(self.channel.clone());
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let r = timed(
                "range",
                kv.range(pb::RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: 1000,
                    // Later pages read the snapshot the first one saw.
                    revision,
                }),
            )
            .await?;
            if revision == 0 {
                revision = r.header.as_ref().map_or(0, |h| h.revision);
            }
            for k in &r.kvs {
                out.push(Kv {
                    key: String::from_utf8_lossy(&k.key).into_owned(),
                    value: k.value.clone(),
                    mod_revision: k.mod_revision,
                });
            }
            match (r.more, r.kvs.last()) {
                (true, Some(last)) => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }

    /// Writes `key = value`, attached to `lease` (0: none).
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<()> {
        let mut kv = KvClient::new(self.channel.clone());
        timed(
            "put",
            kv.put(pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value,
                lease,
            }),
        )
        .await?;
        Ok(())
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        let mut kv = KvClient::new(self.channel.clone());
        let r = timed(
            "delete",
            kv.delete_range(pb::DeleteRangeRequest {
                key: key.as_bytes().to_vec(),
                range_end: Vec::new(),
            }),
        )
        .await?;
        Ok(r.deleted > 0)
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1); its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64> {
        let mut lease = LeaseClient::new(self.channel.clone());
        let r = timed(
            "lease grant",
            lease.lease_grant(pb::LeaseGrantRequest {
                ttl: ttl.as_secs().max(1) as i64,
                id: 0,
            }),
        )
        .await?;
        if !r.error.is_empty() {
            return Err(MembershipError::Etcd {
                op: "lease grant",
                status: tonic::Status::unknown(r.error),
            });
        }
        Ok(r.id)
    }

    /// Revokes a lease: its keys are deleted at once.
    pub async fn revoke(&self, id: i64) -> Result<()> {
        let mut lease = LeaseClient::new(self.channel.clone());
        timed("lease revoke", lease.lease_revoke(pb::LeaseRevokeRequest { id })).await?;
        Ok(())
    }

    /// Opens a keep-alive stream for lease `id` and refreshes it once.
    pub async fn keep_alive(&self, id: i64) -> Result<KeepAlive> {
        let mut lease = LeaseClient::new(self.channel.clone());
        let (tx, rx) = mpsc::channel(4);
        // etcd answers the call (headers included) with its first refresh: the
        // request must be in the stream before the call is awaited.
        let _ = tx.try_send(pb::LeaseKeepAliveRequest { id });
        let stream = timed(
            "lease keep-alive",
            lease.lease_keep_alive(ReceiverStream::new(rx)),
        )
        .await?;
        let mut ka = KeepAlive { id, tx, stream };
        ka.answer().await?;
        Ok(ka)
    }

    /// Watches every key under `prefix` from `start_revision` on (earlier
    /// changes since then are replayed first).
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<Watch> {
        let mut w = WatchClient::new(self.channel.clone());
        let (tx, rx) = mpsc::channel(1);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.as_bytes().to_vec(),
                    range_end: prefix_end(prefix.as_bytes()),
                    start_revision,
                    progress_notify: true,
                },
            )),
        };
        // The channel has room for the one request: this cannot fail.
        let _ = tx.try_send(create);
        let stream = timed("watch", w.watch(ReceiverStream::new(rx))).await?;
        Ok(Watch { _tx: tx, stream })
    }
}

/// A lease keep-alive stream.
pub struct KeepAlive {
    id: i64,
    tx: mpsc::Sender<pb::LeaseKeepAliveRequest>,
    stream: tonic::Streaming<pb::LeaseKeepAliveResponse>,
}

impl KeepAlive {
    /// Refreshes the lease once; its remaining TTL in seconds. A lease that
    /// expired or was revoked is [`MembershipError::LeaseLost`].
    pub async fn refresh(&mut self) -> Result<i64> {
        self.tx
            .send(pb::LeaseKeepAliveRequest { id: self.id })
            .await
            .map_err(|_| MembershipError::Unavailable {
                op: "lease keep-alive",
                message: "stream closed".into(),
            })?;
        self.answer().await
    }

    /// Reads the answer to one refresh.
    async fn answer(&mut self) -> Result<i64> {
        let gone = |message: &str| MembershipError::Unavailable {
            op: "lease keep-alive",
            message: message.to_string(),
        };
        let r = tokio::time::timeout(CALL_TIMEOUT, self.stream.message())
            .await
            .map_err(|_| gone("no answer in time"))?
            .map_err(|s| status_err("lease keep-alive", s))?
            .ok_or_else(|| gone("stream ended"))?;
        if r.ttl <= 0 {
            return Err(MembershipError::LeaseLost(self.id));
        }
        Ok(r.ttl)
    }
}

/// An open watch.
pub struct Watch {
    // Dropping the request side would end the watch.
    _tx: mpsc::Sender<pb::WatchRequest>,
    stream: tonic::Streaming<pb::WatchResponse>,
}

/// One batch of a watch.
#[derive(Debug)]
pub enum WatchBatch {
    /// Changes (possibly none: a progress notification) up to `revision`.
    Changes {
        /// In revision order.
        changes: Vec<Change>,
        /// The store revision the batch brings the watcher to.
        revision: i64,
    },
    /// The watch was cancelled or its start was compacted away: re-read.
    Resync(String),
}

impl Watch {
    /// The next batch; `Err` when the stream broke (etcd down or restarted).
    pub async fn next(&mut self) -> Result<WatchBatch> {
        let r = self
            .stream
            .message()
            .await
            .map_err(|s| status_err("watch", s))?
            .ok_or_else(|| MembershipError::Unavailable {
                op: "watch",
                message: "stream ended".into(),
            })?;
        if r.canceled || r.compact_revision > 0 {
            return Ok(WatchBatch::Resync(if r.cancel_reason.is_empty() {
                format!("watch cancelled (compacted at {})", r.compact_revision)
            } else {
                r.cancel_reason
            }));
        }
        let revision = r.header.as_ref().map_or(0, |h| h.revision);
        let changes = r
            .events
            .into_iter()
            .filter_map(|e| {
                let kv = e.kv?;
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                Some(match pb::event::EventType::try_from(e.r#type) {
                    Ok(pb::event::EventType::Delete) => Change::Delete(key),
                    _ => Change::Put(Kv {
                        key,
                        value: kv.value,
                        mod_revision: kv.mod_revision,
                    }),
                })
            })
            .collect();
        Ok(WatchBatch::Changes { changes, revision })
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/kvault/"), b"/kvault0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
