//! The attention kernel's AVX2 builds: the f32 cache's (the portable code compiled for AVX2) and
//! the f16 cache's, which runs a block of query rows in one pass over the cache.

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
pub(super) fn attend_row_f32(shape: &AttentionShape, row: Row<'_, f32>, scores: &mut [f32], out: &mut [f32]) {
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
                    let (q_low, q_high) =
                        unsafe { (_mm256_loadu_ps(query.as_ptr()), _mm256_loadu_ps(query.as_ptr().add(8))) };
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
                    let dots = _mm256_add_ps(trees8(&lanes[index]), _mm256_loadu_ps(tails[index].as_ptr()));
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
