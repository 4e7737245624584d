//! Timing of the attention kernel on one KV head per thread (a profiling
//! aid; `kvault bench attend` is the benchmark): each layout, from cache
//! (a head of 1024 tokens) and from memory (heads of 32768 tokens, 64 of
//! them, so no cache holds them), on one thread and on all of them.
//!
//! `cargo run --release -p kvault-server --example attend_kernel`

use std::time::Instant;

use half::f16;
use kvault_server::attend::kernel::{State, attend, simd_available};
use kvault_server::attend::layout::{Format, Geometry, Plane};
use rayon::prelude::*;

const D: usize = 128;
const G: usize = 4;

fn rows(t: usize, seed: usize) -> Vec<f16> {
    (0..t * D)
        .map(|i| f16::from_f32((((i + seed) * 7919) % 1000) as f32 / 500.0 - 1.0))
        .collect()
}

/// Best of five: seconds for one pass of `G` queries over each plane.
fn time(planes: &[Plane], q: &[f32], parallel: bool) -> f64 {
    let one = |p: &Plane| {
        let mut st = State::new(G, D);
        attend(p.view(), q, 0.088, 0, usize::MAX, &mut st);
        std::hint::black_box(&st);
    };
    (0..5)
        .map(|_| {
            let s = Instant::now();
            if parallel {
                planes.par_iter().for_each(one);
            } else {
                planes.iter().for_each(one);
            }
            s.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    println!(
        "AVX2 build: {}; {} threads; G = {G} query heads per KV head, head dim {D}",
        simd_available(),
        rayon::current_num_threads()
    );
    let q: Vec<f32> = (0..G * D).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
    for (label, t, n) in [("cache", 1024usize, 16usize), ("memory", 32_768, 64)] {
        let (k, v) = (rows(t, 0), rows(t, 17));
        let geo = Geometry::new(t, D);
        for f in [Format::F16, Format::Int8, Format::K8V4, Format::K4V4] {
            let planes: Vec<Plane> = (0..n)
                .into_par_iter()
                .map(|_| Plane::pack(f, &k, &v, geo))
                .collect();
            let bytes = planes[0].bytes() as f64;
            let one = time(&planes[..n.min(8)], &q, false) / n.min(8) as f64;
            let all = time(&planes, &q, true) / n as f64;
            println!(
                "{label:<6} {f:<5?} {:>6.1} B/token: 1 thread {:>6.1} ns per token and KV head ({:>5.2} GB/s); all threads {:>6.2} GB/s",
                bytes / t as f64,
                one / t as f64 * 1e9,
                bytes / one / 1e9,
                bytes / all / 1e9,
            );
        }
    }
}
