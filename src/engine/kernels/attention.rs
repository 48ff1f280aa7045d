//! Attention of a step's query rows against one sequence's cached keys and values, on the CPU,
//! read in place from the cache: no transposed copy of the keys, no packing for a general matmul,
//! no score tensor per op.
//!
//! Every query row is computed the same way whatever else the step holds: its scores in position
//! order, its softmax, its weighted sum of values in position order. So a row's result does not
//! depend on how its prompt was split into steps (a prompt-cache hit resumes a prompt in the
//! middle; the scheduler cuts long prompts into chunks), which candle's matmul does not promise:
//! it blocks its sums by the shape of the whole product. Rows are spread across the engine's
//! compute pool; which thread runs a row does not change its result either.
//!
//! Query heads that share a key/value head (grouped-query attention) read the same cached rows.
//!
//! The cache holds f16 (as llama.cpp's does by default: half the memory and half the bytes read
//! per step) or f32. An f16 value widens to f32 exactly, so both are computed by the same f32
//! arithmetic; the queries and the softmax weights stay f32.

use std::ops::Range;

use half::f16;

use super::pool;

/// What a cache stores keys and values as.
pub trait CacheElement: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;

    /// One query row against the cache (`attend_row_portable`, in SIMD where the CPU has it).
    fn attend_row(shape: &AttentionShape, row: Row<'_, Self>, scores: &mut [f32], out: &mut [f32]);
}

impl CacheElement for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    fn attend_row(shape: &AttentionShape, row: Row<'_, Self>, scores: &mut [f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            // SAFETY: `available()` confirmed the CPU has the features.
            return unsafe { simd::attend_row_f32(shape, row, scores, out) };
        }
        attend_row_portable(shape, row, scores, out);
    }
}

impl CacheElement for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    fn attend_row(shape: &AttentionShape, row: Row<'_, Self>, scores: &mut [f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd::available_f16() {
            // SAFETY: `available_f16()` confirmed the CPU has the features.
            return unsafe { simd::attend_row_f16(shape, row, scores, out) };
        }
        attend_row_portable(shape, row, scores, out);
    }
}

/// What one call attends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Query rows (new tokens); the first sits at `position`, so the cache holds
    /// `position + tokens` positions, the new ones included.
    pub tokens: usize,
    pub position: usize,
    /// Sliding-window layers see only the last `window` positions, their own included.
    pub window: Option<usize>,
    /// Scores are `scale · q·k`, then `cap · tanh(score / cap)` where a cap is set.
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl AttentionShape {
    /// Positions in the cache, the new ones included.
    pub fn positions(&self) -> usize {
        self.position + self.tokens
    }

    /// The cache positions query row `token` may look at.
    fn visible(&self, token: usize) -> Range<usize> {
        let query = self.position + token;
        let first = self.window.map_or(0, |size| (query + 1).saturating_sub(size));
        first..query + 1
    }
}

/// Multiply-adds below which a call runs on its caller alone: a decode step over a short cache is
/// a few microseconds of work, less than waking the pool costs.
const THREADED_WORK: usize = 1 << 18;

/// `queries` is `(heads, tokens, head_dim)`; `keys` and `values` hold key/value head `h`'s
/// position `p` at `h · kv_stride + p · head_dim` (the cache's buffers, `positions()` filled);
/// `out` is `(tokens, heads · head_dim)`. Panics on slices too short for the shape.
pub fn attend<T: CacheElement>(
    shape: &AttentionShape,
    queries: &[f32],
    keys: &[T],
    values: &[T],
    kv_stride: usize,
    out: &mut [f32],
) {
    let AttentionShape { heads, kv_heads, head_dim, tokens, .. } = *shape;
    assert!(kv_heads > 0 && heads.is_multiple_of(kv_heads), "heads in whole groups");
    assert_eq!(queries.len(), heads * tokens * head_dim, "queries");
    assert_eq!(out.len(), tokens * heads * head_dim, "output");
    let len = shape.positions();
    let needed = (kv_heads - 1) * kv_stride + len * head_dim;
    assert!(kv_stride >= len * head_dim && keys.len() >= needed && values.len() >= needed, "cache");
    let group = heads / kv_heads;
    let rows = heads * tokens;
    let out_address = out.as_mut_ptr() as usize;
    // Row r is query head r / tokens at token r % tokens: neighbouring rows share their keys.
    let body = |range: Range<usize>| {
        let mut scores = vec![0.0f32; len];
        for row in range {
            let (head, token) = (row / tokens, row % tokens);
            let cache_start = head / group * kv_stride;
            // SAFETY: `out` holds tokens · heads · head_dim values (asserted above) and outlives
            // this call; each row's slice is written by the one thread that claimed the row.
            let out = unsafe {
                std::slice::from_raw_parts_mut(
                    (out_address as *mut f32).add((token * heads + head) * head_dim),
                    head_dim,
                )
            };
            let inputs = Row {
                query: &queries[row * head_dim..][..head_dim],
                keys: &keys[cache_start..],
                values: &values[cache_start..],
                visible: shape.visible(token),
            };
            T::attend_row(shape, inputs, &mut scores, out);
        }
    };
    if rows * len * head_dim < THREADED_WORK {
        body(0..rows);
    } else {
        pool::global().run(rows, body);
    }
}

/// One query row and what it attends: its key/value head's cached rows, the positions it sees.
pub struct Row<'a, T> {
    query: &'a [f32],
    keys: &'a [T],
    values: &'a [T],
    visible: Range<usize>,
}

/// One query row: scores over `visible`, softmax, the weighted sum of values into `out`.
#[inline(always)]
fn attend_row_portable<T: CacheElement>(
    shape: &AttentionShape,
    row: Row<'_, T>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_row_with(shape, row, scores, out, dot::<T>, weighted_sum::<T>);
}

/// The row's arithmetic, written once, with the two loops over the cache passed in. Lanes are
/// summed in the same order whatever the compiler makes of them, so the SIMD builds give the
/// portable one's bits.
#[inline(always)]
fn attend_row_with<T>(
    shape: &AttentionShape,
    row: Row<'_, T>,
    scores: &mut [f32],
    out: &mut [f32],
    dot: impl Fn(&[f32], &[T]) -> f32,
    weighted_sum: impl Fn(&mut [f32], &[f32], &[T]),
) {
    let Row { query, keys, values, visible } = row;
    let head_dim = shape.head_dim;
    let scores = &mut scores[visible.clone()];
    let mut max = f32::NEG_INFINITY;
    for (score, position) in scores.iter_mut().zip(visible.clone()) {
        let mut value = shape.scale * dot(query, &keys[position * head_dim..][..head_dim]);
        if let Some(cap) = shape.softcap {
            value = cap * (value / cap).tanh();
        }
        *score = value;
        max = max.max(value);
    }
    let mut total = 0.0f32;
    for score in scores.iter_mut() {
        *score = (*score - max).exp();
        total += *score;
    }
    weighted_sum(out, scores, &values[visible.start * head_dim..visible.end * head_dim]);
    let inverse = 1.0 / total;
    out.iter_mut().for_each(|value| *value *= inverse);
}

/// Sixteen independent partial sums (two vector registers), added pairwise at the end.
#[inline(always)]
fn dot<T: CacheElement>(a: &[f32], b: &[T]) -> f32 {
    let mut even = [0.0f32; 8];
    let mut odd = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail = dot_tail(a_chunks.remainder(), b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            even[lane] += x[lane] * y[lane].widen();
            odd[lane] += x[lane + 8] * y[lane + 8].widen();
        }
    }
    sum_lanes(&even, &odd, tail)
}

/// The last `len % 16` products of a dot, one after the other.
#[inline(always)]
fn dot_tail<T: CacheElement>(a: &[f32], b: &[T]) -> f32 {
    a.iter().zip(b).fold(0.0, |sum, (x, y)| sum + x * y.widen())
}

/// A dot's two registers of partial sums and its tail, added pairwise.
#[inline(always)]
fn sum_lanes(even: &[f32; 8], odd: &[f32; 8], tail: f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    for lane in 0..8 {
        lanes[lane] = even[lane] + odd[lane];
    }
    let quarter = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]) + tail
}

/// Dimensions of `out` a weighted sum holds in registers while it runs over the positions: eight
/// 8-lane registers.
const SUM_BLOCK: usize = 64;

/// `out[d] = Σ_i weights[i] · values[i · head_dim + d]` (`head_dim` = `out.len()`), each element
/// summed in position order from 0. `SUM_BLOCK` dimensions at a time, so that the partial sums stay
/// in registers rather than going through memory at every position.
#[inline(always)]
fn weighted_sum<T: CacheElement>(out: &mut [f32], weights: &[f32], values: &[T]) {
    let head_dim = out.len();
    for (block, out) in out.chunks_mut(SUM_BLOCK).enumerate() {
        let mut sums = [0.0f32; SUM_BLOCK];
        let sums = &mut sums[..out.len()];
        for (i, &weight) in weights.iter().enumerate() {
            let row = &values[i * head_dim + block * SUM_BLOCK..][..sums.len()];
            for (sum, value) in sums.iter_mut().zip(row) {
                *sum += weight * value.widen();
            }
        }
        out.copy_from_slice(sums);
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::sync::OnceLock;

    use std::arch::x86_64::*;

    use half::f16;

    use super::{AttentionShape, Row, SUM_BLOCK, dot_tail, sum_lanes};

    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
    }

    pub fn available_f16() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| available() && std::arch::is_x86_feature_detected!("f16c"))
    }

    /// `attend_row_portable` compiled for AVX2 (no FMA: a fused multiply-add rounds once where
    /// the portable code rounds twice, and the two must agree).
    #[target_feature(enable = "avx2")]
    pub(super) fn attend_row_f32(
        shape: &AttentionShape,
        row: Row<'_, f32>,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        super::attend_row_portable(shape, row, scores, out);
    }

    /// The same for an f16 cache, its rows widened eight values at a time (`vcvtph2ps`), which
    /// the compiler does not make of `f16::to_f32` on its own.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn attend_row_f16(
        shape: &AttentionShape,
        row: Row<'_, f16>,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        super::attend_row_with(
            shape,
            row,
            scores,
            out,
            |a, b| dot_f16(a, b),
            |out, weights, values| weighted_sum_f16(out, weights, values),
        );
    }

    /// Eight f16 values from `values[at..at + 8]`, widened.
    #[target_feature(enable = "avx2,f16c")]
    fn widen8(values: &[f16], at: usize) -> __m256 {
        let eight = &values[at..at + 8];
        // SAFETY: `eight` holds eight f16 (16 bytes); the load is unaligned.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(eight.as_ptr().cast()) })
    }

    /// `super::dot` on f16: the same lanes, multiplied then added (two roundings, as there).
    #[target_feature(enable = "avx2,f16c")]
    fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
        let len = a.len().min(b.len());
        let whole = len - len % 16;
        let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for start in (0..whole).step_by(16) {
            let x = &a[start..start + 16];
            // SAFETY: `x` holds sixteen f32; the loads are unaligned.
            let (x_even, x_odd) =
                unsafe { (_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(x.as_ptr().add(8))) };
            even = _mm256_add_ps(even, _mm256_mul_ps(x_even, widen8(b, start)));
            odd = _mm256_add_ps(odd, _mm256_mul_ps(x_odd, widen8(b, start + 8)));
        }
        let (mut even_lanes, mut odd_lanes) = ([0.0f32; 8], [0.0f32; 8]);
        // SAFETY: each array holds eight f32.
        unsafe {
            _mm256_storeu_ps(even_lanes.as_mut_ptr(), even);
            _mm256_storeu_ps(odd_lanes.as_mut_ptr(), odd);
        }
        sum_lanes(&even_lanes, &odd_lanes, dot_tail(&a[whole..len], &b[whole..len]))
    }

    /// `super::weighted_sum` on f16 values: a whole block of 64 dimensions in eight registers,
    /// the rest eight at a time, the last `head_dim % 8` one at a time; every element still summed
    /// in position order, multiplied then added.
    #[target_feature(enable = "avx2,f16c")]
    fn weighted_sum_f16(out: &mut [f32], weights: &[f32], values: &[f16]) {
        let head_dim = out.len();
        let rows = weights.len();
        assert!(values.len() >= rows * head_dim, "values");
        let mut start = 0;
        while start + SUM_BLOCK <= head_dim {
            let mut sums = [_mm256_setzero_ps(); SUM_BLOCK / 8];
            for (i, &weight) in weights.iter().enumerate() {
                let weight = _mm256_set1_ps(weight);
                let at = i * head_dim + start;
                for (part, sum) in sums.iter_mut().enumerate() {
                    *sum = _mm256_add_ps(*sum, _mm256_mul_ps(weight, widen8(values, at + part * 8)));
                }
            }
            for (part, sum) in sums.iter().enumerate() {
                // SAFETY: `start + SUM_BLOCK <= out.len()`; the store is unaligned.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(start + part * 8), *sum) };
            }
            start += SUM_BLOCK;
        }
        while start + 8 <= head_dim {
            let mut sum = _mm256_setzero_ps();
            for (i, &weight) in weights.iter().enumerate() {
                sum = _mm256_add_ps(
                    sum,
                    _mm256_mul_ps(_mm256_set1_ps(weight), widen8(values, i * head_dim + start)),
                );
            }
            // SAFETY: `start + 8 <= out.len()`; the store is unaligned.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(start), sum) };
            start += 8;
        }
        for (d, out) in out.iter_mut().enumerate().skip(start) {
            *out = weights
                .iter()
                .enumerate()
                .fold(0.0, |sum, (i, &weight)| sum + weight * values[i * head_dim + d].to_f32());
        }
    }
}

#[cfg(test)]
mod tests;
