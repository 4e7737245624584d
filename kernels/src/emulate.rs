//! A host emulation of the kernels in `cu/decode.cu`, step for step (eight lanes in lock
//! step, ballots as bit masks), so that CPU-only CI checks the decode plans, the output
//! addressing and the kernels' algorithms against the CPU decoder. The GPU parity tests
//! (tests/gpu_parity.rs, run on a machine with a GPU) check the kernels themselves.

use half::{bf16, f16};
use kvault_codec::Dtype;
use kvault_codec::plan::{DecodePlan, NOT_PREDICTED};

use crate::{OutDtype, OutLayout};

/// Runs `plan` over `input` into `out` (slots of `layout` are byte offsets into `out`).
/// Returns whether any stream was found corrupt.
pub(crate) fn run(
    plan: &DecodePlan,
    input: &[u8],
    layout: &OutLayout,
    dtype: OutDtype,
    out: &mut [u8],
) -> bool {
    let c = plan.channels;
    let es = dtype.size() as u64;
    let row = |slot: u32, tok: u32| -> u64 {
        let b = layout.block_table[(tok / layout.block_size) as usize] as u64;
        layout.slots[slot as usize]
            + (b * u64::from(layout.block_size) + u64::from(tok % layout.block_size)) * u64::from(c) * es
    };
    let mut store = |addr: u64, v: f32| {
        let a = addr as usize;
        match dtype {
            OutDtype::F16 => out[a..a + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes()),
            OutDtype::Bf16 => out[a..a + 2].copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes()),
            OutDtype::F32 => out[a..a + 4].copy_from_slice(&v.to_le_bytes()),
        }
    };
    let mut bad = false;

    // rans_build_tables + rans_decode.
    let r = &plan.rans;
    let tables: Vec<Vec<u32>> = r
        .freqs
        .chunks_exact(64)
        .map(|f| {
            let mut cum = [0u32; 65];
            for s in 0..64 {
                cum[s + 1] = cum[s] + u32::from(f[s]);
            }
            (0..4096u32)
                .map(|slot| {
                    let s = (1..64).filter(|&k| cum[k] <= slot).max().unwrap_or(0);
                    (cum[s + 1] - cum[s]) | ((slot - cum[s]) << 13) | ((s as u32) << 25)
                })
                .collect()
        })
        .collect();
    for st in &r.streams {
        let p = r.parts[st.part as usize];
        let s = &input[st.data_offset as usize..][..st.data_len as usize];
        let words = st.data_len / 2;
        let word = |i: u32| {
            if i < words {
                u32::from(s[2 * i as usize]) | u32::from(s[2 * i as usize + 1]) << 8
            } else {
                0
            }
        };
        let tab = &tables[st.part as usize];
        let n = st.tokens * c;
        let mut x: Vec<u32> = (0..8).map(|l| word(2 * l) | (word(2 * l + 1) << 16)).collect();
        bad |= x.iter().any(|&x| x < 65536);
        let (mut pos, mut esc_used) = (16u32, 0u32);
        // A predicted part's per-channel state (the kernel keeps it as bytes in shared
        // memory), 0 at the stream's start.
        let predicted = p.rho_start != NOT_PREDICTED;
        let mut state = vec![0i8; c as usize];
        for k in 0..n.div_ceil(8) {
            let mut syms = [None; 8];
            let mut need = [false; 8];
            for l in 0..8 {
                let i = 8 * k + l;
                if i < n {
                    let e = tab[(x[l as usize] & 4095) as usize];
                    let y = (e & 0x1FFF) * (x[l as usize] >> 12) + ((e >> 13) & 0xFFF);
                    need[l as usize] = y < 65536;
                    x[l as usize] = y;
                    syms[l as usize] = Some(e >> 25);
                }
            }
            for l in 0..8 {
                if need[l] {
                    let ahead = need[..l].iter().filter(|&&b| b).count() as u32;
                    x[l] = (x[l] << 16) | word(pos + ahead);
                }
            }
            pos += need.iter().filter(|&&b| b).count() as u32;
            let esc_sym = 2 * p.m + 1;
            let mut esc_here = 0;
            for (l, sym) in syms.iter().enumerate() {
                let Some(sym) = *sym else { continue };
                let i = 8 * k + l as u32;
                let (t, ch) = (i / c, i % c);
                let tok = st.token_start + t;
                let g = (p.group_start
                    + match p.group_kind {
                        1 => tok,
                        2 => tok / p.group_tokens * c + ch,
                        _ => ch,
                    }) as usize;
                let pred = if predicted {
                    let w = i32::from(r.rho[(p.rho_start + ch) as usize]);
                    (w * i32::from(state[ch as usize]) + 4) >> 3
                } else {
                    0
                };
                if predicted {
                    state[ch as usize] = if sym == esc_sym {
                        0
                    } else {
                        (sym as i32 - p.m as i32 + pred).clamp(-127, 127) as i8
                    };
                }
                let v = if sym != esc_sym {
                    (sym.wrapping_add(r.biases[g] as u32).wrapping_add(pred as u32) as i32) as f32
                        * r.steps[g]
                } else {
                    let ord = esc_used + esc_here;
                    esc_here += 1;
                    if ord < st.escape_count {
                        let q = i64::from(r.escapes[(st.escape_start + ord) as usize])
                            + i64::from(r.biases[g])
                            + i64::from(p.m);
                        q as f32 * r.steps[g]
                    } else {
                        bad = true;
                        0.0
                    }
                };
                store(
                    row(p.out_slot, p.token_offset + st.token_start + t) + u64::from(ch) * es,
                    v,
                );
            }
            esc_used += esc_here;
        }
        bad |= x.iter().any(|&x| x != 65536) || pos != words || esc_used != st.escape_count;
    }

    // exact_rows, after the streams (a later launch on the same stream).
    for e in &r.exact_rows {
        // The planner only emits rows of a known dtype.
        let Ok(dtype) = Dtype::from_u8(e.dtype as u8) else {
            bad = true;
            continue;
        };
        let size = dtype.size();
        let src = &input[e.data_offset as usize..][..c as usize * size];
        for ch in 0..c {
            let b = &src[ch as usize * size..][..size];
            let v = match dtype {
                Dtype::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                Dtype::Bf16 => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            };
            store(row(e.out_slot, e.token) + u64::from(ch) * es, v);
        }
    }

    // q8_decode.
    for p in &plan.q8.parts {
        let lo = &plan.q8.lo_step[p.param_start as usize..];
        for i in 0..p.tokens * c {
            let (t, ch) = (i / c, i % c);
            let q = f32::from(input[(p.data_offset + u64::from(i)) as usize]);
            store(
                row(p.out_slot, p.token_offset + t) + u64::from(ch) * es,
                lo[ch as usize] + q * lo[(c + ch) as usize],
            );
        }
    }

    // cachegen_decode.
    let g = &plan.cachegen;
    'streams: for st in &g.streams {
        let p = g.parts[st.part as usize];
        let s = &input[st.data_offset as usize..][..st.data_len as usize];
        let bit = |i: u64| {
            s.get((i / 8) as usize)
                .map_or(0, |b| u32::from(b >> (7 - i % 8)) & 1)
        };
        let cdf = &g.cdfs[(p.cdf_start + st.channel * 33) as usize..][..33];
        let maxf = p.max as f32;
        let mut value = (0..32).fold(0u32, |v, i| (v << 1) | bit(i));
        let (mut next, mut low, mut high) = (32u64, 0u32, u32::MAX);
        for i in 0..st.tokens {
            let range = u64::from(high - low) + 1;
            let count = ((u64::from(value.wrapping_sub(low)) + 1) * 65536 - 1) / range;
            let count = u32::from(count as u16);
            let n = cdf[..32].iter().filter(|&&v| u32::from(v) <= count).count() as u32;
            let sym = n.saturating_sub(1);
            let tok = st.token_start + i;
            let v = (sym as f32 - maxf) / maxf * g.scales[(p.scale_start + tok) as usize];
            store(
                row(p.out_slot, p.token_offset + tok) + u64::from(st.channel) * es,
                v,
            );
            if i + 1 == st.tokens {
                break;
            }
            let c_lo = u64::from(cdf[sym as usize]);
            let c_hi = if sym == 31 {
                0x10000
            } else {
                u64::from(cdf[sym as usize + 1])
            };
            high = (u64::from(low) + ((range * c_hi) >> 16)).wrapping_sub(1) as u32;
            low = low.wrapping_add(((range * c_lo) >> 16) as u32);
            let mut renorm = 0;
            loop {
                if low >= 0x8000_0000 || high < 0x8000_0000 {
                    low <<= 1;
                    high = (high << 1) | 1;
                    value = (value << 1) | bit(next);
                } else if low >= 0x4000_0000 && high < 0xC000_0000 {
                    low = (low << 1) & 0x7FFF_FFFF;
                    high = (high << 1) | 0x8000_0001;
                    value = (value.wrapping_sub(0x4000_0000) << 1) | bit(next);
                } else {
                    break;
                }
                next += 1;
                renorm += 1;
                if renorm > 64 {
                    bad = true;
                    continue 'streams;
                }
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvault_codec::{KvShape, KvTuning, Profile};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Chunks of a prefix, a layer range, canonical and paged outputs: the emulated
        /// kernels give the CPU decoder's bytes.
        #[test]
        fn emulated_kernels_match_the_cpu_decoder(
            profile in prop::sample::select(crate::GPU_PROFILES),
            layers in 1u32..4,
            heads in 1u32..3,
            head_dim in prop::sample::select(&[2u32, 4, 8, 12][..]),
            tokens in prop::collection::vec(1u32..150, 1..3),
            range_start in 0u32..3,
            dtype in prop::sample::select(&[OutDtype::F16, OutDtype::Bf16, OutDtype::F32][..]),
            key_rows in prop::sample::select(&[0u32, 8, 40][..]),
            seed in any::<u64>(),
        ) {
            let range = range_start.min(layers - 1)..layers;
            let nl = range.end - range.start;
            let mut input = Vec::new();
            let mut plan = DecodePlan::new();
            let mut expected_chunks = Vec::new();
            let mut tok0 = 0;
            for (i, &t) in tokens.iter().enumerate() {
                let shape = KvShape { layers, tokens: t, kv_heads: heads, head_dim };
                let kv = crate::synthetic::kv_like(shape, seed ^ i as u64);
                // kv-* chunks also with key rows (payload format 2 when a chunk has more
                // than one row).
                // The first chunk starts the sequence: kv-* store its sink token exactly.
                let tuning = KvTuning::of(profile)
                    .filter(|_| key_rows > 0)
                    .map(|own| KvTuning { key_group_tokens: key_rows, key_rows_min_tokens: 0, ..own });
                let options = kvault_codec::EncodeOptions { tuning: tuning.as_ref(), starts_sequence: i == 0 };
                let blob = kvault_codec::encode_with(kv.view(), profile, options).unwrap();
                plan.add(&blob, input.len() as u64, tok0, Some(range.clone())).unwrap();
                let sliced = kvault_codec::slice_layers(&blob, range.clone()).unwrap();
                let sub = KvShape { layers: nl, ..shape };
                let mut cpu = vec![0u8; sub.byte_len(dtype.dtype()).unwrap()];
                kvault_codec::decode_into(&sliced, dtype.dtype(), &mut cpu).unwrap();
                expected_chunks.push((tok0, t, cpu));
                input.extend_from_slice(&blob);
                tok0 += t;
            }
            // kv-* store the first chunk's token 0 (of more than one) exactly, key rows
            // only, which the plan writes after the streams.
            if KvTuning::of(profile).is_some() {
                let rows: Vec<(u32, u32)> = plan.rans.exact_rows.iter().map(|e| (e.out_slot, e.token)).collect();
                let want: Vec<(u32, u32)> = if tokens[0] > 1 { (0..nl).map(|l| (2 * l, 0)).collect() } else { Vec::new() };
                prop_assert_eq!(rows, want);
            }
            let c = heads * head_dim;
            let es = dtype.size();
            // Canonical.
            let layout = OutLayout::canonical(0, nl, tok0, c, dtype);
            let mut out = vec![0xAAu8; (nl * 2 * tok0 * c) as usize * es];
            prop_assert!(!run(&plan, &input, &layout, dtype, &mut out));
            for (t0, t, cpu) in &expected_chunks {
                let row = c as usize * es;
                for part in 0..(2 * nl) as usize {
                    let got = &out[(part * tok0 as usize + *t0 as usize) * row..][..*t as usize * row];
                    let want = &cpu[part * *t as usize * row..][..*t as usize * row];
                    prop_assert_eq!(got, want);
                }
            }
            // Paged: blocks of 16 rows, in reverse order, K and V of each layer apart.
            let bs = 16u32;
            let blocks = tok0.div_ceil(bs);
            let cache = u64::from(blocks * bs * c) * es as u64;
            let table: Vec<u32> = (0..blocks).rev().collect();
            let k: Vec<u64> = (0..nl).map(|l| u64::from(2 * l) * cache).collect();
            let v: Vec<u64> = (0..nl).map(|l| u64::from(2 * l + 1) * cache).collect();
            let paged = OutLayout::paged(&k, &v, bs, &table, u64::from(blocks), tok0).unwrap();
            let mut pout = vec![0u8; (cache * 2 * u64::from(nl)) as usize];
            prop_assert!(!run(&plan, &input, &paged, dtype, &mut pout));
            let row = c as usize * es;
            for slot in 0..(2 * nl) as usize {
                for tok in 0..tok0 as usize {
                    let b = table[tok / bs as usize] as usize;
                    let at = slot * cache as usize + (b * bs as usize + tok % bs as usize) * row;
                    prop_assert_eq!(&pout[at..at + row], &out[(slot * tok0 as usize + tok) * row..][..row]);
                }
            }
        }
    }

    /// Predicted parts (payload format 4), also with a channel count that is not a multiple
    /// of the eight lanes: the emulated kernel gives the CPU decoder's bytes.
    #[test]
    fn predicted_parts_match_the_cpu_decoder() {
        for (heads, head_dim) in [(2u32, 8u32), (1, 12), (3, 64)] {
            let shape = KvShape {
                layers: 2,
                tokens: 130,
                kv_heads: heads,
                head_dim,
            };
            let c = heads * head_dim;
            let kv = crate::synthetic::kv_like(shape, 11);
            let options = kvault_codec::EncodeOptions::sequence_start(true);
            let blob = kvault_codec::encode_with(kv.view(), Profile::KvMid, options).unwrap();
            let mut plan = DecodePlan::new();
            plan.add(&blob, 0, 0, None).unwrap();
            assert!(
                plan.rans.parts.iter().any(|p| p.rho_start != NOT_PREDICTED),
                "{c} channels: no part predicted"
            );
            let layout = OutLayout::canonical(0, 2, 130, c, OutDtype::F32);
            let mut out = vec![0u8; (2 * 2 * 130 * c * 4) as usize];
            assert!(!run(&plan, &blob, &layout, OutDtype::F32, &mut out));
            let mut cpu = vec![0u8; out.len()];
            kvault_codec::decode_into(&blob, Dtype::F32, &mut cpu).unwrap();
            assert_eq!(out, cpu, "{c} channels");
        }
    }

    #[test]
    fn damaged_streams_are_reported() {
        let shape = KvShape {
            layers: 1,
            tokens: 40,
            kv_heads: 2,
            head_dim: 8,
        };
        for profile in [Profile::KvMid, Profile::CachegenBaseline] {
            let blob = kvault_codec::encode(crate::synthetic::kv_like(shape, 7).view(), profile).unwrap();
            let mut plan = DecodePlan::new();
            plan.add(&blob, 0, 0, None).unwrap();
            let layout = OutLayout::canonical(0, 1, 40, 16, OutDtype::F16);
            let mut out = vec![0u8; 2 * 40 * 16 * 2];
            assert!(!run(&plan, &blob, &layout, OutDtype::F16, &mut out));
            // Damage a stream byte after planning (as a bad device copy would): the rANS
            // end-state checks must notice. Cachegen has no end check (like upstream), so
            // only the rANS profile is required to report it.
            let mut bad = blob.clone();
            let at = plan.rans.streams.first().map(|s| s.data_offset as usize + 20);
            if let Some(at) = at {
                bad[at] ^= 0x5A;
                assert!(run(&plan, &bad, &layout, OutDtype::F16, &mut out));
            }
        }
    }
}
