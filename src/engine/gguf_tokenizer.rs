//! PLACEHOLDER (being written by a helper).
use candle_core::quantized::gguf_file;
use tokenizers::Tokenizer;

use super::EngineError;

pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub eos_token_ids: Vec<u32>,
}

pub fn tokenizer_from_gguf(_content: &gguf_file::Content) -> Result<GgufTokenizer, EngineError> {
    Err(EngineError::Inference("not yet".into()))
}
