//! The OpenAI wire types llmesh answers with: model lists, chat and text completions (whole and
//! as stream chunks), embeddings. Serialization only; requests are parsed by each endpoint.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::tool_calls::Parsed;
use crate::engine::ModelHost;
use crate::engine::{FinishReason, ModelInfo, ModelKind, TokenLogprob, ToolCall, Usage};

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

/// A fresh response id with OpenAI's prefix for its kind ("chatcmpl", "cmpl").
pub fn response_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

#[derive(Debug, Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// What OpenAI has no field for.
    pub llmesh: ModelDetails,
}

#[derive(Debug, Serialize)]
pub struct ModelDetails {
    pub kind: ModelKind,
    pub architecture: String,
    pub quantization: String,
    pub context_length: usize,
    /// Parameters in the model's files (0: unknown, e.g. announced by an older node).
    pub parameters: u64,
    /// Bytes of the model's files (0: unknown).
    pub file_bytes: u64,
    /// The nodes of the cluster that serve the model.
    pub hosts: Vec<ModelHost>,
}

impl From<ModelInfo> for ModelObject {
    fn from(model: ModelInfo) -> Self {
        Self {
            id: model.id,
            object: "model",
            created: model.created,
            owned_by: "llmesh",
            llmesh: ModelDetails {
                kind: model.kind,
                architecture: model.architecture,
                quantization: model.quantization,
                context_length: model.context_length,
                parameters: model.parameters,
                file_bytes: model.file_bytes,
                hosts: model.hosts,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct UsageObject {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl From<Usage> for UsageObject {
    fn from(usage: Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens + usage.completion_tokens,
        }
    }
}

/// The `usage` of a stream chunk: left out unless the client asked for usage; then `null` on
/// every chunk but the last.
pub type ChunkUsage = Option<Option<UsageObject>>;

#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageObject,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// `null` when the answer is only tool calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallObject>>,
}

impl AssistantMessage {
    pub fn text(content: String) -> Self {
        Self { role: "assistant", content: Some(content), tool_calls: None }
    }

    /// The answer as read by the tool-call parser: its content (`null` when only whitespace
    /// surrounds calls) and its calls.
    pub fn from_parsed(parsed: Vec<Parsed>) -> Self {
        let mut content = String::new();
        let mut calls = Vec::new();
        for item in parsed {
            match item {
                Parsed::Content(text) => content.push_str(&text),
                Parsed::Call(call) => calls.push(ToolCallObject::from(call)),
            }
        }
        if calls.is_empty() {
            return Self::text(content);
        }
        let content = (!content.trim().is_empty()).then_some(content);
        Self { role: "assistant", content, tool_calls: Some(calls) }
    }
}

#[derive(Debug, Serialize)]
pub struct ToolCallObject {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

impl From<ToolCall> for ToolCallObject {
    fn from(call: ToolCall) -> Self {
        Self {
            id: call.id,
            kind: "function",
            function: FunctionCall { name: call.name, arguments: call.arguments },
        }
    }
}

/// A streamed piece of tool call `index`: the first carries its id, type and name, the next ones
/// pieces of its arguments.
#[derive(Debug, Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Serialize)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: ChunkUsage,
}

#[derive(Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// What a chunk adds to the message; both fields absent in the closing chunk.
#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A legacy completion, whole or as a stream chunk (`finish_reason` null and `usage` per
/// [`ChunkUsage`] until the end).
#[derive(Debug, Serialize)]
pub struct TextCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<TextChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: ChunkUsage,
}

#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<TextLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// A chat answer's log-probabilities, one entry per generated token.
#[derive(Debug, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    pub refusal: Option<()>,
}

#[derive(Debug, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl ChatLogprobs {
    pub fn new(entries: Vec<TokenLogprob>) -> Self {
        let content = entries
            .into_iter()
            .map(|entry| ChatTokenLogprob {
                token: String::from_utf8_lossy(&entry.bytes).into_owned(),
                logprob: entry.logprob,
                top_logprobs: entry
                    .top
                    .into_iter()
                    .map(|top| ChatTopLogprob {
                        token: String::from_utf8_lossy(&top.bytes).into_owned(),
                        logprob: top.logprob,
                        bytes: top.bytes,
                    })
                    .collect(),
                bytes: entry.bytes,
            })
            .collect();
        Self { content, refusal: None }
    }
}

/// A legacy completion's log-probabilities: parallel arrays, one place per token, and each
/// token's offset in the completion's text (in characters).
#[derive(Debug, Serialize)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    pub text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// The entries of tokens whose text starts `offset` characters into the completion.
    pub fn new(entries: Vec<TokenLogprob>, mut offset: usize) -> Self {
        let mut logprobs = Self {
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text_offset: Vec::new(),
        };
        for entry in entries {
            let token = String::from_utf8_lossy(&entry.bytes).into_owned();
            logprobs.text_offset.push(offset);
            offset += token.chars().count();
            logprobs.tokens.push(token);
            logprobs.token_logprobs.push(entry.logprob);
            let top = entry.top.into_iter().map(|top| {
                (String::from_utf8_lossy(&top.bytes).into_owned(), serde_json::Value::from(top.logprob))
            });
            logprobs.top_logprobs.push(top.collect());
        }
        logprobs
    }
}

#[derive(Debug, Serialize)]
pub struct EmbeddingList {
    pub object: &'static str,
    pub data: Vec<EmbeddingObject>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingObject {
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingVector,
}

/// A vector as numbers, or as base64 of its little-endian `f32` bytes.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct Health {
    pub status: &'static str,
}
