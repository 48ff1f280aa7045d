//! Causal language models read from GGUF files.
//!
//! One decoder (`decoder.rs`) serves every supported architecture; `config.rs` says how the
//! families differ. The weights are shared (`LanguageModel`); each generation gets its own
//! `Sequence` holding its KV cache (`kv_cache.rs`). To add a family, add its
//! arm in `DecoderConfig::from_metadata` and its name to `ARCHITECTURES`.

mod config;
mod cpu_attention;
mod decoder;
mod kv_cache;
#[cfg(test)]
mod reference_tests;
#[cfg(test)]
mod tests;
mod weights;

use std::fs::File;
use std::path::Path;

use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

pub use config::DecoderConfig;
use decoder::default_cache_type;
pub use decoder::{Decoder, DecoderModel};

use super::EngineError;
use super::loading::{CountingReader, LoadProgress, MemoryNeed, check_memory};

/// Weights shared by every generation of one model.
pub trait LanguageModel: Send + Sync {
    /// A fresh sequence with an empty KV cache.
    fn new_sequence(&self) -> Box<dyn Sequence>;

    /// One step for several sequences of this model at once (continuous batching): each entry
    /// runs its tokens in its own sequence from its position (an earlier position than the
    /// sequence holds reruns from there). Every weight is read once for the whole batch. The
    /// logits `(entries, vocabulary)` predict the token after each entry's last one. On an error
    /// no entry's sequence is to be trusted beyond the position it started from.
    fn forward_batch(&self, batch: &mut [BatchEntry<'_>]) -> candle_core::Result<Tensor>;

    /// A batch of one: the logits (a rank-1 tensor over the vocabulary) after `tokens`, run in
    /// `sequence` from `position`.
    #[cfg(test)]
    fn forward_one(
        &self,
        sequence: &mut dyn Sequence,
        tokens: &[u32],
        position: usize,
    ) -> candle_core::Result<Tensor> {
        self.forward_batch(&mut [BatchEntry { sequence, tokens, position }])?.squeeze(0)
    }
}

/// One sequence's part of a batch step.
pub struct BatchEntry<'a> {
    pub sequence: &'a mut dyn Sequence,
    pub tokens: &'a [u32],
    pub position: usize,
}

/// One generation's state in a model (its KV cache), opaque to everyone but the model that made
/// it; run through `LanguageModel::forward_batch`.
pub trait Sequence: Send {
    /// For the model that made it to find its own type again in `forward_batch`.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;

    /// A new sequence holding a copy of this one's first `len` positions (the choices of one
    /// request share their prompt's forward pass this way).
    fn fork(&self, len: usize) -> candle_core::Result<Box<dyn Sequence>>;

    /// Release the room held beyond what the sequence holds (before it is kept for reuse).
    fn shrink_to_fit(&mut self) -> candle_core::Result<()>;

    /// Bytes of memory its KV cache holds.
    fn held_bytes(&self) -> usize;
}

/// A language model with what the engine needs to know about its file.
pub struct LoadedLanguageModel {
    pub model: Box<dyn LanguageModel>,
    pub architecture: String,
    pub quantization: String,
    /// The smaller of what the file declares and what the implementation supports.
    pub context_length: usize,
    /// Elements of every tensor in the file.
    pub parameters: u64,
    pub file_bytes: u64,
}

/// A GGUF chat model whose metadata is read and checked, its weights not yet: what the metadata
/// alone gives (the tokenizer) can be built, and its arrays dropped, before the weights are in
/// memory beside them.
pub struct OpenedLanguageModel<'a> {
    path: std::path::PathBuf,
    content: gguf_file::Content,
    file: CountingReader<'a, std::io::BufReader<File>>,
    config: DecoderConfig,
    architecture: String,
    quantization: String,
    declared_context: Option<usize>,
    file_bytes: u64,
}

/// Open a GGUF chat model and read its metadata, counting the bytes read into `progress`; an
/// unsupported architecture or configuration is refused here. `load` then reads the weights,
/// after checking the memory they need against what is available (`check_memory`).
pub fn open_language_model<'a>(
    path: &Path,
    progress: &'a LoadProgress,
) -> Result<OpenedLanguageModel<'a>, EngineError> {
    let load_error = |error: &dyn std::fmt::Display| load_error(path, error);
    let file = File::open(path).map_err(|e| load_error(&e))?;
    let file_bytes = file.metadata().map_err(|e| load_error(&e))?.len();
    progress.set_total(file_bytes);
    let mut file = CountingReader::new(std::io::BufReader::new(file), progress);
    let content = gguf_file::Content::read(&mut file).map_err(|e| load_error(&message(&e)))?;
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
    if !ARCHITECTURES.contains(&architecture.as_str()) {
        return Err(load_error(&format!(
            "architecture '{architecture}' is not supported ({} are)",
            ARCHITECTURES.join(", ")
        )));
    }
    let config = DecoderConfig::from_metadata(&architecture, &content.metadata)
        .map_err(|e| load_error(&message(&e)))?;
    Ok(OpenedLanguageModel {
        path: path.to_path_buf(),
        content,
        file,
        config,
        architecture,
        quantization,
        declared_context,
        file_bytes,
    })
}

impl OpenedLanguageModel<'_> {
    pub fn metadata(&self) -> &std::collections::HashMap<String, gguf_file::Value> {
        &self.content.metadata
    }

    /// Drop the vocabulary's arrays from the metadata (`tokenizer.ggml.*`: every token, score,
    /// type and merge; tens of MiB as parsed for a vocabulary of 262,144) once the tokenizer is
    /// built from them, so that they are not in memory beside the weights.
    pub fn forget_vocabulary(&mut self) {
        self.content.metadata.retain(|key, _| !key.starts_with("tokenizer.ggml."));
    }

    /// Check the memory the model needs against what is available (`check_memory`), then read
    /// the weights; the KV cache is the device's default (`default_cache_type`).
    pub fn load(self, device: &Device) -> Result<LoadedLanguageModel, EngineError> {
        self.load_with_cache_type(device, default_cache_type(device))
    }

    /// `load`, the KV cache stored as `cache_type` (F16 or F32; the tests hold llmesh to
    /// llama.cpp's answers made with either).
    pub fn load_with_cache_type(
        self,
        device: &Device,
        cache_type: DType,
    ) -> Result<LoadedLanguageModel, EngineError> {
        let Self {
            path,
            content,
            mut file,
            config,
            architecture,
            quantization,
            declared_context,
            file_bytes,
        } = self;
        let load_error = |error: &dyn std::fmt::Display| load_error(&path, error);
        let supported_context = config.context_length;
        let (parameters, weight_bytes) = tensor_sizes(&content);
        let kv_cache = (config.layers * config.kv_heads * config.head_dim * 2 * cache_type.size_in_bytes())
            as u64
            * supported_context as u64;
        check_memory(&path.display().to_string(), MemoryNeed { weights: weight_bytes, kv_cache })?;
        let decoder = Decoder::load(config, &content, &mut file, device)
            .map_err(|e| load_error(&message(&e)))?
            .with_cache_type(cache_type);
        file.progress().finish();
        let model: Box<dyn LanguageModel> = Box::new(DecoderModel(Arc::new(decoder)));
        let context_length =
            declared_context.map_or(supported_context, |declared| declared.min(supported_context));
        Ok(LoadedLanguageModel { model, architecture, quantization, context_length, parameters, file_bytes })
    }
}

fn load_error(path: &Path, error: &dyn std::fmt::Display) -> EngineError {
    EngineError::Inference(format!("cannot load {}: {error}", path.display()))
}

/// A candle error's message without the backtrace candle appends when `RUST_BACKTRACE` is set:
/// it is shown to whoever loads the model.
fn message(error: &candle_core::Error) -> String {
    match error {
        candle_core::Error::WithBacktrace { inner, .. } => message(inner),
        other => other.to_string(),
    }
}

/// (elements, bytes) of every tensor in the file.
fn tensor_sizes(content: &gguf_file::Content) -> (u64, u64) {
    content.tensor_infos.values().fold((0, 0), |(elements, bytes), info| {
        let count = info.shape.elem_count() as u64;
        let size = count / info.ggml_dtype.block_size() as u64 * info.ggml_dtype.type_size() as u64;
        (elements + count, bytes + size)
    })
}

/// The architectures (`general.architecture`) the decoder serves.
const ARCHITECTURES: [&str; 6] = ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"];

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
