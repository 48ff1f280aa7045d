//! x86-64 variants of the scalar dot products: AVX2 (+FMA, F16C) and AVX-512 VNNI (its 256-bit
//! `vpdpbusd`, which sums four byte products in one instruction). `super::Kernels::detect`
//! picks one at run time; each is tested against its scalar twin on random blocks below.
//!
//! Both variants are the same code written once in `dot_kernels!`; they differ only in how 32
//! unsigned-by-signed byte products become eight 32-bit sums (`products`). A block of weights is
//! widened to 32 bytes (nibbles split into the low and high halves), multiplied with the 32
//! activation bytes, the sums scaled by both block scales and accumulated in eight f32 lanes.
//! The row-group kernels (eight rows at once, `super::row_groups`) are in the same macro, with the
//! differing part in `group_sums`; their unpacking of group blocks is in `x86/row_group_weights.rs`.

use std::arch::x86_64::*;

use super::k_quants::{Q4_K_BYTES, Q6_K_BYTES, scale_and_min};
use super::row_groups::{
    self, GROUP_ROWS, Q4_K_GROUP_BYTES, Q6_K_GROUP_BYTES, Q8_0_GROUP_BYTES, SmallBlocks,
};
use super::scalar::ActivationBlock;

/// The 32 nibbles of 16 bytes as 32 bytes: low nibbles first, then high nibbles.
#[inline]
#[target_feature(enable = "avx2")]
fn nibbles_to_bytes(packed: __m128i) -> __m256i {
    let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Byte j is 0xFF where bit j of `bits` is set, else 0.
#[inline]
#[target_feature(enable = "avx2")]
fn bits_to_bytes(bits: u32) -> __m256i {
    let word = _mm256_set1_epi32(bits as i32);
    let spread = _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303);
    let bytes = _mm256_shuffle_epi8(word, spread);
    let all_but_own_bit = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(bytes, all_but_own_bit), _mm256_set1_epi64x(-1))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn horizontal_sum(v: __m256) -> f32 {
    let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)))
}

/// The f16 values at bytes `at..at + 2` and `at + 2..at + 4` of `block`, as f32 in lanes 0 and 1.
/// One 4-byte load into a zeroed register: a 2-byte one is compiled to an insert into whatever the
/// register held (the scalar accumulator, as it happened), a false dependency that chained each
/// block to the one before and made every dot product 1.5 times slower.
#[inline]
#[target_feature(enable = "f16c")]
fn f16_pair(block: &[u8], at: usize) -> __m128 {
    let bits = u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"));
    _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
}

/// An activation block's `scale` and `sum`, in lanes 0 and 1.
#[inline]
#[target_feature(enable = "avx2")]
fn scale_and_sum(block: &ActivationBlock) -> __m128 {
    _mm_setr_ps(block.scale, block.sum, 0.0, 0.0)
}

#[inline]
#[target_feature(enable = "avx2")]
fn load32(bytes: &[u8]) -> __m256i {
    assert!(bytes.len() >= 32);
    // SAFETY: 32 bytes are in bounds (checked above); loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load16(bytes: &[u8]) -> __m128i {
    assert!(bytes.len() >= 16);
    // SAFETY: as in `load32`, for 16 bytes.
    unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn activation_bytes(block: &ActivationBlock) -> __m256i {
    // SAFETY: `values` is 32 bytes.
    unsafe { _mm256_loadu_si256(block.values.as_ptr().cast()) }
}

mod row_group_weights;
use row_group_weights::*;

macro_rules! dot_kernels {
    ($features:literal, $products:item, $group_sums:item) => {
        use super::*;

        $products

        $group_sums

        /// `T` tokens against the eight rows of a row group of `layout`: per block, each row's
        /// exact integer dot, less `offset` times the activations' total, then one fma with
        /// `d·scale` (and one with `m·sum` for a type with a minimum).
        #[inline]
        #[target_feature(enable = $features)]
        fn small_group_dot<const T: usize>(
            group: &[u8],
            tokens: [&[ActivationBlock]; T],
            layout: SmallBlocks,
        ) -> [__m256; T] {
            let blocks = group.len() / layout.group_bytes();
            assert!(tokens.iter().all(|t| t.len() >= blocks), "fewer activation blocks than weight blocks");
            let tokens = tokens.map(|t| &t[..blocks]);
            let mut acc = [_mm256_setzero_ps(); T];
            for (index, block) in group.chunks_exact(layout.group_bytes()).enumerate() {
                let mut sums = [_mm256_setzero_si256(); T];
                for half in 0..2 {
                    let weights = small_group_weights(block, layout, half);
                    for t in 0..T {
                        let a = &tokens[t][index];
                        let activations: [__m256i; 4] = std::array::from_fn(|k| four_activations(a, 4 * half + k));
                        sums[t] = _mm256_add_epi32(sums[t], group_sums(weights, activations));
                    }
                }
                let d = _mm256_cvtph_ps(load16(block));
                let m = _mm256_cvtph_ps(load16(&block[SmallBlocks::MINIMUMS..]));
                for t in 0..T {
                    let a = &tokens[t][index];
                    let sum = _mm256_sub_epi32(sums[t], _mm256_set1_epi32(layout.offset * a.total));
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.scale));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[t]);
                    if layout.minimum {
                        acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.sum), acc[t]);
                    }
                }
            }
            acc
        }

        /// `T` tokens against the eight rows of a Q4_K row group: per 32-weight sub-block, each
        /// row's exact integer dot, one fma with `d·scale_j·scale` and one with `−dmin·min_j·sum`.
        #[inline]
        #[target_feature(enable = $features)]
        fn q4_k_group_dot<const T: usize>(group: &[u8], tokens: [&[ActivationBlock]; T]) -> [__m256; T] {
            let blocks = group.len() / Q4_K_GROUP_BYTES;
            assert!(tokens.iter().all(|t| t.len() >= 8 * blocks), "fewer activation blocks than weight blocks");
            let tokens = tokens.map(|t| &t[..8 * blocks]);
            let mut acc = [_mm256_setzero_ps(); T];
            for (super_block, block) in group.chunks_exact(Q4_K_GROUP_BYTES).enumerate() {
                let (d, dmin) = (_mm256_cvtph_ps(load16(block)), _mm256_cvtph_ps(load16(&block[16..])));
                let [scales_low, scales_high, mins_low, mins_high] = q4_k_group_scales(block);
                for j in 0..8 {
                    let (scales, mins) = if j < 4 { (scales_low, mins_low) } else { (scales_high, mins_high) };
                    let scale = _mm256_mul_ps(d, lane_byte(scales, j));
                    let min = _mm256_mul_ps(dmin, lane_byte(mins, j));
                    let mut sums = [_mm256_setzero_si256(); T];
                    for half in 0..2 {
                        let weights = q4_k_group_weights(block, j, half);
                        for t in 0..T {
                            let a = &tokens[t][8 * super_block + j];
                            let activations: [__m256i; 4] = std::array::from_fn(|k| four_activations(a, 4 * half + k));
                            sums[t] = _mm256_add_epi32(sums[t], group_sums(weights, activations));
                        }
                    }
                    for t in 0..T {
                        let a = &tokens[t][8 * super_block + j];
                        let factor = _mm256_mul_ps(scale, _mm256_set1_ps(a.scale));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t]), factor, acc[t]);
                        acc[t] = _mm256_fnmadd_ps(min, _mm256_set1_ps(a.sum), acc[t]);
                    }
                }
            }
            acc
        }

        /// `T` tokens against the eight rows of a Q6_K row group: per 16 weights, each row's exact
        /// integer dot (signed weights: their magnitudes against the activations carrying their
        /// signs) and one fma with `d·scale_s·scale`.
        #[inline]
        #[target_feature(enable = $features)]
        fn q6_k_group_dot<const T: usize>(group: &[u8], tokens: [&[ActivationBlock]; T]) -> [__m256; T] {
            let blocks = group.len() / Q6_K_GROUP_BYTES;
            assert!(tokens.iter().all(|t| t.len() >= 8 * blocks), "fewer activation blocks than weight blocks");
            let tokens = tokens.map(|t| &t[..8 * blocks]);
            let mut acc = [_mm256_setzero_ps(); T];
            for (super_block, block) in group.chunks_exact(Q6_K_GROUP_BYTES).enumerate() {
                let d = _mm256_cvtph_ps(load16(block));
                for quarter in 0..8 {
                    let (h, k) = (quarter / 4, quarter % 4);
                    for e in 0..2 {
                        let weights = q6_k_group_weights(block, h, k, e);
                        let magnitudes = weights.map(|w| _mm256_sign_epi8(w, w));
                        let scale = _mm256_mul_ps(d, q6_k_group_scale(block, 8 * h + 2 * k + e));
                        for t in 0..T {
                            let a = &tokens[t][8 * super_block + quarter];
                            let activations: [__m256i; 4] = std::array::from_fn(|m| {
                                _mm256_sign_epi8(four_activations(a, 4 * e + m), weights[m])
                            });
                            let sum = _mm256_cvtepi32_ps(group_sums(magnitudes, activations));
                            acc[t] = _mm256_fmadd_ps(sum, _mm256_mul_ps(scale, _mm256_set1_ps(a.scale)), acc[t]);
                        }
                    }
                }
            }
            acc
        }

        #[target_feature(enable = $features)]
        pub fn dot_q6_k_group(group: &[u8], tokens: &[&[ActivationBlock]], out: &mut [[f32; GROUP_ROWS]]) {
            in_fours(tokens, out, |t| q6_k_group_dot::<4>(group, t), |t| q6_k_group_dot::<1>(group, t))
        }

        /// `T` tokens against the eight rows of a Q8_0 row group: per block, each row's exact
        /// integer dot (magnitudes against activations carrying the weights' signs, each part
        /// widened on its own: two parts' products could overflow i16) and one fma.
        #[inline]
        #[target_feature(enable = $features)]
        fn q8_0_group_dot<const T: usize>(group: &[u8], tokens: [&[ActivationBlock]; T]) -> [__m256; T] {
            let blocks = group.len() / Q8_0_GROUP_BYTES;
            assert!(tokens.iter().all(|t| t.len() >= blocks), "fewer activation blocks than weight blocks");
            let tokens = tokens.map(|t| &t[..blocks]);
            let mut acc = [_mm256_setzero_ps(); T];
            for (index, block) in group.chunks_exact(Q8_0_GROUP_BYTES).enumerate() {
                let mut sums = [_mm256_setzero_si256(); T];
                for p in 0..8 {
                    let weights = load32(&block[16 + 32 * p..]);
                    let magnitudes = _mm256_sign_epi8(weights, weights);
                    for t in 0..T {
                        let a = _mm256_sign_epi8(four_activations(&tokens[t][index], p), weights);
                        sums[t] = _mm256_add_epi32(sums[t], products(magnitudes, a));
                    }
                }
                let d = _mm256_cvtph_ps(load16(block));
                for t in 0..T {
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(tokens[t][index].scale));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t]), scale, acc[t]);
                }
            }
            acc
        }

        #[target_feature(enable = $features)]
        pub fn dot_q8_0_group(group: &[u8], tokens: &[&[ActivationBlock]], out: &mut [[f32; GROUP_ROWS]]) {
            in_fours(tokens, out, |t| q8_0_group_dot::<4>(group, t), |t| q8_0_group_dot::<1>(group, t))
        }

        /// A `row_groups::DotGroup` from a kernel for four tokens and one for one.
        #[inline]
        #[target_feature(enable = $features)]
        fn in_fours(
            tokens: &[&[ActivationBlock]],
            out: &mut [[f32; GROUP_ROWS]],
            four: impl Fn([&[ActivationBlock]; 4]) -> [__m256; 4],
            one: impl Fn([&[ActivationBlock]; 1]) -> [__m256; 1],
        ) {
            assert_eq!(tokens.len(), out.len(), "one output per token");
            let store = |acc: __m256, out: &mut [f32; GROUP_ROWS]| {
                // SAFETY: `out` is eight f32; storeu has no alignment requirement.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc) }
            };
            for (tokens, out) in tokens.chunks_exact(4).zip(out.chunks_exact_mut(4)) {
                for (acc, out) in four([tokens[0], tokens[1], tokens[2], tokens[3]]).into_iter().zip(out) {
                    store(acc, out);
                }
            }
            let done = tokens.len() / 4 * 4;
            for (token, out) in tokens[done..].iter().zip(&mut out[done..]) {
                store(one([token])[0], out);
            }
        }

        #[target_feature(enable = $features)]
        pub fn dot_q4_0_group(group: &[u8], tokens: &[&[ActivationBlock]], out: &mut [[f32; GROUP_ROWS]]) {
            let layout = row_groups::Q4_0;
            in_fours(tokens, out, |t| small_group_dot::<4>(group, t, layout), |t| small_group_dot::<1>(group, t, layout))
        }

        #[target_feature(enable = $features)]
        pub fn dot_q4_1_group(group: &[u8], tokens: &[&[ActivationBlock]], out: &mut [[f32; GROUP_ROWS]]) {
            let layout = row_groups::Q4_1;
            in_fours(tokens, out, |t| small_group_dot::<4>(group, t, layout), |t| small_group_dot::<1>(group, t, layout))
        }

        #[target_feature(enable = $features)]
        pub fn dot_q5_1_group(group: &[u8], tokens: &[&[ActivationBlock]], out: &mut [[f32; GROUP_ROWS]]) {
            let layout = row_groups::Q5_1;
            in_fours(tokens, out, |t| small_group_dot::<4>(group, t, layout), |t| small_group_dot::<1>(group, t, layout))
        }

        #[target_feature(enable = $features)]
        pub fn dot_q5_0_group(group: &[u8], tokens: &[&[ActivationBlock]], out: &mut [[f32; GROUP_ROWS]]) {
            let layout = row_groups::Q5_0;
            in_fours(tokens, out, |t| small_group_dot::<4>(group, t, layout), |t| small_group_dot::<1>(group, t, layout))
        }

        #[target_feature(enable = $features)]
        pub fn dot_q4_k_group(group: &[u8], tokens: &[&[ActivationBlock]], out: &mut [[f32; GROUP_ROWS]]) {
            in_fours(tokens, out, |t| q4_k_group_dot::<4>(group, t), |t| q4_k_group_dot::<1>(group, t))
        }

        /// Products of signed weight bytes with signed activation bytes.
        #[inline]
        #[target_feature(enable = $features)]
        fn signed_products(weights: __m256i, activations: __m256i) -> __m256i {
            products(_mm256_sign_epi8(weights, weights), _mm256_sign_epi8(activations, weights))
        }

        #[target_feature(enable = $features)]
        pub fn dot_q4_0(row: &[u8], activations: &[ActivationBlock]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for (block, a) in row.chunks_exact(18).zip(activations) {
                let weights = _mm256_sub_epi8(nibbles_to_bytes(load16(&block[2..])), _mm256_set1_epi8(8));
                let sums = signed_products(weights, activation_bytes(a));
                let scale = _mm256_broadcastss_ps(_mm_mul_ss(f16_pair(block, 0), scale_and_sum(a)));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
            }
            horizontal_sum(acc)
        }

        #[target_feature(enable = $features)]
        pub fn dot_q4_1(row: &[u8], activations: &[ActivationBlock]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let mut minimums = _mm_setzero_ps();
            for (block, a) in row.chunks_exact(20).zip(activations) {
                let sums = products(nibbles_to_bytes(load16(&block[4..])), activation_bytes(a));
                // (d·scale, m·sum): the block's factor, and its minimum's share of the dot.
                let factors = _mm_mul_ps(f16_pair(block, 0), scale_and_sum(a));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_broadcastss_ps(factors), acc);
                minimums = _mm_add_ps(minimums, factors);
            }
            horizontal_sum(acc) + _mm_cvtss_f32(_mm_movehdup_ps(minimums))
        }

        #[target_feature(enable = $features)]
        pub fn dot_q5_0(row: &[u8], activations: &[ActivationBlock]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for (block, a) in row.chunks_exact(22).zip(activations) {
                let high_bits = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                let fifth = _mm256_and_si256(bits_to_bytes(high_bits), _mm256_set1_epi8(0x10));
                let unsigned = _mm256_or_si256(nibbles_to_bytes(load16(&block[6..])), fifth);
                let weights = _mm256_sub_epi8(unsigned, _mm256_set1_epi8(16));
                let sums = signed_products(weights, activation_bytes(a));
                let scale = _mm256_broadcastss_ps(_mm_mul_ss(f16_pair(block, 0), scale_and_sum(a)));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
            }
            horizontal_sum(acc)
        }

        #[target_feature(enable = $features)]
        pub fn dot_q5_1(row: &[u8], activations: &[ActivationBlock]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let mut minimums = _mm_setzero_ps();
            for (block, a) in row.chunks_exact(24).zip(activations) {
                let high_bits = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
                let fifth = _mm256_and_si256(bits_to_bytes(high_bits), _mm256_set1_epi8(0x10));
                let weights = _mm256_or_si256(nibbles_to_bytes(load16(&block[8..])), fifth);
                let sums = products(weights, activation_bytes(a));
                // (d·scale, m·sum): the block's factor, and its minimum's share of the dot.
                let factors = _mm_mul_ps(f16_pair(block, 0), scale_and_sum(a));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_broadcastss_ps(factors), acc);
                minimums = _mm_add_ps(minimums, factors);
            }
            horizontal_sum(acc) + _mm_cvtss_f32(_mm_movehdup_ps(minimums))
        }

        #[target_feature(enable = $features)]
        pub fn dot_q8_0(row: &[u8], activations: &[ActivationBlock]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for (block, a) in row.chunks_exact(34).zip(activations) {
                let sums = signed_products(load32(&block[2..]), activation_bytes(a));
                let scale = _mm256_broadcastss_ps(_mm_mul_ss(f16_pair(block, 0), scale_and_sum(a)));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
            }
            horizontal_sum(acc)
        }

        #[target_feature(enable = $features)]
        pub fn dot_q4_k(row: &[u8], activations: &[ActivationBlock]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let mut minimums = 0.0;
            for (block, a) in row.chunks_exact(Q4_K_BYTES).zip(activations.chunks_exact(8)) {
                let pair = f16_pair(block, 0);
                let (d, dmin) = (_mm_cvtss_f32(pair), _mm_cvtss_f32(_mm_movehdup_ps(pair)));
                for run in 0..4 {
                    let packed = load32(&block[16 + 32 * run..]);
                    let low = _mm256_and_si256(packed, _mm256_set1_epi8(0x0F));
                    let high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), _mm256_set1_epi8(0x0F));
                    for (j, nibbles) in [(2 * run, low), (2 * run + 1, high)] {
                        let (scale, min) = scale_and_min(j, &block[4..16]);
                        let sums = products(nibbles, activation_bytes(&a[j]));
                        let scale = _mm256_set1_ps(d * f32::from(scale) * a[j].scale);
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
                        minimums += dmin * f32::from(min) * a[j].sum;
                    }
                }
            }
            horizontal_sum(acc) - minimums
        }

        /// Quarter `quarter` (32 weights) of a Q6_K block as unsigned bytes 0..63, and the scales of
        /// its two halves of 16.
        #[inline]
        #[target_feature(enable = $features)]
        fn q6_k_quarter(block: &[u8], quarter: usize) -> (__m256i, f32, f32) {
            let (half, k) = (quarter / 4, quarter % 4);
            let ql = load32(&block[64 * half + 32 * (k % 2)..]);
            let ql = if k >= 2 { _mm256_srli_epi16(ql, 4) } else { ql };
            let low = _mm256_and_si256(ql, _mm256_set1_epi8(0x0F));
            let qh = load32(&block[128 + 32 * half..]);
            let high = match k {
                0 => qh,
                1 => _mm256_srli_epi16(qh, 2),
                2 => _mm256_srli_epi16(qh, 4),
                _ => _mm256_srli_epi16(qh, 6),
            };
            let high = _mm256_slli_epi16(_mm256_and_si256(high, _mm256_set1_epi8(3)), 4);
            let scales = &block[192 + 8 * half + 2 * k..];
            (_mm256_or_si256(low, high), f32::from(scales[0] as i8), f32::from(scales[1] as i8))
        }

        /// One quarter's products with one activation block into `acc`.
        #[inline]
        #[target_feature(enable = $features)]
        fn q6_k_accumulate(acc: __m256, weights: __m256i, (first, second): (f32, f32), d: f32, a: &ActivationBlock) -> __m256 {
            let values = activation_bytes(a);
            // (q − 32)·x as q·x − 32·x: the weights stay unsigned for the byte products.
            let sums = _mm256_sub_epi32(products(weights, values), products(_mm256_set1_epi8(32), values));
            // Lanes 0–3 sum weights 0–15, lanes 4–7 weights 16–31: one scale each.
            let factor = d * a.scale;
            let (first, second) = (first * factor, second * factor);
            let scale = _mm256_setr_ps(first, first, first, first, second, second, second, second);
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc)
        }

        #[target_feature(enable = $features)]
        pub fn dot_q6_k(row: &[u8], activations: &[ActivationBlock]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for (block, a) in row.chunks_exact(Q6_K_BYTES).zip(activations.chunks_exact(8)) {
                // d is the block's last two bytes: read with the two before it.
                let d = _mm_cvtss_f32(_mm_movehdup_ps(f16_pair(block, 206)));
                for (quarter, a) in a.iter().enumerate() {
                    let (weights, first, second) = q6_k_quarter(block, quarter);
                    acc = q6_k_accumulate(acc, weights, (first, second), d, a);
                }
            }
            horizontal_sum(acc)
        }
    };
}

/// AVX2 with FMA and F16C (Haswell and later).
pub mod avx2 {
    dot_kernels!(
        "avx2,fma,f16c",
        /// Eight sums of four products each: pairs to i16 (cannot saturate: 15·127·2 and
        /// 127·128·2 both fit), then pairs of those to i32.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn products(unsigned: __m256i, signed: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, signed), _mm256_set1_epi16(1))
        },
        /// Eight sums (one per row of a row group) of four parts' products: weights below 32,
        /// so the i16 sums cannot saturate (4 · 2 · 31 · 127 fits).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn group_sums(weights: [__m256i; 4], activations: [__m256i; 4]) -> __m256i {
            let mut pairs = _mm256_maddubs_epi16(weights[0], activations[0]);
            for k in 1..4 {
                pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(weights[k], activations[k]));
            }
            _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
        }
    );

    /// Whether this CPU runs these kernels.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
}

/// AVX-512 VNNI on 256-bit registers (Ice Lake, Zen 4 and later).
pub mod vnni {
    dot_kernels!(
        "avx2,fma,f16c,avx512vnni,avx512vl",
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        fn products(unsigned: __m256i, signed: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), unsigned, signed)
        },
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        fn group_sums(weights: [__m256i; 4], activations: [__m256i; 4]) -> __m256i {
            let mut sums = _mm256_setzero_si256();
            for k in 0..4 {
                sums = _mm256_dpbusd_epi32(sums, weights[k], activations[k]);
            }
            sums
        }
    );

    pub fn available() -> bool {
        super::avx2::available()
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
    }
}

/// `scalar::quantize_activations` in AVX2, to the bit: the same f32 operations in the same order
/// per value (scale, inverse, product, round half to even, clamp), eight values a lane.
///
/// # Safety
/// The CPU must have AVX2 (`avx2::available`).
#[target_feature(enable = "avx2")]
pub unsafe fn quantize_activations(input: &[f32], out: &mut [ActivationBlock]) {
    let sign = _mm256_set1_ps(-0.0);
    let (low, high) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    // The two packs below work within 128-bit halves: 32-bit lane k of their result holds the
    // four values of group (0, 2, 4, 6, 1, 3, 5, 7)[k] (group j: values 4j..4j+4). This puts
    // group j back in lane j.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (values, block) in input.chunks_exact(super::BLOCK).zip(out.iter_mut()) {
        // SAFETY: `values` is 32 floats; loadu has no alignment requirement.
        let lanes: [__m256; 4] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(values.as_ptr().add(8 * i)) });
        let magnitudes = lanes.map(|lane| _mm256_andnot_ps(sign, lane));
        let max = _mm256_max_ps(
            _mm256_max_ps(magnitudes[0], magnitudes[1]),
            _mm256_max_ps(magnitudes[2], magnitudes[3]),
        );
        let half = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps(max, 1));
        let quarter = _mm_max_ps(half, _mm_movehl_ps(half, half));
        let max = _mm_cvtss_f32(_mm_max_ss(quarter, _mm_movehdup_ps(quarter)));
        let scale = max / 127.0;
        let inverse = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let integers = lanes.map(|lane| {
            let scaled =
                _mm256_round_ps(_mm256_mul_ps(lane, inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(scaled, low), high))
        });
        let total = _mm256_add_epi32(
            _mm256_add_epi32(integers[0], integers[1]),
            _mm256_add_epi32(integers[2], integers[3]),
        );
        let total = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        let total = _mm_add_epi32(total, _mm_shuffle_epi32(total, 0b01_00_11_10));
        let total = _mm_cvtsi128_si32(_mm_add_epi32(total, _mm_shuffle_epi32(total, 0b10_11_00_01)));
        let words =
            [_mm256_packs_epi32(integers[0], integers[1]), _mm256_packs_epi32(integers[2], integers[3])];
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words[0], words[1]), order);
        // SAFETY: `values` of the block is 32 bytes.
        unsafe { _mm256_storeu_si256(block.values.as_mut_ptr().cast(), bytes) };
        block.scale = scale;
        block.sum = scale * total as f32;
        block.total = total;
    }
}
