//! Validated domain types for `kvault.v1` messages.
//!
//! The server never works on raw protobuf structs past the edge: every
//! message field it relies on is checked here once (`TryFrom`), and a wire
//! mistake becomes a [`ModelError`] that the server answers with
//! `invalid_argument`.

use kvault_codec::Dtype;
use thiserror::Error;

use crate::keys::NamespaceId;
use crate::pb;

/// Largest model id accepted, in bytes.
pub const MAX_MODEL_ID_BYTES: usize = 256;
/// Most keys one request may name (a 1M-token prefix at 256 tokens per chunk is 4096).
pub const MAX_KEYS_PER_REQUEST: usize = 65_536;
/// Upper bound for any layout dimension; real models are far below it.
const MAX_DIM: u32 = 1 << 16;

/// A wire message that does not describe something valid.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ModelError {
    /// The request carries no namespace.
    #[error("request has no namespace")]
    MissingNamespace,
    /// The model id is empty or too long.
    #[error("model id must be 1..={MAX_MODEL_ID_BYTES} bytes, got {0}")]
    BadModelId(usize),
    /// A layout dimension is zero or absurd.
    #[error("namespace field {field} must be in 1..={MAX_DIM}, got {value}")]
    BadDimension {
        /// Field name as in the proto.
        field: &'static str,
        /// The value received.
        value: u32,
    },
    /// The dtype enum value is unknown or unspecified.
    #[error("unknown or unspecified dtype {0}")]
    BadDtype(i32),
    /// RoPE parameters are not finite and positive.
    #[error("rope parameters invalid: theta {theta}, rotary_dim {rotary_dim} (head_dim {head_dim})")]
    BadRope {
        /// Base frequency.
        theta: f32,
        /// Rotated dimensions.
        rotary_dim: u32,
        /// Head dimension of the layout.
        head_dim: u32,
    },
    /// A chunk key is not 32 bytes.
    #[error("chunk key must be 32 bytes, got {len}")]
    BadKey {
        /// Length received.
        len: usize,
    },
    /// Too many keys in one request.
    #[error("too many keys in one request: {got} (max {max})")]
    TooManyKeys {
        /// Keys received.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A layer range that is empty or outside the model.
    #[error("layer range {start}..{end} is empty or outside 0..{layers}")]
    BadLayerRange {
        /// First layer.
        start: u32,
        /// End (exclusive).
        end: u32,
        /// Layers of the model.
        layers: u32,
    },
}

/// Rotary embedding parameters carried by a namespace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Base frequency.
    pub theta: f32,
    /// Rotated dimensions per head.
    pub rotary_dim: u32,
}

/// A model's KV layout: the namespace every chunk key lives in.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Model identifier, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`.
    pub model_id: String,
    /// Transformer layers.
    pub layers: u32,
    /// KV heads per layer.
    pub kv_heads: u32,
    /// Dimension of one head.
    pub head_dim: u32,
    /// Element type of the cache as the engine holds it.
    pub dtype: Dtype,
    /// Tokens per chunk (the last chunk of a prefix may hold fewer).
    pub chunk_tokens: u32,
    /// RoPE parameters, for codecs that un-rotate keys.
    pub rope: Option<Rope>,
}

impl Layout {
    /// Checks every field; the constructor for layouts built in code.
    pub fn validate(&self) -> Result<(), ModelError> {
        let n = self.model_id.len();
        if n == 0 || n > MAX_MODEL_ID_BYTES {
            return Err(ModelError::BadModelId(n));
        }
        for (field, value) in [
            ("layers", self.layers),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("chunk_tokens", self.chunk_tokens),
        ] {
            if value == 0 || value > MAX_DIM {
                return Err(ModelError::BadDimension { field, value });
            }
        }
        if let Some(r) = self.rope {
            let ok = r.theta.is_finite()
                && r.theta > 0.0
                && r.rotary_dim > 0
                && r.rotary_dim <= self.head_dim
                && r.rotary_dim % 2 == 0;
            if !ok {
                return Err(ModelError::BadRope {
                    theta: r.theta,
                    rotary_dim: r.rotary_dim,
                    head_dim: self.head_dim,
                });
            }
        }
        Ok(())
    }

    /// The namespace id: a hash over every layout field, so two layouts that
    /// differ in anything never share keys.
    pub fn namespace_id(&self) -> NamespaceId {
        let mut h = blake3::Hasher::new();
        h.update(b"kvault-namespace-v1\0");
        h.update(&(self.model_id.len() as u32).to_le_bytes());
        h.update(self.model_id.as_bytes());
        for v in [self.layers, self.kv_heads, self.head_dim, self.chunk_tokens] {
            h.update(&v.to_le_bytes());
        }
        h.update(&[self.dtype as u8]);
        match self.rope {
            None => {
                h.update(&[0]);
            }
            Some(r) => {
                h.update(&[1]);
                h.update(&r.theta.to_bits().to_le_bytes());
                h.update(&r.rotary_dim.to_le_bytes());
            }
        }
        NamespaceId(*h.finalize().as_bytes())
    }

    /// Whether `other` describes the same cache layout (the model id aside).
    pub fn same_shape(&self, other: &Layout) -> bool {
        self.layers == other.layers
            && self.kv_heads == other.kv_heads
            && self.head_dim == other.head_dim
            && self.dtype == other.dtype
            && self.chunk_tokens == other.chunk_tokens
            && self.rope == other.rope
    }

    /// Wire form of the layout.
    pub fn to_proto(&self) -> pb::Namespace {
        pb::Namespace {
            model_id: self.model_id.clone(),
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype: dtype_to_proto(self.dtype) as i32,
            chunk_tokens: self.chunk_tokens,
            rope: self.rope.map(|r| pb::RopeParams {
                theta: r.theta,
                rotary_dim: r.rotary_dim,
            }),
        }
    }

    /// Parses an optional wire namespace, refusing a missing one.
    pub fn from_wire(ns: Option<pb::Namespace>) -> Result<Layout, ModelError> {
        ns.ok_or(ModelError::MissingNamespace)?.try_into()
    }
}

impl TryFrom<pb::Namespace> for Layout {
    type Error = ModelError;

    fn try_from(ns: pb::Namespace) -> Result<Self, ModelError> {
        let layout = Layout {
            model_id: ns.model_id,
            layers: ns.layers,
            kv_heads: ns.kv_heads,
            head_dim: ns.head_dim,
            dtype: dtype_from_proto(ns.dtype)?,
            chunk_tokens: ns.chunk_tokens,
            rope: ns.rope.map(|r| Rope {
                theta: r.theta,
                rotary_dim: r.rotary_dim,
            }),
        };
        layout.validate()?;
        Ok(layout)
    }
}

/// Wire enum value of a codec dtype.
pub fn dtype_to_proto(d: Dtype) -> pb::Dtype {
    match d {
        Dtype::F16 => pb::Dtype::F16,
        Dtype::Bf16 => pb::Dtype::Bf16,
        Dtype::F32 => pb::Dtype::F32,
    }
}

/// Codec dtype of a wire enum value.
pub fn dtype_from_proto(v: i32) -> Result<Dtype, ModelError> {
    match pb::Dtype::try_from(v) {
        Ok(pb::Dtype::F16) => Ok(Dtype::F16),
        Ok(pb::Dtype::Bf16) => Ok(Dtype::Bf16),
        Ok(pb::Dtype::F32) => Ok(Dtype::F32),
        _ => Err(ModelError::BadDtype(v)),
    }
}

/// A validated, non-empty layer range inside a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpan {
    /// First layer, inclusive.
    pub start: u32,
    /// Last layer, exclusive.
    pub end: u32,
}

impl LayerSpan {
    /// Checks a wire range against the model's layer count.
    pub fn new(start: u32, end: u32, layers: u32) -> Result<LayerSpan, ModelError> {
        if start >= end || end > layers {
            return Err(ModelError::BadLayerRange { start, end, layers });
        }
        Ok(LayerSpan { start, end })
    }

    /// The span as a `Range`.
    pub fn range(&self) -> std::ops::Range<u32> {
        self.start..self.end
    }
}

/// Parses a list of wire keys, refusing bad lengths and oversize lists.
pub fn keys_from_wire(keys: &[impl AsRef<[u8]>]) -> Result<Vec<crate::ChunkKey>, ModelError> {
    if keys.len() > MAX_KEYS_PER_REQUEST {
        return Err(ModelError::TooManyKeys {
            got: keys.len(),
            max: MAX_KEYS_PER_REQUEST,
        });
    }
    keys.iter()
        .map(|k| crate::ChunkKey::from_slice(k.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smol() -> Layout {
        Layout {
            model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            layers: 30,
            kv_heads: 3,
            head_dim: 64,
            dtype: Dtype::F16,
            chunk_tokens: 256,
            rope: Some(Rope {
                theta: 100_000.0,
                rotary_dim: 64,
            }),
        }
    }

    #[test]
    fn proto_round_trip() {
        let l = smol();
        assert_eq!(Layout::try_from(l.to_proto()).unwrap(), l);
    }

    #[test]
    fn namespace_id_covers_every_field() {
        let base = smol();
        let id = base.namespace_id();
        let variants: Vec<Layout> = vec![
            Layout {
                model_id: "other".into(),
                ..base.clone()
            },
            Layout {
                layers: 31,
                ..base.clone()
            },
            Layout {
                kv_heads: 4,
                ..base.clone()
            },
            Layout {
                head_dim: 32,
                ..base.clone()
            },
            Layout {
                dtype: Dtype::Bf16,
                ..base.clone()
            },
            Layout {
                chunk_tokens: 128,
                ..base.clone()
            },
            Layout {
                rope: None,
                ..base.clone()
            },
            Layout {
                rope: Some(Rope {
                    theta: 10_000.0,
                    rotary_dim: 64,
                }),
                ..base.clone()
            },
        ];
        for v in variants {
            assert_ne!(v.namespace_id(), id, "{v:?}");
        }
    }

    #[test]
    fn bad_namespaces_are_refused() {
        let mut p = smol().to_proto();
        p.layers = 0;
        assert!(matches!(
            Layout::try_from(p),
            Err(ModelError::BadDimension { field: "layers", .. })
        ));
        let mut p = smol().to_proto();
        p.dtype = 0;
        assert_eq!(Layout::try_from(p), Err(ModelError::BadDtype(0)));
        let mut p = smol().to_proto();
        p.model_id = String::new();
        assert_eq!(Layout::try_from(p), Err(ModelError::BadModelId(0)));
        let mut p = smol().to_proto();
        p.rope = Some(pb::RopeParams {
            theta: f32::NAN,
            rotary_dim: 64,
        });
        assert!(matches!(Layout::try_from(p), Err(ModelError::BadRope { .. })));
        assert_eq!(Layout::from_wire(None), Err(ModelError::MissingNamespace));
    }

    #[test]
    fn layer_span_bounds() {
        assert!(LayerSpan::new(0, 30, 30).is_ok());
        assert!(LayerSpan::new(3, 3, 30).is_err());
        assert!(LayerSpan::new(0, 31, 30).is_err());
    }
}
