//! Every SIMD variant against its scalar twin on random blocks; the scalar kernels against
//! candle's own dequantization of the same bytes, so the block layouts are read as ggml writes
//! them.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::*;

/// Every quantized type, each kept as row groups when its height allows.
pub(super) const TYPES: [WeightType; 7] = [
    WeightType::Q4_0,
    WeightType::Q4_1,
    WeightType::Q5_0,
    WeightType::Q5_1,
    WeightType::Q8_0,
    WeightType::Q4K,
    WeightType::Q6K,
];

/// A small deterministic generator (no dependency on `rand`'s algorithms across versions), shared
/// by the tests of every kernel here.
pub(super) struct Random(pub(super) u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    pub(super) fn float(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
    }

    /// `len` values in `[-scale, scale)`.
    pub(super) fn floats(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.float() * scale).collect()
    }
}

/// Random bytes shaped as valid blocks: finite f16 scales and minimums, anything elsewhere.
pub(super) fn random_row(weight_type: WeightType, columns: usize, random: &mut Random) -> Vec<u8> {
    let (values, block_bytes) = weight_type.layout();
    let small_scale = |random: &mut Random| half::f16::from_f32(random.float() * 0.05).to_le_bytes();
    match weight_type {
        // d and dmin first, then anything.
        WeightType::Q4K => {
            return (0..columns / values)
                .flat_map(|_| {
                    let mut block = [small_scale(random), small_scale(random)].concat();
                    block.extend((4..block_bytes).map(|_| random.next() as u8));
                    block
                })
                .collect();
        }
        // Anything, then d last.
        WeightType::Q6K => {
            return (0..columns / values)
                .flat_map(|_| {
                    let mut block: Vec<u8> = (0..block_bytes - 2).map(|_| random.next() as u8).collect();
                    block.extend(small_scale(random));
                    block
                })
                .collect();
        }
        _ => {}
    }
    let scales = match weight_type {
        WeightType::Q4_1 | WeightType::Q5_1 => 2,
        _ => 1,
    };
    let mut row = Vec::new();
    for _ in 0..columns / BLOCK {
        let start = row.len();
        for _ in 0..scales {
            row.extend_from_slice(&half::f16::from_f32(random.float() * 0.05).to_le_bytes());
        }
        while row.len() < start + block_bytes {
            row.push(random.next() as u8);
        }
    }
    row
}

pub(super) fn random_activations(columns: usize, random: &mut Random) -> Vec<ActivationBlock> {
    let input: Vec<f32> = (0..columns).map(|_| random.float() * 3.0).collect();
    let mut blocks = vec![ActivationBlock::default(); columns / BLOCK];
    scalar::quantize_activations(&input, &mut blocks);
    blocks
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-4 * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn every_simd_variant_matches_the_scalar_kernels() {
    let reference = Kernels::scalar();
    let variants: Vec<Kernels> =
        [Variant::Avx2, Variant::Vnni].into_iter().filter_map(Kernels::variant).collect();
    if variants.is_empty() {
        eprintln!("no SIMD variant runs on this CPU: only the scalar kernels are in use");
    }
    let mut random = Random(7);
    for weight_type in TYPES {
        for columns in [32, 64, 576, 1536, 256, 2048] {
            if weight_type.row_bytes(columns).is_none() {
                continue;
            }
            for _ in 0..20 {
                let row = random_row(weight_type, columns, &mut random);
                let activations = random_activations(columns, &mut random);
                let expected = (reference.dot(weight_type).unwrap())(&row, &activations);
                for kernels in &variants {
                    let got = (kernels.dot(weight_type).unwrap())(&row, &activations);
                    assert!(
                        close(expected, got),
                        "{:?} {weight_type:?} × {columns}: {got} vs scalar {expected}",
                        kernels.variant
                    );
                }
            }
        }
    }
}

#[test]
fn row_group_kernels_equal_the_scalar_one_to_the_bit_in_any_batch() {
    let variants: Vec<Kernels> =
        [Variant::Scalar, Variant::Avx2, Variant::Vnni].into_iter().filter_map(Kernels::variant).collect();
    let mut random = Random(17);
    let shapes = [
        (WeightType::Q4_0, 640),
        (WeightType::Q4_1, 32),
        (WeightType::Q4_1, 576),
        (WeightType::Q5_0, 640),
        (WeightType::Q5_1, 96),
        (WeightType::Q5_0, 2048),
        (WeightType::Q8_0, 64),
        (WeightType::Q8_0, 640),
        (WeightType::Q4K, 256),
        (WeightType::Q4K, 2048),
        (WeightType::Q6K, 256),
        (WeightType::Q6K, 2048),
    ];
    for (weight_type, columns) in shapes {
        let reference = Kernels::scalar().group_dot(weight_type).unwrap();
        let native: Vec<u8> =
            (0..GROUP_ROWS).flat_map(|_| random_row(weight_type, columns, &mut random)).collect();
        let matrix = QuantizedMatrix::new(weight_type, GROUP_ROWS, columns, native).unwrap();
        assert!(matrix.grouped);
        let group = &matrix.bytes;
        let tokens: Vec<Vec<ActivationBlock>> =
            (0..9).map(|_| random_activations(columns, &mut random)).collect();
        let tokens: Vec<&[ActivationBlock]> = tokens.iter().map(Vec::as_slice).collect();
        let mut expected = vec![[0.0; GROUP_ROWS]; tokens.len()];
        reference(group, &tokens, &mut expected);
        for kernels in &variants {
            let dot = kernels.group_dot(weight_type).unwrap();
            for count in 1..=tokens.len() {
                let mut got = vec![[f32::NAN; GROUP_ROWS]; count];
                dot(group, &tokens[..count], &mut got);
                let bits = |rows: &[[f32; GROUP_ROWS]]| {
                    rows.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(
                    bits(&got),
                    bits(&expected[..count]),
                    "{:?} {weight_type:?} × {columns}, {count} tokens",
                    kernels.variant
                );
            }
        }
    }
}

#[test]
fn scalar_dots_equal_the_dot_of_the_dequantized_rows() {
    let mut random = Random(11);
    for weight_type in TYPES {
        let columns = 256;
        let row = random_row(weight_type, columns, &mut random);
        let activations = random_activations(columns, &mut random);
        let mut weights = vec![0.0; columns];
        (weight_type.dequantize())(&row, &mut weights);
        let expected: f32 = activations
            .iter()
            .flat_map(|block| block.values.iter().map(move |&q| f32::from(q) * block.scale))
            .zip(&weights)
            .map(|(a, w)| a * w)
            .sum();
        let got = (Kernels::scalar().dot(weight_type).unwrap())(&row, &activations);
        assert!(close(expected, got), "{weight_type:?}: {got} vs {expected}");
    }
}

#[test]
fn rows_dequantize_as_candle_does() {
    // 16 rows: Q5_0 is kept as row groups, and its rows read back from them.
    let (rows, columns) = (16, 512);
    let mut random = Random(3);
    let values: Vec<f32> = (0..rows * columns).map(|_| random.float()).collect();
    let tensor = Tensor::from_vec(values, (rows, columns), &Device::Cpu).unwrap();
    for (dtype, weight_type) in [
        (GgmlDType::Q4_0, WeightType::Q4_0),
        (GgmlDType::Q4_1, WeightType::Q4_1),
        (GgmlDType::Q5_0, WeightType::Q5_0),
        (GgmlDType::Q5_1, WeightType::Q5_1),
        (GgmlDType::Q8_0, WeightType::Q8_0),
        (GgmlDType::Q4K, WeightType::Q4K),
        (GgmlDType::Q6K, WeightType::Q6K),
        (GgmlDType::F16, WeightType::F16),
        (GgmlDType::F32, WeightType::F32),
    ] {
        let quantized = QTensor::quantize(&tensor, dtype).unwrap();
        let expected = quantized.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let bytes = quantized.data().unwrap().into_owned();
        let matrix = QuantizedMatrix::new(weight_type, rows, columns, bytes).unwrap();
        for (index, expected) in expected.iter().enumerate() {
            let mut row = vec![0.0; columns];
            assert!(matrix.dequantize_row(index, &mut row));
            assert_eq!(&row, expected, "{weight_type:?} row {index}");
        }
        assert!(!matrix.dequantize_row(rows, &mut vec![0.0; columns]));
    }
}

#[test]
fn matmul_over_threads_equals_row_by_row_dots() {
    let (rows, columns, tokens) = (200, 256, 3);
    let mut random = Random(5);
    let kernels = Kernels::detect();
    for weight_type in TYPES {
        let bytes: Vec<u8> = (0..rows).flat_map(|_| random_row(weight_type, columns, &mut random)).collect();
        let matrix = QuantizedMatrix::new(weight_type, rows, columns, bytes.clone()).unwrap();
        let input: Vec<f32> = (0..tokens * columns).map(|_| random.float()).collect();
        let mut out = vec![0.0; tokens * rows];
        matrix.matmul(&kernels, &input, &mut out);
        for token in 0..tokens {
            let mut activations = vec![ActivationBlock::default(); columns / BLOCK];
            scalar::quantize_activations(&input[token * columns..(token + 1) * columns], &mut activations);
            for row in 0..rows {
                let weights = &bytes[row * matrix.row_bytes..(row + 1) * matrix.row_bytes];
                let expected = (Kernels::scalar().dot(weight_type).unwrap())(weights, &activations);
                assert!(close(expected, out[token * rows + row]), "{weight_type:?} token {token} row {row}");
            }
        }
    }
}

#[test]
fn a_matrix_of_the_wrong_size_is_refused() {
    assert!(QuantizedMatrix::new(WeightType::Q4_1, 2, 32, vec![0; 39]).is_err());
    assert!(QuantizedMatrix::new(WeightType::Q4_1, 2, 48, vec![0; 60]).is_err());
    assert!(QuantizedMatrix::new(WeightType::Q4_1, 2, 32, vec![0; 40]).is_ok());
}

#[test]
fn fused_matmuls_equal_separate_ones() {
    let (columns, tokens) = (256, 2);
    let mut random = Random(9);
    let kernels = Kernels::detect();
    let matrix = |rows: usize, weight_type, random: &mut Random| {
        let bytes: Vec<u8> = (0..rows).flat_map(|_| random_row(weight_type, columns, random)).collect();
        QuantizedMatrix::new(weight_type, rows, columns, bytes).unwrap()
    };
    let matrices = [
        matrix(40, WeightType::Q4_1, &mut random),
        matrix(7, WeightType::Q8_0, &mut random),
        matrix(17, WeightType::Q5_0, &mut random),
        matrix(24, WeightType::Q5_0, &mut random),
        matrix(9, WeightType::Q4K, &mut random),
        matrix(5, WeightType::Q6K, &mut random),
    ];
    let input: Vec<f32> = (0..tokens * columns).map(|_| random.float()).collect();
    let total: usize = matrices.iter().map(QuantizedMatrix::rows).sum();
    let mut fused = vec![0.0; tokens * total];
    matmul_fused(&kernels, &matrices.iter().collect::<Vec<_>>(), &input, &mut fused);
    let mut column = 0;
    for matrix in &matrices {
        let mut alone = vec![0.0; tokens * matrix.rows()];
        matrix.matmul(&kernels, &input, &mut alone);
        for token in 0..tokens {
            let start = token * total + column;
            assert_eq!(
                &fused[start..start + matrix.rows()],
                &alone[token * matrix.rows()..(token + 1) * matrix.rows()]
            );
        }
        column += matrix.rows();
    }
}

#[test]
fn matmul_results_do_not_depend_on_the_thread_count() {
    let (columns, tokens) = (96, 3);
    let mut random = Random(13);
    let kernels = Kernels::detect();
    // Row counts that do not divide into chunks or threads evenly.
    let matrices: Vec<QuantizedMatrix> =
        [(37, WeightType::Q4_1), (250, WeightType::Q8_0), (5, WeightType::Q5_1), (40, WeightType::Q5_0)]
            .into_iter()
            .map(|(rows, weight_type)| {
                let bytes: Vec<u8> =
                    (0..rows).flat_map(|_| random_row(weight_type, columns, &mut random)).collect();
                QuantizedMatrix::new(weight_type, rows, columns, bytes).unwrap()
            })
            .collect();
    let matrices: Vec<&QuantizedMatrix> = matrices.iter().collect();
    let input: Vec<f32> = (0..tokens * columns).map(|_| random.float()).collect();
    let total: usize = matrices.iter().map(|matrix| matrix.rows()).sum();
    let mut alone = vec![0.0; tokens * total];
    matmul_fused_on(&ComputePool::new(1).unwrap(), &kernels, &matrices, &input, &mut alone);
    assert!(alone.iter().any(|&value| value != 0.0));
    for threads in 2..=5 {
        let pool = ComputePool::new(threads).unwrap();
        for _ in 0..20 {
            let mut out = vec![f32::NAN; tokens * total];
            matmul_fused_on(&pool, &kernels, &matrices, &input, &mut out);
            assert_eq!(out, alone, "{threads} threads");
        }
    }
}

#[test]
fn every_variant_quantizes_activations_as_the_scalar_code_does() {
    let mut random = Random(11);
    // Random values at several magnitudes, whole zero blocks, exact halves (round to even) and a
    // block whose largest value is negative.
    let mut input: Vec<f32> = (0..32 * 40).map(|i| random.float() * [1e-3, 1.0, 300.0][i / 32 % 3]).collect();
    input[32..64].fill(0.0);
    for (i, value) in input[64..96].iter_mut().enumerate() {
        *value = i as f32 - 15.5;
    }
    input[96..128].copy_from_slice(&[127.0, 0.5, 1.5, -2.5, -127.0].repeat(7)[..32]);
    input[128] = -1000.0;
    let mut expected = vec![ActivationBlock::default(); input.len() / BLOCK];
    scalar::quantize_activations(&input, &mut expected);
    for kernels in [Variant::Avx2, Variant::Vnni].into_iter().filter_map(Kernels::variant) {
        let mut blocks = vec![ActivationBlock::default(); expected.len()];
        (kernels.quantize)(&input, &mut blocks);
        assert_eq!(blocks, expected, "{:?}", kernels.variant);
    }
}

#[test]
fn a_prompt_is_quantized_across_threads_as_on_one() {
    let mut random = Random(12);
    let blocks = 5 * QUANTIZE_BLOCKS_PER_ITEM + 7;
    let input: Vec<f32> = (0..blocks * BLOCK).map(|_| random.float() * 4.0).collect();
    let mut expected = vec![ActivationBlock::default(); blocks];
    scalar::quantize_activations(&input, &mut expected);
    let kernels = Kernels::detect();
    for threads in [1, 2, 3] {
        let mut out = vec![ActivationBlock::default(); blocks];
        quantize_on(&ComputePool::new(threads).unwrap(), &kernels, &input, &mut out);
        assert_eq!(out, expected, "{threads} threads");
    }
}
