//! The kvault storage server.
//!
//! `kvault-server` keeps encoded KV-cache chunks (codec containers) in
//! storage tiers and serves them over gRPC (`kvault.v1.KvVault`). It is not
//! a codec (chunks arrive encoded; the server only verifies their container)
//! and knows nothing of the CLI or of models beyond their layout.
//!
//! Start reading at [`server::Server`] (how the pieces are wired), then
//! [`service`] (the gRPC edge), [`store`] (tiers stacked fast to slow) and
//! [`tier::ram`] (the RAM tier).

pub mod attend;
pub mod auth;
pub mod config;
pub mod error;
pub mod index;
pub mod io;
pub mod metrics;
pub mod namespace;
pub mod server;
pub mod service;
pub mod store;
pub mod tier;

pub use config::Config;
pub use error::ServerError;
pub use server::Server;
