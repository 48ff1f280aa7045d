//! `POST /v1/completions`: OpenAI's legacy text completions. The prompt is used as it is, without
//! a chat template; the answer is a `text_completion`, whole or streamed.

use axum::Json;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::auth::Caller;
use super::error::ApiError;
use super::extract::{FromJsonObject, JsonBody, JsonObject, json_kind, missing};
use super::generation::{ChunkWriter, collect_choices, generate_choices, json_event, stream_choices};
use super::params::{GenerationOptions, parse_completion_logprobs};
use super::types::{TextChoice, TextCompletion, TextLogprobs, response_id, unix_now};
use super::{AppState, served_by};
use crate::engine::{FinishReason, Prompt, TokenLogprob, Usage};

/// `max_tokens` when the request sets none: 16, OpenAI's documented default for this endpoint,
/// which clients of the legacy API rely on.
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

#[derive(Debug)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: String,
    pub options: GenerationOptions,
}

impl FromJsonObject for CompletionRequest {
    fn from_json_object(mut fields: JsonObject) -> Result<Self, ApiError> {
        let model = fields.required_text("model")?;
        let prompt = parse_prompt(fields.take("prompt"))?;
        let logprobs = parse_completion_logprobs(&mut fields)?;
        let mut options = GenerationOptions::parse(&mut fields)?;
        options.set_logprobs(logprobs);
        Ok(Self { model, prompt, options })
    }
}

/// A prompt is one string, possibly wrapped in a one-element array. Batches and token
/// arrays are not supported.
fn parse_prompt(value: Option<Value>) -> Result<String, ApiError> {
    let invalid = |message: String| ApiError::invalid_param("prompt", message);
    let prompt = match value {
        None => return Err(missing("prompt")),
        Some(Value::String(prompt)) => prompt,
        Some(Value::Array(mut items)) => match (items.pop(), items.is_empty()) {
            (Some(Value::String(prompt)), true) => prompt,
            (Some(Value::String(_)), false) => {
                return Err(invalid("Only one prompt per request is supported.".into()));
            }
            _ => {
                return Err(invalid(
                    "'prompt' must be a string or an array holding one string; token arrays \
                     are not supported."
                        .into(),
                ));
            }
        },
        Some(other) => {
            return Err(invalid(format!("'prompt' must be a string, not {}.", json_kind(&other))));
        }
    };
    Ok(prompt)
}

pub async fn create_completion(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    tracing::Span::current().record("model", request.model.as_str());
    let CompletionRequest { model, prompt, options } = request;
    let engine = state.engine_for(&caller, &model)?;
    let requests = options.requests(model.clone(), Prompt::Text(prompt), DEFAULT_COMPLETION_MAX_TOKENS)?;
    let streams = generate_choices(&engine, requests).await?;
    let id = response_id("cmpl");
    let created = unix_now();
    let writer = |index| TextChunks {
        id: id.clone(),
        index,
        created,
        model: model.clone(),
        include_usage: options.include_usage,
        logprobs: options.logprobs().map(|_| Vec::new()),
        text_offset: 0,
    };
    let node = streams[0].served_by.clone();
    if options.stream {
        let choices =
            streams.into_iter().enumerate().map(|(index, events)| (events, writer(index))).collect();
        return Ok(served_by(stream_choices(choices, options.include_usage), node.as_deref()));
    }
    let (collected, usage) = collect_choices(streams).await?;
    let mut choices = Vec::with_capacity(collected.len());
    for (index, collected) in collected.into_iter().enumerate() {
        let mut writer = writer(index);
        writer.logprobs = writer.logprobs.map(|_| collected.logprobs);
        choices.extend(writer.completion(collected.text, Some(collected.finish_reason)).choices);
    }
    let completion = TextCompletion {
        id,
        object: "text_completion",
        created,
        model,
        choices,
        usage: Some(Some(usage.into())),
    };
    Ok(served_by(Json(completion).into_response(), node.as_deref()))
}

/// Writes `text_completion` objects; streamed chunks share the id and `created`.
struct TextChunks {
    id: String,
    /// The choice this writer writes.
    index: usize,
    created: u64,
    model: String,
    include_usage: bool,
    /// The log-probabilities not yet sent, when the request asked for them.
    logprobs: Option<Vec<TokenLogprob>>,
    /// Characters of text sent so far (where the next tokens' `text_offset` starts).
    text_offset: usize,
}

impl TextChunks {
    /// A completion (or chunk) with `text` and the log-probabilities gathered since the last.
    fn completion(&mut self, text: String, finish_reason: Option<FinishReason>) -> TextCompletion {
        let logprobs = self
            .logprobs
            .as_mut()
            .map(|entries| TextLogprobs::new(std::mem::take(entries), self.text_offset));
        if let Some(logprobs) = &logprobs {
            self.text_offset = logprobs.text_offset.last().map_or(self.text_offset, |&last| {
                last + logprobs.tokens.last().map_or(0, |token| token.chars().count())
            });
        }
        TextCompletion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![TextChoice { text, index: self.index, logprobs, finish_reason }],
            usage: self.include_usage.then_some(None),
        }
    }
}

impl ChunkWriter for TextChunks {
    fn opening(&mut self) -> Option<Event> {
        None
    }

    fn text(&mut self, text: String) -> Vec<Event> {
        vec![json_event(&self.completion(text, None))]
    }

    fn finish(&mut self, finish_reason: FinishReason) -> Vec<Event> {
        vec![json_event(&self.completion(String::new(), Some(finish_reason)))]
    }

    fn logprobs(&mut self, entry: TokenLogprob) {
        if let Some(entries) = &mut self.logprobs {
            entries.push(entry);
        }
    }

    fn usage(&self, usage: Usage) -> Event {
        json_event(&TextCompletion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices: Vec::new(),
            usage: Some(Some(usage.into())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_is_one_string() {
        assert_eq!(parse_prompt(Some(serde_json::json!("hi"))).unwrap(), "hi");
        assert_eq!(parse_prompt(Some(serde_json::json!(["hi"]))).unwrap(), "hi");
        for bad in [serde_json::json!(["a", "b"]), serde_json::json!([1, 2]), serde_json::json!([])] {
            let error = parse_prompt(Some(bad.clone())).unwrap_err();
            assert_eq!(error.body().error.param.as_deref(), Some("prompt"), "{bad}");
        }
    }
}
