//! Fetching chunks straight into GPU memory (feature `cuda`): the containers come over
//! gRPC as usual and are decoded by the CUDA kernels of `kvault-kernels` into
//! caller-owned device buffers, canonical or paged (vLLM-style). Chunks whose profile has
//! no GPU decoder (lossless) are decoded on the CPU and copied up instead, so any stored
//! prefix can be fetched this way.

use std::ops::Range;

use kvault_codec::plan::Family;
use kvault_codec::{Container, Dtype, peek_profile};
use kvault_proto::{ChunkKey, LayerSpan, Layout};
use rayon::prelude::*;

pub use kvault_kernels::{GpuDecoder, KernelError, OutDtype, Target};

use crate::client::Client;
use crate::error::{ClientError, Result};

impl From<KernelError> for ClientError {
    fn from(e: KernelError) -> Self {
        match e {
            KernelError::Codec(c) => ClientError::Codec(c),
            e => ClientError::Gpu(e.to_string()),
        }
    }
}

impl Client {
    /// Fetches the chunks `keys` (consecutive chunks of one prefix, in token order) and
    /// decodes them on the GPU of `decoder` into `target`: the canonical layout of the
    /// whole run (`[layers, 2, tokens, kv_heads, head_dim]`) or paged caches. With `layers`
    /// only that layer range travels and is written.
    ///
    /// Every chunk must be stored ([`ClientError::NotFound`] names the first missing one;
    /// use [`Client::lookup`] first for the longest stored prefix). The decode blocks the
    /// calling thread for its duration (milliseconds for thousands of tokens).
    pub async fn get_to_device(
        &self,
        layout: &Layout,
        keys: &[ChunkKey],
        layers: Option<Range<u32>>,
        decoder: &GpuDecoder,
        dtype: OutDtype,
        target: Target<'_>,
    ) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let span = match &layers {
            Some(r) => Some(LayerSpan::new(r.start, r.end, layout.layers)?),
            None => None,
        };
        let fetched = self.get_many(layout, keys, span).await?;
        let mut blobs = Vec::with_capacity(fetched.len());
        for (i, f) in fetched.into_iter().enumerate() {
            match f {
                Some(f) => blobs.push(f.blob),
                None => {
                    return Err(ClientError::NotFound(format!(
                        "chunk {i} of {} is not stored",
                        keys.len()
                    )));
                }
            }
        }
        let refs: Vec<&[u8]> = blobs.iter().map(|b| b.as_ref()).collect();
        let on_gpu = refs
            .iter()
            .map(|b| Ok(Family::of(peek_profile(b)?).is_some()))
            .collect::<std::result::Result<Vec<bool>, kvault_codec::CodecError>>()?;
        if on_gpu.iter().all(|&g| g) {
            // The server already sliced the layer range: decode every layer it sent.
            decoder.decode_pipelined(&refs, None, dtype, target, 4)?;
            return Ok(());
        }
        // A CPU codec among the chunks: decode all of them on the CPU, then upload.
        let out_dtype: Dtype = dtype.dtype();
        let decoded: Vec<(u32, Vec<u8>)> = refs
            .par_iter()
            .map(|b| {
                let c = Container::parse(b)?;
                let shape = c.header().shape();
                let mut out = vec![0u8; shape.byte_len(out_dtype)?];
                kvault_codec::decode_into(b, out_dtype, &mut out)?;
                Ok((shape.tokens, out))
            })
            .collect::<std::result::Result<_, kvault_codec::CodecError>>()?;
        let nl = layers.as_ref().map_or(layout.layers, |r| r.end - r.start);
        let channels = layout.kv_heads * layout.head_dim;
        let tokens: u32 = decoded.iter().map(|d| d.0).sum();
        let row = channels as usize * dtype.size();
        let mut canonical = vec![0u8; 2 * nl as usize * tokens as usize * row];
        let mut t0 = 0usize;
        for (t, bytes) in &decoded {
            let t = *t as usize;
            for slot in 0..2 * nl as usize {
                let src = bytes.get(slot * t * row..(slot + 1) * t * row).ok_or_else(|| {
                    ClientError::Protocol("a chunk has fewer layers than the namespace".into())
                })?;
                canonical[(slot * tokens as usize + t0) * row..][..t * row].copy_from_slice(src);
            }
            t0 += t;
        }
        decoder.upload_canonical(&canonical, nl, tokens, channels, dtype, target)?;
        Ok(())
    }
}
