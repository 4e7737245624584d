//! The server's error type, and its one mapping to gRPC status codes.

use kvault_codec::CodecError;
use kvault_proto::ModelError;
use thiserror::Error;
use tonic::Status;

/// Everything a request can fail with. Each variant is something the caller
/// can act on; [`From<ServerError> for Status`] is the only place codes are chosen.
#[derive(Debug, Error)]
pub enum ServerError {
    /// A malformed wire message (bad namespace, key, range).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A chunk body that is not a valid container (bad magic, checksum, truncation).
    #[error("chunk body rejected: {0}")]
    Container(#[from] CodecError),
    /// The model id was registered earlier with another layout.
    #[error("model id {model_id:?} is registered with layout {registered}, request has {requested}")]
    LayoutMismatch {
        /// The model id.
        model_id: String,
        /// Layout stored at first use.
        registered: String,
        /// Layout in the request.
        requested: String,
    },
    /// A valid container whose shape or dtype is not the namespace's.
    #[error("chunk does not match its namespace: {0}")]
    ChunkShape(String),
    /// The stream broke the Put or Get protocol (order, lengths).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A chunk or request larger than the server accepts.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The disk is full: the put failed and nothing was stored.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// Missing or unknown credentials.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Local storage failed (persisting the namespace registry, a tier).
    #[error("storage error: {0}")]
    Storage(String),
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// A flag combination the server cannot start with.
    #[error("configuration: {0}")]
    Config(String),
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Status {
        let msg = e.to_string();
        match e {
            ServerError::Model(_)
            | ServerError::Container(_)
            | ServerError::ChunkShape(_)
            | ServerError::Protocol(_) => Status::invalid_argument(msg),
            ServerError::LayoutMismatch { .. } => Status::failed_precondition(msg),
            ServerError::TooLarge(_) | ServerError::NoSpace(_) => Status::resource_exhausted(msg),
            ServerError::Unauthenticated(_) => Status::unauthenticated(msg),
            ServerError::Storage(_) | ServerError::Config(_) => Status::internal(msg),
            ServerError::ShuttingDown => Status::unavailable(msg),
        }
    }
}

/// Result alias for server operations.
pub type Result<T, E = ServerError> = std::result::Result<T, E>;
