//! The attention kernel against the textbook definition in f64, its rows against themselves in
//! other batches, and its SIMD builds against the portable code, on f32 and f16 caches.

use super::*;
use crate::engine::kernels::tests::Random;

fn sample(len: usize, seed: u64) -> Vec<f32> {
    Random(seed).floats(len, 1.0)
}

/// The textbook definition, in f64, one query head at a time.
fn reference(
    shape: &AttentionShape,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    kv_stride: usize,
) -> Vec<f32> {
    let AttentionShape { heads, kv_heads, head_dim, tokens, position, .. } = *shape;
    let mut out = vec![0.0f32; tokens * heads * head_dim];
    for head in 0..heads {
        let kv = head / (heads / kv_heads);
        for token in 0..tokens {
            let query = position + token;
            let q = &queries[(head * tokens + token) * head_dim..][..head_dim];
            let scores: Vec<Option<f64>> = (0..shape.positions())
                .map(|key| {
                    let hidden = key > query || shape.window.is_some_and(|size| query - key >= size);
                    (!hidden).then(|| {
                        let k = &keys[kv * kv_stride + key * head_dim..][..head_dim];
                        let mut s = f64::from(shape.scale)
                            * q.iter().zip(k).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>();
                        if let Some(cap) = shape.softcap {
                            s = f64::from(cap) * (s / f64::from(cap)).tanh();
                        }
                        s
                    })
                })
                .collect();
            let max = scores.iter().flatten().fold(f64::NEG_INFINITY, |m, &s| m.max(s));
            let total: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
            for d in 0..head_dim {
                let mut value = 0.0;
                for (key, score) in scores.iter().enumerate() {
                    if let Some(s) = score {
                        value +=
                            (s - max).exp() / total * f64::from(values[kv * kv_stride + key * head_dim + d]);
                    }
                }
                out[(token * heads + head) * head_dim + d] = value as f32;
            }
        }
    }
    out
}

struct Case {
    shape: AttentionShape,
    kv_stride: usize,
    queries: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn new(
        seed: u64,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        tokens: usize,
        position: usize,
        window: Option<usize>,
        softcap: Option<f32>,
    ) -> Self {
        let shape =
            AttentionShape { heads, kv_heads, head_dim, tokens, position, window, scale: 0.3, softcap };
        // A cache with room beyond what is filled, as the real one has.
        let kv_stride = (shape.positions() + 5) * head_dim;
        Self {
            shape,
            kv_stride,
            queries: sample(heads * tokens * head_dim, seed),
            keys: sample(kv_heads * kv_stride, 100 + seed),
            values: sample(kv_heads * kv_stride, 200 + seed),
        }
    }

    fn run(&self) -> Vec<f32> {
        let shape = &self.shape;
        let mut out = vec![f32::NAN; shape.tokens * shape.heads * shape.head_dim];
        attend(shape, &self.queries, &self.keys, &self.values, self.kv_stride, &mut out);
        out
    }

    /// The same case with its cache rounded to f16.
    fn in_f16(&self) -> Self {
        let round = |values: &[f32]| values.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        Self { keys: round(&self.keys), values: round(&self.values), queries: self.queries.clone(), ..*self }
    }

    /// Run on an f16 cache (the values must be f16 already: `in_f16`).
    fn run_f16(&self) -> Vec<f32> {
        let shape = &self.shape;
        let narrow = |values: &[f32]| values.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
        let mut out = vec![f32::NAN; shape.tokens * shape.heads * shape.head_dim];
        attend(shape, &self.queries, &narrow(&self.keys), &narrow(&self.values), self.kv_stride, &mut out);
        out
    }
}

#[test]
fn agrees_with_the_definition() {
    let cases = [
        // heads, kv_heads, head_dim, tokens, position, window, softcap
        (4, 4, 16, 1, 0, None, None),
        (9, 3, 64, 1, 37, None, None),
        (4, 1, 36, 3, 20, None, Some(50.0)),
        (8, 2, 12, 2, 30, Some(8), None),
        (2, 1, 8, 5, 0, Some(3), Some(30.0)),
        // Enough work to be spread over the pool.
        (8, 2, 64, 48, 100, None, None),
        (4, 4, 40, 64, 0, Some(16), None),
    ];
    for (seed, (heads, kv_heads, head_dim, tokens, position, window, softcap)) in
        cases.into_iter().enumerate()
    {
        let case = Case::new(seed as u64, heads, kv_heads, head_dim, tokens, position, window, softcap);
        let expected = reference(&case.shape, &case.queries, &case.keys, &case.values, case.kv_stride);
        for (i, (got, want)) in case.run().iter().zip(&expected).enumerate() {
            assert!((got - want).abs() <= 1e-5, "case {seed}, value {i}: {got} against {want}");
        }
        // An f16 cache is computed as the f32 cache of the same (widened) values.
        let rounded = case.in_f16();
        let expected =
            reference(&rounded.shape, &rounded.queries, &rounded.keys, &rounded.values, case.kv_stride);
        for (i, (got, want)) in rounded.run_f16().iter().zip(&expected).enumerate() {
            assert!((got - want).abs() <= 1e-5, "case {seed} in f16, value {i}: {got} against {want}");
        }
        assert_eq!(
            bits(&rounded.run_f16()),
            bits(&rounded.run()),
            "case {seed}: f16 and f32 caches of the same values"
        );
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// A row's bits do not depend on the other rows of its call: the last rows of a prompt run
/// whole equal those rows run as a step of their own over the same cache.
#[test]
fn a_row_is_the_same_whatever_rows_run_beside_it() {
    let whole = Case::new(7, 8, 2, 64, 60, 0, None, None);
    let (heads, head_dim) = (8, 64);
    let all = whole.run();
    for first in [1, 13, 59] {
        let tokens = 60 - first;
        let queries: Vec<f32> = (0..heads)
            .flat_map(|head| {
                whole.queries[(head * 60 + first) * head_dim..(head * 60 + 60) * head_dim].to_vec()
            })
            .collect();
        let shape = AttentionShape { tokens, position: first, ..whole.shape };
        let mut out = vec![0.0; tokens * heads * head_dim];
        attend(&shape, &queries, &whole.keys, &whole.values, whole.kv_stride, &mut out);
        assert!(
            out.iter().zip(&all[first * heads * head_dim..]).all(|(a, b)| a.to_bits() == b.to_bits()),
            "rows from {first} on differ"
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_simd_builds_give_the_portable_bits() {
    if !simd::available_f16() {
        return;
    }
    let cases = [
        // heads, kv_heads, head_dim, tokens, position, window, softcap
        // 72 is four and a half registers of sixteen: the dot's tail runs, and the weighted
        // sum's eight-wide tail; 100 also runs its last four one at a time.
        (4, 2, 72, 5, 30, None, Some(20.0)),
        (4, 2, 100, 5, 30, None, None),
        // A decode step: grouped-query heads share blocks of three and of four, two, or none
        // (one row: its sums sixty-four dimensions at a time).
        (9, 3, 64, 1, 37, None, None),
        (8, 2, 64, 1, 200, None, None),
        (4, 2, 72, 1, 45, None, None),
        (4, 4, 100, 1, 50, None, None),
        (2, 2, 256, 1, 40, None, None),
        // A prompt chunk: neighbouring tokens share blocks; positions not a multiple of eight.
        (4, 1, 256, 11, 61, None, None),
        (2, 2, 16, 9, 0, None, None),
        // Sliding windows: rows in a block start at different positions, or share none.
        (4, 1, 32, 12, 40, Some(6), None),
        (4, 2, 32, 7, 3, Some(2), Some(30.0)),
        (2, 1, 8, 5, 0, Some(1), None),
        // Enough work to be spread over the pool.
        (8, 2, 64, 48, 100, None, None),
    ];
    for (seed, (heads, kv_heads, head_dim, tokens, position, window, softcap)) in
        cases.into_iter().enumerate()
    {
        let case = Case::new(seed as u64, heads, kv_heads, head_dim, tokens, position, window, softcap);
        simd_and_portable_agree(&case, seed);
    }
}

#[cfg(target_arch = "x86_64")]
fn simd_and_portable_agree(case: &Case, seed: usize) {
    let narrow = |values: &[f32]| values.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
    let (keys_f16, values_f16) = (narrow(&case.keys), narrow(&case.values));
    let shape = &case.shape;
    let run = |keys: &[f16], values: &[f16], simd: bool| {
        let mut out = vec![f32::NAN; shape.tokens * shape.heads * shape.head_dim];
        let kernel =
            |shape: &AttentionShape, rows: &Rows<'_, f16>, scores: &mut [f32], outs: &mut Outs<'_>| {
                if simd {
                    // SAFETY: the caller checked `available_f16()`.
                    unsafe { simd::attend_rows_f16(shape, rows, scores, outs) }
                } else {
                    attend_rows_portable(shape, rows, scores, outs)
                }
            };
        attend_with(shape, &case.queries, keys, values, case.kv_stride, &mut out, kernel);
        out
    };
    let simd = run(&keys_f16, &values_f16, true);
    assert!(simd.iter().all(|value| value.is_finite()), "case {seed}: every output written");
    assert_eq!(bits(&simd), bits(&run(&keys_f16, &values_f16, false)), "case {seed}: f16 cache");
    // The f32 cache's build (the portable code compiled for AVX2) against the portable code.
    let mut out = vec![0.0; simd.len()];
    let portable_f32 =
        |shape: &AttentionShape, rows: &Rows<'_, f32>, scores: &mut [f32], outs: &mut Outs<'_>| {
            attend_rows_portable(shape, rows, scores, outs)
        };
    attend_with(shape, &case.queries, &case.keys, &case.values, case.kv_stride, &mut out, portable_f32);
    assert_eq!(bits(&case.run()), bits(&out), "case {seed}: f32 cache");
}

/// `exp` within a few ulp of the exact value over the softmax's range, and its SIMD build
/// giving its bits, NaN and the ends of the range included.
#[test]
fn exp_is_close_to_the_exact_value() {
    let mut worst = 0.0f64;
    for step in 0..=200_000 {
        let x = -87.0 + 87.0 * step as f32 / 200_000.0;
        let exact = f64::from(x).exp();
        worst = worst.max(((f64::from(exp(x)) - exact) / exact).abs());
    }
    assert!(worst < 4.0 * f64::from(f32::EPSILON), "relative error {worst}");
    assert_eq!(exp(0.0), 1.0);
    assert_eq!(exp(-1000.0), exp(-87.0));
    assert_eq!(exp(f32::NAN), exp(-87.0));
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        let inputs: Vec<f32> = Random(11)
            .floats(4096, 90.0)
            .into_iter()
            .chain([0.0, -0.0, -87.0, 88.0, -1000.0, 1000.0, f32::NAN, f32::NEG_INFINITY])
            .collect();
        for eight in inputs.chunks_exact(8) {
            let mut got = [0.0f32; 8];
            // SAFETY: `available()` was checked; `eight` and `got` hold eight f32.
            unsafe { simd::exp8_into(eight, &mut got) };
            for (x, got) in eight.iter().zip(got) {
                assert_eq!(got.to_bits(), exp(*x).to_bits(), "e^{x}");
            }
        }
    }
}

#[test]
fn a_window_of_one_sees_only_its_own_position() {
    let shape = AttentionShape {
        heads: 1,
        kv_heads: 1,
        head_dim: 2,
        tokens: 1,
        position: 3,
        window: Some(1),
        scale: 1.0,
        softcap: None,
    };
    let keys = [9.0; 8];
    let values = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, -4.0];
    let mut out = [0.0; 2];
    attend(&shape, &[1.0, 0.0], &keys, &values, 8, &mut out);
    assert_eq!(out, [4.0, -4.0]);
}
