//! Re-encoding weight types that candle's CPU kernels have no SIMD path for (Q4_1, Q5_0, Q5_1)
//! as Q8_0, which has one. Q8_0 is finer than any of them, so the model's answers barely move,
//! while prompt and decode speed roughly double; weights of those types take about twice the
//! memory.

use std::io::Cursor;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Result};

/// The file's tensors with slow types re-encoded, as a GGUF in memory; `None` when nothing needs
/// it (then load from the file as it is).
pub fn requantize_slow_types<R: std::io::Read + std::io::Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
) -> Result<Option<(gguf_file::Content, Cursor<Vec<u8>>)>> {
    let slow = |info: &gguf_file::TensorInfo| {
        matches!(info.ggml_dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
            && info.shape.dims().last().is_some_and(|columns| columns % 32 == 0)
    };
    if !content.tensor_infos.values().any(slow) {
        return Ok(None);
    }
    let mut tensors = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let tensor = content.tensor(reader, name, &Device::Cpu)?;
        let tensor = if slow(info) {
            QTensor::quantize(&tensor.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?
        } else {
            tensor
        };
        tensors.push((name.as_str(), tensor));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> =
        content.metadata.iter().map(|(key, value)| (key.as_str(), value)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(name, tensor)| (*name, tensor)).collect();
    let mut buffer = Cursor::new(Vec::new());
    gguf_file::write(&mut buffer, &metadata, &tensor_refs)?;
    buffer.set_position(0);
    let content = gguf_file::Content::read(&mut buffer)?;
    Ok(Some((content, buffer)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn q4_1_becomes_q8_0_with_nearly_the_same_values() {
        let values: Vec<f32> = (0..64 * 32).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let original = Tensor::from_vec(values, (64, 32), &Device::Cpu).unwrap();
        let q4_1 = QTensor::quantize(&original, GgmlDType::Q4_1).unwrap();
        let small = QTensor::quantize(
            &Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let mut file = Cursor::new(Vec::new());
        let name = gguf_file::Value::String("test".into());
        gguf_file::write(&mut file, &[("general.name", &name)], &[("w", &q4_1), ("norm", &small)]).unwrap();
        file.set_position(0);
        let content = gguf_file::Content::read(&mut file).unwrap();

        let (content, mut buffer) = requantize_slow_types(&content, &mut file).unwrap().expect("re-encoded");
        let converted = content.tensor(&mut buffer, "w", &Device::Cpu).unwrap();
        assert_eq!(converted.dtype(), GgmlDType::Q8_0);
        assert_eq!(content.tensor(&mut buffer, "norm", &Device::Cpu).unwrap().dtype(), GgmlDType::F32);
        assert!(content.metadata.contains_key("general.name"));
        let before = q4_1.dequantize(&Device::Cpu).unwrap();
        let after = converted.dequantize(&Device::Cpu).unwrap();
        let error = (before - after).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(error < 0.01, "max error {error}");
    }
}
