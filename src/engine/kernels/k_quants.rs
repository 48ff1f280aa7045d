//! Reference kernels of the two k-quant types that the common `Q4_K_M` files are made of: Q4_K
//! and Q6_K, read as ggml stores them (256 weights a super-block), dotted with the same 8-bit
//! activation blocks of 32 as the other types. The SIMD variants are in `x86.rs`, held to these
//! by tests.
//!
//! Layouts (little-endian):
//! - Q4_K, 144 bytes: `d` (f16), `dmin` (f16), 12 bytes packing eight 6-bit scales and eight
//!   6-bit minimums, 128 bytes of nibbles. Sub-block j (32 weights): weight = d·scale_j·q −
//!   dmin·min_j. Byte i of the c-th 32-byte run holds weight i of sub-block 2c in its low nibble
//!   and weight i of sub-block 2c+1 in its high nibble.
//! - Q6_K, 210 bytes: 128 bytes of low nibbles `ql`, 64 bytes of two-bit high parts `qh`, sixteen
//!   signed scales (one per 16 weights), `d` (f16). weight = d·scale·(q − 32) with q six bits.
//!   Each half of 128 weights uses 64 bytes of `ql` and 32 of `qh`; its quarter k (32 weights)
//!   takes the low (k = 0, 1) or high (k = 2, 3) nibbles of `ql[32·(k mod 2)..]` and bits
//!   2k..2k+1 of `qh`.

use super::scalar::{ActivationBlock, f16_at};

/// Weights in one super-block.
pub const SUPER_BLOCK: usize = 256;
pub const Q4_K_BYTES: usize = 144;
pub const Q6_K_BYTES: usize = 210;

/// Scale and minimum of sub-block `j` (0..8) from Q4_K's 12 packed bytes: the first four are
/// the low six bits of bytes 0..4 and 4..8; the last four take their low four bits from bytes
/// 8..12 and their top two from the spare bits of the first eight.
pub(super) fn scale_and_min(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        let scale = (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4);
        let min = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
        (scale, min)
    }
}

/// The six-bit value (0..64) of weight `l` (0..32) in quarter `k` of a Q6_K half.
pub(super) fn six_bit(ql: &[u8], qh: &[u8], k: usize, l: usize) -> i32 {
    let low = match k {
        0 => ql[l] & 0x0F,
        1 => ql[l + 32] & 0x0F,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    i32::from(low | (((qh[l] >> (2 * k)) & 3) << 4))
}

pub fn dot_q4_k(row: &[u8], activations: &[ActivationBlock]) -> f32 {
    let mut total = 0.0;
    for (block, a) in row.chunks_exact(Q4_K_BYTES).zip(activations.chunks_exact(8)) {
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        let packed = &block[4..16];
        for (j, a) in a.iter().enumerate() {
            let run = &block[16 + 32 * (j / 2)..16 + 32 * (j / 2 + 1)];
            let shift = 4 * (j % 2);
            let sum: i32 =
                run.iter().zip(&a.values).map(|(&q, &x)| i32::from((q >> shift) & 0x0F) * i32::from(x)).sum();
            let (scale, min) = scale_and_min(j, packed);
            total += d * f32::from(scale) * a.scale * sum as f32 - dmin * f32::from(min) * a.sum;
        }
    }
    total
}

pub fn dot_q6_k(row: &[u8], activations: &[ActivationBlock]) -> f32 {
    let mut total = 0.0;
    for (block, a) in row.chunks_exact(Q6_K_BYTES).zip(activations.chunks_exact(8)) {
        let d = f16_at(block, 208);
        for (quarter, a) in a.iter().enumerate() {
            let (half, k) = (quarter / 4, quarter % 4);
            let ql = &block[64 * half..64 * half + 64];
            let qh = &block[128 + 32 * half..128 + 32 * half + 32];
            for group in 0..2 {
                let sum: i32 = (16 * group..16 * group + 16)
                    .map(|l| (six_bit(ql, qh, k, l) - 32) * i32::from(a.values[l]))
                    .sum();
                let scale = block[192 + 8 * half + 2 * k + group] as i8;
                total += d * f32::from(scale) * a.scale * sum as f32;
            }
        }
    }
    total
}

pub fn dequantize_q4_k(row: &[u8], out: &mut [f32]) {
    for (block, out) in row.chunks_exact(Q4_K_BYTES).zip(out.chunks_exact_mut(SUPER_BLOCK)) {
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        for (j, out) in out.chunks_exact_mut(32).enumerate() {
            let (scale, min) = scale_and_min(j, &block[4..16]);
            let (scale, min) = (d * f32::from(scale), dmin * f32::from(min));
            let run = &block[16 + 32 * (j / 2)..16 + 32 * (j / 2 + 1)];
            for (value, &q) in out.iter_mut().zip(run) {
                *value = scale * f32::from((q >> (4 * (j % 2))) & 0x0F) - min;
            }
        }
    }
}

pub fn dequantize_q6_k(row: &[u8], out: &mut [f32]) {
    for (block, out) in row.chunks_exact(Q6_K_BYTES).zip(out.chunks_exact_mut(SUPER_BLOCK)) {
        let d = f16_at(block, 208);
        for (quarter, out) in out.chunks_exact_mut(32).enumerate() {
            let (half, k) = (quarter / 4, quarter % 4);
            let ql = &block[64 * half..64 * half + 64];
            let qh = &block[128 + 32 * half..128 + 32 * half + 32];
            for (l, value) in out.iter_mut().enumerate() {
                let scale = block[192 + 8 * half + 2 * k + l / 16] as i8;
                *value = d * f32::from(scale) * (six_bit(ql, qh, k, l) - 32) as f32;
            }
        }
    }
}
