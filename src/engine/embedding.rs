//! Sentence embeddings with BERT-family models (all-MiniLM-L6-v2 and friends) loaded from a
//! folder holding model.safetensors, config.json and tokenizer.json.
//!
//! Each model runs on its own OS thread fed by a bounded queue. Vectors are mean-pooled over the
//! attention mask and L2-normalised, as sentence-transformers does.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tokio::sync::oneshot;

use super::kernels::candle_pools::in_own_rayon_pool;
use super::{Embeddings, EngineError};

/// Inputs run through the model in one forward pass.
const BATCH_SIZE: usize = 16;

struct EmbedJob {
    inputs: Vec<String>,
    span: tracing::Span,
    reply: oneshot::Sender<Result<Embeddings, EngineError>>,
}

/// The handle to an embedding model's worker thread.
pub struct EmbeddingWorker {
    model_id: String,
    jobs: SyncSender<EmbedJob>,
    /// Batches queued or being embedded.
    pending: Arc<AtomicUsize>,
}

/// What the engine reports about a loaded embedding model.
pub struct EmbeddingModelInfo {
    pub context_length: usize,
    pub parameters: u64,
    /// Bytes of `model.safetensors`.
    pub file_bytes: u64,
}

impl EmbeddingWorker {
    pub fn load(
        model_id: &str,
        folder: &Path,
        device: &Device,
        max_queued: usize,
    ) -> Result<(Self, EmbeddingModelInfo), EngineError> {
        let load_error = |error: &dyn std::fmt::Display| {
            EngineError::Inference(format!("cannot load {}: {error}", folder.display()))
        };
        let config_text = std::fs::read_to_string(folder.join("config.json")).map_err(|e| load_error(&e))?;
        let config: Config = serde_json::from_str(&config_text).map_err(|e| load_error(&e))?;
        let mut tokenizer =
            Tokenizer::from_file(folder.join("tokenizer.json")).map_err(|e| load_error(&e))?;
        // The file pins padding and truncation at 128; truncate at what the model can take instead
        // and pad each batch only to its longest input.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: config.max_position_embeddings,
                ..TruncationParams::default()
            }))
            .map_err(|e| load_error(&e))?;
        let pad_id = config.pad_token_id as u32;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id,
            ..PaddingParams::default()
        }));
        let weights = folder.join("model.safetensors");
        let file_bytes = std::fs::metadata(&weights).map_err(|e| load_error(&e))?.len();
        // SAFETY: the file is mapped read-only and llmesh never writes model files while serving.
        let parameters = safetensors_parameters(&weights).map_err(|e| load_error(&e))?;
        let vars = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, device) }
            .map_err(|e| load_error(&e))?;
        let model = BertModel::load(vars, &config).map_err(|e| load_error(&e))?;
        let info =
            EmbeddingModelInfo { context_length: config.max_position_embeddings, parameters, file_bytes };
        let (jobs, queue) = std::sync::mpsc::sync_channel(max_queued);
        let pending = Arc::new(AtomicUsize::new(0));
        let worker_pending = pending.clone();
        std::thread::Builder::new()
            .name(format!("embed-{model_id}"))
            .spawn(move || in_own_rayon_pool(|| run_worker(model, tokenizer, queue, &worker_pending)))
            .map_err(|e| load_error(&e))?;
        Ok((Self { model_id: model_id.to_string(), jobs, pending }, info))
    }

    /// Queue a batch; the vectors arrive on the returned receiver.
    pub fn submit(
        &self,
        inputs: Vec<String>,
    ) -> Result<oneshot::Receiver<Result<Embeddings, EngineError>>, EngineError> {
        let (reply, answer) = oneshot::channel();
        let job = EmbedJob { inputs, span: tracing::Span::current(), reply };
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.jobs.try_send(job).map_err(|error| {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            match error {
                TrySendError::Full(_) => EngineError::QueueFull(self.model_id.clone()),
                TrySendError::Disconnected(_) => EngineError::ShuttingDown(self.model_id.clone()),
            }
        })?;
        Ok(answer)
    }

    /// Batches queued or being embedded now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

fn run_worker(model: BertModel, tokenizer: Tokenizer, queue: Receiver<EmbedJob>, pending: &AtomicUsize) {
    while let Ok(job) = queue.recv() {
        let _entered = job.span.enter();
        if !job.reply.is_closed() {
            let result = embed_all(&model, &tokenizer, &job.inputs).map_err(|error| {
                tracing::error!(%error, "embedding failed");
                EngineError::Inference(error.to_string())
            });
            let _ = job.reply.send(result);
        }
        pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Elements of every tensor in a safetensors file, from its header alone.
fn safetensors_parameters(path: &Path) -> anyhow::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    let mut length = [0u8; 8];
    std::io::Read::read_exact(&mut file, &mut length)?;
    let length = u64::from_le_bytes(length);
    anyhow::ensure!(length <= 100 << 20, "a safetensors header of {length} bytes");
    let mut header = vec![0u8; length as usize];
    std::io::Read::read_exact(&mut file, &mut header)?;
    let header: std::collections::HashMap<String, serde_json::Value> = serde_json::from_slice(&header)?;
    Ok(header
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .filter_map(|(_, tensor)| tensor["shape"].as_array())
        .map(|shape| shape.iter().filter_map(serde_json::Value::as_u64).product::<u64>())
        .sum())
}

fn embed_all(model: &BertModel, tokenizer: &Tokenizer, inputs: &[String]) -> anyhow::Result<Embeddings> {
    let mut vectors = Vec::with_capacity(inputs.len());
    let mut prompt_tokens = 0;
    for batch in inputs.chunks(BATCH_SIZE) {
        let encodings = tokenizer.encode_batch(batch.to_vec(), true).map_err(anyhow::Error::msg)?;
        prompt_tokens += encodings
            .iter()
            .map(|e| e.get_attention_mask().iter().filter(|&&m| m == 1).count())
            .sum::<usize>();
        let rows = |field: fn(&tokenizers::Encoding) -> &[u32]| -> candle_core::Result<Tensor> {
            let rows = encodings
                .iter()
                .map(|e| Tensor::new(field(e), &model.device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::stack(&rows, 0)
        };
        let input_ids = rows(tokenizers::Encoding::get_ids)?;
        let attention_mask = rows(tokenizers::Encoding::get_attention_mask)?;
        let token_type_ids = input_ids.zeros_like()?;
        let hidden = model.forward(&input_ids, &token_type_ids, Some(&attention_mask))?;
        let mask = attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let pooled = summed.broadcast_div(&mask.sum(1)?)?;
        let norms = pooled.sqr()?.sum_keepdim(1)?.sqrt()?;
        let normalised = pooled.broadcast_div(&norms.clamp(1e-12, f64::INFINITY)?)?;
        vectors.extend(normalised.to_vec2::<f32>()?);
    }
    Ok(Embeddings { vectors, prompt_tokens, served_by: None })
}
