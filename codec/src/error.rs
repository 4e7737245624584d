//! The one error type of the crate: every way encoding, decoding or parsing can fail.

use thiserror::Error;

/// Everything that can go wrong in `kvault-codec`.
///
/// Variants say what to do: a `ChecksumMismatch` or `Corrupt` blob should be dropped and
/// refetched, an `UnsupportedVersion` or `UnknownProfile` blob was written by a newer
/// kvault, a `BufferSize` is a caller bug.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// The blob does not start with `KVLT`: it is not a kvault container.
    #[error("bad magic {found:02x?}, not a kvault container")]
    BadMagic {
        /// The first bytes of the blob.
        found: [u8; 4],
    },
    /// The container was written by a format version this build cannot read.
    #[error("unsupported container version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version in the blob.
        found: u16,
        /// Version this build reads.
        supported: u16,
    },
    /// The container sets flags this build does not know.
    #[error("unsupported container flags {0:#06x}")]
    UnsupportedFlags(u16),
    /// The blob ends before the container does.
    #[error("container truncated: need {needed} bytes, have {got}")]
    Truncated {
        /// Bytes the header says the container needs (at least).
        needed: u64,
        /// Bytes present.
        got: u64,
    },
    /// The trailing crc32c does not match the bytes: the blob was damaged.
    #[error("checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    ChecksumMismatch {
        /// Checksum stored in the blob.
        expected: u32,
        /// Checksum computed over the blob.
        actual: u32,
    },
    /// A profile id or name this build does not know.
    #[error("unknown codec profile {0}")]
    UnknownProfile(String),
    /// A dtype id or name this build does not know.
    #[error("unknown dtype {0} (expected f16, bf16 or f32)")]
    UnknownDtype(String),
    /// A shape that is not usable (a zero dimension, or a mismatch with the data).
    #[error("bad shape: {0}")]
    BadShape(String),
    /// A layer range that is empty or not inside the layers at hand.
    #[error("layer range {start}..{end} is empty or not inside {available_start}..{available_end}")]
    LayerRange {
        /// Requested first layer (absolute).
        start: u32,
        /// Requested end layer (absolute, exclusive).
        end: u32,
        /// First layer available (absolute).
        available_start: u32,
        /// End of the available layers (absolute, exclusive).
        available_end: u32,
    },
    /// The container is structurally wrong in a way the checksum did not catch.
    #[error("corrupt container: {0}")]
    Corrupt(String),
    /// A value is above the limits in [`crate::tensor::LIMITS`].
    #[error("{what} is {value}, above the limit of {limit}")]
    TooLarge {
        /// Which quantity.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A caller buffer has the wrong length.
    #[error("buffer size mismatch: expected {expected} bytes, got {got}")]
    BufferSize {
        /// Length required.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// A lossy profile was given a NaN or infinite element (or one too large for its
    /// quantizer); encode it with `lossless` instead.
    #[error("{profile} cannot encode {what}")]
    Unencodable {
        /// The profile's name.
        profile: &'static str,
        /// What was wrong with the input.
        what: &'static str,
    },
    /// The compressor failed while encoding (not a property of the input data).
    #[error("compression failed: {0}")]
    Compression(String),
}
