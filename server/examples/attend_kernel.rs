//! Timing of the attention kernel on one KV head per thread (a profiling
//! aid; `kvault bench attend` is the benchmark): each layout from L2 (one
//! head of 256 tokens, read over and over), from L3 (eight heads of 1024
//! tokens; 4 MiB of f16 KV, so f16 is partly memory) and from memory (heads
//! of 32768 tokens, 64 of them, so no cache holds them), on one thread and
//! on all of them.
//!
//! `cargo run --release -p kvault-server --example attend_kernel -- [--layout f16|int8|k8v4|k4v4]
//! [--where l2|l3|memory] [--reps N] [--heads N] [--builds avx2,avx512]`: only that layout /
//! that row; every row keeps the best of N (default 5) passes; the memory row over N heads
//! (default 64); `--builds` times each of the kernel's builds (default: the best this CPU
//! runs), taking turns row by row.

use std::time::Instant;

use half::f16;
use kvault_server::attend::kernel::{Build, State, attend_with};
use kvault_server::attend::layout::{Format, Geometry, Plane};
use rayon::prelude::*;

const D: usize = 128;
const G: usize = 4;

fn rows(t: usize, seed: usize) -> Vec<f16> {
    (0..t * D)
        .map(|i| f16::from_f32((((i + seed) * 7919) % 1000) as f32 / 500.0 - 1.0))
        .collect()
}

/// Best of `reps`: seconds for `inner` passes of `G` queries over each plane.
fn time(build: Build, planes: &[Plane], q: &[f32], parallel: bool, reps: usize, inner: usize) -> f64 {
    let one = |p: &Plane| {
        for _ in 0..inner {
            let mut st = State::new(G, D);
            attend_with(build, p.view(), q, 0.088, 0, usize::MAX, &mut st);
            std::hint::black_box(&st);
        }
    };
    best(planes, parallel, reps, one)
}

/// Best of `reps`: seconds for one pass of `one` over every plane, on one
/// thread or all of them.
fn best(planes: &[Plane], parallel: bool, reps: usize, one: impl Fn(&Plane) + Sync) -> f64 {
    (0..reps)
        .map(|_| {
            let s = Instant::now();
            if parallel {
                planes.par_iter().for_each(&one);
            } else {
                planes.iter().for_each(&one);
            }
            s.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Best of `reps`: seconds to read every f16 key and value of each plane
/// (8 u64 lanes), as a reference for the memory rows.
fn time_read(planes: &[Plane], parallel: bool, reps: usize) -> f64 {
    use kvault_server::attend::layout::{Keys, Values};
    let one = |p: &Plane| {
        let kv = p.view();
        let (Keys::F16(k), Values::F16(v)) = (kv.keys, kv.values) else {
            return;
        };
        let mut lanes = [0u64; 8];
        for half in [k, v] {
            for x in half.chunks_exact(32) {
                for i in 0..8 {
                    lanes[i] = lanes[i].wrapping_add(x[4 * i].to_bits() as u64);
                }
            }
        }
        std::hint::black_box(lanes);
    };
    best(planes, parallel, reps, one)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let layouts: Vec<Format> = [Format::F16, Format::Int8, Format::K8V4, Format::K4V4]
        .into_iter()
        .filter(|f| flag("--layout").is_none_or(|l| format!("{f:?}").eq_ignore_ascii_case(l)))
        .collect();
    let reps: usize = flag("--reps").and_then(|r| r.parse().ok()).unwrap_or(5);
    let mem_heads: usize = flag("--heads").and_then(|r| r.parse().ok()).unwrap_or(64);
    let builds: Vec<Build> = match flag("--builds") {
        None => vec![Build::best()],
        Some(list) => list
            .split(',')
            .map(|b| match b {
                "portable" => Build::Portable,
                "avx2" => Build::Avx2,
                "avx512" => Build::Avx512,
                other => panic!("unknown build {other}: portable, avx2 or avx512"),
            })
            .filter(|b| {
                let ok = b.available();
                if !ok {
                    println!("skipping the {b:?} build: this CPU does not run it");
                }
                ok
            })
            .collect(),
    };
    println!(
        "builds {builds:?} (best here: {:?}); {} threads; G = {G} query heads per KV head, head dim {D}",
        Build::best(),
        rayon::current_num_threads()
    );
    let q: Vec<f32> = (0..G * D).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
    // (row, tokens per head, heads, passes over a head per timing)
    for (label, t, n, inner) in [
        ("l2", 256usize, 1usize, 64usize),
        ("l3", 1024, 8, 1),
        ("memory", 32_768, mem_heads, 1),
    ] {
        if flag("--where").is_some_and(|w| w != label) {
            continue;
        }
        let (k, v) = (rows(t, 0), rows(t, 17));
        let geo = Geometry::new(t, D);
        for &f in &layouts {
            let planes: Vec<Plane> = (0..n.max(2))
                .into_par_iter()
                .map(|_| Plane::pack(f, &k, &v, geo))
                .collect();
            let bytes = planes[0].bytes() as f64 * inner as f64;
            // How much of the process transparent huge pages back (Linux).
            let huge = std::fs::read_to_string("/proc/self/smaps_rollup")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("AnonHugePages"))
                        .map(str::to_string)
                })
                .unwrap_or_default();
            let ns = n.min(8);
            if label == "memory" && f == Format::F16 && args.iter().any(|a| a == "--read") {
                let one = time_read(&planes[..ns], false, reps) / ns as f64;
                let all = time_read(&planes, true, reps) / planes.len() as f64;
                let b = planes[0].bytes() as f64;
                for huge in [false, true] {
                    let n = 1usize << 26;
                    let mut a: Vec<f64> = Vec::with_capacity(n);
                    if huge {
                        kvault_server::attend::layout::advise_huge_pages(a.as_mut_ptr() as *mut u8, n * 8);
                    }
                    a.resize(n, 1.0);
                    let sum = |a: &[f64]| {
                        let mut lanes = [0f64; 8];
                        for x in a.chunks_exact(8) {
                            for i in 0..8 {
                                lanes[i] += x[i];
                            }
                        }
                        std::hint::black_box(lanes);
                    };
                    let t1 = (0..reps)
                        .map(|_| {
                            let s = Instant::now();
                            sum(&a[..n / 4]);
                            s.elapsed().as_secs_f64()
                        })
                        .fold(f64::INFINITY, f64::min);
                    let t2 = (0..reps)
                        .map(|_| {
                            let s = Instant::now();
                            a.par_chunks(n / 8).for_each(sum);
                            s.elapsed().as_secs_f64()
                        })
                        .fold(f64::INFINITY, f64::min);
                    println!(
                        "STREAM-like read of 512 MiB, huge pages {huge}: 1 thread {:.2} GB/s; all threads {:.2} GB/s",
                        (n * 2) as f64 / t1 / 1e9,
                        (n * 8) as f64 / t2 / 1e9
                    );
                }
                println!(
                    "memory read of the f16 planes (every 64-byte line): 1 thread {:.2} GB/s; all threads {:.2} GB/s",
                    b / one / 1e9,
                    b / all / 1e9
                );
            }
            for &build in &builds {
                let one = time(build, &planes[..ns], &q, false, reps, inner) / ns as f64;
                let all = time(build, &planes, &q, true, reps, inner) / planes.len() as f64;
                println!(
                    "{label:<6} {f:<5?} {build:<8?} {:>6.1} B/token: 1 thread {:>6.1} ns per token and KV head ({:>5.2} GB/s); all threads {:>6.2} GB/s; {}",
                    planes[0].bytes() as f64 / t as f64,
                    one / (t * inner) as f64 * 1e9,
                    bytes / one / 1e9,
                    bytes / all / 1e9,
                    huge.split_whitespace().collect::<Vec<_>>().join(" "),
                );
            }
        }
    }
}
