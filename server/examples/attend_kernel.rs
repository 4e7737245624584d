//! Single-thread timing of the attention kernel on one KV head (a profiling
//! aid; `kvault bench attend` is the benchmark).

use std::time::Instant;

use half::f16;
use kvault_server::attend::kernel::{HeadKv, State, attend};

fn main() {
    let (t, d, g) = (32_768usize, 128usize, 4usize);
    let k: Vec<f16> = (0..t * d)
        .map(|i| f16::from_f32(((i * 7919) % 1000) as f32 / 500.0 - 1.0))
        .collect();
    let v = k.clone();
    let q: Vec<f32> = (0..g * d).map(|i| (i % 13) as f32 / 13.0).collect();
    let k8: Vec<i8> = (0..t * d).map(|i| (i % 255) as i8).collect();
    let ks = vec![0.01f32; d];
    let vs = vec![0.01f32; t];
    for (name, kv, bytes) in [
        ("f16", HeadKv::F16 { k: &k, v: &v }, 4 * d),
        (
            "int8",
            HeadKv::Int8 {
                k: &k8,
                k_scale: &ks,
                v: &k8,
                v_scale: &vs,
            },
            2 * d + 4,
        ),
    ] {
        let mut st = State::new(g, d);
        attend(kv, d, &q, 0.08, 0, t, &mut st);
        let n = 20;
        let s = Instant::now();
        for _ in 0..n {
            let mut st = State::new(g, d);
            attend(kv, d, &q, 0.08, 0, t, &mut st);
            std::hint::black_box(&st);
        }
        let secs = s.elapsed().as_secs_f64() / n as f64;
        println!(
            "{name}: {:.2} ms per head pass, {:.2} GB/s, {:.0} ns per token",
            secs * 1e3,
            (t * bytes) as f64 / secs / 1e9,
            secs / t as f64 * 1e9
        );
    }
}
