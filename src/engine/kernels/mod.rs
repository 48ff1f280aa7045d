//! CPU matrix-vector kernels on GGUF weights in their native encoding (Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0, and the k-quants Q4_K and Q6_K): nothing is re-encoded at load, the raw block bytes are
//! the weights.
//!
//! Laid out as ggml-cpu is: `scalar.rs` holds the reference kernel of every type, `x86.rs` the
//! SIMD variants beside them; `Kernels::detect` picks the best variant this CPU runs, once, at
//! run time (never from compile-time target features), and tests hold every variant to its
//! scalar twin. A matmul quantizes its input once to 8-bit activation blocks, then splits the
//! weight rows (in groups of eight, `row_groups.rs`, each against four tokens at a time)
//! across the engine's compute pool (`pool.rs`: persistent workers that park when
//! idle, the calling thread taking part) in one dispatch. `candle_pools.rs` sizes candle's own
//! pools, which run the rest of a forward pass, so that they do not fight this one.
//! `attention.rs` is attention over one sequence's KV cache, on the same pool. `row_groups.rs`
//! keeps matrices whose height is a multiple of eight as groups of eight interleaved rows, run
//! by eight-row kernels; the one-row kernels serve other heights.

pub mod activation;
pub mod attention;
pub mod candle_pools;
mod k_quants;
pub mod pool;
pub mod row_groups;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::cell::RefCell;
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;

pub use activation::GatedActivation;
pub use pool::ComputePool;
use row_groups::{DotGroup, GROUP_ROWS};
use scalar::DotRow;
pub use scalar::{ActivationBlock, BLOCK};

/// A GGUF weight type this module reads rows of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q6K,
}

impl WeightType {
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::F32 => Self::F32,
            GgmlDType::F16 => Self::F16,
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    /// Values per block and bytes per block.
    fn layout(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 => (1, 2),
            Self::Q4_0 => (BLOCK, 18),
            Self::Q4_1 => (BLOCK, 20),
            Self::Q5_0 => (BLOCK, 22),
            Self::Q5_1 => (BLOCK, 24),
            Self::Q8_0 => (BLOCK, 34),
            Self::Q4K => (k_quants::SUPER_BLOCK, k_quants::Q4_K_BYTES),
            Self::Q6K => (k_quants::SUPER_BLOCK, k_quants::Q6_K_BYTES),
        }
    }

    /// Bytes of one row of `columns` values; `None` unless `columns` fills whole blocks.
    pub fn row_bytes(self, columns: usize) -> Option<usize> {
        let (values, bytes) = self.layout();
        columns.is_multiple_of(values).then_some(columns / values * bytes)
    }

    /// Whether matmuls of this type run here (the float types are left to candle).
    pub fn has_dot_kernel(self) -> bool {
        !matches!(self, Self::F32 | Self::F16)
    }

    fn dequantize(self) -> fn(&[u8], &mut [f32]) {
        match self {
            Self::F32 => scalar::dequantize_f32,
            Self::F16 => scalar::dequantize_f16,
            Self::Q4_0 => scalar::dequantize_q4_0,
            Self::Q4_1 => scalar::dequantize_q4_1,
            Self::Q5_0 => scalar::dequantize_q5_0,
            Self::Q5_1 => scalar::dequantize_q5_1,
            Self::Q8_0 => scalar::dequantize_q8_0,
            Self::Q4K => k_quants::dequantize_q4_k,
            Self::Q6K => k_quants::dequantize_q6_k,
        }
    }
}

/// Which implementation of the dot products runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Scalar,
    Avx2,
    Vnni,
}

/// The dot product of every type, for one variant.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub variant: Variant,
    q4_0: DotRow,
    q4_1: DotRow,
    q5_0: DotRow,
    q5_1: DotRow,
    q8_0: DotRow,
    q4_k: DotRow,
    q6_k: DotRow,
    /// Eight rows at once, for the types stored as row groups (`row_groups`).
    q4_0_group: DotGroup,
    q4_1_group: DotGroup,
    q5_0_group: DotGroup,
    q5_1_group: DotGroup,
    q8_0_group: DotGroup,
    q4_k_group: DotGroup,
    q6_k_group: DotGroup,
    quantize: Quantize,
}

/// Quantize a row of activations (a multiple of 32 long) to 8-bit blocks.
type Quantize = fn(input: &[f32], out: &mut [ActivationBlock]);

impl Kernels {
    pub fn scalar() -> Self {
        Self {
            variant: Variant::Scalar,
            q4_0: scalar::dot_q4_0,
            q4_1: scalar::dot_q4_1,
            q5_0: scalar::dot_q5_0,
            q5_1: scalar::dot_q5_1,
            q8_0: scalar::dot_q8_0,
            q4_k: k_quants::dot_q4_k,
            q6_k: k_quants::dot_q6_k,
            q4_0_group: |g, t, o| row_groups::Q4_0.dot(g, t, o),
            q4_1_group: |g, t, o| row_groups::Q4_1.dot(g, t, o),
            q5_0_group: |g, t, o| row_groups::Q5_0.dot(g, t, o),
            q5_1_group: |g, t, o| row_groups::Q5_1.dot(g, t, o),
            q8_0_group: row_groups::dot_q8_0_group,
            q4_k_group: row_groups::dot_q4_k_group,
            q6_k_group: row_groups::dot_q6_k_group,
            quantize: scalar::quantize_activations,
        }
    }

    /// A variant, or `None` when this CPU cannot run it.
    pub fn variant(variant: Variant) -> Option<Self> {
        match variant {
            Variant::Scalar => Some(Self::scalar()),
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 if x86::avx2::available() => Some(Self {
                variant,
                // SAFETY (each closure): `available()` confirmed the CPU has the features.
                q4_0: |r, a| unsafe { x86::avx2::dot_q4_0(r, a) },
                q4_1: |r, a| unsafe { x86::avx2::dot_q4_1(r, a) },
                q5_0: |r, a| unsafe { x86::avx2::dot_q5_0(r, a) },
                q5_1: |r, a| unsafe { x86::avx2::dot_q5_1(r, a) },
                q8_0: |r, a| unsafe { x86::avx2::dot_q8_0(r, a) },
                q4_k: |r, a| unsafe { x86::avx2::dot_q4_k(r, a) },
                q6_k: |r, a| unsafe { x86::avx2::dot_q6_k(r, a) },
                q4_0_group: |g, t, o| unsafe { x86::avx2::dot_q4_0_group(g, t, o) },
                q4_1_group: |g, t, o| unsafe { x86::avx2::dot_q4_1_group(g, t, o) },
                q5_0_group: |g, t, o| unsafe { x86::avx2::dot_q5_0_group(g, t, o) },
                q5_1_group: |g, t, o| unsafe { x86::avx2::dot_q5_1_group(g, t, o) },
                q8_0_group: |g, t, o| unsafe { x86::avx2::dot_q8_0_group(g, t, o) },
                q4_k_group: |g, t, o| unsafe { x86::avx2::dot_q4_k_group(g, t, o) },
                q6_k_group: |g, t, o| unsafe { x86::avx2::dot_q6_k_group(g, t, o) },
                quantize: |i, o| unsafe { x86::quantize_activations(i, o) },
            }),
            #[cfg(target_arch = "x86_64")]
            Variant::Vnni if x86::vnni::available() => Some(Self {
                variant,
                // SAFETY (each closure): as above.
                q4_0: |r, a| unsafe { x86::vnni::dot_q4_0(r, a) },
                q4_1: |r, a| unsafe { x86::vnni::dot_q4_1(r, a) },
                q5_0: |r, a| unsafe { x86::vnni::dot_q5_0(r, a) },
                q5_1: |r, a| unsafe { x86::vnni::dot_q5_1(r, a) },
                q8_0: |r, a| unsafe { x86::vnni::dot_q8_0(r, a) },
                q4_k: |r, a| unsafe { x86::vnni::dot_q4_k(r, a) },
                q6_k: |r, a| unsafe { x86::vnni::dot_q6_k(r, a) },
                q4_0_group: |g, t, o| unsafe { x86::vnni::dot_q4_0_group(g, t, o) },
                q4_1_group: |g, t, o| unsafe { x86::vnni::dot_q4_1_group(g, t, o) },
                q5_0_group: |g, t, o| unsafe { x86::vnni::dot_q5_0_group(g, t, o) },
                q5_1_group: |g, t, o| unsafe { x86::vnni::dot_q5_1_group(g, t, o) },
                q8_0_group: |g, t, o| unsafe { x86::vnni::dot_q8_0_group(g, t, o) },
                q4_k_group: |g, t, o| unsafe { x86::vnni::dot_q4_k_group(g, t, o) },
                q6_k_group: |g, t, o| unsafe { x86::vnni::dot_q6_k_group(g, t, o) },
                quantize: |i, o| unsafe { x86::quantize_activations(i, o) },
            }),
            _ => None,
        }
    }

    /// The fastest variant this CPU runs. `LLMESH_KERNELS=scalar|avx2|vnni` asks for one (for
    /// measuring); one the CPU lacks falls back to detection.
    pub fn detect() -> Self {
        static DETECTED: OnceLock<Kernels> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let requested = match std::env::var("LLMESH_KERNELS").as_deref() {
                Ok("scalar") => Some(Variant::Scalar),
                Ok("avx2") => Some(Variant::Avx2),
                Ok("vnni") => Some(Variant::Vnni),
                _ => None,
            };
            let kernels = requested
                .and_then(Self::variant)
                .or_else(|| Self::variant(Variant::Vnni))
                .or_else(|| Self::variant(Variant::Avx2))
                .unwrap_or_else(Self::scalar);
            tracing::debug!(variant = ?kernels.variant, "CPU kernels");
            kernels
        })
    }

    pub fn dot(&self, weight_type: WeightType) -> Option<DotRow> {
        match weight_type {
            WeightType::Q4_0 => Some(self.q4_0),
            WeightType::Q4_1 => Some(self.q4_1),
            WeightType::Q5_0 => Some(self.q5_0),
            WeightType::Q5_1 => Some(self.q5_1),
            WeightType::Q8_0 => Some(self.q8_0),
            WeightType::Q4K => Some(self.q4_k),
            WeightType::Q6K => Some(self.q6_k),
            WeightType::F32 | WeightType::F16 => None,
        }
    }

    /// The eight-row kernel of a type stored as row groups (`WeightType::in_row_groups`).
    pub fn group_dot(&self, weight_type: WeightType) -> Option<DotGroup> {
        match weight_type {
            WeightType::Q4_0 => Some(self.q4_0_group),
            WeightType::Q4_1 => Some(self.q4_1_group),
            WeightType::Q5_0 => Some(self.q5_0_group),
            WeightType::Q5_1 => Some(self.q5_1_group),
            WeightType::Q8_0 => Some(self.q8_0_group),
            WeightType::Q4K => Some(self.q4_k_group),
            WeightType::Q6K => Some(self.q6_k_group),
            _ => None,
        }
    }
}

impl WeightType {
    /// Whether a matrix of this type and height is kept as row groups (`row_groups`).
    fn in_row_groups(self, rows: usize) -> bool {
        self.has_dot_kernel() && rows.is_multiple_of(GROUP_ROWS)
    }
}

/// A weight matrix of GGUF blocks: `rows` rows of `columns` values, row after row of blocks as the
/// file stores them, or (`grouped`) as row groups of eight (`row_groups`).
pub struct QuantizedMatrix {
    weight_type: WeightType,
    rows: usize,
    columns: usize,
    row_bytes: usize,
    grouped: bool,
    bytes: Vec<u8>,
}

/// Rows handed to a thread at a time: small enough to balance two to sixteen threads on the
/// smallest matrices (192 rows), large enough that the per-chunk cost vanishes.
const ROWS_PER_CHUNK: usize = 16;
const _: () = assert!(ROWS_PER_CHUNK.is_multiple_of(GROUP_ROWS), "a chunk is whole row groups");

thread_local! {
    static ACTIVATIONS: RefCell<Vec<ActivationBlock>> = const { RefCell::new(Vec::new()) };
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("a {rows}x{columns} {weight_type:?} matrix needs {expected} bytes, got {got}")]
    WrongSize { weight_type: WeightType, rows: usize, columns: usize, expected: usize, got: usize },
    #[error("{0:?} rows of {1} values do not fill whole blocks")]
    PartialBlock(WeightType, usize),
}

impl QuantizedMatrix {
    pub fn new(
        weight_type: WeightType,
        rows: usize,
        columns: usize,
        bytes: Vec<u8>,
    ) -> Result<Self, KernelError> {
        let row_bytes =
            weight_type.row_bytes(columns).ok_or(KernelError::PartialBlock(weight_type, columns))?;
        if bytes.len() != rows * row_bytes {
            return Err(KernelError::WrongSize {
                weight_type,
                rows,
                columns,
                expected: rows * row_bytes,
                got: bytes.len(),
            });
        }
        let grouped = weight_type.in_row_groups(rows);
        let bytes = if grouped { row_groups::interleave(weight_type, bytes, rows, columns) } else { bytes };
        Ok(Self { weight_type, rows, columns, row_bytes, grouped, bytes })
    }

    pub fn weight_type(&self) -> WeightType {
        self.weight_type
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Row `index` as f32 values into `out` (`columns` long); false when out of range.
    pub fn dequantize_row(&self, index: usize, out: &mut [f32]) -> bool {
        if index >= self.rows || out.len() != self.columns {
            return false;
        }
        if self.grouped {
            let mut row = vec![0; self.row_bytes];
            row_groups::native_row(self.weight_type, &self.bytes, index, self.columns, &mut row);
            (self.weight_type.dequantize())(&row, out);
        } else {
            let row = &self.bytes[index * self.row_bytes..(index + 1) * self.row_bytes];
            (self.weight_type.dequantize())(row, out);
        }
        true
    }

    /// `out[t][r] = Σ_c input[t][c] · self[r][c]` for `tokens` rows of input (`tokens × columns`,
    /// row-major) into `out` (`tokens × rows`). Panics on a type without a dot kernel (see
    /// `has_dot_kernel`) or on lengths that do not fit.
    pub fn matmul(&self, kernels: &Kernels, input: &[f32], out: &mut [f32]) {
        matmul_fused(kernels, &[self], input, out);
    }
}

/// Several matrices over the same input (query, key and value; gate and up) in one go: the input
/// is quantized once and the rows of all of them are split across the threads in one dispatch.
/// `out` is `tokens × Σ rows`, each token's row holding the first matrix's outputs, then the
/// second's, and so on. Every matrix must have the input's width and a dot kernel.
pub fn matmul_fused(kernels: &Kernels, matrices: &[&QuantizedMatrix], input: &[f32], out: &mut [f32]) {
    matmul_fused_on(pool::global(), kernels, matrices, input, out);
}

/// `matmul_fused` on a given pool.
fn matmul_fused_on(
    pool: &ComputePool,
    kernels: &Kernels,
    matrices: &[&QuantizedMatrix],
    input: &[f32],
    out: &mut [f32],
) {
    let Some(first) = matrices.first() else { return };
    let columns = first.columns;
    assert!(matrices.iter().all(|matrix| matrix.columns == columns), "matrices of different widths");
    let dots: Vec<DotRow> = matrices
        .iter()
        .map(|matrix| kernels.dot(matrix.weight_type).expect("matmul on a type without a dot kernel"))
        .collect();
    let group_dots: Vec<Option<DotGroup>> = matrices
        .iter()
        .map(|matrix| matrix.grouped.then(|| kernels.group_dot(matrix.weight_type).expect("a group kernel")))
        .collect();
    assert_eq!(input.len() % columns, 0, "input is not whole rows");
    let tokens = input.len() / columns;
    let total_rows: usize = matrices.iter().map(|matrix| matrix.rows).sum();
    assert_eq!(out.len(), tokens * total_rows, "output size");
    // Work item i covers rows [ROWS_PER_CHUNK·(i - first_chunk[m]), …) of matrix m.
    let mut first_chunk = Vec::with_capacity(matrices.len() + 1);
    let mut first_column = Vec::with_capacity(matrices.len());
    let (mut chunks, mut column) = (0, 0);
    for matrix in matrices {
        first_chunk.push(chunks);
        first_column.push(column);
        chunks += matrix.rows.div_ceil(ROWS_PER_CHUNK);
        column += matrix.rows;
    }
    first_chunk.push(chunks);
    let blocks = columns / BLOCK;
    ACTIVATIONS.with(|scratch| {
        let mut activations = scratch.borrow_mut();
        activations.resize(tokens * blocks, ActivationBlock::default());
        quantize_on(pool, kernels, input, &mut activations);
        let activations: &[ActivationBlock] = &activations;
        let out_address = out.as_mut_ptr() as usize;
        pool.run(chunks, |range| {
            for chunk in range {
                let which = first_chunk.partition_point(|&start| start <= chunk) - 1;
                let (matrix, dot) = (matrices[which], dots[which]);
                let first_row = (chunk - first_chunk[which]) * ROWS_PER_CHUNK;
                let token_blocks = |token: usize| &activations[token * blocks..(token + 1) * blocks];
                // Values of consecutive rows of one token, from `row` on.
                let write = |token: usize, row: usize, values: &[f32]| {
                    let at = token * total_rows + first_column[which] + row;
                    assert!(row + values.len() <= matrix.rows && token < tokens, "write out of bounds");
                    // SAFETY: `out` holds tokens × total_rows values (asserted above) and
                    // outlives this call, and the rows are the matrix's (asserted here); each
                    // (token, row) is written by exactly one chunk, so no two threads write the
                    // same element.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            values.as_ptr(),
                            (out_address as *mut f32).add(at),
                            values.len(),
                        )
                    };
                };
                let rows = first_row..matrix.rows.min(first_row + ROWS_PER_CHUNK);
                if let Some(group_dot) = group_dots[which] {
                    // Four tokens at a time against every group of the chunk, rather than every
                    // token against one group: the chunk's rows (a few KiB) and four tokens'
                    // blocks stay in L1 while a prompt's activations (100 KiB and more) are read
                    // once per chunk, not once per group.
                    let group_bytes = GROUP_ROWS * matrix.row_bytes;
                    let mut results = [[0.0; GROUP_ROWS]; 4];
                    for first in (0..tokens).step_by(4) {
                        let count = (tokens - first).min(4);
                        let group: [&[ActivationBlock]; 4] =
                            std::array::from_fn(|t| token_blocks((first + t).min(tokens - 1)));
                        for start in rows.clone().step_by(GROUP_ROWS) {
                            let weights = &matrix.bytes[start * matrix.row_bytes..][..group_bytes];
                            group_dot(weights, &group[..count], &mut results[..count]);
                            for (t, values) in results[..count].iter().enumerate() {
                                write(first + t, start, values);
                            }
                        }
                    }
                    continue;
                }
                let weights =
                    |row: usize| &matrix.bytes[row * matrix.row_bytes..(row + 1) * matrix.row_bytes];
                // A matrix whose height is not a multiple of eight, row by row.
                for token in 0..tokens {
                    for row in rows.clone() {
                        write(token, row, &[dot(weights(row), token_blocks(token))]);
                    }
                }
            }
        });
    });
}

/// Activation blocks quantized per work item: a prompt's rows are split across the pool, one
/// token's (at most a few hundred blocks) is quantized on the caller alone.
const QUANTIZE_BLOCKS_PER_ITEM: usize = 256;

/// Quantize `input` into `out` (one block per 32 values) on `pool`.
fn quantize_on(pool: &ComputePool, kernels: &Kernels, input: &[f32], out: &mut [ActivationBlock]) {
    let blocks = out.len();
    assert_eq!(input.len(), blocks * BLOCK, "input and blocks differ in length");
    if blocks < 2 * QUANTIZE_BLOCKS_PER_ITEM {
        return (kernels.quantize)(input, out);
    }
    let out_address = out.as_mut_ptr() as usize;
    pool.run(blocks.div_ceil(QUANTIZE_BLOCKS_PER_ITEM), |items| {
        let start = items.start * QUANTIZE_BLOCKS_PER_ITEM;
        let end = (items.end * QUANTIZE_BLOCKS_PER_ITEM).min(blocks);
        // SAFETY: `out` holds `blocks` blocks and outlives this call; the pool hands out disjoint
        // item ranges, so no two threads touch the same block.
        let out = unsafe {
            std::slice::from_raw_parts_mut((out_address as *mut ActivationBlock).add(start), end - start)
        };
        (kernels.quantize)(&input[start * BLOCK..end * BLOCK], out);
    });
}

#[cfg(test)]
mod tests;
