//! Who is in a kvault cluster, kept in etcd.
//!
//! Each `kvault-server` started with `--etcd` writes a [`NodeRecord`] (its
//! address, capacity and join time) under `PREFIX/nodes/ID`, attached to an
//! etcd lease that it keeps alive ([`Registration`]); a node that dies drops
//! out when the lease expires, a node that stops cleanly revokes it at once.
//! Clients and sidecars read and watch the prefix ([`Follower`]) and place
//! keys over the live set with the client library's rendezvous hashing; when
//! etcd cannot be reached they keep the last set they saw and say so.
//! Per-namespace replication factors live beside the nodes
//! (`PREFIX/replicas/MODEL_ID`), so every client applies the same one.
//!
//! This crate speaks etcd's own v3 gRPC API (the subset in
//! `proto/etcd.proto`, compiled by protox): no home-made coordination
//! protocol and no system `protoc`. It does no placement and moves no KV
//! data. Start reading at [`record`], then [`register`] and [`follow`].

pub mod etcd;
pub mod follow;
pub mod record;
pub mod register;

pub use etcd::Etcd;
pub use follow::{Follower, Members, View};
pub use record::{Keys, NodeRecord};
pub use register::{RegisterConfig, Registration};

use thiserror::Error;

/// What can go wrong talking to etcd or reading what it holds.
#[derive(Debug, Error)]
pub enum MembershipError {
    /// An etcd endpoint that is not a usable URL.
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why it was refused.
        reason: String,
    },
    /// etcd did not answer (down, unreachable, or too slow).
    #[error("etcd {op}: unavailable: {message}")]
    Unavailable {
        /// The operation.
        op: &'static str,
        /// Transport error or timeout.
        message: String,
    },
    /// etcd answered with an error.
    #[error("etcd {op}: {status}")]
    Etcd {
        /// The operation.
        op: &'static str,
        /// etcd's answer.
        status: tonic::Status,
    },
    /// A record that is not a valid node record.
    #[error("bad node record at {key:?}: {reason}")]
    BadRecord {
        /// Its etcd key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registration's lease expired or was revoked by someone else.
    #[error("lease {0:x} is gone")]
    LeaseLost(i64),
}

/// Shorthand for this crate's results.
pub type Result<T, E = MembershipError> = std::result::Result<T, E>;
