//! Byte shuffle: regroups the bytes of fixed-size elements so that byte 0 of every element
//! comes first, then byte 1 of every element, and so on.
//!
//! Float KV values have noisy low mantissa bytes and very repetitive high bytes (sign,
//! exponent); grouping the bytes by significance lets zstd find that repetition. This is the
//! same transform as Blosc's `SHUFFLE` filter.
//!
//! Hot path: every lossless encode and decode runs through here. The 2- and 4-byte versions
//! are plain loops over `chunks_exact` with a fixed element size, which LLVM turns into SIMD
//! (de)interleaves; keep them free of bounds checks and branches.

/// Shuffles `src` (elements of `elem_size` bytes) into `dst`.
///
/// # Panics
/// If the lengths differ or are not a multiple of `elem_size` (a caller bug: callers size
/// both buffers from a validated shape).
pub(crate) fn shuffle(src: &[u8], dst: &mut [u8], elem_size: usize) {
    check(src.len(), dst.len(), elem_size);
    match elem_size {
        1 => dst.copy_from_slice(src),
        2 => shuffle2(src, dst),
        4 => shuffle4(src, dst),
        s => shuffle_any(src, dst, s),
    }
}

/// Inverse of [`shuffle`]: reads planes from `src`, writes interleaved elements to `dst`.
///
/// # Panics
/// As [`shuffle`].
pub(crate) fn unshuffle(src: &[u8], dst: &mut [u8], elem_size: usize) {
    check(src.len(), dst.len(), elem_size);
    match elem_size {
        1 => dst.copy_from_slice(src),
        2 => unshuffle2(src, dst),
        4 => unshuffle4(src, dst),
        s => unshuffle_any(src, dst, s),
    }
}

fn check(src: usize, dst: usize, elem_size: usize) {
    assert!(
        elem_size > 0 && src == dst && src.is_multiple_of(elem_size),
        "shuffle buffers: src {src}, dst {dst}, element size {elem_size}"
    );
}

fn shuffle2(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / 2;
    let (p0, p1) = dst.split_at_mut(n);
    // LLVM does not vectorise a byte deinterleave at the x86-64 baseline (no pshufb), so
    // split 4 elements at a time inside a u64 (SWAR): gather the even and the odd bytes
    // with masks and shifts, store 4 bytes to each plane.
    let words = src.chunks_exact(8);
    let tail = words.remainder();
    let mut p0w = p0.chunks_exact_mut(4);
    let mut p1w = p1.chunks_exact_mut(4);
    for ((w, a), b) in words.zip(&mut p0w).zip(&mut p1w) {
        let x = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        a.copy_from_slice(&gather_even_bytes(x).to_le_bytes());
        b.copy_from_slice(&gather_even_bytes(x >> 8).to_le_bytes());
    }
    let (t0, t1) = (p0w.into_remainder(), p1w.into_remainder());
    for ((e, a), b) in tail.chunks_exact(2).zip(t0).zip(t1) {
        *a = e[0];
        *b = e[1];
    }
}

/// Bytes 0, 2, 4 and 6 of `x`, packed into a u32 (little-endian order kept).
#[inline(always)]
fn gather_even_bytes(x: u64) -> u32 {
    let x = x & 0x00FF_00FF_00FF_00FF;
    let x = (x | (x >> 8)) & 0x0000_FFFF_0000_FFFF;
    (x | (x >> 16)) as u32
}

fn unshuffle2(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / 2;
    let (p0, p1) = src.split_at(n);
    for ((e, a), b) in dst.chunks_exact_mut(2).zip(p0).zip(p1) {
        e[0] = *a;
        e[1] = *b;
    }
}

fn shuffle4(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / 4;
    let (p0, rest) = dst.split_at_mut(n);
    let (p1, rest) = rest.split_at_mut(n);
    let (p2, p3) = rest.split_at_mut(n);
    for ((((e, a), b), c), d) in src.chunks_exact(4).zip(p0).zip(p1).zip(p2).zip(p3) {
        let w = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        *a = w as u8;
        *b = (w >> 8) as u8;
        *c = (w >> 16) as u8;
        *d = (w >> 24) as u8;
    }
}

fn unshuffle4(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / 4;
    let (p0, rest) = src.split_at(n);
    let (p1, rest) = rest.split_at(n);
    let (p2, p3) = rest.split_at(n);
    for ((((e, a), b), c), d) in dst.chunks_exact_mut(4).zip(p0).zip(p1).zip(p2).zip(p3) {
        e[0] = *a;
        e[1] = *b;
        e[2] = *c;
        e[3] = *d;
    }
}

fn shuffle_any(src: &[u8], dst: &mut [u8], s: usize) {
    let n = src.len() / s;
    for (b, plane) in dst.chunks_exact_mut(n.max(1)).enumerate() {
        for (d, e) in plane.iter_mut().zip(src.chunks_exact(s)) {
            *d = e[b];
        }
    }
}

fn unshuffle_any(src: &[u8], dst: &mut [u8], s: usize) {
    let n = src.len() / s;
    for (b, plane) in src.chunks_exact(n.max(1)).enumerate() {
        for (d, e) in plane.iter().zip(dst.chunks_exact_mut(s)) {
            e[b] = *d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Obviously correct reference.
    fn reference(src: &[u8], s: usize) -> Vec<u8> {
        let n = src.len() / s;
        (0..src.len()).map(|i| src[(i % n) * s + i / n]).collect()
    }

    #[test]
    fn shuffle2_layout() {
        let src = [1, 2, 3, 4, 5, 6];
        let mut dst = [0; 6];
        shuffle(&src, &mut dst, 2);
        assert_eq!(dst, [1, 3, 5, 2, 4, 6]);
    }

    proptest! {
        #[test]
        fn matches_reference_and_inverts(
            s in prop::sample::select(vec![1usize, 2, 3, 4, 8]),
            n in 0usize..300,
            seed in any::<u64>(),
        ) {
            let src: Vec<u8> = (0..n * s)
                .map(|i| (seed.wrapping_mul(i as u64 + 1) >> 13) as u8)
                .collect();
            let mut shuffled = vec![0; src.len()];
            shuffle(&src, &mut shuffled, s);
            if n > 0 {
                prop_assert_eq!(&shuffled, &reference(&src, s));
            }
            let mut back = vec![0; src.len()];
            unshuffle(&shuffled, &mut back, s);
            prop_assert_eq!(back, src);
        }
    }

    /// Throughput check of the hot path; run with
    /// `cargo test -p kvault-codec --release -- --ignored --nocapture shuffle_speed`.
    #[test]
    #[ignore]
    fn shuffle_speed() {
        let src: Vec<u8> = (0..64u32 << 20).map(|i| (i * 7 + i / 3) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        let mut back = vec![0u8; src.len()];
        for s in [2, 2, 4, 4] {
            let t = std::time::Instant::now();
            shuffle(&src, &mut dst, s);
            let sh = t.elapsed();
            let t = std::time::Instant::now();
            unshuffle(&dst, &mut back, s);
            let un = t.elapsed();
            let gb = src.len() as f64 / 1e9;
            println!(
                "s={s}: shuffle {:.2} GB/s, unshuffle {:.2} GB/s",
                gb / sh.as_secs_f64(),
                gb / un.as_secs_f64()
            );
            assert_eq!(back, src);
        }
    }
}
