//! GPU attention worker benchmark (issue 7, the optional GPU worker): decode attention over
//! an f16 cache in device memory, in GB/s of KV read per second, beside a device-to-device
//! copy of the same bytes in the same run (STREAM's copy convention: bytes read plus
//! written); and the latency of one layer's query (batch 1). Each shape is first checked
//! against attention in f64 on the host.
//!
//! ```sh
//! kvault-gpu-attend-bench [--tokens 32768] [--iters 20]
//! ```

use std::time::Instant;

use anyhow::{Context, Result, bail};
use half::f16;
use kvault_kernels::GpuAttention;
use kvault_kernels::attend::{AttendQuery, KvDims, Partial, reference};
use kvault_kernels::cudarc::driver::CudaSlice;
use kvault_kernels::synthetic::uniform;
use rayon::prelude::*;

fn args() -> Result<(usize, usize)> {
    let (mut tokens, mut iters) = (32_768usize, 20usize);
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--tokens" => tokens = v.parse()?,
            "--iters" => iters = v.parse()?,
            _ => bail!("unknown argument {k} (expected --tokens N, --iters N)"),
        }
    }
    if tokens == 0 || iters == 0 {
        bail!("--tokens and --iters must be positive");
    }
    Ok((tokens, iters))
}

/// Largest |o| and |lse| error of `q` against attention in f64 on the host.
fn error(kv: &[f16], dims: KvDims, q_heads: usize, q: &AttendQuery<'_>, got: &Partial) -> (f64, f64) {
    let (o, lse) = reference(kv, dims, q_heads, q);
    let max = |a: &[f32], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - y).abs())
            .fold(0f64, f64::max)
    };
    (max(&got.o, &o), max(&got.lse, &lse))
}

fn main() -> Result<()> {
    let (tokens, iters) = args()?;
    let att = GpuAttention::new(0)?;
    let s = att.stream().clone();
    println!("GPU attention worker, f16 KV in device memory; {iters} iterations per figure");
    println!(
        "| shape | KV bytes | copy GB/s | worker GB/s | of copy | kernels GB/s | Mtok/s | 1-layer query p50 ms | max error o / lse |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // (name, layers, q heads, KV heads, head dim)
    for (name, layers, qh, kvh, d) in [
        (
            "Llama-3-8B (32 q / 8 KV heads, dim 128), 8 layers",
            8usize,
            32usize,
            8usize,
            128usize,
        ),
        ("SmolLM2-135M (9 q / 3 KV heads, dim 64), 30 layers", 30, 9, 3, 64),
    ] {
        let dims = KvDims {
            layers,
            kv_heads: kvh,
            head_dim: d,
            tokens,
        };
        let kv: Vec<f16> = uniform(dims.elements(), 7)
            .into_par_iter()
            .map(f16::from_f32)
            .collect();
        let dev = att.upload(dims, &kv)?;
        let bytes = dev.bytes();
        // The copy baseline over the same number of bytes.
        let src: CudaSlice<u8> = s.alloc_zeros(bytes)?;
        let mut dst: CudaSlice<u8> = s.alloc_zeros(bytes)?;
        let mut copy = f64::INFINITY;
        for _ in 0..iters {
            let t = Instant::now();
            s.memcpy_dtod(&src, &mut dst)?;
            s.synchronize()?;
            copy = copy.min(t.elapsed().as_secs_f64());
        }
        drop((src, dst));
        let scale = 1.0 / (d as f32).sqrt();
        let qv: Vec<Vec<f32>> = (0..layers).map(|l| uniform(qh * d, 100 + l as u64)).collect();
        let step: Vec<AttendQuery<'_>> = (0..layers)
            .map(|layer| AttendQuery {
                layer,
                q: &qv[layer],
                scale,
                start: 0,
                end: tokens,
            })
            .collect();
        let first = att.attend(&dev, qh, &step)?;
        let (eo, el) = error(&kv, dims, qh, &step[0], &first[0]);
        if eo > 1e-4 || el > 1e-4 {
            bail!("{name}: GPU attention differs from f64 (o {eo:e}, lse {el:e})");
        }
        let (mut best, mut kernel) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..iters {
            let t = Instant::now();
            att.attend(&dev, qh, &step)?;
            best = best.min(t.elapsed().as_secs_f64());
            kernel = kernel.min(att.last_kernel_ms().unwrap_or(f32::INFINITY) as f64 / 1e3);
        }
        let mut one: Vec<f64> = (0..iters.max(50))
            .map(|i| {
                let t = Instant::now();
                att.attend(&dev, qh, &step[i % layers..i % layers + 1])
                    .map(|_| t.elapsed().as_secs_f64())
            })
            .collect::<Result<_, _>>()?;
        one.sort_by(f64::total_cmp);
        let gbs = bytes as f64 / best / 1e9;
        let copy_gbs = 2.0 * bytes as f64 / copy / 1e9;
        println!(
            "| {name}, {tokens} tokens | {:.0} MiB | {copy_gbs:.0} | {gbs:.0} | {:.2} | {:.0} | {:.0} | {:.3} | {eo:.1e} / {el:.1e} |",
            bytes as f64 / (1 << 20) as f64,
            gbs / copy_gbs,
            bytes as f64 / kernel / 1e9,
            (layers * tokens) as f64 / best / 1e6,
            one[one.len() / 2] * 1e3,
        );
    }
    println!(
        "worker GB/s: the cache's bytes over the best step (every layer's query of every head, host queries in and partials out included); kernels GB/s: the same over the two kernels' time alone (CUDA events); copy GB/s: a device-to-device copy of the same bytes, read plus written."
    );
    Ok(())
}
