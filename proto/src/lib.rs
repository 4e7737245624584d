//! The `kvault.v1` wire contract and the domain types that guard it.
//!
//! This crate holds the code generated from `proto/kvault.proto` and
//! `proto/sidecar.proto` (module [`pb`]),
//! the validated types the server and client work with past the wire edge
//! ([`model`]), and the key derivation both sides must agree on ([`keys`]).
//! It does no I/O. Start with [`model::Layout`] and [`keys::ChunkKey`].

pub mod attend;
pub mod keys;
pub mod model;

/// Code generated from `kvault.proto` (messages, client and server stubs).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("kvault.v1");
}

pub use keys::{ChunkKey, NamespaceId, chain_keys};
pub use model::{LayerSpan, Layout, ModelError, Rope};

/// Metadata entry that names the tenant when the server runs without tokens.
pub const TENANT_HEADER: &str = "x-kvault-tenant";
/// Tenant used when a request names none.
pub const DEFAULT_TENANT: &str = "default";
/// Body bytes per streamed message. Well under gRPC's 4 MiB default limit,
/// large enough that framing costs little.
pub const PIECE_BYTES: usize = 1 << 20;
/// The largest message either side accepts: a piece plus headroom for the
/// header fields. Anything bigger is refused as oversize.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
