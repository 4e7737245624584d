//! The KV tensor model: element types, the canonical shape, owned and borrowed tensors,
//! dtype conversion, and the limits every decoder enforces before it allocates.
//!
//! A KV tensor holds the keys and values of `tokens` consecutive tokens for `layers`
//! layers in the canonical row-major layout `[layers][2 (K,V)][tokens][kv_heads][head_dim]`,
//! each element stored as little-endian raw bytes of its [`Dtype`].

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

use crate::error::CodecError;

/// Element type of a KV tensor.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Dtype {
    /// IEEE 754 binary16.
    F16 = 1,
    /// bfloat16 (the upper half of an f32).
    Bf16 = 2,
    /// IEEE 754 binary32.
    F32 = 3,
}

impl Dtype {
    /// Every dtype, in id order.
    pub const ALL: &'static [Dtype] = &[Dtype::F16, Dtype::Bf16, Dtype::F32];

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
        }
    }

    /// Lowercase name: `"f16"`, `"bf16"` or `"f32"`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
        }
    }

    /// The dtype with the given on-disk id.
    pub fn from_u8(id: u8) -> Result<Dtype, CodecError> {
        match id {
            1 => Ok(Dtype::F16),
            2 => Ok(Dtype::Bf16),
            3 => Ok(Dtype::F32),
            other => Err(CodecError::UnknownDtype(format!("id {other}"))),
        }
    }
}

impl FromStr for Dtype {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dtype::ALL
            .iter()
            .copied()
            .find(|d| d.name() == s)
            .ok_or_else(|| CodecError::UnknownDtype(format!("{s:?}")))
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bounds that every shape must respect; decoders refuse anything bigger before allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most layers in a tensor (and in a container's `total_layers`).
    pub max_layers: u32,
    /// Most tokens in a tensor.
    pub max_tokens: u32,
    /// Most KV heads.
    pub max_kv_heads: u32,
    /// Largest head dimension.
    pub max_head_dim: u32,
    /// Largest tensor, in bytes of its own dtype.
    pub max_decoded_bytes: u64,
    /// Largest profile parameter block in a container header.
    pub max_params_len: u32,
}

/// The limits this build enforces.
pub const LIMITS: Limits = Limits {
    max_layers: 4096,
    max_tokens: 1 << 20,
    max_kv_heads: 4096,
    max_head_dim: 4096,
    max_decoded_bytes: 16 << 30,
    max_params_len: 1 << 20,
};

/// Canonical layout `[layers][2 (K,V)][tokens][kv_heads][head_dim]`, row-major.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct KvShape {
    /// Number of layers.
    pub layers: u32,
    /// Number of tokens.
    pub tokens: u32,
    /// Number of KV heads.
    pub kv_heads: u32,
    /// Head dimension.
    pub head_dim: u32,
}

impl KvShape {
    /// Number of elements, K and V together (saturates at `u64::MAX` for absurd shapes;
    /// [`KvShape::validate`] rules those out).
    pub fn elements(&self) -> u64 {
        self.layer_elements().saturating_mul(u64::from(self.layers))
    }

    /// Elements in one layer: `2 * tokens * kv_heads * head_dim`.
    pub fn layer_elements(&self) -> u64 {
        2u64.saturating_mul(u64::from(self.tokens))
            .saturating_mul(u64::from(self.kv_heads))
            .saturating_mul(u64::from(self.head_dim))
    }

    /// Bytes of the whole tensor in dtype `d`, overflow-checked.
    pub fn byte_len(&self, d: Dtype) -> Result<usize, CodecError> {
        let too_large = || CodecError::TooLarge {
            what: "tensor byte length",
            value: u64::MAX,
            limit: usize::MAX as u64,
        };
        let bytes = [self.tokens, self.kv_heads, self.head_dim, self.layers]
            .into_iter()
            .try_fold(2 * d.size() as u64, |acc, x| acc.checked_mul(u64::from(x)))
            .ok_or_else(too_large)?;
        usize::try_from(bytes).map_err(|_| CodecError::TooLarge {
            what: "tensor byte length",
            value: bytes,
            limit: usize::MAX as u64,
        })
    }

    /// Bytes of one layer in dtype `d`, overflow-checked.
    pub(crate) fn layer_byte_len(&self, d: Dtype) -> Result<usize, CodecError> {
        KvShape { layers: 1, ..*self }.byte_len(d)
    }

    /// Checks that every dimension is at least 1 and within [`LIMITS`].
    pub fn validate(&self) -> Result<(), CodecError> {
        let dims = [
            ("layers", self.layers, LIMITS.max_layers),
            ("tokens", self.tokens, LIMITS.max_tokens),
            ("kv_heads", self.kv_heads, LIMITS.max_kv_heads),
            ("head_dim", self.head_dim, LIMITS.max_head_dim),
        ];
        for (what, value, limit) in dims {
            if value == 0 {
                return Err(CodecError::BadShape(format!("{what} is 0")));
            }
            if value > limit {
                return Err(CodecError::TooLarge {
                    what,
                    value: u64::from(value),
                    limit: u64::from(limit),
                });
            }
        }
        Ok(())
    }

    /// Validates the shape and returns its byte length in `d`, refusing tensors above
    /// `LIMITS.max_decoded_bytes`. Encoders and decoders call this before allocating.
    pub(crate) fn checked_byte_len(&self, d: Dtype) -> Result<usize, CodecError> {
        self.validate()?;
        let len = self.byte_len(d)?;
        if len as u64 > LIMITS.max_decoded_bytes {
            return Err(CodecError::TooLarge {
                what: "tensor byte length",
                value: len as u64,
                limit: LIMITS.max_decoded_bytes,
            });
        }
        Ok(len)
    }
}

impl fmt::Display for KvShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{} layers][2][{} tokens][{} kv_heads][{} head_dim]",
            self.layers, self.tokens, self.kv_heads, self.head_dim
        )
    }
}

fn check_data_len(shape: &KvShape, dtype: Dtype, len: usize) -> Result<(), CodecError> {
    shape.validate()?;
    let expected = shape.byte_len(dtype)?;
    if len != expected {
        return Err(CodecError::BufferSize { expected, got: len });
    }
    Ok(())
}

/// A borrowed KV tensor: shape, dtype and the raw little-endian element bytes.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    shape: KvShape,
    dtype: Dtype,
    data: &'a [u8],
}

impl<'a> KvView<'a> {
    /// Wraps `data`, checking the shape and that `data.len() == shape.byte_len(dtype)`.
    pub fn new(shape: KvShape, dtype: Dtype, data: &'a [u8]) -> Result<Self, CodecError> {
        check_data_len(&shape, dtype, data.len())?;
        Ok(KvView { shape, dtype, data })
    }

    /// The shape.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The raw element bytes in canonical layout.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
}

/// An owned KV tensor: shape, dtype and the raw little-endian element bytes.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct KvTensor {
    shape: KvShape,
    dtype: Dtype,
    data: Vec<u8>,
}

impl KvTensor {
    /// Takes ownership of `data`, checking the shape and its length.
    pub fn new(shape: KvShape, dtype: Dtype, data: Vec<u8>) -> Result<Self, CodecError> {
        check_data_len(&shape, dtype, data.len())?;
        Ok(KvTensor { shape, dtype, data })
    }

    /// An all-zero tensor; refuses shapes beyond [`LIMITS`].
    pub fn zeros(shape: KvShape, dtype: Dtype) -> Result<Self, CodecError> {
        let len = shape.checked_byte_len(dtype)?;
        Ok(KvTensor {
            shape,
            dtype,
            data: vec![0; len],
        })
    }

    /// Borrows the tensor as a view.
    pub fn view(&self) -> KvView<'_> {
        KvView {
            shape: self.shape,
            dtype: self.dtype,
            data: &self.data,
        }
    }

    /// The shape.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The raw element bytes in canonical layout.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The raw element bytes, mutable (the length is fixed).
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Gives up the tensor, keeping its bytes.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
}

/// Element conversion between dtypes (little-endian raw bytes), f32 via `half` for f16/bf16 (round-to-nearest-even); same dtype = memcpy.
///
/// `src.len()` must be a multiple of `from.size()` and `dst.len()` must hold exactly as
/// many elements in `to`. f16 and bf16 convert to each other through f32 (exact widening,
/// then one rounding). NaNs stay NaNs.
pub fn convert(src: &[u8], from: Dtype, dst: &mut [u8], to: Dtype) -> Result<(), CodecError> {
    if !src.len().is_multiple_of(from.size()) {
        return Err(CodecError::BufferSize {
            expected: src.len() / from.size() * from.size(),
            got: src.len(),
        });
    }
    let n = src.len() / from.size();
    let expected = n * to.size();
    if dst.len() != expected {
        return Err(CodecError::BufferSize {
            expected,
            got: dst.len(),
        });
    }
    if from == to {
        dst.copy_from_slice(src);
        return Ok(());
    }
    match (from, to) {
        (Dtype::F16, Dtype::F32) => {
            map_elems::<2, 4>(src, dst, |b| f16::from_le_bytes(b).to_f32().to_le_bytes())
        }
        (Dtype::Bf16, Dtype::F32) => {
            map_elems::<2, 4>(src, dst, |b| bf16::from_le_bytes(b).to_f32().to_le_bytes())
        }
        (Dtype::F32, Dtype::F16) => {
            map_elems::<4, 2>(src, dst, |b| f16::from_f32(f32::from_le_bytes(b)).to_le_bytes())
        }
        (Dtype::F32, Dtype::Bf16) => {
            map_elems::<4, 2>(src, dst, |b| bf16::from_f32(f32::from_le_bytes(b)).to_le_bytes())
        }
        (Dtype::F16, Dtype::Bf16) => map_elems::<2, 2>(src, dst, |b| {
            bf16::from_f32(f16::from_le_bytes(b).to_f32()).to_le_bytes()
        }),
        (Dtype::Bf16, Dtype::F16) => map_elems::<2, 2>(src, dst, |b| {
            f16::from_f32(bf16::from_le_bytes(b).to_f32()).to_le_bytes()
        }),
        // Same-dtype pairs returned above.
        (Dtype::F16, Dtype::F16) | (Dtype::Bf16, Dtype::Bf16) | (Dtype::F32, Dtype::F32) => {}
    }
    Ok(())
}

/// Applies `f` to each `A`-byte element of `src`, writing `B`-byte elements to `dst`.
fn map_elems<const A: usize, const B: usize>(src: &[u8], dst: &mut [u8], f: impl Fn([u8; A]) -> [u8; B]) {
    for (s, d) in src.chunks_exact(A).zip(dst.chunks_exact_mut(B)) {
        let mut a = [0u8; A];
        a.copy_from_slice(s);
        d.copy_from_slice(&f(a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s_to_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn bytes_to_f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn round_trip(via: Dtype, input: &[f32]) -> Vec<f32> {
        let src = f32s_to_bytes(input);
        let mut mid = vec![0u8; input.len() * via.size()];
        convert(&src, Dtype::F32, &mut mid, via).unwrap();
        let mut back = vec![0u8; src.len()];
        convert(&mid, via, &mut back, Dtype::F32).unwrap();
        bytes_to_f32s(&back)
    }

    #[test]
    fn f32_f16_f32_known_values() {
        let input = [
            1.0, -2.5, 0.0, 65504.0, 65520.0, 0.1, 2049.0, 2051.0, 1e-8, 6.0e-8,
        ];
        let want = [
            1.0,
            -2.5,
            0.0,
            65504.0,
            f32::INFINITY,  // halfway to the next binade rounds up to infinity
            0.099_975_586,  // nearest f16 to 0.1
            2048.0,         // tie, rounds to even mantissa
            2052.0,         // tie, rounds to even mantissa
            0.0,            // below half the smallest subnormal
            5.960_464_5e-8, // smallest f16 subnormal
        ];
        assert_eq!(round_trip(Dtype::F16, &input), want);
        assert!(round_trip(Dtype::F16, &[f32::NAN])[0].is_nan());
    }

    #[test]
    fn f32_bf16_f32_known_values() {
        let ulp = 2f32.powi(-7); // bf16 spacing just above 1.0
        let input = [1.0, 1.0 + ulp / 2.0, 1.0 + 3.0 * ulp / 2.0, -3.0, 1.0 + ulp / 4.0];
        // Ties round to the even mantissa: 1 + ulp/2 -> 1, 1 + 3ulp/2 -> 1 + 2ulp.
        let want = [1.0, 1.0, 1.0 + 2.0 * ulp, -3.0, 1.0];
        assert_eq!(round_trip(Dtype::Bf16, &input), want);
    }

    #[test]
    fn f16_to_bf16_goes_through_f32() {
        let src = f16::from_f32(3.5).to_le_bytes();
        let mut dst = [0u8; 2];
        convert(&src, Dtype::F16, &mut dst, Dtype::Bf16).unwrap();
        assert_eq!(bf16::from_le_bytes(dst).to_f32(), 3.5);
    }

    #[test]
    fn convert_checks_sizes() {
        let mut dst = [0u8; 3];
        assert_eq!(
            convert(&[0u8; 4], Dtype::F16, &mut dst, Dtype::F16),
            Err(CodecError::BufferSize { expected: 4, got: 3 })
        );
        assert!(convert(&[0u8; 3], Dtype::F16, &mut [0u8; 6], Dtype::F32).is_err());
    }

    #[test]
    fn dtype_names_and_ids() {
        for &d in Dtype::ALL {
            assert_eq!(d.name().parse::<Dtype>(), Ok(d));
            assert_eq!(Dtype::from_u8(d as u8), Ok(d));
            assert_eq!(d.to_string(), d.name());
        }
        assert!(matches!(Dtype::from_u8(0), Err(CodecError::UnknownDtype(_))));
        assert!(matches!("fp8".parse::<Dtype>(), Err(CodecError::UnknownDtype(_))));
        assert_eq!(Dtype::F16.size(), 2);
        assert_eq!(Dtype::Bf16.size(), 2);
        assert_eq!(Dtype::F32.size(), 4);
    }

    #[test]
    fn shape_sizes_and_limits() {
        let s = KvShape {
            layers: 3,
            tokens: 5,
            kv_heads: 2,
            head_dim: 7,
        };
        assert_eq!(s.layer_elements(), 2 * 5 * 2 * 7);
        assert_eq!(s.elements(), 3 * 2 * 5 * 2 * 7);
        assert_eq!(s.byte_len(Dtype::F32), Ok(3 * 2 * 5 * 2 * 7 * 4));
        assert!(s.validate().is_ok());

        let too_many_tokens = KvShape { tokens: 1 << 21, ..s };
        assert!(matches!(
            too_many_tokens.validate(),
            Err(CodecError::TooLarge { what: "tokens", .. })
        ));
        assert!(KvTensor::zeros(too_many_tokens, Dtype::F16).is_err());
        let zero = KvShape { layers: 0, ..s };
        assert!(matches!(zero.validate(), Err(CodecError::BadShape(_))));

        // Every dimension at its limit: valid dims, but far above the decoded-bytes limit.
        let huge = KvShape {
            layers: LIMITS.max_layers,
            tokens: LIMITS.max_tokens,
            kv_heads: LIMITS.max_kv_heads,
            head_dim: LIMITS.max_head_dim,
        };
        assert!(huge.validate().is_ok());
        assert!(matches!(
            huge.checked_byte_len(Dtype::F16),
            Err(CodecError::TooLarge { .. })
        ));
        let absurd = KvShape {
            layers: u32::MAX,
            tokens: u32::MAX,
            kv_heads: u32::MAX,
            head_dim: u32::MAX,
        };
        assert!(absurd.byte_len(Dtype::F32).is_err());
        assert_eq!(absurd.elements(), u64::MAX);
    }

    #[test]
    fn views_check_length() {
        let s = KvShape {
            layers: 1,
            tokens: 2,
            kv_heads: 1,
            head_dim: 2,
        };
        assert!(KvView::new(s, Dtype::F16, &[0u8; 16]).is_ok());
        assert_eq!(
            KvView::new(s, Dtype::F16, &[0u8; 15]).err(),
            Some(CodecError::BufferSize {
                expected: 16,
                got: 15
            })
        );
        let t = KvTensor::zeros(s, Dtype::F32).unwrap();
        assert_eq!(t.data().len(), 32);
        assert_eq!(t.view().data().len(), 32);
        assert!(KvTensor::new(s, Dtype::F32, vec![0; 31]).is_err());
    }
}
