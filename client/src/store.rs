//! What the prefix operations, the CLI and the model runner need of a
//! store: one server ([`crate::Client`]) or many ([`crate::Cluster`]).

use std::future::Future;

use bytes::Bytes;
use kvault_codec::{Dtype, KvView, Profile};
use kvault_proto::{ChunkKey, LayerSpan, Layout};

use crate::client::{Fetched, Lookup, Tier};
use crate::error::Result;
use crate::prefix::{FetchedPrefix, PutSummary};

/// Chunk storage by key: a single server or a cluster of them.
pub trait ChunkStore: Sync {
    /// Longest stored prefix of a key chain, and each key's tier.
    fn lookup(&self, layout: &Layout, keys: &[ChunkKey]) -> impl Future<Output = Result<Lookup>> + Send;

    /// Tier of each key (`Tier::None` where absent).
    fn exists(&self, layout: &Layout, keys: &[ChunkKey]) -> impl Future<Output = Result<Vec<Tier>>> + Send;

    /// Stores one chunk container; false when it was already stored.
    fn put(&self, layout: &Layout, key: &ChunkKey, blob: Bytes) -> impl Future<Output = Result<bool>> + Send;

    /// Fetches chunks in key order (`None` where absent), optionally a layer range only.
    fn get_many(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
        layers: Option<LayerSpan>,
    ) -> impl Future<Output = Result<Vec<Option<Fetched>>>> + Send;

    /// Deletes keys; how many were stored.
    fn delete(&self, layout: &Layout, keys: &[ChunkKey]) -> impl Future<Output = Result<u32>> + Send;

    /// The layout the store has bound `model_id` to.
    fn describe_model(&self, model_id: &str) -> impl Future<Output = Result<Layout>> + Send;

    /// Whether this is a cluster (where a down node means fewer cached
    /// chunks, not a failed operation).
    fn is_cluster(&self) -> bool {
        false
    }

    /// Splits `kv` (the cache of `ids`) into chunks, encodes them with
    /// `profile` and stores those not stored yet, `concurrency` puts at once.
    fn put_prefix(
        &self,
        layout: &Layout,
        kv: &KvView<'_>,
        ids: &[u32],
        profile: Profile,
        concurrency: usize,
    ) -> impl Future<Output = Result<PutSummary>> + Send
    where
        Self: Sized,
    {
        crate::prefix::put_prefix(self, layout, kv, ids, profile, concurrency)
    }

    /// Fetches the longest stored prefix of `ids`, decoded into `out_dtype`;
    /// `None` when not even the first chunk is stored.
    fn get_prefix(
        &self,
        layout: &Layout,
        ids: &[u32],
        out_dtype: Dtype,
    ) -> impl Future<Output = Result<Option<FetchedPrefix>>> + Send
    where
        Self: Sized,
    {
        crate::prefix::get_prefix(self, layout, ids, out_dtype)
    }
}

impl ChunkStore for crate::Client {
    async fn lookup(&self, layout: &Layout, keys: &[ChunkKey]) -> Result<Lookup> {
        crate::Client::lookup(self, layout, keys).await
    }

    async fn exists(&self, layout: &Layout, keys: &[ChunkKey]) -> Result<Vec<Tier>> {
        crate::Client::exists(self, layout, keys).await
    }

    async fn put(&self, layout: &Layout, key: &ChunkKey, blob: Bytes) -> Result<bool> {
        crate::Client::put(self, layout, key, blob).await
    }

    async fn get_many(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
        layers: Option<LayerSpan>,
    ) -> Result<Vec<Option<Fetched>>> {
        crate::Client::get_many(self, layout, keys, layers).await
    }

    async fn delete(&self, layout: &Layout, keys: &[ChunkKey]) -> Result<u32> {
        crate::Client::delete(self, layout, keys).await
    }

    async fn describe_model(&self, model_id: &str) -> Result<Layout> {
        crate::Client::describe_model(self, model_id).await
    }
}

impl ChunkStore for crate::Cluster {
    async fn lookup(&self, layout: &Layout, keys: &[ChunkKey]) -> Result<Lookup> {
        let tiers = ChunkStore::exists(self, layout, keys).await?;
        let prefix_chunks = tiers.iter().take_while(|t| **t != Tier::None).count();
        Ok(Lookup { prefix_chunks, tiers })
    }

    /// Unavailable nodes' keys read as absent; a refusal is an error.
    async fn exists(&self, layout: &Layout, keys: &[ChunkKey]) -> Result<Vec<Tier>> {
        self.exists_each(layout, keys)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(t) => Ok(t),
                Err(e) if e.is_unavailable() => Ok(Tier::None),
                Err(e) => Err(e.into()),
            })
            .collect()
    }

    async fn put(&self, layout: &Layout, key: &ChunkKey, blob: Bytes) -> Result<bool> {
        Ok(self.put_owners(layout, key, blob).await?)
    }

    /// Unavailable nodes' keys read as misses; a refusal is an error.
    async fn get_many(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
        layers: Option<LayerSpan>,
    ) -> Result<Vec<Option<Fetched>>> {
        self.get_each(layout, keys, layers)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(f) => Ok(f),
                Err(e) if e.is_unavailable() => Ok(None),
                Err(e) => Err(e.into()),
            })
            .collect()
    }

    async fn delete(&self, layout: &Layout, keys: &[ChunkKey]) -> Result<u32> {
        Ok(self.delete_all(layout, keys).await?)
    }

    async fn describe_model(&self, model_id: &str) -> Result<Layout> {
        Ok(self.describe(model_id).await?)
    }

    fn is_cluster(&self) -> bool {
        true
    }
}
