//! Run-time compilation of the CUDA sources with NVRTC, once per process and target.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::{KernelError, SOURCES};

/// Whether the NVRTC library can be loaded (`libnvrtc.so.13` on the library path).
pub fn nvrtc_available() -> bool {
    // SAFETY: only probes whether the shared library loads; no symbol is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles every source for `arch` (`"sm_90"`, or a `compute_XY` virtual target).
fn compile(name: &str, src: &str, arch: &str) -> Result<Ptx, KernelError> {
    if !nvrtc_available() {
        return Err(KernelError::Compile(
            "libnvrtc not found (install the CUDA toolkit or the `nvidia-cuda-nvrtc` wheel and put its lib folder on LD_LIBRARY_PATH)".into(),
        ));
    }
    let opts = CompileOptions {
        // Bit-exactness with the CPU: no multiply-add contraction anywhere.
        fmad: Some(false),
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(name.into()),
        ..CompileOptions::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts)
        .map_err(|e| KernelError::Compile(format!("{name} for {arch}: {e:?}")))
}

/// Compiles every kernel source for `arch` and returns each source's PTX text (what CI runs
/// without a GPU, so that a kernel that does not compile fails the build).
pub fn compile_all(arch: &str) -> Result<Vec<(&'static str, String)>, KernelError> {
    SOURCES
        .iter()
        .map(|&(name, src)| Ok((name, compile(name, src, arch)?.to_src())))
        .collect()
}

/// The PTX of source `name` (one of [`SOURCES`]) for `arch`, compiled on first use and
/// cached for the process.
pub(crate) fn ptx(name: &str, arch: &str) -> Result<Ptx, KernelError> {
    static CACHE: OnceLock<Mutex<HashMap<(String, String), String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    let key = (name.to_string(), arch.to_string());
    if let Some(src) = cache.get(&key) {
        return Ok(Ptx::from_src(src.clone()));
    }
    let &(name, src) = SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| KernelError::Compile(format!("no kernel source named {name}")))?;
    let ptx = compile(name, src, arch)?.to_src();
    cache.insert(key, ptx.clone());
    Ok(Ptx::from_src(ptx))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel compiles to PTX for Hopper. Skipped (with a message) where NVRTC is
    /// absent, unless `KVAULT_REQUIRE_NVRTC=1` (CI sets it after installing the
    /// `nvidia-cuda-nvrtc` wheel), where absence fails.
    #[test]
    fn kernels_compile_with_nvrtc() {
        if !nvrtc_available() {
            assert!(
                std::env::var("KVAULT_REQUIRE_NVRTC").as_deref() != Ok("1"),
                "KVAULT_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded"
            );
            eprintln!("skipped: libnvrtc not found");
            return;
        }
        let entries: &[(&str, &[&str])] = &[
            (
                "decode.cu",
                &[
                    "rans_build_tables",
                    "rans_decode_f16",
                    "rans_decode_bf16",
                    "rans_decode_f32",
                    "q8_decode",
                    "cachegen_decode",
                    "scatter_rows",
                    "exact_rows",
                ],
            ),
            (
                "attend.cu",
                &[
                    "attend_partials_1_1",
                    "attend_partials_1_32",
                    "attend_partials_2_8",
                    "attend_partials_4_4",
                    "attend_partials_4_8",
                    "attend_partials_4_16",
                    "attend_combine",
                ],
            ),
        ];
        for arch in ["sm_90", "compute_80"] {
            let ptx = compile_all(arch).unwrap();
            assert_eq!(ptx.len(), entries.len());
            for ((name, text), (want, names)) in ptx.iter().zip(entries) {
                assert_eq!(name, want);
                for entry in *names {
                    assert!(
                        text.contains(&format!(".entry {entry}")),
                        "{name} for {arch} lacks {entry}"
                    );
                }
            }
        }
    }
}
