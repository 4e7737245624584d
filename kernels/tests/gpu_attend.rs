//! The GPU attention worker against attention computed in f64 on the same KV: GQA and MHA
//! shapes (groups of 1, 3, 4 and 8 heads; head dims 64, 80, 128, 256), ranges that are not
//! multiples of a tile or of the chunk size, single tokens and empty ranges, several
//! queries and layers per launch; KV uploaded from the host and KV decoded on the GPU
//! (kv-mid chunks into the canonical layout, attended where they land).
//!
//! Needs a GPU: skipped (with a message) without one, unless `KVAULT_REQUIRE_GPU=1`.

use half::f16;
use kvault_codec::{KvShape, Profile};
use kvault_kernels::attend::{AttendQuery, KvDims, Partial, reference};
use kvault_kernels::cudarc::driver::CudaSlice;
use kvault_kernels::synthetic::{kv_like, split, uniform};
use kvault_kernels::{GpuAttention, GpuDecoder, KernelError, OutDtype, Target};

fn gpu<T>(r: Result<T, KernelError>) -> Option<T> {
    match r {
        Ok(x) => Some(x),
        Err(KernelError::NoGpu(why)) if std::env::var("KVAULT_REQUIRE_GPU").as_deref() != Ok("1") => {
            eprintln!("skipped: {why}");
            None
        }
        Err(e) => panic!("GPU: {e}"),
    }
}

/// Checks every query's partial against the f64 reference; returns the largest errors.
fn check(
    kv: &[f16],
    dims: KvDims,
    q_heads: usize,
    qs: &[AttendQuery<'_>],
    got: &[Partial],
    what: &str,
) -> (f64, f64) {
    assert_eq!(got.len(), qs.len(), "{what}");
    let (mut eo, mut el) = (0f64, 0f64);
    for (i, (q, p)) in qs.iter().zip(got).enumerate() {
        let (o, lse) = reference(kv, dims, q_heads, q);
        for (h, want) in lse.iter().enumerate() {
            if *want == f64::NEG_INFINITY {
                assert_eq!(
                    p.lse[h],
                    f32::NEG_INFINITY,
                    "{what} query {i} head {h}: empty range"
                );
                assert!(
                    p.o[h * dims.head_dim..][..dims.head_dim]
                        .iter()
                        .all(|x| *x == 0.0)
                );
                continue;
            }
            el = el.max((p.lse[h] as f64 - want).abs());
        }
        for (a, b) in p.o.iter().zip(&o) {
            eo = eo.max((*a as f64 - b).abs());
        }
    }
    // f32 sums over up to a few thousand tokens of values in [-1, 1].
    assert!(
        eo < 2e-5 && el < 2e-5,
        "{what}: max |o| error {eo:e}, max |lse| error {el:e}"
    );
    (eo, el)
}

/// Queries of every kind over a cache of `tokens` tokens.
fn ranges(tokens: usize) -> Vec<(usize, usize, usize)> {
    vec![
        (0, 0, tokens),
        (1, 0, tokens),
        (0, 17, tokens.min(777)),
        (1, tokens - 1, tokens),
        (0, 5, 5),
        (1, 0, 0),
        (0, 0, 31),
        (1, 33, 33 + 257.min(tokens - 33)),
    ]
}

#[test]
fn gpu_attention_matches_f64_attention() {
    let Some(att) = gpu(GpuAttention::new(0)) else {
        return;
    };
    // (q heads, KV heads, head dim, tokens)
    for (qh, kvh, d, tokens) in [
        (32, 8, 128, 1000),
        (4, 4, 64, 300),
        (9, 3, 64, 1704),
        (16, 2, 80, 520),
        (2, 1, 256, 4099),
    ] {
        let dims = KvDims {
            layers: 2,
            kv_heads: kvh,
            head_dim: d,
            tokens,
        };
        let kv: Vec<f16> = uniform(dims.elements(), d as u64 + tokens as u64)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let dev = att.upload(dims, &kv).unwrap();
        let qv: Vec<Vec<f32>> = (0..8).map(|i| uniform(qh * d, 1000 + i)).collect();
        let qs: Vec<AttendQuery<'_>> = ranges(tokens)
            .into_iter()
            .zip(&qv)
            .map(|((layer, start, end), q)| AttendQuery {
                layer,
                q,
                scale: 1.0 / (d as f32).sqrt() * 2.0,
                start,
                end,
            })
            .collect();
        let got = att.attend(&dev, qh, &qs).unwrap();
        let what = format!("{qh} q heads, {kvh} KV heads, d {d}, {tokens} tokens");
        let (eo, el) = check(&kv, dims, qh, &qs, &got, &what);
        eprintln!("{what}: max error o {eo:.2e}, lse {el:.2e}");
        // One query at a time gives the same as the batch (pieces depend on the batch,
        // so within rounding).
        let one = att.attend(&dev, qh, &qs[..1]).unwrap();
        check(&kv, dims, qh, &qs[..1], &one, &what);
    }
}

#[test]
fn gpu_decoded_chunks_are_attended_where_they_land() {
    let Some(dec) = gpu(GpuDecoder::new(0)) else {
        return;
    };
    let att = GpuAttention::in_context(dec.context()).unwrap();
    let shape = KvShape {
        layers: 3,
        tokens: 700,
        kv_heads: 3,
        head_dim: 64,
    };
    let t = kv_like(shape, 7);
    // Chunks of 256 tokens (the last one 188), kv-mid, as a warmup would store them.
    let blobs: Vec<Vec<u8>> = split(&t, 256)
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let options = kvault_codec::EncodeOptions::sequence_start(i == 0);
            kvault_codec::encode_with(c.view(), Profile::KvMid, options).unwrap()
        })
        .collect();
    let dims = KvDims {
        layers: 3,
        kv_heads: 3,
        head_dim: 64,
        tokens: 700,
    };
    let refs: Vec<&[u8]> = blobs.iter().map(|b| b.as_slice()).collect();
    let mut out: CudaSlice<u8> = dec.stream().alloc_zeros(dims.elements() * 2).unwrap();
    dec.decode(&refs, None, OutDtype::F16, Target::Canonical(&mut out))
        .unwrap();
    // The reference reads what the GPU decoded (bit for bit the CPU decoder's, gpu_parity).
    let host = dec.stream().clone_dtoh(&out).unwrap();
    let kv: Vec<f16> = host
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]))
        .collect();
    let dev = att.from_canonical(dims, out).unwrap();
    let qv: Vec<Vec<f32>> = (0..8).map(|i| uniform(9 * 64, 50 + i)).collect();
    let qs: Vec<AttendQuery<'_>> = ranges(700)
        .into_iter()
        .zip(&qv)
        .map(|((layer, start, end), q)| AttendQuery {
            layer: layer + 1,
            q,
            scale: 0.125,
            start,
            end,
        })
        .collect();
    let got = att.attend(&dev, 9, &qs).unwrap();
    check(&kv, dims, 9, &qs, &got, "GPU-decoded kv-mid, 9 q heads");
}

#[test]
fn bad_queries_and_shapes_are_refused_on_the_gpu_path() {
    let Some(att) = gpu(GpuAttention::new(0)) else {
        return;
    };
    let dims = KvDims {
        layers: 1,
        kv_heads: 2,
        head_dim: 64,
        tokens: 64,
    };
    let kv = vec![f16::from_f32(0.25); dims.elements()];
    assert!(matches!(att.upload(dims, &kv[1..]), Err(KernelError::Layout(_))));
    let short: CudaSlice<u8> = att.stream().alloc_zeros(kv.len() * 2 - 2).unwrap();
    assert!(matches!(
        att.from_canonical(dims, short),
        Err(KernelError::Layout(_))
    ));
    let dev = att.upload(dims, &kv).unwrap();
    let mut q = vec![0.5f32; 4 * 64];
    let good = |q: &[f32]| -> Vec<Partial> {
        let qs = [AttendQuery {
            layer: 0,
            q,
            scale: 0.125,
            start: 0,
            end: 64,
        }];
        att.attend(&dev, 4, &qs).unwrap()
    };
    let before = good(&q);
    q[3] = f32::NAN;
    let bad = [AttendQuery {
        layer: 0,
        q: &q,
        scale: 0.125,
        start: 0,
        end: 64,
    }];
    let e = att.attend(&dev, 4, &bad).unwrap_err();
    assert!(matches!(e, KernelError::Query(_)), "{e}");
    let past = [AttendQuery {
        end: 65,
        q: &before[0].o,
        ..bad[0]
    }];
    assert!(att.attend(&dev, 4, &past).is_err());
    // The worker goes on: the same good query gives the same answer.
    q[3] = 0.5;
    assert_eq!(good(&q), before);
    // Equal keys and values: every head's output is the value, lse = ln 64 + score.
    let p = &before[0];
    assert!(p.o.iter().all(|x| (*x - 0.25).abs() < 1e-6));
    let want = (64f32).ln() + 0.125 * 64.0 * 0.5 * 0.25;
    assert!(
        p.lse.iter().all(|x| (*x - want).abs() < 1e-5),
        "{:?} vs {want}",
        p.lse
    );
}
