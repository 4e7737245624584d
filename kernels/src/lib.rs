//! GPU side of kvault: CUDA C sources that decode codec containers straight into
//! caller-owned device memory, compiled at run time with NVRTC and launched through
//! cudarc (dynamic loading: a build needs no CUDA toolkit, a host needs no GPU).
//!
//! The host half of every decode is [`kvault_codec::plan::DecodePlan`]: it parses and
//! checks the containers and lists their substreams; the kernels in `cu/decode.cu` only
//! run streams. Outputs are bit for bit the CPU decoder's (every float operation in the
//! kernels names its rounding).
//!
//! [`attend`] is the GPU attention worker: decode attention over an f16 cache in device
//! memory (the decoder's canonical output), with the server's `Attend` contract.
//!
//! Without the `cuda` feature, or without a driver and device at run time, every entry
//! point answers [`KernelError::NoGpu`] instead of panicking.

#![warn(missing_docs)]

use kvault_codec::CodecError;
use thiserror::Error;

pub mod attend;
mod layout;
pub mod synthetic;

#[cfg(feature = "cuda")]
mod compile;
#[cfg(feature = "cuda")]
mod decoder;
#[cfg(test)]
mod emulate;

pub use layout::{OutDtype, OutLayout};

#[cfg(feature = "cuda")]
pub use attend::{GpuAttention, GpuKv};
#[cfg(feature = "cuda")]
pub use compile::{compile_all, nvrtc_available};
#[cfg(feature = "cuda")]
pub use cudarc;
#[cfg(feature = "cuda")]
pub use decoder::{GpuDecoder, Target};

/// The codec profiles the GPU decodes (the lossless profile is a CPU codec).
pub const GPU_PROFILES: &[kvault_codec::Profile] = &[
    kvault_codec::Profile::KvHi,
    kvault_codec::Profile::KvMid,
    kvault_codec::Profile::KvLo,
    kvault_codec::Profile::Q8,
    kvault_codec::Profile::CachegenBaseline,
];

/// The CUDA C sources, by name, as NVRTC compiles them.
pub const SOURCES: &[(&str, &str)] = &[
    ("decode.cu", include_str!("../cu/decode.cu")),
    ("attend.cu", include_str!("../cu/attend.cu")),
];

/// Why a GPU operation could not run or did not succeed.
#[derive(Debug, Error)]
pub enum KernelError {
    /// No usable GPU: the `cuda` feature is off, or no driver or device was found.
    #[error("no GPU: {0}")]
    NoGpu(String),
    /// NVRTC is missing or refused a kernel source.
    #[error("kernel compilation failed: {0}")]
    Compile(String),
    /// A CUDA driver call failed.
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// A container could not be planned (corrupt, unsupported profile, shape mismatch).
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A kernel found a corrupt stream; the output buffer holds partial garbage.
    #[error("corrupt stream found on the GPU: {0}")]
    Corrupt(String),
    /// The output buffers do not fit the plan.
    #[error("output does not fit: {0}")]
    Layout(String),
    /// An attention query or KV shape the GPU worker cannot take.
    #[error("bad attention query: {0}")]
    Query(String),
}

/// Whether this build can use a GPU at all (the `cuda` feature).
pub fn gpu_support_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// Checks that a GPU is usable, naming why not otherwise.
pub fn probe() -> Result<String, KernelError> {
    #[cfg(feature = "cuda")]
    {
        decoder::probe()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(KernelError::NoGpu(
            "kvault-kernels was built without the `cuda` feature".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_gpu_is_a_clean_error_or_a_device_name() {
        match probe() {
            Ok(name) => assert!(!name.is_empty()),
            Err(e) => assert!(matches!(e, KernelError::NoGpu(_)), "{e}"),
        }
    }
}
