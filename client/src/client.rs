//! The gRPC client: connect, lookup, put, get, exists, delete, stat.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kvault_proto::pb::kv_vault_client::KvVaultClient;
use kvault_proto::pb::{self, get_response, put_request};
use kvault_proto::{ChunkKey, LayerSpan, Layout, MAX_MESSAGE_BYTES, PIECE_BYTES, TENANT_HEADER};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::error::{ClientError, Result};
use crate::retry::RetryPolicy;

pub use kvault_proto::pb::Tier;

/// Largest chunk body the client accepts from a server (guards against a
/// hostile or broken peer announcing absurd lengths).
const MAX_CHUNK_BYTES: u64 = 1 << 30;

/// How to reach and talk to a server.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` of the server, or a Unix socket (`unix:/path` or
    /// a path) of a local sidecar.
    pub endpoint: String,
    /// Limit for establishing the connection.
    pub connect_timeout: Duration,
    /// Deadline of every call (sent to the server as `grpc-timeout`).
    pub request_timeout: Duration,
    /// Tenant to act for when the server runs without tokens.
    pub tenant: Option<String>,
    /// Bearer token, when the server requires one.
    pub token: Option<String>,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Connect on first use instead of at once (and reconnect after the
    /// server restarts): for long-lived processes such as the sidecar, which
    /// must start, and keep serving, while a server is down.
    pub lazy: bool,
}

impl ClientConfig {
    /// Defaults for `endpoint`: 5 s to connect, 120 s per call, 4 attempts.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ClientConfig {
            endpoint: endpoint.into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(120),
            tenant: None,
            token: None,
            retry: RetryPolicy::default(),
            lazy: false,
        }
    }
}

/// Adds the tenant or token to every call.
#[derive(Clone)]
pub struct Credentials {
    tenant: Option<MetadataValue<tonic::metadata::Ascii>>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(t) = &self.tenant {
            req.metadata_mut().insert(TENANT_HEADER, t.clone());
        }
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

type Rpc = KvVaultClient<InterceptedService<Channel, Credentials>>;

/// Result of a longest-prefix lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// Leading keys that are all stored.
    pub prefix_chunks: usize,
    /// Tier of every key (`Tier::None` where absent).
    pub tiers: Vec<Tier>,
}

/// One chunk fetched by [`Client::get_many`].
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Tier that served it.
    pub tier: Tier,
    /// The container bytes.
    pub blob: Bytes,
}

/// A connection to one kvault server. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    rpc: Rpc,
    channel: Channel,
    retry: RetryPolicy,
    creds: Credentials,
    endpoint: std::sync::Arc<str>,
}

impl Client {
    /// Connects with default settings.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Client> {
        Client::connect_with(ClientConfig::new(endpoint)).await
    }

    /// A handle that connects on first use (and reconnects after the server
    /// restarts), whatever `cfg.lazy` says: it never waits, so it can be made
    /// outside an async context and while the server is down.
    pub fn connect_lazy(cfg: ClientConfig) -> Result<Client> {
        let (ep, creds) = endpoint_and_creds(&cfg)?;
        let channel = match unix_socket_path(&cfg.endpoint) {
            Some(path) => ep.connect_with_connector_lazy(unix_connector(path)),
            None => ep.connect_lazy(),
        };
        Ok(Client::from_channel(channel, &cfg, creds))
    }

    fn from_channel(channel: Channel, cfg: &ClientConfig, creds: Credentials) -> Client {
        let rpc = KvVaultClient::with_interceptor(channel.clone(), creds.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Client {
            rpc,
            channel,
            retry: cfg.retry,
            creds,
            endpoint: cfg.endpoint.as_str().into(),
        }
    }

    /// The endpoint this handle talks to, as configured.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Connects with explicit settings; fails fast if the server is unreachable.
    pub async fn connect_with(cfg: ClientConfig) -> Result<Client> {
        if cfg.lazy {
            return Client::connect_lazy(cfg);
        }
        let (ep, creds) = endpoint_and_creds(&cfg)?;
        let endpoint = cfg.endpoint.as_str();
        let socket = unix_socket_path(endpoint);
        let channel = cfg
            .retry
            .run(|| {
                let ep = ep.clone();
                let socket = socket.clone();
                async move {
                    let r = match socket {
                        // A local sidecar: HTTP/2 over a Unix domain socket; the
                        // endpoint's authority is a placeholder the connector ignores.
                        Some(path) => ep.connect_with_connector(unix_connector(path)).await,
                        None => ep.connect().await,
                    };
                    r.map_err(|e| ClientError::Unavailable(format!("{endpoint}: {}", source_chain(&e))))
                }
            })
            .await?;
        Ok(Client::from_channel(channel, &cfg, creds))
    }
}

/// A connector that opens the Unix socket at `path` for every connection.
fn unix_connector(
    path: std::path::PathBuf,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    })
}

/// The tonic endpoint and credentials `cfg` describes.
fn endpoint_and_creds(cfg: &ClientConfig) -> Result<(Endpoint, Credentials)> {
    let bad = |reason: String| ClientError::InvalidEndpoint {
        endpoint: cfg.endpoint.clone(),
        reason,
    };
    let url = match unix_socket_path(&cfg.endpoint) {
        Some(_) => "http://sidecar.invalid".to_string(),
        None => cfg.endpoint.clone(),
    };
    let ep = Endpoint::from_shared(url)
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(cfg.connect_timeout)
        .timeout(cfg.request_timeout)
        .tcp_nodelay(true)
        // Chunk bodies are MiBs: small HTTP/2 windows would cap throughput.
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        // The receiver's frame size bounds the server's DATA frames: 16 KiB by
        // default, which means 64 frames per body piece.
        .max_frame_size(Some((1 << 20) - 1));
    let ascii = |v: String, what: &str| {
        v.parse::<MetadataValue<tonic::metadata::Ascii>>()
            .map_err(|_| bad(format!("{what} is not valid ASCII metadata")))
    };
    let creds = Credentials {
        tenant: cfg.tenant.clone().map(|t| ascii(t, "tenant")).transpose()?,
        token: cfg
            .token
            .clone()
            .map(|t| ascii(format!("Bearer {t}"), "token"))
            .transpose()?,
    };
    Ok((ep, creds))
}

impl Client {
    /// The same connection acting for another tenant (servers without
    /// tokens): the sidecar forwards each caller's tenant this way.
    pub fn for_tenant(&self, tenant: &str) -> Result<Client> {
        let v = tenant
            .parse::<MetadataValue<tonic::metadata::Ascii>>()
            .map_err(|_| {
                ClientError::InvalidArgument(format!("tenant {tenant:?} is not valid ASCII metadata"))
            })?;
        let creds = Credentials {
            tenant: Some(v),
            token: self.creds.token.clone(),
        };
        let rpc = KvVaultClient::with_interceptor(self.channel.clone(), creds.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Client {
            rpc,
            channel: self.channel.clone(),
            retry: self.retry,
            creds,
            endpoint: self.endpoint.clone(),
        })
    }

    /// The same connection with another retry policy (e.g. none, where a
    /// caller has its own deadline).
    pub fn with_retry(&self, retry: RetryPolicy) -> Client {
        Client {
            retry,
            ..self.clone()
        }
    }

    /// The underlying channel, for other services on the same connection.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Whether the server reports itself serving (gRPC health).
    pub async fn health(&self) -> Result<bool> {
        use tonic_health::pb::health_check_response::ServingStatus;
        let mut h = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: "kvault.v1.KvVault".into(),
            })
            .await?;
        Ok(r.into_inner().status == ServingStatus::Serving as i32)
    }

    /// Longest stored prefix of a key chain, and each key's tier.
    pub async fn lookup(&self, layout: &Layout, keys: &[ChunkKey]) -> Result<Lookup> {
        let req = pb::LookupRequest {
            namespace: Some(layout.to_proto()),
            keys: wire_keys(keys),
        };
        let r = self
            .unary(req, |mut rpc, req| async move { rpc.lookup(req).await })
            .await?;
        if r.tiers.len() != keys.len() || r.prefix_chunks as usize > keys.len() {
            return Err(ClientError::Protocol(format!(
                "lookup of {} keys answered {} tiers, prefix {}",
                keys.len(),
                r.tiers.len(),
                r.prefix_chunks
            )));
        }
        Ok(Lookup {
            prefix_chunks: r.prefix_chunks as usize,
            tiers: r.tiers.iter().map(|t| tier(*t)).collect(),
        })
    }

    /// Stores one chunk container. Returns false when the key was already stored.
    pub async fn put(&self, layout: &Layout, key: &ChunkKey, blob: Bytes) -> Result<bool> {
        let header = pb::PutHeader {
            namespace: Some(layout.to_proto()),
            key: Bytes::copy_from_slice(&key.0),
            total_len: blob.len() as u64,
        };
        let r = self
            .retry
            .run(|| {
                let mut rpc = self.rpc.clone();
                let msgs = put_messages(header.clone(), blob.clone());
                async move { Ok(rpc.put(tokio_stream::iter(msgs)).await?.into_inner()) }
            })
            .await?;
        Ok(r.stored)
    }

    /// Fetches one chunk; `None` when it is not stored.
    pub async fn get(&self, layout: &Layout, key: &ChunkKey) -> Result<Option<Bytes>> {
        let mut v = self.get_many(layout, std::slice::from_ref(key), None).await?;
        Ok(v.pop().flatten().map(|f| f.blob))
    }

    /// Fetches one layer range of chunks, each as a container holding only those layers.
    pub async fn get_layers(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
        layers: std::ops::Range<u32>,
    ) -> Result<Vec<Option<Bytes>>> {
        let span = LayerSpan::new(layers.start, layers.end, layout.layers)?;
        let v = self.get_many(layout, keys, Some(span)).await?;
        Ok(v.into_iter().map(|f| f.map(|f| f.blob)).collect())
    }

    /// Fetches many chunks in one stream, in key order (`None` where absent).
    pub async fn get_many(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
        layers: Option<LayerSpan>,
    ) -> Result<Vec<Option<Fetched>>> {
        let req = pb::GetRequest {
            namespace: Some(layout.to_proto()),
            keys: wire_keys(keys),
            layers: layers.map(|s| pb::LayerRange {
                start: s.start,
                end: s.end,
            }),
        };
        self.retry
            .run(|| {
                let (mut rpc, req) = (self.rpc.clone(), req.clone());
                async move {
                    let stream = rpc.get(req).await?.into_inner();
                    read_chunks(stream, keys.len()).await
                }
            })
            .await
    }

    /// Tier of each key (`Tier::None` where absent).
    pub async fn exists(&self, layout: &Layout, keys: &[ChunkKey]) -> Result<Vec<Tier>> {
        let req = pb::ExistsRequest {
            namespace: Some(layout.to_proto()),
            keys: wire_keys(keys),
        };
        let r = self
            .unary(req, |mut rpc, req| async move { rpc.exists(req).await })
            .await?;
        if r.tiers.len() != keys.len() {
            return Err(ClientError::Protocol(format!(
                "exists of {} keys answered {}",
                keys.len(),
                r.tiers.len()
            )));
        }
        Ok(r.tiers.iter().map(|t| tier(*t)).collect())
    }

    /// Deletes keys; returns how many were stored.
    pub async fn delete(&self, layout: &Layout, keys: &[ChunkKey]) -> Result<u32> {
        let req = pb::DeleteRequest {
            namespace: Some(layout.to_proto()),
            keys: wire_keys(keys),
        };
        let r = self
            .unary(req, |mut rpc, req| async move { rpc.delete(req).await })
            .await?;
        Ok(r.deleted)
    }

    /// Server-wide counters per tier.
    pub async fn stat(&self) -> Result<pb::StatResponse> {
        self.unary(
            pb::StatRequest {},
            |mut rpc, req| async move { rpc.stat(req).await },
        )
        .await
    }

    /// The layout the server has bound `model_id` to.
    pub async fn describe_model(&self, model_id: &str) -> Result<Layout> {
        let req = pb::DescribeModelRequest {
            model_id: model_id.to_string(),
        };
        let r = self
            .unary(req, |mut rpc, req| async move { rpc.describe_model(req).await })
            .await?;
        Ok(Layout::from_wire(r.namespace)?)
    }
}

impl Client {
    /// Opens an `Attend` stream with `requests` as the request side (see [`crate::attend::AttendConn`]).
    pub(crate) async fn attend_raw(
        &self,
        requests: impl tonic::codegen::tokio_stream::Stream<Item = pb::AttendRequest> + Send + 'static,
    ) -> Result<tonic::Streaming<pb::AttendResponse>> {
        let mut rpc = self.rpc.clone();
        Ok(rpc.attend(requests).await?.into_inner())
    }

    /// Runs a unary call with retries; `call` gets a fresh handle and a copy of the request.
    async fn unary<Req, Resp, F, Fut>(&self, req: Req, call: F) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Rpc, Req) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<Resp>, Status>>,
    {
        self.retry
            .run(|| {
                let fut = call(self.rpc.clone(), req.clone());
                async move { Ok(fut.await?.into_inner()) }
            })
            .await
    }
}

/// The socket path of a Unix-socket endpoint: `unix:/path`, `unix:///path`,
/// or a bare path (anything starting with `/` or `.`); `None` for URLs.
pub fn unix_socket_path(endpoint: &str) -> Option<std::path::PathBuf> {
    if let Some(rest) = endpoint.strip_prefix("unix:") {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        return Some(rest.into());
    }
    (endpoint.starts_with('/') || endpoint.starts_with('.')).then(|| endpoint.into())
}

fn wire_keys(keys: &[ChunkKey]) -> Vec<Bytes> {
    keys.iter().map(|k| Bytes::copy_from_slice(&k.0)).collect()
}

fn tier(v: i32) -> Tier {
    Tier::try_from(v).unwrap_or(Tier::None)
}

/// Header then body pieces; the pieces are slices of `blob`, not copies.
fn put_messages(header: pb::PutHeader, blob: Bytes) -> Vec<pb::PutRequest> {
    let mut msgs = Vec::with_capacity(1 + blob.len().div_ceil(PIECE_BYTES));
    msgs.push(pb::PutRequest {
        msg: Some(put_request::Msg::Header(header)),
    });
    let mut off = 0;
    while off < blob.len() {
        let end = (off + PIECE_BYTES).min(blob.len());
        msgs.push(pb::PutRequest {
            msg: Some(put_request::Msg::Piece(blob.slice(off..end))),
        });
        off = end;
    }
    msgs
}

/// Reassembles a Get stream, checking that it keeps to the protocol.
async fn read_chunks(
    mut stream: tonic::Streaming<pb::GetResponse>,
    n: usize,
) -> Result<Vec<Option<Fetched>>> {
    let mut out: Vec<Option<Fetched>> = Vec::with_capacity(n);
    // (tier, expected length, body so far) of the chunk being received.
    let mut current: Option<(Tier, usize, BytesMut)> = None;
    let proto = |m: String| ClientError::Protocol(m);
    while let Some(msg) = stream.message().await? {
        match msg.msg {
            Some(get_response::Msg::Header(h)) => {
                if let Some((_, want, body)) = &current {
                    return Err(proto(format!("chunk ended after {} of {want} bytes", body.len())));
                }
                if h.index as usize != out.len() || out.len() >= n {
                    return Err(proto(format!(
                        "chunk header {} out of order (expected {})",
                        h.index,
                        out.len()
                    )));
                }
                if !h.found {
                    out.push(None);
                } else if h.total_len == 0 || h.total_len > MAX_CHUNK_BYTES {
                    return Err(proto(format!("chunk length {} out of range", h.total_len)));
                } else {
                    let len = h.total_len as usize;
                    current = Some((tier(h.tier), len, BytesMut::with_capacity(len)));
                }
            }
            Some(get_response::Msg::Piece(p)) => {
                let Some((t, want, mut body)) = current.take() else {
                    return Err(proto("body piece without a chunk header".into()));
                };
                if body.len() + p.len() > want {
                    return Err(proto(format!("chunk body exceeds its {want} bytes")));
                }
                body.extend_from_slice(&p);
                if body.len() == want {
                    out.push(Some(Fetched {
                        tier: t,
                        blob: body.freeze(),
                    }));
                } else {
                    current = Some((t, want, body));
                }
            }
            None => return Err(proto("empty get message".into())),
        }
    }
    if current.is_some() || out.len() != n {
        return Err(proto(format!(
            "get stream ended after {} of {n} chunks",
            out.len()
        )));
    }
    Ok(out)
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::unix_socket_path;
    use std::path::PathBuf;

    #[test]
    fn unix_endpoints_are_recognised() {
        assert_eq!(
            unix_socket_path("unix:/run/kv.sock"),
            Some(PathBuf::from("/run/kv.sock"))
        );
        assert_eq!(
            unix_socket_path("unix:///run/kv.sock"),
            Some(PathBuf::from("/run/kv.sock"))
        );
        assert_eq!(unix_socket_path("/tmp/s"), Some(PathBuf::from("/tmp/s")));
        assert_eq!(unix_socket_path("./s"), Some(PathBuf::from("./s")));
        assert_eq!(unix_socket_path("http://127.0.0.1:7070"), None);
    }
}
