//! The decoder's weights as read from a GGUF file: linear layers that run on llmesh's own CPU
//! kernels (`engine::kernels`) in the file's encoding, or on candle's quantized matmul where those
//! do not apply (other devices, types without a kernel of ours); token embeddings looked up row by
//! row from the quantized table.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use candle_core::quantized::{QMatMul, gguf_file};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor, bail};

use crate::engine::kernels::activation::gated;
use crate::engine::kernels::{GatedActivation, Kernels, QuantizedMatrix, WeightType, matmul_fused};

/// Reads named tensors out of one GGUF file for one device.
pub struct WeightReader<'a, R> {
    content: &'a gguf_file::Content,
    reader: &'a mut R,
    device: Device,
    kernels: Kernels,
}

impl<'a, R: Read + Seek> WeightReader<'a, R> {
    pub fn new(content: &'a gguf_file::Content, reader: &'a mut R, device: &Device) -> Self {
        Self { content, reader, device: device.clone(), kernels: Kernels::detect() }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The rows of a matrix (its second GGUF dimension).
    pub fn rows(&self, name: &str) -> Result<usize> {
        match self.info(name)?.shape.dims() {
            &[rows, _] => Ok(rows),
            dims => bail!("{name}: a matrix expected, found dimensions {dims:?}"),
        }
    }

    fn info(&self, name: &str) -> Result<&'a gguf_file::TensorInfo> {
        match self.content.tensor_infos.get(name) {
            Some(info) => Ok(info),
            None => bail!("the file has no tensor {name}"),
        }
    }

    /// The tensor's bytes exactly as stored.
    fn raw(&mut self, name: &str) -> Result<Vec<u8>> {
        let info = self.info(name)?;
        let elements = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        if !elements.is_multiple_of(block) {
            bail!("{name}: {elements} values do not fill whole blocks of {block}");
        }
        let size = elements / block * info.ggml_dtype.type_size();
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        self.reader.seek(SeekFrom::Start(start))?;
        let mut bytes = vec![0u8; size];
        self.reader.read_exact(&mut bytes)?;
        Ok(bytes)
    }

    /// A matrix of ours when the tensor is a 2-D quantized type we read natively.
    fn native_matrix(&mut self, name: &str, need_dot: bool) -> Result<Option<Arc<QuantizedMatrix>>> {
        let info = self.info(name)?;
        let Some(weight_type) = WeightType::from_ggml(info.ggml_dtype) else { return Ok(None) };
        let &[rows, columns] = info.shape.dims() else { return Ok(None) };
        if (need_dot && !weight_type.has_dot_kernel()) || weight_type.row_bytes(columns).is_none() {
            return Ok(None);
        }
        let bytes = self.raw(name)?;
        let matrix = QuantizedMatrix::new(weight_type, rows, columns, bytes)
            .map_err(|error| candle_core::Error::Msg(format!("{name}: {error}")))?;
        Ok(Some(Arc::new(matrix)))
    }

    /// A weight matrix (`rows × columns`, applied as `x · Wᵀ`).
    pub fn linear(&mut self, name: &str) -> Result<Linear> {
        if self.device.is_cpu()
            && let Some(matrix) = self.native_matrix(name, true)?
        {
            return Ok(Linear::Native { matrix, kernels: self.kernels });
        }
        let tensor = self.content.tensor(&mut *self.reader, name, &self.device)?;
        Ok(Linear::Candle(QMatMul::from_qtensor(tensor)?))
    }

    /// A matrix that the file stores fused (phi3's `attn_qkv`, its gate|up `ffn_up`), as the
    /// linear layers of its consecutive row blocks of `parts` rows each. On our kernels the blocks
    /// are the file's own rows, untouched; elsewhere they are expanded to f32 once.
    pub fn linear_parts(&mut self, name: &str, parts: &[usize]) -> Result<Vec<Linear>> {
        let info = self.info(name)?;
        let &[rows, columns] = info.shape.dims() else { bail!("{name}: a matrix expected") };
        if parts.iter().sum::<usize>() != rows {
            bail!("{name}: {rows} rows cannot split into {parts:?}");
        }
        let weight_type = WeightType::from_ggml(info.ggml_dtype)
            .filter(|weight_type| self.device.is_cpu() && weight_type.has_dot_kernel());
        if let Some((weight_type, row_bytes)) =
            weight_type.and_then(|weight_type| Some((weight_type, weight_type.row_bytes(columns)?)))
        {
            let bytes = self.raw(name)?;
            let mut start = 0;
            let mut linears = Vec::with_capacity(parts.len());
            for &part in parts {
                let block = bytes[start * row_bytes..(start + part) * row_bytes].to_vec();
                let matrix = QuantizedMatrix::new(weight_type, part, columns, block)
                    .map_err(|error| candle_core::Error::Msg(format!("{name}: {error}")))?;
                linears.push(Linear::Native { matrix: Arc::new(matrix), kernels: self.kernels });
                start += part;
            }
            return Ok(linears);
        }
        let whole = self.content.tensor(&mut *self.reader, name, &self.device)?.dequantize(&self.device)?;
        let mut start = 0;
        let mut linears = Vec::with_capacity(parts.len());
        for &part in parts {
            linears.push(Linear::Candle(QMatMul::Tensor(whole.narrow(0, start, part)?.contiguous()?)));
            start += part;
        }
        Ok(linears)
    }

    /// A vector (norm weights) as f32 on the device.
    pub fn vector(&mut self, name: &str) -> Result<Tensor> {
        self.content
            .tensor(&mut *self.reader, name, &self.device)?
            .dequantize(&self.device)?
            .to_dtype(DType::F32)
    }

    /// The token table, and the output layer made from the same tensor when the file ties them
    /// (no `output_name` tensor). The table stays quantized on the host wherever its type has a
    /// row reader; else it is expanded to f32 on the device, as candle does.
    pub fn embeddings(&mut self, table_name: &str, output_name: &str) -> Result<(TokenEmbedding, Linear)> {
        let table_info = self.info(table_name)?;
        let tied = !self.contains(output_name);
        let rows = match self.native_matrix(table_name, false)? {
            Some(matrix) => TokenEmbedding::Rows { matrix, device: self.device.clone() },
            None => {
                let table = self.content.tensor(&mut *self.reader, table_name, &self.device)?;
                let columns = table_info.shape.dims().last().copied().unwrap_or(0);
                TokenEmbedding::Table { table: table.dequantize(&self.device)?, columns }
            }
        };
        let output = match (&rows, tied) {
            (_, false) => self.linear(output_name)?,
            (TokenEmbedding::Rows { matrix, .. }, true)
                if self.device.is_cpu() && matrix.weight_type().has_dot_kernel() =>
            {
                Linear::Native { matrix: matrix.clone(), kernels: self.kernels }
            }
            (_, true) => self.linear(table_name)?,
        };
        Ok((rows, output))
    }
}

/// A linear layer without bias: `y = x · Wᵀ` over the last dimension of `x`.
#[derive(Clone)]
pub enum Linear {
    /// llmesh's kernels on the raw GGUF blocks (CPU only).
    Native { matrix: Arc<QuantizedMatrix>, kernels: Kernels },
    /// candle's quantized matmul: any device, any type.
    Candle(QMatMul),
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Native { matrix, kernels } => {
                x.contiguous()?.apply_op1_no_bwd(&NativeMatMul { matrices: &[&**matrix], kernels: *kernels })
            }
            Self::Candle(matmul) => matmul.forward(x),
        }
    }

    /// `linears` applied to the same `x`, as one op when they all run on our kernels (the input
    /// quantized once, one dispatch to the threads), else one after the other.
    pub fn forward_fused(linears: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let natives: Option<Vec<(&QuantizedMatrix, Kernels)>> = linears
            .iter()
            .map(|linear| match linear {
                Self::Native { matrix, kernels } => Some((&**matrix, *kernels)),
                Self::Candle(_) => None,
            })
            .collect();
        let Some(natives) = natives.filter(|natives| natives.len() > 1) else {
            return linears.iter().map(|linear| linear.forward(x)).collect();
        };
        let kernels = natives[0].1;
        let matrices: Vec<&QuantizedMatrix> = natives.iter().map(|(matrix, _)| *matrix).collect();
        let fused = x.contiguous()?.apply_op1_no_bwd(&NativeMatMul { matrices: &matrices, kernels })?;
        let last = fused.rank() - 1;
        let mut start = 0;
        let mut outputs = Vec::with_capacity(matrices.len());
        for matrix in &matrices {
            outputs.push(fused.narrow(last, start, matrix.rows())?);
            start += matrix.rows();
        }
        Ok(outputs)
    }

    /// The gated feed-forward's first half, `act(x · gateᵀ) · (x · upᵀ)`. On our kernels the two
    /// projections run as one fused matmul and the activation reads their joint output in one
    /// pass; elsewhere candle's ops.
    pub fn forward_gated(
        gate: &Linear,
        up: &Linear,
        activation: GatedActivation,
        x: &Tensor,
    ) -> Result<Tensor> {
        if let (Self::Native { matrix: gate_matrix, kernels }, Self::Native { matrix: up_matrix, .. }) =
            (gate, up)
            && gate_matrix.rows() == up_matrix.rows()
        {
            let matrices = [&**gate_matrix, &**up_matrix];
            let fused =
                x.contiguous()?.apply_op1_no_bwd(&NativeMatMul { matrices: &matrices, kernels: *kernels })?;
            return fused.apply_op1_no_bwd(&GatedOp(activation));
        }
        let [gate, up]: [Tensor; 2] = Self::forward_fused(&[gate, up], x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("two projections expected".into()))?;
        let gate = match activation {
            GatedActivation::Silu => candle_nn::ops::silu(&gate)?,
            GatedActivation::GeluTanh => gate.gelu()?,
        };
        gate * up
    }

    /// Whether the layer runs on llmesh's kernels (for logs and tests).
    pub fn is_native(&self) -> bool {
        matches!(self, Self::Native { .. })
    }
}

/// Our matmul (of one matrix, or several fused) as a candle op, so the decoder's tensors stay
/// candle tensors on every device.
struct NativeMatMul<'a> {
    matrices: &'a [&'a QuantizedMatrix],
    kernels: Kernels,
}

impl CustomOp1 for NativeMatMul<'_> {
    fn name(&self) -> &'static str {
        "llmesh-quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { bail!("{}: the input must be f32", self.name()) };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("{}: the input must be contiguous", self.name())
        };
        let columns = self.matrices.first().map_or(0, |matrix| matrix.columns());
        if self.matrices.iter().any(|matrix| matrix.columns() != columns) {
            bail!("{}: fused matrices of different widths", self.name());
        }
        let rows: usize = self.matrices.iter().map(|matrix| matrix.rows()).sum();
        let mut dims = layout.shape().dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == columns && columns > 0 => *last = rows,
            _ => bail!("{}: input {:?} against {columns} columns", self.name(), layout.shape()),
        }
        let input = &data[start..end];
        let mut out = vec![0.0f32; input.len() / columns * rows];
        matmul_fused(&self.kernels, self.matrices, input, &mut out);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `activation::gated` as a candle op on a fused gate|up output (CPU only, like `NativeMatMul`).
struct GatedOp(GatedActivation);

impl CustomOp1 for GatedOp {
    fn name(&self) -> &'static str {
        "llmesh-gated-activation"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { bail!("{}: the input must be f32", self.name()) };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("{}: the input must be contiguous", self.name())
        };
        let mut dims = layout.shape().dims().to_vec();
        let width = match dims.last_mut() {
            Some(last) if *last > 0 && last.is_multiple_of(2) => {
                *last /= 2;
                *last
            }
            _ => bail!("{}: input {:?} is not gate|up pairs", self.name(), layout.shape()),
        };
        let fused = &data[start..end];
        let mut out = vec![0.0f32; fused.len() / 2];
        gated(self.0, fused, width, &mut out);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// The token embedding table.
pub enum TokenEmbedding {
    /// Quantized on the host; the rows asked for are expanded and sent to the device.
    Rows { matrix: Arc<QuantizedMatrix>, device: Device },
    /// Expanded to f32 on the device (types without a row reader here).
    Table { table: Tensor, columns: usize },
}

impl TokenEmbedding {
    /// Values per token.
    pub fn columns(&self) -> usize {
        match self {
            Self::Rows { matrix, .. } => matrix.columns(),
            Self::Table { columns, .. } => *columns,
        }
    }

    /// `tokens.len() × hidden` f32 embeddings. A token outside the vocabulary is an error.
    pub fn forward(&self, tokens: &[u32]) -> Result<Tensor> {
        match self {
            Self::Rows { matrix, device } => {
                let columns = matrix.columns();
                let mut values = vec![0.0f32; tokens.len() * columns];
                for (&token, out) in tokens.iter().zip(values.chunks_exact_mut(columns)) {
                    if !matrix.dequantize_row(token as usize, out) {
                        bail!("token {token} is outside the vocabulary of {}", matrix.rows());
                    }
                }
                Tensor::from_vec(values, (tokens.len(), columns), device)
            }
            Self::Table { table, columns } => {
                let vocabulary = table.dim(0)?;
                if let Some(token) = tokens.iter().find(|&&token| token as usize >= vocabulary) {
                    bail!("token {token} is outside the vocabulary of {vocabulary}");
                }
                let ids = Tensor::new(tokens, table.device())?;
                table.index_select(&ids, 0)?.reshape((tokens.len(), *columns))
            }
        }
    }
}
