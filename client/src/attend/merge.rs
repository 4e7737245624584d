//! Exact merging of partial attention results, and attention over tokens
//! the node holds itself.
//!
//! A partial over a token set `I` is, per query head, the normalised output
//! `o = Σ softmax(s)_j v_j` and `lse = log Σ exp(s_j)` with `s_j = scale·q·k_j`.
//! Partials over disjoint sets merge exactly: `M = max lse_i`,
//! `o = Σ e^(lse_i−M) o_i / Σ e^(lse_i−M)`, `lse = M + log Σ e^(lse_i−M)`.
//! An empty set is `lse = −inf`, `o = 0`, and drops out of a merge.

use thiserror::Error;

/// Partials that cannot be merged or computed.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MergeError {
    /// Partials of different shapes.
    #[error("partial of {got_heads}x{got_dim} does not match {heads}x{dim}")]
    Shape {
        /// Heads expected.
        heads: usize,
        /// Dimension expected.
        dim: usize,
        /// Heads found.
        got_heads: usize,
        /// Dimension found.
        got_dim: usize,
    },
    /// Inputs whose lengths do not fit the stated shape.
    #[error("{0}")]
    Length(String),
}

/// Normalised attention output of `heads` query heads over some token set.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// Query heads.
    pub heads: usize,
    /// Dimension of a head.
    pub head_dim: usize,
    /// `[heads][head_dim]`.
    pub o: Vec<f32>,
    /// `[heads]`, natural log.
    pub lse: Vec<f32>,
}

impl Partial {
    /// The partial of the empty token set.
    pub fn empty(heads: usize, head_dim: usize) -> Partial {
        Partial {
            heads,
            head_dim,
            o: vec![0.0; heads * head_dim],
            lse: vec![f32::NEG_INFINITY; heads],
        }
    }

    /// Builds a partial, checking the lengths.
    pub fn new(heads: usize, head_dim: usize, o: Vec<f32>, lse: Vec<f32>) -> Result<Partial, MergeError> {
        if o.len() != heads * head_dim || lse.len() != heads {
            return Err(MergeError::Length(format!(
                "partial of {heads}x{head_dim} has {} outputs and {} lse values",
                o.len(),
                lse.len()
            )));
        }
        Ok(Partial {
            heads,
            head_dim,
            o,
            lse,
        })
    }
}

/// Merges partials over disjoint token sets into the partial over their union.
pub fn merge(parts: &[&Partial]) -> Result<Partial, MergeError> {
    let Some(first) = parts.first() else {
        return Err(MergeError::Length("nothing to merge".into()));
    };
    let (heads, dim) = (first.heads, first.head_dim);
    for p in parts {
        if p.heads != heads || p.head_dim != dim || p.o.len() != heads * dim || p.lse.len() != heads {
            return Err(MergeError::Shape {
                heads,
                dim,
                got_heads: p.heads,
                got_dim: p.head_dim,
            });
        }
    }
    let mut out = Partial::empty(heads, dim);
    let mut acc = vec![0f64; dim];
    for h in 0..heads {
        let m = parts.iter().map(|p| p.lse[h]).fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            continue; // every part empty: stays -inf and 0
        }
        acc.fill(0.0);
        let mut sum = 0f64;
        for p in parts {
            // Never (−inf) − (−inf): empty parts are skipped.
            if p.lse[h] == f32::NEG_INFINITY {
                continue;
            }
            let w = (p.lse[h] as f64 - m as f64).exp();
            sum += w;
            for (a, x) in acc.iter_mut().zip(&p.o[h * dim..(h + 1) * dim]) {
                *a += w * *x as f64;
            }
        }
        for (o, a) in out.o[h * dim..(h + 1) * dim].iter_mut().zip(&acc) {
            *o = (a / sum) as f32;
        }
        out.lse[h] = (m as f64 + sum.ln()) as f32;
    }
    Ok(out)
}

/// Attention of one query token over keys and values the node holds:
/// `q[heads][head_dim]`; `k`, `v` are `[kv_heads][tokens][head_dim]` (the
/// model runner's cache order); query head `h` reads KV head
/// `h / (heads / kv_heads)`. Computed in f64, returned as f32.
pub fn local_partial(
    q: &[f32],
    heads: usize,
    head_dim: usize,
    kv_heads: usize,
    k: &[f32],
    v: &[f32],
    scale: f32,
) -> Result<Partial, MergeError> {
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || q.len() != heads * head_dim {
        return Err(MergeError::Length(format!(
            "{heads} query heads of {head_dim} over {kv_heads} KV heads with {} query values",
            q.len()
        )));
    }
    let row = kv_heads * head_dim;
    if k.len() != v.len() || !k.len().is_multiple_of(row.max(1)) {
        return Err(MergeError::Length(format!(
            "keys ({}) and values ({}) are not whole tokens of {kv_heads}x{head_dim}",
            k.len(),
            v.len()
        )));
    }
    let tokens = k.len() / row;
    let g = heads / kv_heads;
    let mut out = Partial::empty(heads, head_dim);
    if tokens == 0 {
        return Ok(out);
    }
    let mut s = vec![0f64; tokens];
    let mut acc = vec![0f64; head_dim];
    for h in 0..heads {
        let base = (h / g) * tokens * head_dim;
        let qh = &q[h * head_dim..(h + 1) * head_dim];
        for (t, st) in s.iter_mut().enumerate() {
            let kt = &k[base + t * head_dim..base + (t + 1) * head_dim];
            *st = scale as f64 * qh.iter().zip(kt).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
        }
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        acc.fill(0.0);
        let mut l = 0f64;
        for (t, st) in s.iter().enumerate() {
            let p = (st - m).exp();
            l += p;
            let vt = &v[base + t * head_dim..base + (t + 1) * head_dim];
            for (a, x) in acc.iter_mut().zip(vt) {
                *a += p * *x as f64;
            }
        }
        for (o, a) in out.o[h * head_dim..(h + 1) * head_dim].iter_mut().zip(&acc) {
            *o = (a / l) as f32;
        }
        out.lse[h] = (m + l.ln()) as f32;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Splitting the tokens anywhere and merging the pieces gives the whole.
    fn split_equals_whole(tokens: usize, cuts: &[usize], seed: u64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (heads, kvh, d) = (6, 2, 8);
        let q: Vec<f32> = (0..heads * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let k: Vec<f32> = (0..kvh * tokens * d)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let v: Vec<f32> = (0..kvh * tokens * d)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let whole = local_partial(&q, heads, d, kvh, &k, &v, 0.4).unwrap();
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (tokens + 1)).collect();
        bounds.push(0);
        bounds.push(tokens);
        bounds.sort();
        let piece = |a: usize, b: usize, x: &[f32]| -> Vec<f32> {
            (0..kvh)
                .flat_map(|h| x[(h * tokens + a) * d..(h * tokens + b) * d].to_vec())
                .collect()
        };
        let parts: Vec<Partial> = bounds
            .windows(2)
            .map(|w| {
                local_partial(
                    &q,
                    heads,
                    d,
                    kvh,
                    &piece(w[0], w[1], &k),
                    &piece(w[0], w[1], &v),
                    0.4,
                )
                .unwrap()
            })
            .collect();
        let refs: Vec<&Partial> = parts.iter().collect();
        let m = merge(&refs).unwrap();
        for (a, b) in m.o.iter().zip(&whole.o) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        for (a, b) in m.lse.iter().zip(&whole.lse) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    proptest! {
        #[test]
        fn merge_of_any_split_is_the_whole(tokens in 1usize..40, cuts in prop::collection::vec(0usize..64, 0..4), seed: u64) {
            split_equals_whole(tokens, &cuts, seed);
        }
    }

    #[test]
    fn empty_parts_drop_out() {
        let e = Partial::empty(2, 3);
        let p = Partial::new(
            2,
            3,
            vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0],
            vec![0.5, f32::NEG_INFINITY],
        )
        .unwrap();
        let m = merge(&[&e, &p, &e]).unwrap();
        assert_eq!(m, p);
        let all_empty = merge(&[&e, &e]).unwrap();
        assert_eq!(all_empty, e);
        assert_eq!(local_partial(&[0.0; 6], 2, 3, 1, &[], &[], 1.0).unwrap(), e);
    }

    #[test]
    fn huge_lse_does_not_overflow() {
        // exp(lse) would overflow f32 and f64; the max shift keeps it exact.
        let a = Partial::new(1, 1, vec![1.0], vec![1000.0]).unwrap();
        let b = Partial::new(1, 1, vec![3.0], vec![1000.0]).unwrap();
        let m = merge(&[&a, &b]).unwrap();
        assert_eq!(m.o, [2.0]);
        assert!((m.lse[0] - (1000.0 + 2f32.ln())).abs() < 1e-3);
    }

    #[test]
    fn shape_mismatch_is_refused() {
        let a = Partial::empty(2, 3);
        let b = Partial::empty(3, 2);
        assert!(matches!(merge(&[&a, &b]), Err(MergeError::Shape { .. })));
        assert!(merge(&[]).is_err());
        assert!(Partial::new(2, 3, vec![0.0; 5], vec![0.0; 2]).is_err());
    }
}
