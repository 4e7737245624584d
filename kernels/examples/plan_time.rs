//! Time of the host half of a GPU decode (a profiling aid, no GPU needed): planning
//! 256-token chunks of a Llama-3-8B-shaped synthetic cache, per profile, serial and over
//! all cores, and the bytes of the merged plan a decode uploads.
//!
//! `cargo run --release -p kvault-kernels --example plan_time`

use std::time::Instant;

use kvault_codec::KvShape;
use kvault_codec::plan::DecodePlan;
use kvault_kernels::GPU_PROFILES;
use kvault_kernels::synthetic::{kv_like, split};
use rayon::prelude::*;

const CHUNK: u32 = 256;

/// Best of twenty, seconds.
fn best(mut f: impl FnMut()) -> f64 {
    (0..20)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let shape = KvShape {
        layers: 32,
        tokens: 4096,
        kv_heads: 8,
        head_dim: 128,
    };
    let t = kv_like(shape, 42);
    let chunks = split(&t, CHUNK);
    println!(
        "| profile | plan ms, 1 thread | plan ms, {} threads | merged plan MB |",
        rayon::current_num_threads()
    );
    println!("|---|---|---|---|");
    let only: Option<String> = std::env::args().nth(1);
    for &p in GPU_PROFILES {
        if only.as_deref().is_some_and(|o| o != p.to_string()) {
            continue;
        }
        let blobs: Vec<Vec<u8>> = chunks
            .par_iter()
            .enumerate()
            .map(|(i, c)| {
                let options = kvault_codec::EncodeOptions::sequence_start(i == 0);
                kvault_codec::encode_with(c.view(), p, options).expect("encode")
            })
            .collect();
        let plan_all = |parallel: bool| {
            let plans: Vec<DecodePlan> = if parallel {
                blobs
                    .par_iter()
                    .map(|b| DecodePlan::of_container(b, None).expect("plan"))
                    .collect()
            } else {
                blobs
                    .iter()
                    .map(|b| DecodePlan::of_container(b, None).expect("plan"))
                    .collect()
            };
            let mut all = DecodePlan::new();
            let (mut off, mut tok) = (0u64, 0u32);
            for (b, pl) in blobs.iter().zip(&plans) {
                all.merge(pl, off, tok).expect("merge");
                off += b.len() as u64;
                tok += pl.tokens;
            }
            all
        };
        let pl = plan_all(false);
        let r = &pl.rans;
        let bytes = r.parts.len() * 32
            + r.streams.len() * 32
            + r.freqs.len() * 2
            + (r.steps.len() + r.biases.len() + r.escapes.len()) * 4;
        let one = best(|| drop(plan_all(false)));
        let par = best(|| drop(plan_all(true)));
        println!(
            "| {p} | {:.2} | {:.2} | {:.2} |",
            one * 1e3,
            par * 1e3,
            bytes as f64 / 1e6
        );
    }
}
