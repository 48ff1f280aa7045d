//! Weight rows kept in groups of eight, interleaved block by block, and the reference kernels over
//! them. Matrices of every quantized type are stored so (SmolLM2 is Q4_1; gemma-3's
//! attention and feed-forward inputs are Q5_0; Q4_K is most of every `Q4_K_M` file; Q8_0 is the
//! output layer of many, whose single-token matmul is a large part of decoding): one row at a
//! time, every 32-weight block paid for its own unpacking, widening, conversion to float and
//! scaling, once per token. Eight rows side
//! by side let one multiply take four weights of each row against the same four activation bytes,
//! and share the integer and float work of a block among the eight rows. The bytes are the
//! file's, moved and not re-encoded: a group block is exactly eight native blocks (llama.cpp
//! repacks Q4_0 and Q4_K rows for the same reason).
//!
//! A group block of the 32-weight types (Q4_0, Q4_1, Q5_0, Q5_1), rows `8g..8g+8` by one 32-column
//! block, is eight native blocks' bytes (`SmallBlocks`):
//! - `0..16`: the eight rows' scales `d` (f16), in row order;
//! - with a minimum (Q4_1, Q5_1), `16..32` the rows' minimums `m` (f16);
//! - with fifth bits (Q5_0, Q5_1), 32 bytes: bit `j` of byte `4r + i` is the fifth bit of weight
//!   `4j + i` of row `r`;
//! - the last 128 bytes: nibbles in four parts of 32 bytes: byte `32k + 4r + i` of them is the
//!   native nibble byte `4k + i` of row `r` (low nibble weight `4k + i`, high nibble weight
//!   `16 + 4k + i`).
//!
//! A Q8_0 group block (272 bytes): the rows' `d` at `0..16`, then eight registers of values,
//! register `p` holding bytes `4p..4p+4` of row `r` at `4r`.
//!
//! A Q4_K group block, eight rows by one 256-column super-block, is 1,152 bytes:
//! - `0..16` the rows' `d`, `16..32` their `dmin` (f16, row order);
//! - `32..128`: the 12 packed scale bytes of each row as three words: bytes `32 + 32w + 4r..+4` are
//!   bytes `4w..4w+4` of row `r`'s (so one register holds word `w` of all eight rows);
//! - `128..1152`: nibbles, 32 parts of 32 bytes: part `8c + p` holds, at `4r..4r+4`, the native
//!   nibble bytes `32c + 4p..+4` of row `r` (weights `4p..4p+4` of sub-block `2c` in the low nibbles,
//!   of sub-block `2c + 1` in the high ones).
//!
//! A Q6_K group block, eight rows by one super-block, is 1,680 bytes: `0..16` the rows' `d`; then
//! their 16 signed scales as four registers (register `v`, at `16 + 32v`, holds scales `4v..4v+4`
//! of row `r` at `4r`); then the low nibbles (`ql`) as 32 registers, register `16h + 8c + p`
//! holding bytes `64h + 32c + 4p..+4` of each row; then the high bits (`qh`) as 16 registers,
//! register `8h + p` holding bytes `32h + 4p..+4` of each row.
//!
//! So a register of 32 bytes holds four weights of every row, row `r` in bytes `4r..4r+4`.
//!
//! Every kernel computes a row's result the same way whatever tokens share its call: per 32-weight
//! block the exact integer dot `s = Σ (q − offset)·a`, then `acc = fma(s, d·scale, acc)` and, for
//! the types with a minimum, `acc = fma(m, sum, acc)` (Q4_K: `d·sc_j` for `d`, `−dmin·m_j` for `m`;
//! Q6_K: one fma per 16 weights, with `d·sc`), in block order. The SIMD kernels equal these to the bit, and a token's result does not depend on its
//! batch.

use super::WeightType;
use super::k_quants::{Q4_K_BYTES, Q6_K_BYTES, SUPER_BLOCK, scale_and_min};
use super::scalar::{ActivationBlock, BLOCK, f16_at};

/// Rows in a group.
pub const GROUP_ROWS: usize = 8;
/// Bytes of a Q8_0 group block: eight native 34-byte blocks.
pub const Q8_0_GROUP_BYTES: usize = GROUP_ROWS * 34;
/// Bytes of a Q4_K group block: eight native super-blocks.
pub const Q4_K_GROUP_BYTES: usize = GROUP_ROWS * Q4_K_BYTES;
/// Bytes of a Q6_K group block: eight native super-blocks.
pub const Q6_K_GROUP_BYTES: usize = GROUP_ROWS * Q6_K_BYTES;
/// Where a Q6_K group block's parts start: scales, low nibbles, high bits.
pub const Q6_K_SCALES: usize = 16;
pub const Q6_K_LOW: usize = 144;
pub const Q6_K_HIGH: usize = 144 + 1024;

/// Eight rows' dot products with several tokens: `group` is a row group's blocks, `tokens[t]` a
/// token's activation blocks (at least as many), `out[t][r]` row `r` with token `t`.
pub type DotGroup = fn(group: &[u8], tokens: &[&[ActivationBlock]], out: &mut [[f32; GROUP_ROWS]]);

/// `rows × columns` weights of `weight_type`, in GGUF's row order, as row groups, in place: a
/// group's eight rows take the same bytes in either order, so only one group is copied at a time
/// (the token table of a large vocabulary is hundreds of MB). `rows` must be a multiple of eight
/// and `weight_type` one kept so (`WeightType::in_row_groups`).
pub fn interleave(weight_type: WeightType, mut bytes: Vec<u8>, rows: usize, columns: usize) -> Vec<u8> {
    let interleave = match weight_type {
        WeightType::Q4_0 => |n: &[u8], r, c| Q4_0.interleave(n, r, c),
        WeightType::Q4_1 => |n: &[u8], r, c| Q4_1.interleave(n, r, c),
        WeightType::Q5_0 => |n: &[u8], r, c| Q5_0.interleave(n, r, c),
        WeightType::Q5_1 => |n: &[u8], r, c| Q5_1.interleave(n, r, c),
        WeightType::Q8_0 => |n: &[u8], r, c| Q8_0.interleave(n, r, c),
        WeightType::Q4K => |n: &[u8], r, c| Q4_K.interleave(n, r, c),
        WeightType::Q6K => |n: &[u8], r, c| Q6_K.interleave(n, r, c),
        other => panic!("{other:?} is not kept as row groups"),
    };
    assert!(rows.is_multiple_of(GROUP_ROWS) && bytes.len().is_multiple_of(rows));
    let group_bytes = bytes.len() / rows * GROUP_ROWS;
    for group in bytes.chunks_exact_mut(group_bytes) {
        let grouped = interleave(group, GROUP_ROWS, columns);
        group.copy_from_slice(&grouped);
    }
    bytes
}

/// Row `row` of grouped weights `columns` wide, back in GGUF's encoding, into `out`.
pub fn native_row(weight_type: WeightType, grouped: &[u8], row: usize, columns: usize, out: &mut [u8]) {
    match weight_type {
        WeightType::Q4_0 => Q4_0.native_row(grouped, row, columns, out),
        WeightType::Q4_1 => Q4_1.native_row(grouped, row, columns, out),
        WeightType::Q5_0 => Q5_0.native_row(grouped, row, columns, out),
        WeightType::Q5_1 => Q5_1.native_row(grouped, row, columns, out),
        WeightType::Q8_0 => Q8_0.native_row(grouped, row, columns, out),
        WeightType::Q4K => Q4_K.native_row(grouped, row, columns, out),
        WeightType::Q6K => Q6_K.native_row(grouped, row, columns, out),
        other => panic!("{other:?} is not kept as row groups"),
    }
}

/// A type of 32-weight blocks with one f16 scale `d` and 16 bytes of nibbles: Q4_0, Q4_1 (with a
/// minimum `m`), Q5_0 (with fifth bits) and Q5_1 (both). Its group block holds the eight rows' `d`
/// at 0..16, then their minimums (16..32), then their fifth bits (32 bytes), and the nibbles in
/// the last 128 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmallBlocks {
    /// Bytes of a native block.
    pub native_bytes: usize,
    pub minimum: bool,
    pub fifth_bits: bool,
    /// Subtracted from every stored weight (8 for Q4_0, 16 for Q5_0).
    pub offset: i32,
}

pub const Q4_0: SmallBlocks = SmallBlocks { native_bytes: 18, minimum: false, fifth_bits: false, offset: 8 };
pub const Q4_1: SmallBlocks = SmallBlocks { native_bytes: 20, minimum: true, fifth_bits: false, offset: 0 };
pub const Q5_0: SmallBlocks = SmallBlocks { native_bytes: 22, minimum: false, fifth_bits: true, offset: 16 };
pub const Q5_1: SmallBlocks = SmallBlocks { native_bytes: 24, minimum: true, fifth_bits: true, offset: 0 };

impl SmallBlocks {
    /// Bytes of a group block: eight native blocks.
    pub const fn group_bytes(self) -> usize {
        GROUP_ROWS * self.native_bytes
    }

    /// Where the nibbles start in a group block.
    pub const fn nibbles(self) -> usize {
        self.group_bytes() - 128
    }

    /// Where the minimums (f16) start in a group block.
    pub const MINIMUMS: usize = 16;

    /// Where the fifth bits start in a group block, after the minimums if any.
    pub const fn fifth_bits_at(self) -> usize {
        if self.minimum { 32 } else { 16 }
    }

    /// Where the fifth bits start in a native block.
    const fn native_fifth_bits_at(self) -> usize {
        if self.minimum { 4 } else { 2 }
    }

    /// `rows × columns` weights in GGUF's row order as row groups. `rows` must be a multiple of
    /// eight and `native` whole rows of whole blocks.
    pub fn interleave(self, native: &[u8], rows: usize, columns: usize) -> Vec<u8> {
        let blocks = columns / BLOCK;
        let (row_bytes, group_bytes) = (blocks * self.native_bytes, self.group_bytes());
        assert!(rows.is_multiple_of(GROUP_ROWS) && columns.is_multiple_of(BLOCK));
        assert_eq!(native.len(), rows * row_bytes);
        let mut grouped = vec![0; native.len()];
        for (index, out) in grouped.chunks_exact_mut(group_bytes).enumerate() {
            let (group, block) = (index / blocks, index % blocks);
            for r in 0..GROUP_ROWS {
                let start = (group * GROUP_ROWS + r) * row_bytes + block * self.native_bytes;
                let native = &native[start..start + self.native_bytes];
                out[2 * r..2 * r + 2].copy_from_slice(&native[..2]);
                if self.minimum {
                    out[Self::MINIMUMS + 2 * r..][..2].copy_from_slice(&native[2..4]);
                }
                if self.fifth_bits {
                    let at = self.native_fifth_bits_at();
                    let fifth =
                        u32::from_le_bytes([native[at], native[at + 1], native[at + 2], native[at + 3]]);
                    for i in 0..4 {
                        out[self.fifth_bits_at() + 4 * r + i] =
                            (0..8).map(|j| (((fifth >> (4 * j + i)) & 1) as u8) << j).sum();
                    }
                }
                let nibbles = &native[self.native_bytes - 16..];
                for k in 0..4 {
                    out[self.nibbles() + 32 * k + 4 * r..][..4].copy_from_slice(&nibbles[4 * k..][..4]);
                }
            }
        }
        grouped
    }

    /// Row `row` of grouped weights `columns` wide, back in GGUF's encoding, into `out`.
    pub fn native_row(self, grouped: &[u8], row: usize, columns: usize, out: &mut [u8]) {
        let (blocks, group_bytes) = (columns / BLOCK, self.group_bytes());
        let (group, r) = (row / GROUP_ROWS, row % GROUP_ROWS);
        let group_blocks = &grouped[group * blocks * group_bytes..][..blocks * group_bytes];
        for (block, native) in
            group_blocks.chunks_exact(group_bytes).zip(out.chunks_exact_mut(self.native_bytes))
        {
            native[..2].copy_from_slice(&block[2 * r..2 * r + 2]);
            if self.minimum {
                native[2..4].copy_from_slice(&block[Self::MINIMUMS + 2 * r..][..2]);
            }
            if self.fifth_bits {
                let fifth: u32 = (0..BLOCK).map(|v| u32::from(self.fifth_bit(block, r, v)) << v).sum();
                native[self.native_fifth_bits_at()..][..4].copy_from_slice(&fifth.to_le_bytes());
            }
            let at = self.native_bytes - 16;
            for k in 0..4 {
                native[at + 4 * k..][..4].copy_from_slice(&block[self.nibbles() + 32 * k + 4 * r..][..4]);
            }
        }
    }

    fn fifth_bit(self, block: &[u8], r: usize, v: usize) -> u8 {
        (block[self.fifth_bits_at() + 4 * r + v % 4] >> (v / 4)) & 1
    }

    /// Weight `v` (0..32) of row `r` of a group block, as stored (before the offset).
    fn weight(self, block: &[u8], r: usize, v: usize) -> i32 {
        let byte = block[self.nibbles() + 32 * (v % 16 / 4) + 4 * r + v % 4];
        let nibble = if v < 16 { byte & 0x0F } else { byte >> 4 };
        let fifth = if self.fifth_bits { self.fifth_bit(block, r, v) << 4 } else { 0 };
        i32::from(nibble | fifth)
    }

    /// The reference kernel: per block and row, `acc = fma(Σ (q − offset)·a, d·scale, acc)`, then
    /// with a minimum `acc = fma(m, sum, acc)`.
    pub fn dot(self, group: &[u8], tokens: &[&[ActivationBlock]], out: &mut [[f32; GROUP_ROWS]]) {
        assert_eq!(tokens.len(), out.len(), "one output per token");
        for (activations, out) in tokens.iter().zip(out.iter_mut()) {
            *out = [0.0; GROUP_ROWS];
            for (block, a) in group.chunks_exact(self.group_bytes()).zip(activations.iter()) {
                for (r, acc) in out.iter_mut().enumerate() {
                    let sum: i32 = (0..BLOCK)
                        .map(|v| (self.weight(block, r, v) - self.offset) * i32::from(a.values[v]))
                        .sum();
                    *acc = (sum as f32).mul_add(f16_at(block, 2 * r) * a.scale, *acc);
                    if self.minimum {
                        *acc = f16_at(block, Self::MINIMUMS + 2 * r).mul_add(a.sum, *acc);
                    }
                }
            }
        }
    }
}

/// A type whose group block is its eight rows' native blocks moved in runs of bytes (Q8_0, Q4_K,
/// Q6_K): `moves(r)` lists, for row `r`, each run as (native offset, group offset, length).
#[derive(Debug, Clone, Copy)]
pub struct MovedBlocks {
    /// Values in a native block.
    pub values: usize,
    /// Bytes of a native block.
    pub native_bytes: usize,
    moves: fn(usize) -> Vec<(usize, usize, usize)>,
}

/// Q8_0: the rows' `d` at `0..16`, then register `p` holding bytes `4p..4p+4` of each row's values.
pub const Q8_0: MovedBlocks = MovedBlocks {
    values: BLOCK,
    native_bytes: 34,
    moves: |r| {
        let values = (0..8).map(|p| (2 + 4 * p, 16 + 32 * p + 4 * r, 4));
        std::iter::once((0, 2 * r, 2)).chain(values).collect()
    },
};

/// Q4_K: `d` at `0..16`, `dmin` at `16..32`, the scale words, the nibble parts (see above).
pub const Q4_K: MovedBlocks = MovedBlocks {
    values: SUPER_BLOCK,
    native_bytes: Q4_K_BYTES,
    moves: |r| {
        let scales = (0..3).map(|w| (4 + 4 * w, 32 + 32 * w + 4 * r, 4));
        let nibbles = (0..32).map(|p| (16 + 4 * p, 128 + 32 * p + 4 * r, 4));
        [(0, 2 * r, 2), (2, 16 + 2 * r, 2)].into_iter().chain(scales).chain(nibbles).collect()
    },
};

/// Q6_K: `d` at `0..16`, the scale registers, the low nibbles, the high bits (see above).
pub const Q6_K: MovedBlocks = MovedBlocks {
    values: SUPER_BLOCK,
    native_bytes: Q6_K_BYTES,
    moves: |r| {
        let scales = (0..4).map(|v| (192 + 4 * v, Q6_K_SCALES + 32 * v + 4 * r, 4));
        let low = (0..32).map(|i| (4 * i, Q6_K_LOW + 32 * i + 4 * r, 4));
        let high = (0..16).map(|i| (128 + 4 * i, Q6_K_HIGH + 32 * i + 4 * r, 4));
        std::iter::once((208, 2 * r, 2)).chain(scales).chain(low).chain(high).collect()
    },
};

impl MovedBlocks {
    /// `rows × columns` weights in GGUF's row order as row groups (`rows` a multiple of eight).
    pub fn interleave(self, native: &[u8], rows: usize, columns: usize) -> Vec<u8> {
        let blocks = columns / self.values;
        let (row_bytes, group_bytes) = (blocks * self.native_bytes, GROUP_ROWS * self.native_bytes);
        assert!(rows.is_multiple_of(GROUP_ROWS) && columns.is_multiple_of(self.values));
        assert_eq!(native.len(), rows * row_bytes);
        let moves: Vec<_> = (0..GROUP_ROWS).map(self.moves).collect();
        let mut grouped = vec![0; native.len()];
        for (index, out) in grouped.chunks_exact_mut(group_bytes).enumerate() {
            let (group, block) = (index / blocks, index % blocks);
            for (r, moves) in moves.iter().enumerate() {
                let start = (group * GROUP_ROWS + r) * row_bytes + block * self.native_bytes;
                for &(from, to, len) in moves {
                    out[to..to + len].copy_from_slice(&native[start + from..start + from + len]);
                }
            }
        }
        grouped
    }

    /// Row `row` of grouped weights `columns` wide, back in GGUF's encoding, into `out`.
    pub fn native_row(self, grouped: &[u8], row: usize, columns: usize, out: &mut [u8]) {
        let (blocks, group_bytes) = (columns / self.values, GROUP_ROWS * self.native_bytes);
        let (group, r) = (row / GROUP_ROWS, row % GROUP_ROWS);
        let moves = (self.moves)(r);
        let group_blocks = &grouped[group * blocks * group_bytes..][..blocks * group_bytes];
        for (block, native) in
            group_blocks.chunks_exact(group_bytes).zip(out.chunks_exact_mut(self.native_bytes))
        {
            for &(from, to, len) in &moves {
                native[from..from + len].copy_from_slice(&block[to..to + len]);
            }
        }
    }
}

/// The reference `DotGroup` of Q8_0: per block and row, `acc = fma(Σ q·a, d·scale, acc)`.
pub fn dot_q8_0_group(group: &[u8], tokens: &[&[ActivationBlock]], out: &mut [[f32; GROUP_ROWS]]) {
    assert_eq!(tokens.len(), out.len(), "one output per token");
    for (activations, out) in tokens.iter().zip(out.iter_mut()) {
        *out = [0.0; GROUP_ROWS];
        for (block, a) in group.chunks_exact(Q8_0_GROUP_BYTES).zip(activations.iter()) {
            for (r, acc) in out.iter_mut().enumerate() {
                let sum: i32 = (0..BLOCK)
                    .map(|v| {
                        i32::from(block[16 + 32 * (v / 4) + 4 * r + v % 4] as i8) * i32::from(a.values[v])
                    })
                    .sum();
                *acc = (sum as f32).mul_add(f16_at(block, 2 * r) * a.scale, *acc);
            }
        }
    }
}

/// Row `r`'s 12 packed scale bytes of a Q4_K group block.
fn q4_k_packed_scales(block: &[u8], r: usize) -> [u8; 12] {
    std::array::from_fn(|i| block[32 + 32 * (i / 4) + 4 * r + i % 4])
}

/// The reference `DotGroup` of Q4_K.
pub fn dot_q4_k_group(group: &[u8], tokens: &[&[ActivationBlock]], out: &mut [[f32; GROUP_ROWS]]) {
    assert_eq!(tokens.len(), out.len(), "one output per token");
    for (activations, out) in tokens.iter().zip(out.iter_mut()) {
        *out = [0.0; GROUP_ROWS];
        for (block, a) in group.chunks_exact(Q4_K_GROUP_BYTES).zip(activations.chunks_exact(8)) {
            for (r, acc) in out.iter_mut().enumerate() {
                let (d, dmin) = (f16_at(block, 2 * r), f16_at(block, 16 + 2 * r));
                let packed = q4_k_packed_scales(block, r);
                for (j, a) in a.iter().enumerate() {
                    let sum: i32 = (0..BLOCK)
                        .map(|v| {
                            let byte = block[128 + 32 * (8 * (j / 2) + v / 4) + 4 * r + v % 4];
                            let q = if j.is_multiple_of(2) { byte & 0x0F } else { byte >> 4 };
                            i32::from(q) * i32::from(a.values[v])
                        })
                        .sum();
                    let (scale, min) = scale_and_min(j, &packed);
                    let (scale, min) = (d * f32::from(scale), dmin * f32::from(min));
                    *acc = (sum as f32).mul_add(scale * a.scale, *acc);
                    *acc = (-min).mul_add(a.sum, *acc);
                }
            }
        }
    }
}

/// Weight `l` (0..32) of quarter `k` (0..4) of half `h` (0..2) of row `r` of a Q6_K group block,
/// as stored: 0..63.
fn q6_k_weight(block: &[u8], r: usize, h: usize, k: usize, l: usize) -> i32 {
    let (p, i) = (l / 4, l % 4);
    let low = block[Q6_K_LOW + 32 * (16 * h + 8 * (k % 2) + p) + 4 * r + i];
    let low = if k < 2 { low & 0x0F } else { low >> 4 };
    let high = (block[Q6_K_HIGH + 32 * (8 * h + p) + 4 * r + i] >> (2 * k)) & 3;
    i32::from(low | (high << 4))
}

/// Scale `s` (0..16) of row `r` of a Q6_K group block.
fn q6_k_scale(block: &[u8], r: usize, s: usize) -> f32 {
    f32::from(block[Q6_K_SCALES + 32 * (s / 4) + 4 * r + s % 4] as i8)
}

/// The reference `DotGroup` of Q6_K: per 16 weights (one scale), `acc = fma(Σ (q − 32)·a,
/// d·scale_s·scale, acc)`.
pub fn dot_q6_k_group(group: &[u8], tokens: &[&[ActivationBlock]], out: &mut [[f32; GROUP_ROWS]]) {
    assert_eq!(tokens.len(), out.len(), "one output per token");
    for (activations, out) in tokens.iter().zip(out.iter_mut()) {
        *out = [0.0; GROUP_ROWS];
        for (block, a) in group.chunks_exact(Q6_K_GROUP_BYTES).zip(activations.chunks_exact(8)) {
            for (r, acc) in out.iter_mut().enumerate() {
                let d = f16_at(block, 2 * r);
                for (quarter, a) in a.iter().enumerate() {
                    let (h, k) = (quarter / 4, quarter % 4);
                    for e in 0..2 {
                        let sum: i32 = (16 * e..16 * e + 16)
                            .map(|l| (q6_k_weight(block, r, h, k, l) - 32) * i32::from(a.values[l]))
                            .sum();
                        let scale = d * q6_k_scale(block, r, 8 * h + 2 * k + e);
                        *acc = (sum as f32).mul_add(scale * a.scale, *acc);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::Kernels;
    use crate::engine::kernels::tests::{Random, TYPES, random_activations, random_row};

    #[test]
    fn grouping_moves_every_byte_and_back() {
        let mut random = Random(3);
        for weight_type in TYPES {
            let (rows, columns) = (16, 512);
            let native: Vec<u8> =
                (0..rows).flat_map(|_| random_row(weight_type, columns, &mut random)).collect();
            let grouped = interleave(weight_type, native.clone(), rows, columns);
            assert_ne!(grouped, native);
            let mut row = vec![0; weight_type.row_bytes(columns).unwrap()];
            for index in 0..rows {
                native_row(weight_type, &grouped, index, columns, &mut row);
                assert_eq!(
                    row,
                    native[index * row.len()..(index + 1) * row.len()],
                    "{weight_type:?} row {index}"
                );
            }
        }
    }

    #[test]
    fn a_group_dot_is_the_dot_of_the_dequantized_rows() {
        let mut random = Random(11);
        for weight_type in TYPES {
            let dot = Kernels::scalar().group_dot(weight_type).unwrap();
            let (rows, columns) = (16, 512);
            let row_bytes = weight_type.row_bytes(columns).unwrap();
            let native: Vec<u8> =
                (0..rows).flat_map(|_| random_row(weight_type, columns, &mut random)).collect();
            let grouped = interleave(weight_type, native.clone(), rows, columns);
            let tokens: Vec<Vec<ActivationBlock>> =
                (0..3).map(|_| random_activations(columns, &mut random)).collect();
            let tokens: Vec<&[ActivationBlock]> = tokens.iter().map(Vec::as_slice).collect();
            let mut weights = vec![0.0; columns];
            for group in 0..rows / GROUP_ROWS {
                let mut out = vec![[0.0; GROUP_ROWS]; tokens.len()];
                dot(&grouped[group * row_bytes * GROUP_ROWS..][..row_bytes * GROUP_ROWS], &tokens, &mut out);
                for r in 0..GROUP_ROWS {
                    let row = group * GROUP_ROWS + r;
                    (weight_type.dequantize())(&native[row * row_bytes..(row + 1) * row_bytes], &mut weights);
                    for (t, (token, out)) in tokens.iter().zip(&out).enumerate() {
                        let products: Vec<f64> = token
                            .iter()
                            .flat_map(|a| a.values.iter().map(move |&q| f64::from(q) * f64::from(a.scale)))
                            .zip(&weights)
                            .map(|(x, &w)| x * f64::from(w))
                            .collect();
                        let expected: f64 = products.iter().sum();
                        // f32 sums of terms that cancel (Q6_K's scales make them large): the error
                        // bound scales with the terms' magnitudes, not the result's.
                        let magnitude: f64 = products.iter().map(|p| p.abs()).sum();
                        let got = f64::from(out[r]);
                        assert!(
                            (got - expected).abs() <= 1e-5 * (1.0 + magnitude),
                            "{weight_type:?} row {row} token {t}: {got} vs {expected} (terms {magnitude})"
                        );
                    }
                }
            }
        }
    }
}
