//! Causal language models read from GGUF files, one file per architecture.
//!
//! An architecture turns GGUF tensors into shared weights (`LanguageModel`); each generation gets
//! its own `Sequence` holding its KV cache, so many sequences share one copy of the weights. To add
//! an architecture (qwen2, phi3, ...), add a file with a `load` function and one arm in
//! `load_language_model`.

mod gemma3;
mod llama;
mod requantize;

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use super::EngineError;

/// Weights shared by every generation of one model.
pub trait LanguageModel: Send + Sync {
    /// A fresh sequence with an empty KV cache.
    fn new_sequence(&self) -> Box<dyn Sequence>;
}

/// One generation's view of a model: the weights plus its own KV cache.
pub trait Sequence: Send {
    /// Run `tokens`, the first of which sits at `position`, and return the logits that predict the
    /// token after the last one (a rank-1 tensor over the vocabulary).
    fn forward(&mut self, tokens: &[u32], position: usize) -> candle_core::Result<Tensor>;
}

/// A language model with what the engine needs to know about its file.
pub struct LoadedLanguageModel {
    pub model: Box<dyn LanguageModel>,
    pub metadata: std::collections::HashMap<String, gguf_file::Value>,
    pub architecture: String,
    pub quantization: String,
    /// The smaller of what the file declares and what the implementation supports.
    pub context_length: usize,
}

pub fn load_language_model(path: &Path, device: &Device) -> Result<LoadedLanguageModel, EngineError> {
    let load_error = |error: &dyn std::fmt::Display| {
        EngineError::Inference(format!("cannot load {}: {error}", path.display()))
    };
    let mut file = File::open(path).map_err(|e| load_error(&e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| load_error(&e))?;
    let architecture = match content.metadata.get("general.architecture") {
        Some(gguf_file::Value::String(name)) => name.clone(),
        _ => return Err(load_error(&"no general.architecture in its metadata")),
    };
    let declared_context = content
        .metadata
        .get(&format!("{architecture}.context_length"))
        .and_then(|value| value.to_u64().ok())
        .map(|length| length as usize);
    let quantization = quantization_name(&content);
    let metadata = content.metadata.clone();
    if !matches!(architecture.as_str(), "llama" | "gemma3") {
        return Err(load_error(&format!(
            "architecture '{architecture}' is not supported (llama, gemma3 are)"
        )));
    }
    let requantized = if device.is_cpu() {
        requantize::requantize_slow_types(&content, &mut file).map_err(|e| load_error(&e))?
    } else {
        None
    };
    let (model, supported_context) = match requantized {
        Some((content, mut memory)) => load_architecture(&architecture, content, &mut memory, device),
        None => load_architecture(&architecture, content, &mut file, device),
    }
    .map_err(|e| load_error(&e))?;
    let context_length =
        declared_context.map_or(supported_context, |declared| declared.min(supported_context));
    Ok(LoadedLanguageModel { model, metadata, architecture, quantization, context_length })
}

fn load_architecture<R: std::io::Read + std::io::Seek>(
    architecture: &str,
    content: gguf_file::Content,
    reader: &mut R,
    device: &Device,
) -> candle_core::Result<(Box<dyn LanguageModel>, usize)> {
    match architecture {
        "gemma3" => gemma3::load(content, reader, device),
        _ => llama::load(content, reader, device),
    }
}

/// The name llama.cpp gives the file's quantisation (`general.file_type`), else the type of the
/// first weight matrix.
fn quantization_name(content: &gguf_file::Content) -> String {
    const FILE_TYPES: [(u32, &str); 16] = [
        (0, "F32"),
        (1, "F16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (7, "Q8_0"),
        (8, "Q5_0"),
        (9, "Q5_1"),
        (10, "Q2_K"),
        (11, "Q3_K_S"),
        (12, "Q3_K_M"),
        (13, "Q3_K_L"),
        (14, "Q4_K_S"),
        (15, "Q4_K_M"),
        (16, "Q5_K_S"),
        (17, "Q5_K_M"),
        (18, "Q6_K"),
    ];
    let file_type = content.metadata.get("general.file_type").and_then(|v| v.to_u32().ok());
    if let Some(name) = file_type.and_then(|t| FILE_TYPES.iter().find(|(id, _)| *id == t)) {
        return name.1.to_string();
    }
    content
        .tensor_infos
        .get("blk.0.attn_q.weight")
        .map(|info| format!("{:?}", info.ggml_dtype))
        .unwrap_or_else(|| "unknown".to_string())
}

/// The forward pass of a candle-transformers model whose KV cache lives inside its weights
/// struct, and whose clones share the weight tensors.
trait CandleWeights: Clone + Send + Sync + 'static {
    fn forward(&mut self, input: &Tensor, position: usize) -> candle_core::Result<Tensor>;
}

/// Weights that are never run themselves: each sequence clones them (sharing the tensors) and so
/// owns its KV cache.
#[derive(Clone)]
struct ClonedPerSequence<W> {
    weights: W,
    device: Device,
}

impl<W: CandleWeights> LanguageModel for ClonedPerSequence<W> {
    fn new_sequence(&self) -> Box<dyn Sequence> {
        Box::new(self.clone())
    }
}

impl<W: CandleWeights> Sequence for ClonedPerSequence<W> {
    fn forward(&mut self, tokens: &[u32], position: usize) -> candle_core::Result<Tensor> {
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        self.weights.forward(&input, position)?.squeeze(0)
    }
}
