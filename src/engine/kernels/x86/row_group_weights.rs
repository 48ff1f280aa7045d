//! The row-group kernels' unpacking (see `super::super::row_groups` for the layouts): a group
//! block's weights of eight rows as registers of 32 bytes, four weights of row `r` at `4r`, and
//! the scales that go with them. The kernels themselves are in `dot_kernels!` beside the one-row
//! ones.

use std::arch::x86_64::*;

use super::load32;
use crate::engine::kernels::row_groups::{Q6_K_HIGH, Q6_K_LOW, Q6_K_SCALES, SmallBlocks};
use crate::engine::kernels::scalar::ActivationBlock;

/// Activation bytes `4j..4j+4` of a block in every 32-bit lane.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn four_activations(block: &ActivationBlock, j: usize) -> __m256i {
    let v = &block.values[4 * j..4 * j + 4];
    _mm256_set1_epi32(i32::from_le_bytes([v[0] as u8, v[1] as u8, v[2] as u8, v[3] as u8]))
}

/// Weights `4j..4j+4` of the eight rows of a group block of `layout` (see `row_groups`), for `j`
/// in `4·half..4·half+4`, as stored (unsigned, 0..15 or with fifth bits 0..31): row `r` in bytes
/// `4r..4r+4`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn small_group_weights(block: &[u8], layout: SmallBlocks, half: usize) -> [__m256i; 4] {
    let fifth_bits =
        if layout.fifth_bits { load32(&block[layout.fifth_bits_at()..]) } else { _mm256_setzero_si256() };
    let mut weights = [_mm256_setzero_si256(); 4];
    for (k, weights) in weights.iter_mut().enumerate() {
        let packed = load32(&block[layout.nibbles() + 32 * k..]);
        let packed = if half == 0 { packed } else { _mm256_srli_epi16(packed, 4) };
        *weights = _mm256_and_si256(packed, _mm256_set1_epi8(0x0F));
        if layout.fifth_bits {
            // Bit j of each byte to bit 4 (16-bit shifts: bit 4 of either byte comes from the
            // same byte for shifts up to four left or three right).
            let fifth = match 4 * half + k {
                0 => _mm256_slli_epi16(fifth_bits, 4),
                1 => _mm256_slli_epi16(fifth_bits, 3),
                2 => _mm256_slli_epi16(fifth_bits, 2),
                3 => _mm256_slli_epi16(fifth_bits, 1),
                4 => fifth_bits,
                5 => _mm256_srli_epi16(fifth_bits, 1),
                6 => _mm256_srli_epi16(fifth_bits, 2),
                _ => _mm256_srli_epi16(fifth_bits, 3),
            };
            *weights = _mm256_or_si256(*weights, _mm256_and_si256(fifth, _mm256_set1_epi8(0x10)));
        }
    }
    weights
}

/// The scales and minimums of the eight rows of a Q4_K group block, as `k_quants::scale_and_min`
/// unpacks them, all rows at once: (scales of sub-blocks 0..4, of 4..8, minimums of 0..4, of
/// 4..8), byte `j % 4` of lane `r` being row `r`'s.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q4_k_group_scales(block: &[u8]) -> [__m256i; 4] {
    let words = [load32(&block[32..]), load32(&block[64..]), load32(&block[96..])];
    let (six, four) = (_mm256_set1_epi8(0x3F), _mm256_set1_epi8(0x0F));
    // The top two bits of each byte of a word, as bits 4 and 5.
    let top = |word: __m256i| {
        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(word, 6), _mm256_set1_epi8(3)), 4)
    };
    [
        _mm256_and_si256(words[0], six),
        _mm256_or_si256(_mm256_and_si256(words[2], four), top(words[0])),
        _mm256_and_si256(words[1], six),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(words[2], 4), four), top(words[1])),
    ]
}

/// Byte `j % 4` of every 32-bit lane, as f32.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn lane_byte(bytes: __m256i, j: usize) -> __m256 {
    let shifted = match j % 4 {
        0 => bytes,
        1 => _mm256_srli_epi32(bytes, 8),
        2 => _mm256_srli_epi32(bytes, 16),
        _ => _mm256_srli_epi32(bytes, 24),
    };
    _mm256_cvtepi32_ps(_mm256_and_si256(shifted, _mm256_set1_epi32(0xFF)))
}

/// Weights `4p..4p+4` of sub-block `j` of the eight rows of a Q4_K group block, for `p` in
/// `4·half..4·half+4`, as bytes 0..15: row `r` in bytes `4r..4r+4`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q4_k_group_weights(block: &[u8], j: usize, half: usize) -> [__m256i; 4] {
    let mut weights = [_mm256_setzero_si256(); 4];
    for (k, weights) in weights.iter_mut().enumerate() {
        let packed = load32(&block[128 + 32 * (8 * (j / 2) + 4 * half + k)..]);
        let packed = if j.is_multiple_of(2) { packed } else { _mm256_srli_epi16(packed, 4) };
        *weights = _mm256_and_si256(packed, _mm256_set1_epi8(0x0F));
    }
    weights
}

/// Weights `16e + 4p..+4` (`p` in 0..4) of quarter `k` of half `h` of the eight rows of a Q6_K
/// group block, signed (q − 32, in −32..31): row `r` in bytes `4r..4r+4`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q6_k_group_weights(block: &[u8], h: usize, k: usize, e: usize) -> [__m256i; 4] {
    let mut weights = [_mm256_setzero_si256(); 4];
    for (m, weights) in weights.iter_mut().enumerate() {
        let p = 4 * e + m;
        let low = load32(&block[Q6_K_LOW + 32 * (16 * h + 8 * (k % 2) + p)..]);
        let low = if k < 2 { low } else { _mm256_srli_epi16(low, 4) };
        let high = load32(&block[Q6_K_HIGH + 32 * (8 * h + p)..]);
        // Bits 2k, 2k+1 of each byte to bits 4, 5 (16-bit shifts; the mask keeps each byte's own).
        let high = match k {
            0 => _mm256_slli_epi16(high, 4),
            1 => _mm256_slli_epi16(high, 2),
            2 => high,
            _ => _mm256_srli_epi16(high, 2),
        };
        let q = _mm256_or_si256(
            _mm256_and_si256(low, _mm256_set1_epi8(0x0F)),
            _mm256_and_si256(high, _mm256_set1_epi8(0x30)),
        );
        *weights = _mm256_sub_epi8(q, _mm256_set1_epi8(32));
    }
    weights
}

/// Scale `s` (0..16) of the eight rows of a Q6_K group block, as f32.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q6_k_group_scale(block: &[u8], s: usize) -> __m256 {
    let scales = load32(&block[Q6_K_SCALES + 32 * (s / 4)..]);
    // Byte s % 4 of each lane to the top, then sign-extended down.
    let top = match s % 4 {
        0 => _mm256_slli_epi32(scales, 24),
        1 => _mm256_slli_epi32(scales, 16),
        2 => _mm256_slli_epi32(scales, 8),
        _ => scales,
    };
    _mm256_cvtepi32_ps(_mm256_srai_epi32(top, 24))
}
