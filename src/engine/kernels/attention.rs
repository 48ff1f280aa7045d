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
mod simd {
    use std::ops::Range;
    use std::sync::OnceLock;

    use std::arch::x86_64::*;

    use half::f16;

    use super::{
        AttentionShape, EXP_POLYNOMIAL, LN2_HIGH, LN2_LOW, LOG2_E, Outs, ROWS, Row, Rows, dot_tail, sum_tree,
    };

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

    /// `attend_row_portable` for every row of the block on an f16 cache, in one pass over the
    /// cached rows: each key and value row is widened once (`vcvtph2ps`, eight at a time) for all
    /// the block's queries. Each row's arithmetic is the portable code's, lane for lane: the
    /// scores' lanes are added by the same tree, eight positions at once; the weights' total
    /// keeps lane i % 8 for position i; each output value is summed in position order.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn attend_rows_f16(
        shape: &AttentionShape,
        rows: &Rows<'_, f16>,
        scores: &mut [f32],
        outs: &mut Outs<'_>,
    ) {
        match rows.count {
            1 => block::<1>(shape, rows, scores, outs),
            2 => block::<2>(shape, rows, scores, outs),
            3 => block::<3>(shape, rows, scores, outs),
            _ => block::<ROWS>(shape, rows, scores, outs),
        }
    }

    /// The first `R` rows of `rows`.
    #[target_feature(enable = "avx2,f16c")]
    fn block<const R: usize>(
        shape: &AttentionShape,
        rows: &Rows<'_, f16>,
        scores: &mut [f32],
        outs: &mut Outs<'_>,
    ) {
        let len = scores.len() / ROWS;
        let visible = &rows.visible[..R];
        // Positions every row sees: the weighted sums share the pass over them.
        let shared = visible.iter().map(|range| range.start).max().unwrap_or(0)
            ..visible.iter().map(|range| range.end).min().unwrap_or(0);
        if R > 1 && shared.is_empty() {
            for index in 0..R {
                let single = Rows {
                    queries: [rows.queries[index]; ROWS],
                    visible: std::array::from_fn(|_| visible[index].clone()),
                    count: 1,
                    keys: rows.keys,
                    values: rows.values,
                };
                let mut out: Outs<'_> = std::array::from_fn(|_| &mut [][..]);
                out[0] = std::mem::take(&mut outs[index]);
                block::<1>(shape, &single, scores, &mut out);
                outs[index] = std::mem::take(&mut out[0]);
            }
            return;
        }
        // Every row's scores over all the positions any of them sees (a few more than its own).
        let all = visible.iter().map(|range| range.start).min().unwrap_or(0)
            ..visible.iter().map(|range| range.end).max().unwrap_or(0);
        block_scores::<R>(shape, rows, all, scores, len);
        let mut inverse = [0.0f32; R];
        for (index, inverse) in inverse.iter_mut().enumerate() {
            let weights = &mut scores[index * len..][visible[index].clone()];
            *inverse = 1.0 / softmax(shape, weights);
        }
        weighted_sums::<R>(shape.head_dim, rows, &shared, scores, len, outs);
        for (out, inverse) in outs.iter_mut().zip(inverse) {
            out.iter_mut().for_each(|value| *value *= inverse);
        }
    }

    /// `scale · q·k` of each row against each cached row in `positions`, into
    /// `scores[row · len + position]`: `super::dot`'s two registers of lanes per position, their
    /// trees eight positions at once.
    #[target_feature(enable = "avx2,f16c")]
    fn block_scores<const R: usize>(
        shape: &AttentionShape,
        rows: &Rows<'_, f16>,
        positions: Range<usize>,
        scores: &mut [f32],
        len: usize,
    ) {
        let head_dim = shape.head_dim;
        let whole = head_dim - head_dim % 16;
        let queries = &rows.queries[..R];
        let mut lanes = [[_mm256_setzero_ps(); 8]; R];
        let mut tails = [[0.0f32; 8]; R];
        let mut first = positions.start;
        while first < positions.end {
            let count = (positions.end - first).min(8);
            for (slot, position) in (first..first + count).enumerate() {
                let key = &rows.keys[position * head_dim..][..head_dim];
                let (mut even, mut odd) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
                for start in (0..whole).step_by(16) {
                    let (low, high) = (widen8(key, start), widen8(key, start + 8));
                    for index in 0..R {
                        let query = &queries[index][start..start + 16];
                        // SAFETY: `query` holds sixteen f32; the loads are unaligned.
                        let (q_low, q_high) = unsafe {
                            (_mm256_loadu_ps(query.as_ptr()), _mm256_loadu_ps(query.as_ptr().add(8)))
                        };
                        even[index] = _mm256_add_ps(even[index], _mm256_mul_ps(q_low, low));
                        odd[index] = _mm256_add_ps(odd[index], _mm256_mul_ps(q_high, high));
                    }
                }
                for index in 0..R {
                    lanes[index][slot] = _mm256_add_ps(even[index], odd[index]);
                    tails[index][slot] = dot_tail(&queries[index][whole..], &key[whole..]);
                }
            }
            let scale = _mm256_set1_ps(shape.scale);
            for index in 0..R {
                let out = &mut scores[index * len + first..][..count];
                if count == 8 {
                    // SAFETY: `tails[index]` and `out` hold eight f32; the accesses are unaligned.
                    unsafe {
                        let dots =
                            _mm256_add_ps(trees8(&lanes[index]), _mm256_loadu_ps(tails[index].as_ptr()));
                        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_mul_ps(scale, dots));
                    }
                } else {
                    for (slot, out) in out.iter_mut().enumerate() {
                        let mut values = [0.0f32; 8];
                        // SAFETY: `values` holds eight f32.
                        unsafe { _mm256_storeu_ps(values.as_mut_ptr(), lanes[index][slot]) };
                        *out = shape.scale * (sum_tree(&values) + tails[index][slot]);
                    }
                }
            }
            first += count;
        }
    }

    /// `super::sum_tree` of eight registers at once: lane i of the result is register i's tree.
    #[target_feature(enable = "avx2")]
    fn trees8(registers: &[__m256; 8]) -> __m256 {
        // Halves: [low of a, low of b] + [high of a, high of b] gives both registers' quarters.
        let quarters = |a: __m256, b: __m256| {
            _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31))
        };
        // Quarters q0..q3 reordered q0, q2, q1, q3, so that a horizontal add makes q0 + q2 and
        // q1 + q3.
        let spread = |v: __m256| _mm256_permute_ps(v, 0b11_01_10_00);
        let (r01, r23) =
            (spread(quarters(registers[0], registers[1])), spread(quarters(registers[2], registers[3])));
        let (r45, r67) =
            (spread(quarters(registers[4], registers[5])), spread(quarters(registers[6], registers[7])));
        // Lanes 0..4 hold registers 0, 2, 4, 6 and lanes 4..8 registers 1, 3, 5, 7.
        let sums = _mm256_hadd_ps(_mm256_hadd_ps(r01, r23), _mm256_hadd_ps(r45, r67));
        _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// The softcap, then `scores` turned into their softmax's weights before the division
    /// (e^(score - max)); returns their total.
    #[target_feature(enable = "avx2,f16c")]
    fn softmax(shape: &AttentionShape, scores: &mut [f32]) -> f32 {
        if let Some(cap) = shape.softcap {
            scores.iter_mut().for_each(|value| *value = cap * (*value / cap).tanh());
        }
        let whole = scores.len() - scores.len() % 8;
        let mut maxima = _mm256_set1_ps(f32::NEG_INFINITY);
        for start in (0..whole).step_by(8) {
            // SAFETY: `start + 8 <= scores.len()`; the load is unaligned.
            let values = unsafe { _mm256_loadu_ps(scores.as_ptr().add(start)) };
            // A NaN score leaves the maximum as it was, as `f32::max` does.
            maxima = _mm256_max_ps(values, maxima);
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), maxima) };
        let max = lanes.iter().chain(&scores[whole..]).fold(f32::NEG_INFINITY, |max, &value| max.max(value));
        let mut totals = _mm256_setzero_ps();
        for start in (0..whole).step_by(8) {
            // SAFETY: as above.
            unsafe {
                let pointer = scores.as_mut_ptr().add(start);
                let weights = exp8(_mm256_sub_ps(_mm256_loadu_ps(pointer), _mm256_set1_ps(max)));
                _mm256_storeu_ps(pointer, weights);
                totals = _mm256_add_ps(totals, weights);
            }
        }
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), totals) };
        for (lane, score) in scores[whole..].iter_mut().enumerate() {
            *score = super::exp(*score - max);
            lanes[lane] += *score;
        }
        sum_tree(&lanes)
    }

    /// `super::exp` on eight lanes, the same operations in the same order.
    #[target_feature(enable = "avx2")]
    fn exp8(x: __m256) -> __m256 {
        // `max` with x first returns the bound for a NaN x, as `f32::max` does.
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
        let n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2_E)), _mm256_set1_ps(0.5)));
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HIGH))),
            _mm256_mul_ps(n, _mm256_set1_ps(LN2_LOW)),
        );
        let p = EXP_POLYNOMIAL[1..].iter().fold(_mm256_set1_ps(EXP_POLYNOMIAL[0]), |p, &c| {
            _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c))
        });
        let e_r = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.0));
        // n is a whole number in [-126, 127]: exact as an integer, and 2^n's exponent bits.
        let exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        _mm256_mul_ps(e_r, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(exponent)))
    }

    /// `exp8` of `x[..8]` into `out`.
    #[cfg(test)]
    #[target_feature(enable = "avx2")]
    pub(super) fn exp8_into(x: &[f32], out: &mut [f32; 8]) {
        let x = &x[..8];
        // SAFETY: `x` and `out` hold eight f32; the accesses are unaligned.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_loadu_ps(x.as_ptr()))) };
    }

    /// Each row's `Σ weight · value` over its visible positions, in position order, into `outs`:
    /// sixteen dimensions at a time, each row's own positions before and after `shared` alone,
    /// the shared ones with every value row widened once for all rows.
    #[target_feature(enable = "avx2,f16c")]
    fn weighted_sums<const R: usize>(
        head_dim: usize,
        rows: &Rows<'_, f16>,
        shared: &Range<usize>,
        weights: &[f32],
        len: usize,
        outs: &mut Outs<'_>,
    ) {
        let values = rows.values;
        let visible = &rows.visible[..R];
        let weight = |index: usize, position: usize| _mm256_set1_ps(weights[index * len + position]);
        let mut start = 0;
        while start + 16 <= head_dim {
            let mut sums = [[_mm256_setzero_ps(); 2]; R];
            let add = |sums: &mut [__m256; 2], weight: __m256, position: usize| {
                let at = position * head_dim + start;
                sums[0] = _mm256_add_ps(sums[0], _mm256_mul_ps(weight, widen8(values, at)));
                sums[1] = _mm256_add_ps(sums[1], _mm256_mul_ps(weight, widen8(values, at + 8)));
            };
            for index in 0..R {
                for position in visible[index].start..shared.start {
                    add(&mut sums[index], weight(index, position), position);
                }
            }
            for position in shared.clone() {
                let at = position * head_dim + start;
                let (low, high) = (widen8(values, at), widen8(values, at + 8));
                for (index, sums) in sums.iter_mut().enumerate() {
                    let weight = weight(index, position);
                    sums[0] = _mm256_add_ps(sums[0], _mm256_mul_ps(weight, low));
                    sums[1] = _mm256_add_ps(sums[1], _mm256_mul_ps(weight, high));
                }
            }
            for (index, sums) in sums.iter_mut().enumerate() {
                for position in shared.end..visible[index].end {
                    add(sums, weight(index, position), position);
                }
                let out = &mut outs[index][start..start + 16];
                // SAFETY: `out` holds sixteen f32; the stores are unaligned.
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr(), sums[0]);
                    _mm256_storeu_ps(out.as_mut_ptr().add(8), sums[1]);
                }
            }
            start += 16;
        }
        if start + 8 <= head_dim {
            for index in 0..R {
                let mut sum = _mm256_setzero_ps();
                for position in visible[index].clone() {
                    let value = widen8(values, position * head_dim + start);
                    sum = _mm256_add_ps(sum, _mm256_mul_ps(weight(index, position), value));
                }
                // SAFETY: `start + 8 <= head_dim`, the row's length; the store is unaligned.
                unsafe { _mm256_storeu_ps(outs[index].as_mut_ptr().add(start), sum) };
            }
            start += 8;
        }
        for index in 0..R {
            for d in start..head_dim {
                outs[index][d] = visible[index].clone().fold(0.0, |sum, position| {
                    sum + weights[index * len + position] * values[position * head_dim + d].to_f32()
                });
            }
        }
    }

    /// Eight f16 values from `values[at..at + 8]`, widened.
    #[target_feature(enable = "avx2,f16c")]
    fn widen8(values: &[f16], at: usize) -> __m256 {
        let eight = &values[at..at + 8];
        // SAFETY: `eight` holds eight f16 (16 bytes); the load is unaligned.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(eight.as_ptr().cast()) })
    }
}

#[cfg(test)]
mod tests;
