//! KV caches as safetensors files: tensor `kv` in the canonical layout
//! `[layers, 2, tokens, kv_heads, head_dim]` (f16, bf16 or f32) and tensor
//! `ids` with the prefix's token ids (`[tokens]`, any integer type).

use std::path::Path;

use kvault_codec::{Dtype, KvShape, KvTensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors};
use thiserror::Error;

/// Why a KV file could not be read or written.
#[derive(Debug, Error)]
pub enum KvFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a safetensors file, or a broken one.
    #[error("{path}: not a valid safetensors file: {reason}")]
    Format {
        /// The file.
        path: String,
        /// Parser's message.
        reason: String,
    },
    /// A tensor is missing or has the wrong shape or type.
    #[error("{path}: {reason}")]
    Tensor {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// A prefix's KV cache and its token ids.
#[derive(Debug)]
pub struct KvFile {
    /// The cache, canonical layout.
    pub kv: KvTensor,
    /// Token ids, one per cached token.
    pub ids: Vec<u32>,
}

fn codec_dtype(d: StDtype) -> Option<Dtype> {
    match d {
        StDtype::F16 => Some(Dtype::F16),
        StDtype::BF16 => Some(Dtype::Bf16),
        StDtype::F32 => Some(Dtype::F32),
        _ => None,
    }
}

fn st_dtype(d: Dtype) -> StDtype {
    match d {
        Dtype::F16 => StDtype::F16,
        Dtype::Bf16 => StDtype::BF16,
        Dtype::F32 => StDtype::F32,
    }
}

/// Reads tensor `ids` from raw little-endian integers of any width and sign,
/// refusing values that are not valid u32 token ids.
fn ids_from(view: &TensorView<'_>, path: &str) -> Result<Vec<u32>, KvFileError> {
    let bad = |reason: String| KvFileError::Tensor {
        path: path.to_string(),
        reason,
    };
    if view.shape().len() != 1 {
        return Err(bad(format!(
            "tensor `ids` must be 1-D, has shape {:?}",
            view.shape()
        )));
    }
    let b = view.data();
    let vals: Vec<i128> = match view.dtype() {
        StDtype::U8 => b.iter().map(|&x| x as i128).collect(),
        StDtype::I8 => b.iter().map(|&x| x as i8 as i128).collect(),
        StDtype::U16 => b
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as i128)
            .collect(),
        StDtype::I16 => b
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as i128)
            .collect(),
        StDtype::U32 => b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i128)
            .collect(),
        StDtype::I32 => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i128)
            .collect(),
        StDtype::U64 => b
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as i128)
            .collect(),
        StDtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as i128)
            .collect(),
        d => return Err(bad(format!("tensor `ids` must have an integer type, has {d:?}"))),
    };
    vals.into_iter()
        .enumerate()
        .map(|(i, v)| u32::try_from(v).map_err(|_| bad(format!("ids[{i}] = {v} is not a valid token id"))))
        .collect()
}

/// Reads a whole safetensors file; the tensors borrow from the returned bytes.
fn load(path: &Path) -> Result<(String, Vec<u8>), KvFileError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| KvFileError::Io {
        path: p.clone(),
        source,
    })?;
    Ok((p, bytes))
}

fn parse<'a>(p: &str, bytes: &'a [u8]) -> Result<SafeTensors<'a>, KvFileError> {
    SafeTensors::deserialize(bytes).map_err(|e| KvFileError::Format {
        path: p.to_string(),
        reason: e.to_string(),
    })
}

/// Reads tensor `ids` alone (the KV tensor may be absent).
pub fn read_ids(path: &Path) -> Result<Vec<u32>, KvFileError> {
    let (p, bytes) = load(path)?;
    let st = parse(&p, &bytes)?;
    let ids = st.tensor("ids").map_err(|_| KvFileError::Tensor {
        path: p.clone(),
        reason: "missing tensor `ids`".into(),
    })?;
    ids_from(&ids, &p)
}

/// Reads and validates tensors `kv` and `ids`.
pub fn read(path: &Path) -> Result<KvFile, KvFileError> {
    let (p, bytes) = load(path)?;
    let st = parse(&p, &bytes)?;
    let bad = |reason: String| KvFileError::Tensor {
        path: p.clone(),
        reason,
    };
    let kv = st.tensor("kv").map_err(|_| bad("missing tensor `kv`".into()))?;
    let dtype = codec_dtype(kv.dtype()).ok_or_else(|| {
        bad(format!(
            "tensor `kv` must be f16, bf16 or f32, is {:?}",
            kv.dtype()
        ))
    })?;
    let s = kv.shape();
    if s.len() != 5 || s[1] != 2 {
        return Err(bad(format!(
            "tensor `kv` must have shape [layers, 2, tokens, kv_heads, head_dim], has {s:?}"
        )));
    }
    let dim = |i: usize| u32::try_from(s[i]).map_err(|_| bad(format!("dimension {i} of `kv` is too large")));
    let shape = KvShape {
        layers: dim(0)?,
        tokens: dim(2)?,
        kv_heads: dim(3)?,
        head_dim: dim(4)?,
    };
    shape.validate().map_err(|e| bad(format!("tensor `kv`: {e}")))?;
    let ids = st.tensor("ids").map_err(|_| bad("missing tensor `ids`".into()))?;
    let ids = ids_from(&ids, &p)?;
    if ids.len() != shape.tokens as usize {
        return Err(bad(format!(
            "tensor `ids` has {} tokens, `kv` has {}",
            ids.len(),
            shape.tokens
        )));
    }
    let kv = KvTensor::new(shape, dtype, kv.data().to_vec()).map_err(|e| bad(e.to_string()))?;
    Ok(KvFile { kv, ids })
}

/// Writes `kv` and `ids` (as i64, the type engines use for token ids).
pub fn write(path: &Path, kv: &KvTensor, ids: &[u32]) -> Result<(), KvFileError> {
    let p = path.display().to_string();
    let fmt = |e: safetensors::SafeTensorError| KvFileError::Format {
        path: p.clone(),
        reason: e.to_string(),
    };
    let s = kv.shape();
    let kv_view = TensorView::new(
        st_dtype(kv.dtype()),
        vec![
            s.layers as usize,
            2,
            s.tokens as usize,
            s.kv_heads as usize,
            s.head_dim as usize,
        ],
        kv.data(),
    )
    .map_err(fmt)?;
    let id_bytes: Vec<u8> = ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
    let ids_view = TensorView::new(StDtype::I64, vec![ids.len()], &id_bytes).map_err(fmt)?;
    safetensors::serialize_to_file([("kv", kv_view), ("ids", ids_view)], None, path).map_err(fmt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (KvTensor, Vec<u32>) {
        let shape = KvShape {
            layers: 2,
            tokens: 5,
            kv_heads: 1,
            head_dim: 4,
        };
        let n = shape.byte_len(Dtype::F16).unwrap();
        let kv = KvTensor::new(shape, Dtype::F16, (0..n).map(|i| i as u8).collect()).unwrap();
        (kv, vec![1, 2, 3, 4, 5])
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let (kv, ids) = sample();
        write(&p, &kv, &ids).unwrap();
        let f = read(&p).unwrap();
        assert_eq!(f.kv.data(), kv.data());
        assert_eq!(f.kv.shape(), kv.shape());
        assert_eq!(f.ids, ids);
        assert_eq!(read_ids(&p).unwrap(), ids);
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.safetensors");
        let data = vec![0u8; 2 * 2 * 3 * 4];
        let v = TensorView::new(StDtype::F16, vec![2, 3, 2, 2], &data).unwrap();
        safetensors::serialize_to_file([("kv", v)], None, &p).unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("shape"), "{e}");

        let ids = vec![0u8; 8];
        let v = TensorView::new(StDtype::I64, vec![1], &ids).unwrap();
        safetensors::serialize_to_file([("ids", v)], None, &p).unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("missing tensor `kv`"), "{e}");

        std::fs::write(&p, b"garbage").unwrap();
        assert!(matches!(read(&p), Err(KvFileError::Format { .. })));
    }

    #[test]
    fn negative_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        let (kv, _) = sample();
        let s = kv.shape();
        let kv_view = TensorView::new(StDtype::F16, vec![2, 2, s.tokens as usize, 1, 4], kv.data()).unwrap();
        let ids: Vec<u8> = [1i32, 2, -3, 4, 5].iter().flat_map(|i| i.to_le_bytes()).collect();
        let ids_view = TensorView::new(StDtype::I32, vec![5], &ids).unwrap();
        safetensors::serialize_to_file([("kv", kv_view), ("ids", ids_view)], None, &p).unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("ids[2]"), "{e}");
    }
}
