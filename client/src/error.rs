//! The client's error type: one variant per thing a caller can act on.

use kvault_codec::CodecError;
use kvault_proto::ModelError;
use thiserror::Error;
use tonic::{Code, Status};

/// Why a client call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The endpoint URL is not usable.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The URL given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server could not be reached (after retries).
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// The server refused the request's content (shape, checksum, key, range).
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The model id is bound to another layout on the server.
    #[error("layout mismatch: {0}")]
    LayoutMismatch(String),
    /// A chunk or message larger than the server accepts.
    #[error("too large: {0}")]
    TooLarge(String),
    /// Credentials missing or refused.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The thing asked for does not exist (e.g. an unregistered model id).
    #[error("not found: {0}")]
    NotFound(String),
    /// The call ran past its deadline.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The server answered out of protocol (a bug or a hostile peer).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A local argument is invalid (bad key, bad layout).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The GPU decode path failed (no GPU, kernel error, output that does not fit).
    #[error("gpu: {0}")]
    Gpu(String),
    /// Encoding or decoding a chunk failed.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// Any other gRPC status.
    #[error("server error ({code:?}): {message}")]
    Server {
        /// gRPC code.
        code: Code,
        /// Server's message.
        message: String,
    },
}

impl ClientError {
    /// Whether retrying the same call may succeed (the server or network was
    /// momentarily unavailable); never true for a refusal of the request itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, ClientError::Unavailable(_))
    }

    /// The gRPC code this error stands for (to pass a refusal on unchanged).
    pub fn code(&self) -> Code {
        match self {
            ClientError::InvalidArgument(_) | ClientError::Model(_) => Code::InvalidArgument,
            ClientError::LayoutMismatch(_) => Code::FailedPrecondition,
            ClientError::TooLarge(_) => Code::ResourceExhausted,
            ClientError::Unauthenticated(_) => Code::Unauthenticated,
            ClientError::NotFound(_) => Code::NotFound,
            ClientError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ClientError::Unavailable(_) | ClientError::InvalidEndpoint { .. } => Code::Unavailable,
            ClientError::Server { code, .. } => *code,
            ClientError::Protocol(_) | ClientError::Codec(_) => Code::DataLoss,
            ClientError::Gpu(_) => Code::Internal,
        }
    }
}

impl From<Status> for ClientError {
    fn from(s: Status) -> ClientError {
        let m = s.message().to_string();
        match s.code() {
            Code::Unavailable => ClientError::Unavailable(m),
            Code::InvalidArgument | Code::OutOfRange => ClientError::InvalidArgument(m),
            Code::FailedPrecondition => ClientError::LayoutMismatch(m),
            Code::ResourceExhausted => ClientError::TooLarge(m),
            Code::Unauthenticated | Code::PermissionDenied => ClientError::Unauthenticated(m),
            Code::NotFound => ClientError::NotFound(m),
            Code::DeadlineExceeded => ClientError::DeadlineExceeded(m),
            code => ClientError::Server { code, message: m },
        }
    }
}

/// Result alias for client calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
