//! The kvault sidecar: a process beside a serving engine (vLLM, SGLang) that
//! answers in microseconds, hands decoded KV over without copies, and hides
//! the network.
//!
//! It serves the same `kvault.v1.KvVault` API as a server, on a Unix socket
//! ([`service`]), from a local RAM cache (the server's RAM tier code) in
//! front of the upstream servers ([`chunks`], [`upstream`]): reads are local
//! or fetched from the upstream that owns the key (rendezvous placement, as
//! the client library places keys), writes go through. The
//! `kvault.v1.Sidecar` service ([`shm`]) adds what only a local process can
//! use: a shared-memory region ([`region`]) into which `GetInto` decodes
//! chunks, with leases that expire so a crashed engine cannot leak it, and
//! `Prefetch`. Upstream failures never stall callers: lookups answer within
//! their deadline and a circuit breaker per upstream keeps
//! misses fast while a server is down. The upstream set is a cluster handle of the
//! client library ([`kvault_client::cluster`]): a static list, or the servers
//! registered in etcd, followed as they join and leave.
//!
//! It is not a server: it stores nothing durably. Start at [`server::Sidecar`].

pub mod chunks;
pub mod config;
pub mod metrics;
pub mod region;
pub mod server;
pub mod service;
pub mod shm;
pub mod upstream;

pub use config::Config;
pub use server::Sidecar;
