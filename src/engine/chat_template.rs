//! PLACEHOLDER (being written by a helper).
use super::{ChatMessage, EngineError};

pub struct ChatTemplate;

impl ChatTemplate {
    pub fn new(
        _source: Option<&str>,
        _bos_token: Option<String>,
        _eos_token: Option<String>,
    ) -> Result<Self, EngineError> {
        Ok(Self)
    }

    pub fn render(&self, _messages: &[ChatMessage]) -> Result<String, EngineError> {
        Err(EngineError::Inference("not yet".into()))
    }
}
