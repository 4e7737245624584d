//! GPU decode parity with the CPU decoder, bit for bit: every profile with a GPU decoder,
//! random and real KV, odd token counts, layer ranges, several chunks per launch,
//! canonical and paged outputs, f16/bf16/f32; and corrupt input reported as an error.
//!
//! Needs a GPU: skipped (with a message) without one, unless `KVAULT_REQUIRE_GPU=1`.
//! Real KV: `KVAULT_REAL_KV=path.safetensors` (tensor `kv`, f16, canonical layout), e.g.
//! written by `kvault warmup --dump-kv`.

use kvault_codec::{KvShape, KvTensor, KvTuning, Profile};
use kvault_kernels::cudarc::driver::CudaSlice;
use kvault_kernels::synthetic::kv_like;
use kvault_kernels::{GPU_PROFILES, GpuDecoder, KernelError, OutDtype, Target};

fn decoder() -> Option<GpuDecoder> {
    match GpuDecoder::new(0) {
        Ok(d) => Some(d),
        Err(KernelError::NoGpu(why)) if std::env::var("KVAULT_REQUIRE_GPU").as_deref() != Ok("1") => {
            eprintln!("skipped: {why}");
            None
        }
        Err(e) => panic!("GPU decoder: {e}"),
    }
}

/// CPU decode of `layers` of every chunk, as the canonical layout of the concatenation.
fn cpu_canonical(blobs: &[Vec<u8>], layers: std::ops::Range<u32>, dtype: OutDtype) -> Vec<u8> {
    let parts: Vec<(u32, Vec<u8>)> = blobs
        .iter()
        .map(|b| {
            let sliced = kvault_codec::slice_layers(b, layers.clone()).unwrap();
            let h = kvault_codec::Container::parse(&sliced).unwrap().header().clone();
            let mut out = vec![0u8; h.shape().byte_len(dtype.dtype()).unwrap()];
            kvault_codec::decode_into(&sliced, dtype.dtype(), &mut out).unwrap();
            (h.tokens, out)
        })
        .collect();
    let nl = (layers.end - layers.start) as usize;
    let total: u32 = parts.iter().map(|p| p.0).sum();
    let row = parts[0].1.len() / (2 * nl * parts[0].0 as usize);
    let mut out = vec![0u8; 2 * nl * total as usize * row];
    let mut t0 = 0usize;
    for (t, bytes) in &parts {
        let t = *t as usize;
        for slot in 0..2 * nl {
            out[(slot * total as usize + t0) * row..][..t * row]
                .copy_from_slice(&bytes[slot * t * row..][..t * row]);
        }
        t0 += t;
    }
    out
}

fn check(dec: &GpuDecoder, blobs: &[Vec<u8>], layers: std::ops::Range<u32>, dtype: OutDtype, what: &str) {
    let want = cpu_canonical(blobs, layers.clone(), dtype);
    let refs: Vec<&[u8]> = blobs.iter().map(|b| b.as_slice()).collect();
    let stream = dec.stream().clone();
    let mut out: CudaSlice<u8> = stream.alloc_zeros(want.len()).unwrap();
    dec.decode_pipelined(&refs, Some(layers.clone()), dtype, Target::Canonical(&mut out), 2)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = stream.clone_dtoh(&out).unwrap();
    assert!(
        got == want,
        "{what}: canonical output differs from the CPU decoder"
    );

    // Paged: blocks of 16 rows in reverse order, with unused blocks in front.
    let nl = (layers.end - layers.start) as usize;
    let tokens = total_tokens(blobs);
    let row = want.len() / (2 * nl * tokens);
    let bs = 16usize;
    let blocks = tokens.div_ceil(bs) + 3;
    let table: Vec<u32> = (0..tokens.div_ceil(bs))
        .map(|b| (blocks - 1 - b) as u32)
        .collect();
    let mut k: Vec<CudaSlice<u8>> = (0..nl)
        .map(|_| stream.alloc_zeros(blocks * bs * row).unwrap())
        .collect();
    let mut v: Vec<CudaSlice<u8>> = (0..nl)
        .map(|_| stream.alloc_zeros(blocks * bs * row).unwrap())
        .collect();
    dec.decode(
        &refs,
        Some(layers),
        dtype,
        Target::Paged {
            k: &mut k,
            v: &mut v,
            block_size: bs as u32,
            block_table: &table,
        },
    )
    .unwrap_or_else(|e| panic!("{what} paged: {e}"));
    for l in 0..nl {
        for (kind, cache) in [(0, &k[l]), (1, &v[l])] {
            let host = stream.clone_dtoh(cache).unwrap();
            for t in 0..tokens {
                let at = (table[t / bs] as usize * bs + t % bs) * row;
                let slot = 2 * l + kind;
                assert!(
                    host[at..at + row] == want[(slot * tokens + t) * row..][..row],
                    "{what} paged: layer {l} kind {kind} token {t} differs"
                );
            }
        }
    }
}

fn total_tokens(blobs: &[Vec<u8>]) -> usize {
    blobs
        .iter()
        .map(|b| kvault_codec::Container::parse(b).unwrap().header().tokens as usize)
        .sum()
}

/// `t` cut into chunks of `chunk` tokens, each encoded with `profile`; a `kv-*` profile
/// with key rows of about `key_rows` tokens when that is not 0 (payload format 2).
fn chunks(t: &KvTensor, chunk: u32, profile: Profile, key_rows: u32) -> Vec<Vec<u8>> {
    let shape = t.shape();
    let c = (shape.kv_heads * shape.head_dim) as usize;
    let mut out = Vec::new();
    let mut start = 0;
    while start < shape.tokens {
        let n = chunk.min(shape.tokens - start);
        let sub = KvShape { tokens: n, ..shape };
        let mut data = Vec::with_capacity(sub.elements() as usize * 2);
        for slot in 0..(2 * shape.layers) as usize {
            let base = (slot * shape.tokens as usize + start as usize) * c * 2;
            data.extend_from_slice(&t.data()[base..base + n as usize * c * 2]);
        }
        let sub_t = KvTensor::new(sub, t.dtype(), data).unwrap();
        // The first chunk starts the sequence: kv-* store its sink token exactly.
        let tuning = KvTuning::of(profile)
            .filter(|_| key_rows > 0)
            .map(|own| KvTuning {
                key_group_tokens: key_rows,
                key_rows_min_tokens: 0,
                ..own
            });
        let options = kvault_codec::EncodeOptions {
            tuning: tuning.as_ref(),
            starts_sequence: start == 0,
        };
        let blob = kvault_codec::encode_with(sub_t.view(), profile, options);
        out.push(blob.unwrap());
        start += n;
    }
    out
}

#[test]
fn gpu_matches_cpu_on_synthetic_kv() {
    let Some(dec) = decoder() else { return };
    eprintln!("device: {} ({})", dec.device_name(), dec.arch());
    for &profile in GPU_PROFILES {
        for (shape, chunk, layers, dtype) in [
            (
                KvShape {
                    layers: 3,
                    tokens: 77,
                    kv_heads: 2,
                    head_dim: 8,
                },
                32,
                0..3,
                OutDtype::F16,
            ),
            (
                KvShape {
                    layers: 4,
                    tokens: 301,
                    kv_heads: 3,
                    head_dim: 64,
                },
                256,
                1..3,
                OutDtype::Bf16,
            ),
            (
                KvShape {
                    layers: 2,
                    tokens: 5,
                    kv_heads: 1,
                    head_dim: 2,
                },
                5,
                0..2,
                OutDtype::F32,
            ),
            (
                KvShape {
                    layers: 2,
                    tokens: 520,
                    kv_heads: 8,
                    head_dim: 128,
                },
                256,
                0..2,
                OutDtype::F16,
            ),
        ] {
            let t = kv_like(shape, 11);
            // Without key rows (format 1), and with rows of about 16 and 100 tokens
            // (format 2 where a chunk holds more than one row).
            let rows: &[u32] = if KvTuning::of(profile).is_some() {
                &[0, 16, 100]
            } else {
                &[0]
            };
            for &key_rows in rows {
                let blobs = chunks(&t, chunk, profile, key_rows);
                check(
                    &dec,
                    &blobs,
                    layers.clone(),
                    dtype,
                    &format!("{profile} {shape:?} {dtype:?} key rows {key_rows}"),
                );
            }
        }
    }
}

#[test]
fn gpu_matches_cpu_on_real_kv() {
    let Some(dec) = decoder() else { return };
    let Ok(path) = std::env::var("KVAULT_REAL_KV") else {
        eprintln!("skipped: KVAULT_REAL_KV not set");
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kv = st.tensor("kv").unwrap();
    let s = kv.shape();
    let shape = KvShape {
        layers: s[0] as u32,
        tokens: s[2] as u32,
        kv_heads: s[3] as u32,
        head_dim: s[4] as u32,
    };
    let t = KvTensor::new(shape, kvault_codec::Dtype::F16, kv.data().to_vec()).unwrap();
    for &profile in GPU_PROFILES {
        let blobs = chunks(&t, 256, profile, 0);
        check(
            &dec,
            &blobs,
            0..shape.layers,
            OutDtype::F16,
            &format!("real {profile}"),
        );
        check(
            &dec,
            &blobs,
            7..19,
            OutDtype::Bf16,
            &format!("real {profile} layers 7..19"),
        );
        // Whole-prefix chunks with key rows of about 128 tokens (format 2).
        let blobs = chunks(&t, shape.tokens, profile, 128);
        check(
            &dec,
            &blobs,
            0..shape.layers,
            OutDtype::F16,
            &format!("real {profile} one chunk, key rows"),
        );
    }
}

#[test]
fn corrupt_input_is_an_error_not_a_crash() {
    let Some(dec) = decoder() else { return };
    let shape = KvShape {
        layers: 2,
        tokens: 200,
        kv_heads: 2,
        head_dim: 16,
    };
    let t = kv_like(shape, 5);
    // kv-mid also with key rows (format 2).
    for (profile, key_rows) in [
        (Profile::KvMid, 0),
        (Profile::KvMid, 16),
        (Profile::KvLo, 0),
        (Profile::CachegenBaseline, 0),
    ] {
        let blob = chunks(&t, shape.tokens, profile, key_rows).remove(0);
        let plan = kvault_codec::plan::DecodePlan::of_container(&blob, None).unwrap();
        let stream = dec.stream().clone();
        let out_len = shape.byte_len(kvault_codec::Dtype::F16).unwrap();
        // Damage stream bytes after planning, as a bad transfer would: the kernels must
        // stay in bounds and (for rANS) report it.
        let targets: Vec<usize> = plan
            .rans
            .streams
            .iter()
            .map(|s| s.data_offset as usize + s.data_len as usize / 2)
            .chain(plan.cachegen.streams.iter().map(|s| s.data_offset as usize))
            .collect();
        let mut bad = blob.clone();
        for &at in targets.iter().step_by(3) {
            bad[at] ^= 0xA5;
        }
        let input = stream.clone_htod(&bad).unwrap();
        let mut out: CudaSlice<u8> = stream.alloc_zeros(out_len).unwrap();
        let r = dec.decode_plan(&plan, &input, OutDtype::F16, Target::Canonical(&mut out));
        if profile != Profile::CachegenBaseline {
            assert!(matches!(r, Err(KernelError::Corrupt(_))), "{profile}: {r:?}");
        }
        // Truncated or bit-flipped containers fail at planning, before any launch.
        let refs = [&blob[..blob.len() - 9]];
        assert!(matches!(
            dec.decode(&refs, None, OutDtype::F16, Target::Canonical(&mut out)),
            Err(KernelError::Codec(_))
        ));
        // A wrong-sized output is refused.
        let mut small: CudaSlice<u8> = stream.alloc_zeros(out_len - 2).unwrap();
        assert!(matches!(
            dec.decode(&[&blob], None, OutDtype::F16, Target::Canonical(&mut small)),
            Err(KernelError::Layout(_))
        ));
        // The decoder still works after errors.
        dec.decode(&[&blob], None, OutDtype::F16, Target::Canonical(&mut out))
            .unwrap();
    }
}
