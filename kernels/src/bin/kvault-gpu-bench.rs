//! GPU decode benchmark (issue 6): per profile, decode + dequantize throughput on the GPU,
//! beside a device-to-device copy of the output (the memory ceiling) and a host-to-device
//! copy of the uncompressed fp16 cache from pinned memory (what not compressing costs),
//! and the end-to-end time from compressed bytes in pinned host memory to fp16 in device
//! memory. Every decode is checked bit for bit against the CPU decoder first.
//!
//! ```sh
//! kvault-gpu-bench [--real smollm2.safetensors] [--iters 20] [--out notes.md]
//! ```

use std::time::Instant;

use anyhow::{Context, Result, bail};
use kvault_codec::plan::DecodePlan;
use kvault_codec::{Dtype, KvShape, KvTensor};
use kvault_kernels::cudarc::driver::{CudaSlice, sys};
use kvault_kernels::synthetic::{kv_like, split};
use kvault_kernels::{GPU_PROFILES, GpuDecoder, OutDtype, Target};
use rayon::prelude::*;

const CHUNK: u32 = 256;

struct Args {
    real: Option<String>,
    iters: usize,
    out: Option<String>,
    tokens: u32,
}

fn args() -> Result<Args> {
    let mut a = Args {
        real: None,
        iters: 20,
        out: None,
        tokens: 4096,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--real" => a.real = Some(v()?),
            "--iters" => a.iters = v()?.parse()?,
            "--out" => a.out = Some(v()?),
            "--tokens" => a.tokens = v()?.parse()?,
            _ => bail!("unknown argument {k} (expected --real PATH, --iters N, --out PATH, --tokens N)"),
        }
    }
    Ok(a)
}

fn secs<F: FnMut() -> Result<()>>(iters: usize, mut f: F) -> Result<f64> {
    f()?; // warm-up
    let t0 = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    Ok(t0.elapsed().as_secs_f64() / iters as f64)
}

fn main() -> Result<()> {
    let a = args()?;
    let dec = GpuDecoder::new(0)?;
    let stream = dec.stream().clone();
    let ctx = dec.context().clone();
    println!(
        "device: {} ({}), iterations per figure: {}",
        dec.device_name(),
        dec.arch(),
        a.iters
    );

    let mut cases: Vec<(String, KvTensor)> = vec![(
        format!(
            "Llama-3-8B shape (32 L, 8 KV heads, dim 128), {} tokens, synthetic",
            a.tokens
        ),
        kv_like(
            KvShape {
                layers: 32,
                tokens: a.tokens,
                kv_heads: 8,
                head_dim: 128,
            },
            42,
        ),
    )];
    if let Some(path) = &a.real {
        let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let kv = st.tensor("kv")?;
        let s = kv.shape();
        let shape = KvShape {
            layers: s[0] as u32,
            tokens: s[2] as u32,
            kv_heads: s[3] as u32,
            head_dim: s[4] as u32,
        };
        cases.push((
            format!(
                "SmolLM2-135M real KV ({} L, 3 KV heads, dim 64), {} tokens",
                shape.layers, shape.tokens
            ),
            KvTensor::new(shape, Dtype::F16, kv.data().to_vec())?,
        ));
    }

    let mut rows = Vec::new();
    for (name, tensor) in &cases {
        let shape = tensor.shape();
        let fp16_bytes = shape.byte_len(Dtype::F16)?;
        let chunks = split(tensor, CHUNK);
        // Baselines for this shape: D2D copy of the output size, H2D of the fp16 cache.
        let src: CudaSlice<u8> = stream.alloc_zeros(fp16_bytes)?;
        let mut dst: CudaSlice<u8> = stream.alloc_zeros(fp16_bytes)?;
        let d2d = secs(a.iters, || {
            stream.memcpy_dtod(&src, &mut dst)?;
            stream.synchronize()?;
            Ok(())
        })?;
        // SAFETY: filled below before use. Not write-combined: the host reads it too.
        let mut pinned_raw = unsafe { ctx.alloc_pinned_with_flags::<u8>(fp16_bytes, 0) }?;
        pinned_raw.as_mut_slice()?.copy_from_slice(tensor.data());
        let h2d = secs(a.iters, || {
            stream.memcpy_htod(&pinned_raw, &mut dst)?;
            stream.synchronize()?;
            Ok(())
        })?;
        drop(src);
        for &profile in GPU_PROFILES {
            let blobs: Vec<Vec<u8>> = chunks
                .par_iter()
                .enumerate()
                .map(|(i, c)| {
                    kvault_codec::encode_with(
                        c.view(),
                        profile,
                        kvault_codec::EncodeOptions::sequence_start(i == 0),
                    )
                })
                .collect::<Result<_, _>>()?;
            let compressed: usize = blobs.iter().map(|b| b.len()).sum();
            // CPU reference, then the GPU output compared bit for bit.
            let cpu: Vec<Vec<u8>> = blobs
                .par_iter()
                .map(|b| kvault_codec::decode(b).map(|t| t.into_data()))
                .collect::<Result<_, _>>()?;
            let mut want = vec![0u8; fp16_bytes];
            let row = (shape.kv_heads * shape.head_dim) as usize * 2;
            let mut t0 = 0usize;
            for (c, bytes) in chunks.iter().zip(&cpu) {
                let n = c.shape().tokens as usize;
                for slot in 0..(2 * shape.layers) as usize {
                    want[(slot * shape.tokens as usize + t0) * row..][..n * row]
                        .copy_from_slice(&bytes[slot * n * row..][..n * row]);
                }
                t0 += n;
            }
            let mut plan = DecodePlan::new();
            let mut input_host = Vec::with_capacity(compressed);
            let mut tok = 0;
            for b in &blobs {
                plan.add(b, input_host.len() as u64, tok, None)?;
                tok += kvault_codec::Container::parse(b)?.header().tokens;
                input_host.extend_from_slice(b);
            }
            let input = stream.clone_htod(&input_host)?;
            stream.memset_zeros(&mut dst)?;
            dec.decode_plan(&plan, &input, OutDtype::F16, Target::Canonical(&mut dst))?;
            let exact = stream.clone_dtoh(&dst)? == want;
            let mut kernel_ms = Vec::new();
            let call = secs(a.iters, || {
                dec.decode_plan(&plan, &input, OutDtype::F16, Target::Canonical(&mut dst))?;
                kernel_ms.push(f64::from(dec.last_kernel_ms().unwrap_or(f32::NAN)));
                Ok(())
            })?;
            kernel_ms.sort_by(f64::total_cmp);
            let kernel = kernel_ms[kernel_ms.len() / 2] / 1e3;
            // End to end: compressed chunks in pinned host memory -> plan -> copy -> decode.
            // SAFETY: filled right away.
            let mut pinned =
                unsafe { ctx.alloc_pinned_with_flags::<u8>(compressed, sys::CU_MEMHOSTALLOC_PORTABLE) }?;
            pinned.as_mut_slice()?.copy_from_slice(&input_host);
            let host = pinned.as_slice()?;
            let mut refs = Vec::with_capacity(blobs.len());
            let mut at = 0;
            for b in &blobs {
                refs.push(&host[at..at + b.len()]);
                at += b.len();
            }
            let e2e = secs(a.iters, || {
                dec.decode_pipelined(&refs, None, OutDtype::F16, Target::Canonical(&mut dst), 4)?;
                Ok(())
            })?;
            let e2e_exact = stream.clone_dtoh(&dst)? == want;
            // Where the end-to-end time goes: host planning (parse + checksum + records, in
            // parallel over chunks) and the copy of the compressed bytes.
            let plan_s = secs(a.iters, || {
                let plans: Vec<DecodePlan> = refs
                    .par_iter()
                    .map(|b| DecodePlan::of_container(b, None))
                    .collect::<Result<_, _>>()?;
                let mut all = DecodePlan::new();
                let (mut off, mut tok) = (0u64, 0u32);
                for (b, p) in refs.iter().zip(&plans) {
                    all.merge(p, off, tok)?;
                    off += b.len() as u64;
                    tok += p.tokens;
                }
                Ok(())
            })?;
            let parse_s = secs(a.iters, || {
                refs.par_iter()
                    .try_for_each(|b| kvault_codec::Container::parse(b).map(|_| ()))?;
                Ok(())
            })?;
            let mut dev_in = stream.alloc_zeros::<u8>(compressed)?;
            let copy_s = secs(a.iters, || {
                stream.memcpy_htod(&pinned, &mut dev_in)?;
                stream.synchronize()?;
                Ok(())
            })?;
            rows.push(format!(
                "| {name} | {profile} | {:.2}x | {:.0} ({:.0}) | {:.0} | {:.1} | {:.3} ({:.3} plan incl. {:.3} checksums, {:.3} copy) | {:.3} | {:.2}x | {} |",
                fp16_bytes as f64 / compressed as f64,
                fp16_bytes as f64 / kernel / 1e9,
                fp16_bytes as f64 / call / 1e9,
                fp16_bytes as f64 / d2d / 1e9,
                fp16_bytes as f64 / h2d / 1e9,
                e2e * 1e3,
                plan_s * 1e3,
                parse_s * 1e3,
                copy_s * 1e3,
                h2d * 1e3,
                h2d / e2e,
                if exact && e2e_exact { "yes" } else { "NO" },
            ));
            eprintln!("{}", rows.last().map(String::as_str).unwrap_or(""));
        }
    }
    let table = format!(
        "| cache | profile | ratio vs fp16 | GPU decode+dequant GB/s of fp16 out: kernels (whole call with plan upload) | D2D copy GB/s (same bytes) | H2D fp16 pinned GB/s | end-to-end ms, pinned compressed -> device fp16 (of which: host plan with container checksums, H2D of compressed alone) | H2D fp16 ms | end-to-end vs H2D | bit-exact vs CPU |\n|---|---|---|---|---|---|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    println!("\n{table}");
    if let Some(out) = &a.out {
        std::fs::write(out, &table)?;
    }
    Ok(())
}
