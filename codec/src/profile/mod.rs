//! Codec profiles: how one layer of a KV tensor becomes payload bytes and back.
//!
//! Each profile lives in its own module (`lossless.rs`, later `q8.rs`, `cachegen.rs`) and
//! provides four functions: `params` (the profile parameter block stored in the header),
//! `check_params`, `encode_layer` and `decode_layer`. [`Profile`] dispatches to them. To
//! add a profile: add a variant with a new id, a module, and one arm in each `match` here.
//!
//! A layer is the `2 * tokens * kv_heads * head_dim` elements of one layer (K then V),
//! contiguous in the canonical layout. Layers are coded independently, so a container's
//! layers can be fetched and decoded alone.

mod lossless;

use std::fmt;
use std::str::FromStr;

use crate::error::CodecError;
use crate::tensor::{Dtype, KvView};

/// A codec profile: the method that turns a layer into payload bytes.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Profile {
    /// Byte shuffle + zstd of the source bits; decodes bit-exact.
    Lossless = 1,
}

impl Profile {
    /// Every profile this build knows.
    pub const ALL: &'static [Profile] = &[Profile::Lossless];

    /// Lowercase name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Lossless => "lossless",
        }
    }

    /// One line saying what the profile does.
    pub fn description(self) -> &'static str {
        match self {
            Profile::Lossless => "byte-shuffle + zstd of the source bits; bit-exact",
        }
    }

    /// The id stored in containers.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The profile with the given container id.
    pub fn from_id(id: u8) -> Result<Profile, CodecError> {
        Profile::ALL
            .iter()
            .copied()
            .find(|p| p.id() == id)
            .ok_or_else(|| CodecError::UnknownProfile(format!("id {id}")))
    }

    /// Whether decoding gives back the source bits exactly.
    pub fn is_lossless(self) -> bool {
        match self {
            Profile::Lossless => true,
        }
    }

    /// The parameter block to store in the header when encoding `view`.
    pub(crate) fn params(self, view: &KvView<'_>) -> Result<Vec<u8>, CodecError> {
        match self {
            Profile::Lossless => lossless::params(view),
        }
    }

    /// Checks a parameter block read from a container.
    pub(crate) fn check_params(self, dtype: Dtype, params: &[u8]) -> Result<(), CodecError> {
        match self {
            Profile::Lossless => lossless::check_params(dtype, params),
        }
    }

    /// Encodes one layer (raw `dtype` bytes) into its payload.
    pub(crate) fn encode_layer(
        self,
        layer: &[u8],
        dtype: Dtype,
        params: &[u8],
        scratch: &mut Scratch,
    ) -> Result<Vec<u8>, CodecError> {
        match self {
            Profile::Lossless => lossless::encode_layer(layer, dtype, params, scratch),
        }
    }

    /// Decodes one layer payload into `out`, which holds exactly one layer in the source
    /// `dtype`. Must fail (never panic, never allocate beyond `out.len()` plus scratch of
    /// the same size) on any payload.
    pub(crate) fn decode_layer(
        self,
        payload: &[u8],
        dtype: Dtype,
        params: &[u8],
        out: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<(), CodecError> {
        match self {
            Profile::Lossless => lossless::decode_layer(payload, dtype, params, out, scratch),
        }
    }
}

impl FromStr for Profile {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::ALL
            .iter()
            .copied()
            .find(|p| p.name() == s)
            .ok_or_else(|| CodecError::UnknownProfile(format!("{s:?}")))
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-thread working memory reused across layers, so that coding a layer does not
/// allocate once warm.
#[derive(Default)]
pub(crate) struct Scratch {
    /// A byte buffer a profile may use freely (the lossless profile keeps shuffled bytes).
    pub(crate) buf: Vec<u8>,
    /// zstd compression context, created on first use.
    pub(crate) zstd_c: Option<zstd::bulk::Compressor<'static>>,
    /// zstd decompression context, created on first use.
    pub(crate) zstd_d: Option<zstd::bulk::Decompressor<'static>>,
}

/// Returns `buf` grown to at least `len` bytes (never shrunk, so reuse is free), cut to
/// exactly `len`.
pub(crate) fn sized(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_round_trip() {
        for &p in Profile::ALL {
            assert_eq!(Profile::from_id(p.id()), Ok(p));
            assert_eq!(p.name().parse::<Profile>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
            assert!(!p.description().is_empty());
        }
        assert_eq!(Profile::Lossless.id(), 1);
        assert!(Profile::Lossless.is_lossless());
        assert!(matches!(Profile::from_id(0), Err(CodecError::UnknownProfile(_))));
        assert!(matches!(
            "q3".parse::<Profile>(),
            Err(CodecError::UnknownProfile(_))
        ));
    }
}
