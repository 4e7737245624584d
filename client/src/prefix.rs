//! A prefix's KV cache as chunks: splitting a canonical tensor into
//! chunk-sized token ranges for storing, and stitching fetched chunks back.
//!
//! Canonical layout `[layers][2][tokens][kv_heads][head_dim]`: a token range
//! is one contiguous run per (layer, K/V) plane, so both directions copy
//! `2 × layers` runs.

use kvault_codec::{CodecError, Dtype, KvShape, KvTensor, KvView};

/// Copies tokens `t0..t1` of `src` into a new tensor of the same dtype.
pub fn slice_tokens(src: &KvView<'_>, t0: u32, t1: u32) -> Result<KvTensor, CodecError> {
    let s = src.shape();
    if t0 >= t1 || t1 > s.tokens {
        return Err(CodecError::BadShape(format!(
            "token range {t0}..{t1} outside 0..{}",
            s.tokens
        )));
    }
    let shape = KvShape { tokens: t1 - t0, ..s };
    let row = s.kv_heads as usize * s.head_dim as usize * src.dtype().size();
    let plane = s.tokens as usize * row;
    let mut out = Vec::with_capacity(shape.byte_len(src.dtype())?);
    for p in 0..(2 * s.layers as usize) {
        let base = p * plane;
        out.extend_from_slice(&src.data()[base + t0 as usize * row..base + t1 as usize * row]);
    }
    KvTensor::new(shape, src.dtype(), out)
}

/// Writes `src` (a chunk, already in `dst`'s dtype) into `dst` at token `t0`.
pub fn place_tokens(dst: &mut KvTensor, src: &KvView<'_>, t0: u32) -> Result<(), CodecError> {
    let (d, s) = (dst.shape(), src.shape());
    if src.dtype() != dst.dtype()
        || s.layers != d.layers
        || s.kv_heads != d.kv_heads
        || s.head_dim != d.head_dim
        || t0.checked_add(s.tokens).is_none_or(|end| end > d.tokens)
    {
        return Err(CodecError::BadShape(format!(
            "chunk {s:?} ({}) does not fit at token {t0} of {d:?} ({})",
            src.dtype(),
            dst.dtype()
        )));
    }
    let row = d.kv_heads as usize * d.head_dim as usize * dst.dtype().size();
    let (dplane, splane) = (d.tokens as usize * row, s.tokens as usize * row);
    let data = dst.data_mut();
    for p in 0..(2 * d.layers as usize) {
        let at = p * dplane + t0 as usize * row;
        data[at..at + splane].copy_from_slice(&src.data()[p * splane..(p + 1) * splane]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_then_place_is_identity() {
        let shape = KvShape {
            layers: 3,
            tokens: 10,
            kv_heads: 2,
            head_dim: 4,
        };
        let n = shape.byte_len(Dtype::F16).unwrap();
        let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        let full = KvTensor::new(shape, Dtype::F16, data).unwrap();
        let mut back = KvTensor::zeros(shape, Dtype::F16).unwrap();
        for (t0, t1) in [(0, 4), (4, 8), (8, 10)] {
            let c = slice_tokens(&full.view(), t0, t1).unwrap();
            assert_eq!(c.shape().tokens, t1 - t0);
            place_tokens(&mut back, &c.view(), t0).unwrap();
        }
        assert_eq!(back.data(), full.data());
    }

    #[test]
    fn out_of_range_is_refused() {
        let shape = KvShape {
            layers: 1,
            tokens: 4,
            kv_heads: 1,
            head_dim: 2,
        };
        let t = KvTensor::zeros(shape, Dtype::F32).unwrap();
        assert!(slice_tokens(&t.view(), 2, 5).is_err());
        assert!(slice_tokens(&t.view(), 2, 2).is_err());
        let mut dst = KvTensor::zeros(shape, Dtype::F32).unwrap();
        assert!(place_tokens(&mut dst, &t.view(), 1).is_err());
    }
}

/// Runs CPU-heavy codec work without stalling other tasks: on a multi-thread
/// runtime the worker hands its other tasks away first (`block_in_place`
/// would panic on a current-thread runtime, where this runs inline).
fn cpu_bound<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// What storing a prefix did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PutSummary {
    /// Chunks the prefix splits into.
    pub chunks: usize,
    /// Chunks that were not stored before.
    pub new: usize,
    /// Encoded bytes of all the prefix's chunks.
    pub stored_bytes: u64,
    /// Size of the same chunks in fp16.
    pub fp16_bytes: u64,
    /// Chunks not stored because their owner node was down (clusters only).
    pub unavailable: usize,
}

/// A prefix's KV fetched back.
#[derive(Debug)]
pub struct FetchedPrefix {
    /// The cache of the first `tokens` tokens, canonical layout.
    pub kv: KvTensor,
    /// Tokens covered (a multiple of the chunk size, or all of them).
    pub tokens: usize,
    /// Chunks fetched.
    pub chunks: usize,
    /// Encoded bytes moved over the wire.
    pub wire_bytes: u64,
}

/// Splits `kv` (the cache of `ids`) into chunks, encodes them with
/// `profile` and stores those the store does not hold yet, with up to
/// `concurrency` puts in flight. Chunks whose owner is unavailable (a
/// cluster node that is down) are counted in `unavailable`, not errors: the
/// cache stays correct, only less full. Called through
/// [`crate::ChunkStore::put_prefix`].
pub(crate) async fn put_prefix<S: crate::ChunkStore>(
    store: &S,
    layout: &kvault_proto::Layout,
    kv: &KvView<'_>,
    ids: &[u32],
    profile: kvault_codec::Profile,
    concurrency: usize,
) -> crate::Result<PutSummary> {
    use futures::{StreamExt, TryStreamExt};
    let s = kv.shape();
    if s.tokens as usize != ids.len()
        || s.layers != layout.layers
        || s.kv_heads != layout.kv_heads
        || s.head_dim != layout.head_dim
        || kv.dtype() != layout.dtype
    {
        return Err(CodecError::BadShape(format!(
            "KV {s:?} ({}) with {} ids does not match the namespace layout",
            kv.dtype(),
            ids.len()
        ))
        .into());
    }
    let ct = layout.chunk_tokens;
    let keys = kvault_proto::chain_keys(&layout.namespace_id(), ids, ct as usize);
    let present = store.exists(layout, &keys).await?;
    let fp16_per_token = 2 * s.layers as u64 * s.kv_heads as u64 * s.head_dim as u64 * 2;
    let mut summary = PutSummary {
        chunks: keys.len(),
        fp16_bytes: fp16_per_token * s.tokens as u64,
        ..Default::default()
    };
    // Encode every chunk (the summary reports all their sizes); codec work
    // runs on rayon inside `encode`, off the async threads.
    let mut blobs = Vec::with_capacity(keys.len());
    for (i, _) in keys.iter().enumerate() {
        let t0 = i as u32 * ct;
        let t1 = (t0 + ct).min(s.tokens);
        let chunk = slice_tokens(kv, t0, t1)?;
        // Chunk 0 holds the sequence's first token, the attention sink.
        let options = kvault_codec::EncodeOptions::sequence_start(i == 0);
        let blob = cpu_bound(|| kvault_codec::encode_with(chunk.view(), profile, options))?;
        summary.stored_bytes += blob.len() as u64;
        blobs.push(bytes::Bytes::from(blob));
    }
    let todo: Vec<_> = keys
        .iter()
        .zip(blobs)
        .zip(&present)
        .filter(|(_, t)| **t == crate::Tier::None)
        .map(|((k, b), _)| (*k, b))
        .collect();
    let stored: Vec<Option<bool>> = futures::stream::iter(todo)
        .map(|(k, b)| async move {
            match store.put(layout, &k, b).await {
                Ok(s) => Ok(Some(s)),
                Err(crate::ClientError::Unavailable(m)) if store.is_cluster() => {
                    tracing::warn!(key = %k, error = %m, "chunk owner unavailable: not stored");
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    summary.new = stored.iter().filter(|s| **s == Some(true)).count();
    summary.unavailable = stored.iter().filter(|s| s.is_none()).count();
    Ok(summary)
}

/// Fetches the longest stored prefix of `ids` and decodes it into `out_dtype`.
/// `None` when not even the first chunk is stored. Called through
/// [`crate::ChunkStore::get_prefix`].
pub(crate) async fn get_prefix<S: crate::ChunkStore>(
    store: &S,
    layout: &kvault_proto::Layout,
    ids: &[u32],
    out_dtype: Dtype,
) -> crate::Result<Option<FetchedPrefix>> {
    let ct = layout.chunk_tokens as usize;
    let keys = kvault_proto::chain_keys(&layout.namespace_id(), ids, ct);
    let found = store.lookup(layout, &keys).await?.prefix_chunks;
    if found == 0 {
        return Ok(None);
    }
    let fetched = store.get_many(layout, &keys[..found], None).await?;
    let tokens = (found * ct).min(ids.len());
    let shape = KvShape {
        layers: layout.layers,
        tokens: tokens as u32,
        kv_heads: layout.kv_heads,
        head_dim: layout.head_dim,
    };
    let mut kv = KvTensor::zeros(shape, out_dtype)?;
    let mut wire_bytes = 0;
    for (i, f) in fetched.into_iter().enumerate() {
        // Evicted between lookup and get: the prefix ends here.
        let Some(f) = f else {
            let shape = KvShape {
                tokens: (i * ct) as u32,
                ..shape
            };
            if i == 0 {
                return Ok(None);
            }
            let cut = slice_tokens(&kv.view(), 0, shape.tokens)?;
            return Ok(Some(FetchedPrefix {
                kv: cut,
                tokens: i * ct,
                chunks: i,
                wire_bytes,
            }));
        };
        wire_bytes += f.blob.len() as u64;
        let t0 = i * ct;
        let want = (tokens - t0).min(ct) as u32;
        let part = cpu_bound(|| -> crate::Result<KvTensor> {
            let c = kvault_codec::Container::parse(&f.blob)?;
            let h = c.header();
            if h.tokens != want
                || h.layer_count != layout.layers
                || h.kv_heads != layout.kv_heads
                || h.head_dim != layout.head_dim
            {
                return Err(crate::ClientError::Protocol(format!(
                    "chunk {i} holds {} tokens x {} layers, expected {want} x {}",
                    h.tokens, h.layer_count, layout.layers
                )));
            }
            let mut part = KvTensor::zeros(h.shape(), out_dtype)?;
            kvault_codec::decode_into(&f.blob, out_dtype, part.data_mut())?;
            Ok(part)
        })?;
        place_tokens(&mut kv, &part.view(), t0 as u32)?;
    }
    Ok(Some(FetchedPrefix {
        kv,
        tokens,
        chunks: found,
        wire_bytes,
    }))
}
