//! Local inference: the `Engine` trait the rest of llmesh talks to, and the candle-backed
//! `LocalEngine` that implements it.
//!
//! The engine knows nothing of HTTP or networking. It takes typed requests (a chat or a plain
//! prompt plus sampling parameters, or texts to embed) and answers with typed events. Heavy
//! compute runs on one dedicated OS thread per model (see `scheduler` and `embedding`), never on
//! tokio worker threads.

mod chat_template;
mod detokenize;
mod embedding;
mod gguf_tokenizer;
mod grammar;
pub mod kernels;
mod loading;
mod local;
mod models;
mod prompt_cache;
mod sampling;
mod scheduler;
mod source;
mod tools;
mod validation;

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use chat_template::ChatTemplate;

pub use gguf_tokenizer::{GgufTokenizer, tokenizer_from_gguf, tokenizer_from_metadata};
#[doc(hidden)]
pub use grammar::fuzz::walk as fuzz_grammar_walk;
pub use grammar::{MAX_SCHEMA_BYTES, ResponseFormat, close_objects};

pub use detokenize::{IncrementalDecoder, StopMatcher};
pub use local::{LocalEngine, ModelSpec, ModelState, ModelStatus, default_device};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{QueueLimits, WorkerLoad};
pub use source::resolve_model_path;
pub use tools::{GrammarPlan, MAX_TOOLS, Tool, ToolChoice, ToolFormat, ToolParams, valid_name};
pub use validation::{InvalidParam, MAX_EMBEDDING_INPUTS, MAX_STOP_SEQUENCES, excerpt};

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Chat,
    Embeddings,
}

/// A model as the engine describes it to the API (and, later, to the cluster).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The name clients use.
    pub id: String,
    pub kind: ModelKind,
    /// e.g. "llama", "gemma3", "bert".
    pub architecture: String,
    /// e.g. "Q4_1", "Q4_K_M", "f32".
    pub quantization: String,
    /// Maximum tokens of prompt plus completion.
    pub context_length: usize,
    /// Parameters (weights) in the file, 0 where unknown.
    #[serde(default)]
    pub parameters: u64,
    /// Bytes of the model's files, 0 where unknown.
    #[serde(default)]
    pub file_bytes: u64,
    /// Unix seconds when the model was loaded.
    pub created: u64,
    /// The nodes that host it, filled in by the router (empty from a local engine).
    #[serde(default)]
    pub hosts: Vec<ModelHost>,
}

/// A node that hosts a model, as shown to users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelHost {
    pub name: String,
    pub peer_id: String,
}

/// How busy an engine is, summed over its models.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineLoad {
    /// Generations running now.
    pub in_flight: usize,
    /// Generations waiting for a place.
    pub queued: usize,
    /// Generations that started from a prefix in the prompt cache, since start.
    pub prompt_cache_hits: u64,
    /// Prompt tokens those generations did not run again, since start.
    pub prompt_tokens_reused: u64,
    /// Bytes of the KV caches the prompt caches hold now.
    pub prompt_cache_bytes: u64,
}

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message's answer to this call.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message of text only.
    pub fn text(role: &str, content: impl Into<String>) -> Self {
        Self { role: role.to_string(), content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }
}

/// A function call the assistant made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, as OpenAI carries them.
    pub arguments: String,
}

/// The input of a generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// Rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Used as it is (legacy completions).
    Text(String),
    /// An answer cut short on another node, resumed here: the original prompt, then the text the
    /// client already has, which the model continues.
    Continue { prompt: OriginalPrompt, generated: String },
}

/// The prompt a client sent, which a continuation starts from. Its own type rather than a
/// `Prompt`, so that a continuation cannot hold another: requests arrive from peers, and a type
/// that nests lets one small frame nest deep enough to overflow the stack while it is decoded.
/// (The same variants in the same order as `Prompt`'s first two, so both encode alike.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OriginalPrompt {
    Chat(Vec<ChatMessage>),
    Text(String),
}

impl Prompt {
    /// This prompt's original followed by `generated`, everything the client has received since
    /// the original prompt (a continuation's earlier `generated` is replaced, not added to).
    pub fn continued(&self, generated: String) -> Prompt {
        let prompt = match self {
            Prompt::Chat(messages) => OriginalPrompt::Chat(messages.clone()),
            Prompt::Text(text) => OriginalPrompt::Text(text.clone()),
            Prompt::Continue { prompt, .. } => prompt.clone(),
        };
        Prompt::Continue { prompt, generated }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub model: String,
    pub prompt: Prompt,
    pub params: SamplingParams,
}

/// Why a generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An eos token or a stop sequence.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The answer is tool calls (set by the API, which reads the calls out of the text; the
    /// engine never sends it).
    #[serde(rename = "tool_calls")]
    ToolCalls,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What a generation sends back, in order: any number of `Text` (and, when asked for, one
/// `Logprobs` per generated token, before the text it adds to), then one `Done` or one `Error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GenerationEvent {
    /// The next piece of text: always whole UTF-8 characters, never part of a stop sequence.
    Text(String),
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(EngineError),
    /// The log-probability of the token just generated (`SamplingParams::logprobs`).
    Logprobs(TokenLogprob),
}

impl GenerationEvent {
    /// Whether the generation ends with this event.
    pub fn is_last(&self) -> bool {
        matches!(self, GenerationEvent::Done { .. } | GenerationEvent::Error(_))
    }
}

/// A generated token's log-probability under the model's distribution (before grammar masks,
/// penalties and sampling), and the most likely tokens at that place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's bytes (a token may hold part of a UTF-8 character).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// The receiving end of a generation. Dropping it cancels the generation.
#[derive(Debug)]
pub struct GenerationStream {
    /// The name of the node whose engine runs the generation, when a router knows it.
    pub served_by: Option<String>,
    events: mpsc::Receiver<GenerationEvent>,
}

impl GenerationStream {
    pub fn new(events: mpsc::Receiver<GenerationEvent>) -> Self {
        Self { served_by: None, events }
    }

    pub fn served_by(mut self, node: impl Into<String>) -> Self {
        self.served_by = Some(node.into());
        self
    }

    /// The next event; `None` once the generation has ended and every event was read. Cancel-safe.
    pub async fn recv(&mut self) -> Option<GenerationEvent> {
        self.events.recv().await
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedRequest {
    pub model: String,
    pub inputs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embeddings {
    /// One L2-normalised vector per input, in input order.
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
    /// The name of the node that computed them, when a router knows it.
    #[serde(default)]
    pub served_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum EngineError {
    #[error("model '{0}' does not exist")]
    UnknownModel(String),
    #[error("model '{model}' does not support {operation}")]
    WrongKind { model: String, operation: String },
    #[error("model '{0}' is busy: its queue is full")]
    QueueFull(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the prompt has {prompt_tokens} tokens but model '{model}' takes at most {context_length}")]
    ContextLength { model: String, prompt_tokens: usize, context_length: usize },
    #[error("model '{0}' is shutting down")]
    ShuttingDown(String),
    #[error("inference failed: {0}")]
    Inference(String),
    /// The model exists in the cluster but no host can take the request now (its last host went
    /// away, or the host failed before answering).
    #[error("{0}")]
    Unavailable(String),
    /// A request the client must change, with the field to change (named as in OpenAI's API).
    #[error("{message}")]
    InvalidParam { param: String, message: String },
}

/// Local inference as the API and the router see it. Held as `Arc<dyn Engine>` so tests can put a
/// fake in its place.
pub trait Engine: Send + Sync + 'static {
    /// Every model this engine serves.
    fn models(&self) -> Vec<ModelInfo>;

    /// Queue a generation. Fails before anything is generated when the model is unknown, of the
    /// wrong kind, the prompt does not fit or the queue is full; otherwise the answer arrives on
    /// the returned stream. (Async because rendering and tokenizing a large prompt is real work
    /// that must not run on a tokio worker.)
    fn generate(&self, request: GenerateRequest)
    -> BoxFuture<'static, Result<GenerationStream, EngineError>>;

    /// Embed a batch of texts.
    fn embed(&self, request: EmbedRequest) -> BoxFuture<'static, Result<Embeddings, EngineError>>;

    /// How busy the engine is now (announced to the cluster).
    fn load(&self) -> EngineLoad {
        EngineLoad::default()
    }

    /// Start loading a model while serving: `source` is what `--model ID=PATH` takes. Checked at
    /// once (the id, no model of that id), read in the background; `model_states` shows how far.
    fn start_loading(&self, id: &str, _source: &str) -> Result<(), EngineError> {
        Err(EngineError::InvalidRequest(format!("this engine cannot load '{id}' at run time")))
    }

    /// Stop serving a model: new requests are refused with `ShuttingDown` at once; the answers
    /// being generated finish (or, with `force`, end with an error), then it is dropped.
    fn start_unloading(&self, id: &str, _force: bool) -> Result<(), EngineError> {
        Err(EngineError::UnknownModel(id.to_string()))
    }

    /// Every model this engine holds or is loading, with its state (`GET /api/models`).
    fn model_states(&self) -> Vec<ModelStatus> {
        self.models()
            .into_iter()
            .map(|info| ModelStatus { id: info.id.clone(), info: Some(info), ..ModelStatus::default() })
            .collect()
    }
}

pub type SharedEngine = Arc<dyn Engine>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_continuation_continues_the_original_prompt() {
        let once = Prompt::Text("once".into());
        let continued = once.continued(" upon".into()).continued(" upon a time".into());
        let expected = Prompt::Continue {
            prompt: OriginalPrompt::Text("once".into()),
            generated: " upon a time".into(),
        };
        assert_eq!(continued, expected);
    }
}
