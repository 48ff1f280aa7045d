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

    /// A block of query rows against the cache (`attend_row_portable` on each, or one SIMD pass
    /// over the cache for the whole block where the CPU has it). `scores` holds `ROWS` rows of
    /// the cache's positions.
    fn attend_rows(shape: &AttentionShape, rows: &Rows<'_, Self>, scores: &mut [f32], outs: &mut Outs<'_>);
}

impl CacheElement for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    fn attend_rows(shape: &AttentionShape, rows: &Rows<'_, Self>, scores: &mut [f32], outs: &mut Outs<'_>) {
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            for (index, out) in outs.iter_mut().take(rows.count).enumerate() {
                // SAFETY: `available()` confirmed the CPU has the features.
                unsafe { simd::attend_row_f32(shape, rows.row(index), scores, out) };
            }
            return;
        }
        attend_rows_portable(shape, rows, scores, outs);
    }
}

impl CacheElement for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    fn attend_rows(shape: &AttentionShape, rows: &Rows<'_, Self>, scores: &mut [f32], outs: &mut Outs<'_>) {
        #[cfg(target_arch = "x86_64")]
        if simd::available_f16() {
            // SAFETY: `available_f16()` confirmed the CPU has the features.
            return unsafe { simd::attend_rows_f16(shape, rows, scores, outs) };
        }
        attend_rows_portable(shape, rows, scores, outs);
    }
}

/// `attend_row_portable` on each row of a block.
fn attend_rows_portable<T: CacheElement>(
    shape: &AttentionShape,
    rows: &Rows<'_, T>,
    scores: &mut [f32],
    outs: &mut Outs<'_>,
) {
    for (index, out) in outs.iter_mut().take(rows.count).enumerate() {
        attend_row_portable(shape, rows.row(index), scores, out);
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

/// Query rows of one key/value head that one pass over the cache serves (grouped-query heads at
/// a decode step; neighbouring tokens of one head in a prompt chunk): each cached row is read and
/// widened once for all of them.
pub const ROWS: usize = 4;

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
    attend_with(shape, queries, keys, values, kv_stride, out, T::attend_rows);
}

/// `attend` with the blocks computed by `kernel`.
fn attend_with<T: Sync>(
    shape: &AttentionShape,
    queries: &[f32],
    keys: &[T],
    values: &[T],
    kv_stride: usize,
    out: &mut [f32],
    kernel: impl Fn(&AttentionShape, &Rows<'_, T>, &mut [f32], &mut Outs<'_>) + Sync,
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
    // Row r is query head r / tokens at token r % tokens: neighbouring rows share their keys, in
    // blocks of up to `ROWS`.
    let kv_head = |row: usize| row / tokens / group;
    let body = |range: Range<usize>| {
        let mut scores = vec![0.0f32; ROWS * len];
        let mut first = range.start;
        while first < range.end {
            let count =
                (first..range.end).take(ROWS).take_while(|&row| kv_head(row) == kv_head(first)).count();
            // Unused places repeat the last row; only the first `count` are read or written.
            let row = |index: usize| first + index.min(count - 1);
            let cache_start = kv_head(first) * kv_stride;
            let block = Rows {
                queries: std::array::from_fn(|index| &queries[row(index) * head_dim..][..head_dim]),
                visible: std::array::from_fn(|index| shape.visible(row(index) % tokens)),
                count,
                keys: &keys[cache_start..],
                values: &values[cache_start..],
            };
            let mut outs: Outs<'_> = std::array::from_fn(|index| {
                if index >= count {
                    return &mut [][..];
                }
                let (head, token) = (row(index) / tokens, row(index) % tokens);
                // SAFETY: `out` holds tokens · heads · head_dim values (asserted above) and
                // outlives this call; each row's slice is written by the one thread that claimed
                // the row, once.
                unsafe {
                    std::slice::from_raw_parts_mut(
                        (out_address as *mut f32).add((token * heads + head) * head_dim),
                        head_dim,
                    )
                }
            });
            kernel(shape, &block, &mut scores, &mut outs);
            first += count;
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

/// The first `count` of `ROWS` query rows of one key/value head.
pub struct Rows<'a, T> {
    queries: [&'a [f32]; ROWS],
    visible: [Range<usize>; ROWS],
    count: usize,
    keys: &'a [T],
    values: &'a [T],
}

impl<'a, T> Rows<'a, T> {
    fn row(&self, index: usize) -> Row<'a, T> {
        Row {
            query: self.queries[index],
            keys: self.keys,
            values: self.values,
            visible: self.visible[index].clone(),
        }
    }
}

/// The output rows of a block, `head_dim` values each.
pub type Outs<'a> = [&'a mut [f32]; ROWS];

/// One query row: scores over `visible`, softmax, the weighted sum of values into `out`. Lanes
/// are summed in the same order whatever the compiler makes of them, so the SIMD build gives this
/// code's bits.
#[inline(always)]
fn attend_row_portable<T: CacheElement>(
    shape: &AttentionShape,
    row: Row<'_, T>,
    scores: &mut [f32],
    out: &mut [f32],
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
    // The weights' total in eight lanes, position i in lane i % 8, then added pairwise.
    let mut lanes = [0.0f32; 8];
    for (index, score) in scores.iter_mut().enumerate() {
        *score = exp(*score - max);
        lanes[index % 8] += *score;
    }
    weighted_sum(out, scores, &values[visible.start * head_dim..visible.end * head_dim]);
    let inverse = 1.0 / sum_tree(&lanes);
    out.iter_mut().for_each(|value| *value *= inverse);
}

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts, the first exact in few bits, so that `x - n · ln 2` loses nothing.
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;
/// e^r - 1 - r ≈ r² · p(r) on |r| ≤ ln 2 / 2, highest power first (Cephes' `expf`).
const EXP_POLYNOMIAL: [f32; 6] =
    [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_6e-1, 0.5];

/// e^x for the softmax (x ≤ 0 there), within a few ulp of the exact value: x = n · ln 2 + r
/// with |r| ≤ ln 2 / 2, e^r by a polynomial, times 2^n. Basic operations only, each multiply
/// rounded before its add, so the SIMD build (`simd::exp8`, eight at a time) gives the same bits,
/// which libm's `expf` does not promise. x is held to [-87, 88], where 2^n is a normal f32
/// (e^-87 ≈ 1.6e-38 is nothing beside the row's largest weight, e^0 = 1); NaN gives e^-87.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // Not `clamp`, which keeps a NaN.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(88.0);
    let n = (x * LOG2_E + 0.5).floor();
    let r = (x - n * LN2_HIGH) - n * LN2_LOW;
    let p = EXP_POLYNOMIAL[1..].iter().fold(EXP_POLYNOMIAL[0], |p, &c| p * r + c);
    let e_r = (p * (r * r) + r) + 1.0;
    e_r * f32::from_bits(((n as i32 + 127) as u32) << 23)
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
    sum_tree(&lanes) + tail
}

/// One register's lanes added pairwise: the halves, then the quarters.
#[inline(always)]
fn sum_tree(lanes: &[f32; 8]) -> f32 {
    let quarter = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    (quarter[0] + quarter[2]) + (quarter[1] + quarter[3])
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
mod simd;

#[cfg(test)]
mod tests;
