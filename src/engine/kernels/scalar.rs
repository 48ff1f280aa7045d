//! The reference kernels: GGUF block formats read as they are stored, activations quantized to
//! 8-bit blocks, and one plain-Rust dot product per weight type. Every SIMD variant in `x86.rs` is
//! held to these by tests; they are also what runs on CPUs without AVX2 and on other
//! architectures.
//!
//! Block layouts (little-endian, as GGUF stores them; 32 weights a block):
//! - Q4_0, 18 bytes: scale `d` (f16), 16 bytes of nibbles; weight = (q - 8) * d.
//! - Q4_1, 20 bytes: `d` (f16), minimum `m` (f16), 16 bytes of nibbles; weight = q * d + m.
//! - Q5_0, 22 bytes: `d` (f16), 4 bytes of fifth bits, 16 bytes of nibbles; weight = (q - 16) * d.
//! - Q5_1, 24 bytes: `d`, `m` (f16), 4 bytes of fifth bits, 16 bytes of nibbles; weight = q * d + m.
//! - Q8_0, 34 bytes: `d` (f16), 32 signed bytes; weight = q * d.
//!
//! In the 4- and 5-bit types the low nibble of byte j is weight j and its high nibble weight j+16;
//! bit j of the fifth bits belongs to weight j.

use half::f16;

/// Weights (and activations) in one block of every type here.
pub const BLOCK: usize = 32;

/// One block of activations quantized to 8 bits (the counterpart of ggml's Q8_1, with f32 scales):
/// `value ≈ values[i] * scale`, `total = Σ values` and `sum = scale * total`, which the types with
/// a minimum or an offset need.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C)]
pub struct ActivationBlock {
    pub scale: f32,
    pub sum: f32,
    pub total: i32,
    pub values: [i8; BLOCK],
}

/// Quantize `input` (a multiple of 32 long) into `out`, one block per 32 values: the largest
/// magnitude maps to ±127, values round to the nearest integer, ties to even.
pub fn quantize_activations(input: &[f32], out: &mut [ActivationBlock]) {
    for (values, block) in input.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let max = values.iter().fold(0.0f32, |max, value| max.max(value.abs()));
        let scale = max / 127.0;
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut total = 0i32;
        for (quantized, value) in block.values.iter_mut().zip(values) {
            let q = (value * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
            *quantized = q;
            total += i32::from(q);
        }
        block.scale = scale;
        block.sum = scale * total as f32;
        block.total = total;
    }
}

pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

fn fifth_bits(block: &[u8]) -> u32 {
    u32::from_le_bytes([block[2], block[3], block[4], block[5]])
}

/// One row of weights dotted with one row of quantized activations.
pub type DotRow = fn(row: &[u8], activations: &[ActivationBlock]) -> f32;

pub fn dot_q4_0(row: &[u8], activations: &[ActivationBlock]) -> f32 {
    let mut total = 0.0;
    for (block, a) in row.chunks_exact(18).zip(activations) {
        let (low_values, high_values) = a.values.split_at(16);
        let mut sum = 0i32;
        for ((&byte, &low_value), &high_value) in block[2..18].iter().zip(low_values).zip(high_values) {
            let low = i32::from(byte & 0x0F) - 8;
            let high = i32::from(byte >> 4) - 8;
            sum += low * i32::from(low_value) + high * i32::from(high_value);
        }
        total += f16_at(block, 0) * a.scale * sum as f32;
    }
    total
}

pub fn dot_q4_1(row: &[u8], activations: &[ActivationBlock]) -> f32 {
    let mut total = 0.0;
    for (block, a) in row.chunks_exact(20).zip(activations) {
        let (low_values, high_values) = a.values.split_at(16);
        let mut sum = 0i32;
        for ((&byte, &low_value), &high_value) in block[4..20].iter().zip(low_values).zip(high_values) {
            sum +=
                i32::from(byte & 0x0F) * i32::from(low_value) + i32::from(byte >> 4) * i32::from(high_value);
        }
        total += f16_at(block, 0) * a.scale * sum as f32 + f16_at(block, 2) * a.sum;
    }
    total
}

fn five_bit(nibbles: &[u8], high_bits: u32, j: usize) -> i32 {
    let nibble = if j < 16 { nibbles[j] & 0x0F } else { nibbles[j - 16] >> 4 };
    i32::from(nibble) | ((((high_bits >> j) & 1) as i32) << 4)
}

pub fn dot_q5_0(row: &[u8], activations: &[ActivationBlock]) -> f32 {
    let mut total = 0.0;
    for (block, a) in row.chunks_exact(22).zip(activations) {
        let high_bits = fifth_bits(block);
        let nibbles = &block[6..22];
        let sum: i32 =
            (0..BLOCK).map(|j| (five_bit(nibbles, high_bits, j) - 16) * i32::from(a.values[j])).sum();
        total += f16_at(block, 0) * a.scale * sum as f32;
    }
    total
}

pub fn dot_q5_1(row: &[u8], activations: &[ActivationBlock]) -> f32 {
    let mut total = 0.0;
    for (block, a) in row.chunks_exact(24).zip(activations) {
        let high_bits = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
        let nibbles = &block[8..24];
        let sum: i32 = (0..BLOCK).map(|j| five_bit(nibbles, high_bits, j) * i32::from(a.values[j])).sum();
        total += f16_at(block, 0) * a.scale * sum as f32 + f16_at(block, 2) * a.sum;
    }
    total
}

pub fn dot_q8_0(row: &[u8], activations: &[ActivationBlock]) -> f32 {
    let mut total = 0.0;
    for (block, a) in row.chunks_exact(34).zip(activations) {
        let sum: i32 =
            block[2..34].iter().zip(&a.values).map(|(&w, &x)| i32::from(w as i8) * i32::from(x)).sum();
        total += f16_at(block, 0) * a.scale * sum as f32;
    }
    total
}

/// Dequantize one row of `Q4_0`…`Q8_0` blocks into `out` (32 values a block).
pub fn dequantize_q4_0(row: &[u8], out: &mut [f32]) {
    for (block, out) in row.chunks_exact(18).zip(out.chunks_exact_mut(BLOCK)) {
        let d = f16_at(block, 0);
        for j in 0..16 {
            out[j] = (f32::from(block[2 + j] & 0x0F) - 8.0) * d;
            out[j + 16] = (f32::from(block[2 + j] >> 4) - 8.0) * d;
        }
    }
}

pub fn dequantize_q4_1(row: &[u8], out: &mut [f32]) {
    for (block, out) in row.chunks_exact(20).zip(out.chunks_exact_mut(BLOCK)) {
        let (d, m) = (f16_at(block, 0), f16_at(block, 2));
        for j in 0..16 {
            out[j] = f32::from(block[4 + j] & 0x0F) * d + m;
            out[j + 16] = f32::from(block[4 + j] >> 4) * d + m;
        }
    }
}

pub fn dequantize_q5_0(row: &[u8], out: &mut [f32]) {
    for (block, out) in row.chunks_exact(22).zip(out.chunks_exact_mut(BLOCK)) {
        let (d, high_bits) = (f16_at(block, 0), fifth_bits(block));
        for (j, value) in out.iter_mut().enumerate() {
            *value = (five_bit(&block[6..22], high_bits, j) - 16) as f32 * d;
        }
    }
}

pub fn dequantize_q5_1(row: &[u8], out: &mut [f32]) {
    for (block, out) in row.chunks_exact(24).zip(out.chunks_exact_mut(BLOCK)) {
        let (d, m) = (f16_at(block, 0), f16_at(block, 2));
        let high_bits = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
        for (j, value) in out.iter_mut().enumerate() {
            *value = five_bit(&block[8..24], high_bits, j) as f32 * d + m;
        }
    }
}

pub fn dequantize_q8_0(row: &[u8], out: &mut [f32]) {
    for (block, out) in row.chunks_exact(34).zip(out.chunks_exact_mut(BLOCK)) {
        let d = f16_at(block, 0);
        for (value, &q) in out.iter_mut().zip(&block[2..34]) {
            *value = f32::from(q as i8) * d;
        }
    }
}

pub fn dequantize_f32(row: &[u8], out: &mut [f32]) {
    for (value, bytes) in out.iter_mut().zip(row.chunks_exact(4)) {
        *value = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
}

pub fn dequantize_f16(row: &[u8], out: &mut [f32]) {
    for (index, value) in out.iter_mut().enumerate() {
        *value = f16_at(row, index * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_activations_round_trip_within_half_a_step() {
        let input: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let mut blocks = vec![ActivationBlock::default(); 2];
        quantize_activations(&input, &mut blocks);
        for (values, block) in input.chunks(BLOCK).zip(&blocks) {
            for (value, &q) in values.iter().zip(&block.values) {
                assert!((value - f32::from(q) * block.scale).abs() <= block.scale / 2.0 + 1e-6);
            }
            let sum: f32 = block.values.iter().map(|&q| f32::from(q)).sum::<f32>() * block.scale;
            assert!((sum - block.sum).abs() < 1e-4);
        }
    }

    #[test]
    fn zeros_quantize_to_a_zero_scale() {
        let mut blocks = vec![ActivationBlock::default(); 1];
        quantize_activations(&[0.0; 32], &mut blocks);
        assert_eq!(blocks[0], ActivationBlock::default());
    }
}
