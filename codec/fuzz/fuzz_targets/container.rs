//! Feeds arbitrary bytes to every parser of untrusted containers: `Container::parse`,
//! `decode`, `decode_into`, `slice_layers` and the GPU decode planner (`DecodePlan`) must
//! return errors (every profile's decoder runs, since the profile id comes from the input), never panic, hang or
//! allocate without bound. Run with `cargo fuzz run container` from `codec/`.

#![no_main]

use kvault_codec::plan::DecodePlan;
use kvault_codec::{Container, Dtype, decode, decode_into, slice_layers};
use libfuzzer_sys::fuzz_target;

/// Largest tensor this target decodes: keeps libFuzzer's malloc limit meaningful, since a
/// valid header may legitimately claim up to 16 GiB.
const MAX_DECODE: usize = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(c) = Container::parse(data) else {
        // Still run the other entry points on invalid input: they must fail the same way.
        assert!(decode(data).is_err());
        assert!(slice_layers(data, 0..1).is_err());
        assert!(DecodePlan::of_container(data, None).is_err());
        return;
    };
    // Every record the planner emits stays inside the input and its own arrays: the GPU
    // kernels follow them without further bounds checks.
    if let Ok(plan) = DecodePlan::of_container(data, None) {
        let len = data.len() as u64;
        for s in &plan.rans.streams {
            assert!(s.data_offset + u64::from(s.data_len) <= len);
            assert!((s.part as usize) < plan.rans.parts.len());
            assert!((s.escape_start + s.escape_count) as usize <= plan.rans.escapes.len());
        }
        for p in &plan.rans.parts {
            assert!((p.first_stream + p.stream_count) as usize <= plan.rans.streams.len());
            assert!((p.group_start as usize) < plan.rans.steps.len().max(1));
            if p.rho_start != kvault_codec::plan::NOT_PREDICTED {
                assert!((p.rho_start + plan.channels) as usize <= plan.rans.rho.len());
                assert!(plan.channels >= 8);
            }
        }
        assert!(plan.rans.rho.iter().all(|&w| w <= 8));
        for e in &plan.rans.exact_rows {
            let size = Dtype::from_u8(e.dtype as u8).expect("a planned row's dtype").size() as u64;
            assert!(e.data_offset + u64::from(plan.channels) * size <= len);
            assert!(e.token < plan.tokens && e.out_slot < 2 * plan.layers);
        }
        for p in &plan.q8.parts {
            let n = u64::from(p.tokens) * u64::from(plan.channels);
            assert!(p.data_offset + n <= len);
        }
        for s in &plan.cachegen.streams {
            assert!(s.data_offset + u64::from(s.data_len) <= len);
            assert!((s.part as usize) < plan.cachegen.parts.len());
        }
    }
    let header = c.header().clone();
    let range = header.layer_range();
    for i in 0..header.layer_count {
        let _ = c.layer_payload(i);
    }
    if let Ok(part) = slice_layers(data, range.start..range.start + 1) {
        assert!(Container::parse(&part).is_ok());
    }
    let _ = slice_layers(data, range.end..range.end.saturating_add(1));
    let shape = header.shape();
    if shape.byte_len(Dtype::F32).is_ok_and(|n| n <= MAX_DECODE)
        && let Ok(t) = decode(data)
    {
        assert_eq!(t.shape(), shape);
        // Every output dtype: the lossy profiles write each one directly.
        for &to in Dtype::ALL {
            let mut out = vec![0u8; shape.byte_len(to).unwrap_or(0)];
            let _ = decode_into(data, to, &mut out);
        }
    }
});
