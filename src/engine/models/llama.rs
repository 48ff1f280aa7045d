//! The llama family (Llama 2/3, SmolLM2, Mistral-style GGUFs) through candle-transformers'
//! quantized llama.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::{MAX_SEQ_LEN, ModelWeights};

use super::{CandleWeights, ClonedPerSequence, LanguageModel};

impl CandleWeights for ModelWeights {
    fn forward(&mut self, input: &Tensor, position: usize) -> candle_core::Result<Tensor> {
        ModelWeights::forward(self, input, position)
    }
}

/// Returns the model and the longest context the implementation supports.
pub fn load<R: std::io::Read + std::io::Seek>(
    content: gguf_file::Content,
    reader: &mut R,
    device: &Device,
) -> candle_core::Result<(Box<dyn LanguageModel>, usize)> {
    let weights = ModelWeights::from_gguf(content, reader, device)?;
    Ok((Box::new(ClonedPerSequence { weights, device: device.clone() }), MAX_SEQ_LEN))
}
