//! Client side of kvault: the library that serving nodes and tools use to
//! store and fetch KV caches, and the `kvault` command-line tool.
//!
//! The library connects to a `kvault-server` over gRPC ([`Client`]) or to
//! many as one store ([`Cluster`]: rendezvous placement over a static node
//! list or the servers registered in etcd), derives chained chunk keys from
//! token ids ([`kvault_proto::chain_keys`]), and moves whole prefixes through
//! either ([`ChunkStore`]): [`ChunkStore::put_prefix`] splits a KV cache into
//! chunks, encodes and stores them; [`ChunkStore::get_prefix`] finds the
//! longest stored prefix, fetches and decodes it. It is not a server and
//! holds no cache of its own. Start reading at [`client`], then [`prefix`]
//! and [`cluster`].
//!
//! ```no_run
//! use kvault_client::{ChunkStore, Client, Layout};
//! use kvault_codec::{Dtype, KvShape, KvTensor, Profile};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect("http://127.0.0.1:7070").await?;
//! let layout = Layout {
//!     model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
//!     layers: 30, kv_heads: 3, head_dim: 64,
//!     dtype: Dtype::F16, chunk_tokens: 256, rope: None,
//! };
//! let ids: Vec<u32> = (0..600).collect();
//! let shape = KvShape { layers: 30, tokens: 600, kv_heads: 3, head_dim: 64 };
//! let kv = KvTensor::zeros(shape, Dtype::F16)?; // the engine's real cache here
//! let put = client.put_prefix(&layout, &kv.view(), &ids, Profile::Lossless, 4).await?;
//! println!("stored {} new of {} chunks", put.new, put.chunks);
//! if let Some(hit) = client.get_prefix(&layout, &ids, Dtype::F16).await? {
//!     println!("{} tokens cached", hit.tokens);
//! }
//! # Ok(()) }
//! ```

pub mod attend;
pub mod client;
pub mod cluster;
pub mod error;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod kv_file;
pub mod local_server;
#[cfg(feature = "model")]
pub mod model;
pub mod placement;
pub mod prefix;
pub mod retry;
pub mod store;

pub use client::{Client, ClientConfig, Fetched, Lookup, Tier};
pub use cluster::{Cluster, ClusterConfig, Membership};
pub use error::{ClientError, Result};
pub use kvault_proto::{ChunkKey, Layout, NamespaceId, Rope, chain_keys};
pub use placement::{Node, Placement, PlacementError};
pub use retry::RetryPolicy;
pub use store::ChunkStore;
