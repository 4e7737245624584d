//! GPU side of kvault: CUDA C sources for decoding codec containers and for
//! attention partials, compiled at run time with NVRTC and launched through
//! cudarc.
//!
//! This crate is only its frame for now: the kernels arrive with the GPU
//! decode work. It already fixes the contract every caller relies on: without
//! the `cuda` feature, or without a GPU and driver at run time, every entry
//! point answers [`KernelError::NoGpu`] instead of panicking.

use thiserror::Error;

/// Why a GPU operation could not run.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// No usable GPU: the `cuda` feature is off, or no driver or device was found.
    #[error("no GPU: {0}")]
    NoGpu(String),
}

/// Whether this build can use a GPU at all (the `cuda` feature).
pub fn gpu_support_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// Checks that a GPU is usable, naming why not otherwise.
pub fn probe() -> Result<(), KernelError> {
    if !gpu_support_compiled() {
        return Err(KernelError::NoGpu(
            "kvault-kernels was built without the `cuda` feature".into(),
        ));
    }
    Err(KernelError::NoGpu(
        "no GPU decode kernels are built in yet".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_gpu_is_a_clean_error() {
        assert!(matches!(probe(), Err(KernelError::NoGpu(_))));
    }
}
