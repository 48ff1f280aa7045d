//! `POST /v1/chat/completions`: parse and validate an OpenAI chat request, run it on the engine,
//! answer with a `chat.completion` or a stream of `chat.completion.chunk`s.

use axum::Json;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::auth::Caller;
use super::error::ApiError;
use super::extract::{FromJsonObject, JsonBody, JsonObject, json_kind, missing};
use super::generation::{ChunkWriter, collect_choices, generate_choices, json_event, stream_choices};
use super::params::{GenerationOptions, parse_chat_logprobs};
use super::tool_calls::{Parsed, ToolCallParser, parse_message_tool_calls, parse_tool_params};
use super::types::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs, Delta,
    FunctionDelta, ToolCallDelta, response_id, unix_now,
};
use super::{AppState, served_by};
use crate::engine::{ChatMessage, FinishReason, Prompt, TokenLogprob, Usage};

/// `max_tokens` when the request sets none and the engine does not list the model (it will then
/// answer "unknown model" anyway). A listed model gets its whole context length: like OpenAI, a
/// chat runs to its end-of-turn token or to the end of the context window, and the engine clamps
/// the limit to what the window leaves after the prompt.
pub const DEFAULT_CHAT_MAX_TOKENS: usize = 4096;

/// Separates the text parts of one message when they are joined.
const PART_SEPARATOR: &str = "\n";

#[derive(Debug)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub options: GenerationOptions,
}

impl FromJsonObject for ChatCompletionRequest {
    fn from_json_object(mut fields: JsonObject) -> Result<Self, ApiError> {
        let model = fields.required_text("model")?;
        let messages = parse_messages(fields.take("messages"))?;
        let tools = parse_tool_params(&mut fields)?;
        let logprobs = parse_chat_logprobs(&mut fields)?;
        let mut options = GenerationOptions::parse(&mut fields)?;
        options.set_tools(tools);
        options.set_logprobs(logprobs);
        Ok(Self { model, messages, options })
    }
}

fn parse_messages(value: Option<Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match value {
        None => return Err(missing("messages")),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "messages",
                format!("'messages' must be an array, not {}.", json_kind(&other)),
            ));
        }
    };
    items.into_iter().enumerate().map(|(index, item)| parse_message(index, item)).collect()
}

fn parse_message(index: usize, item: Value) -> Result<ChatMessage, ApiError> {
    let Value::Object(mut message) = item else {
        return Err(ApiError::invalid_param(
            format!("messages[{index}]"),
            format!("Each message must be an object, not {}.", json_kind(&item)),
        ));
    };
    // OpenAI's newer `developer` role is passed on as `system`. Which roles are known is
    // `GenerateRequest::validate`'s to check.
    let role = match message.remove("role") {
        Some(Value::String(role)) if role == "developer" => "system".to_owned(),
        Some(Value::String(role)) => role,
        None | Some(Value::Null) => return Err(missing(&format!("messages[{index}].role"))),
        Some(other) => {
            return Err(ApiError::invalid_param(
                format!("messages[{index}].role"),
                format!("A role must be a string, not {}.", json_kind(&other)),
            ));
        }
    };
    let content = parse_content(index, &role, message.remove("content"))?;
    let tool_calls = match role.as_str() {
        "assistant" => parse_message_tool_calls(index, message.remove("tool_calls"))?,
        _ => Vec::new(),
    };
    let tool_call_id = match (role.as_str(), message.remove("tool_call_id")) {
        ("tool", Some(Value::String(id))) => Some(id),
        ("tool", _) => return Err(missing(&format!("messages[{index}].tool_call_id"))),
        _ => None,
    };
    Ok(ChatMessage { role, content, tool_calls, tool_call_id })
}

/// Content is a string or an array of text parts, joined; an assistant turn may have none.
fn parse_content(index: usize, role: &str, value: Option<Value>) -> Result<String, ApiError> {
    let param = format!("messages[{index}].content");
    match value {
        Some(Value::String(text)) => Ok(text),
        None | Some(Value::Null) if role == "assistant" => Ok(String::new()),
        None | Some(Value::Null) => Err(missing(&param)),
        Some(Value::Array(parts)) => {
            let texts = parts
                .into_iter()
                .enumerate()
                .map(|(part_index, part)| text_of_part(&param, part_index, part))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(texts.join(PART_SEPARATOR))
        }
        Some(other) => Err(ApiError::invalid_param(
            param,
            format!("Content must be a string or an array of parts, not {}.", json_kind(&other)),
        )),
    }
}

fn text_of_part(param: &str, part_index: usize, part: Value) -> Result<String, ApiError> {
    let invalid = |message: String| ApiError::invalid_param(param, message);
    let Value::Object(mut part) = part else {
        return Err(invalid(format!("Content part {part_index} must be an object.")));
    };
    match part.get("type").and_then(Value::as_str) {
        Some("text") => {}
        Some(other) => {
            return Err(invalid(format!(
                "Content part type '{other}' is not supported: only 'text' parts are."
            )));
        }
        None => return Err(invalid(format!("Content part {part_index} has no 'type'."))),
    }
    match part.remove("text") {
        Some(Value::String(text)) => Ok(text),
        _ => Err(invalid(format!("Text part {part_index} needs a string 'text'."))),
    }
}

pub async fn create_chat_completion(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    tracing::Span::current().record("model", request.model.as_str());
    let ChatCompletionRequest { model, messages, options } = request;
    let engine = state.engine_for(&caller, &model)?;
    let tools = options.tools();
    let default_max_tokens = state.context_length(&model).unwrap_or(DEFAULT_CHAT_MAX_TOKENS);
    let requests = options.requests(model.clone(), Prompt::Chat(messages), default_max_tokens)?;
    let streams = generate_choices(&engine, requests).await?;
    let id = response_id("chatcmpl");
    let created = unix_now();
    let node = streams[0].served_by.clone();
    let parser = || tools.active().then(|| ToolCallParser::new(tools));
    if options.stream {
        let choices = streams
            .into_iter()
            .enumerate()
            .map(|(index, events)| {
                let writer = ChatChunks {
                    id: id.clone(),
                    index,
                    created,
                    model: model.clone(),
                    include_usage: options.include_usage,
                    parser: parser(),
                    calls: 0,
                    logprobs: options.logprobs().map(|_| Vec::new()),
                };
                (events, writer)
            })
            .collect();
        return Ok(served_by(stream_choices(choices, options.include_usage), node.as_deref()));
    }
    let (collected, usage) = collect_choices(streams).await?;
    let choices = collected
        .into_iter()
        .enumerate()
        .map(|(index, collected)| {
            let (message, finish_reason) = match parser() {
                None => (AssistantMessage::text(collected.text), collected.finish_reason),
                Some(mut parser) => {
                    let mut parsed = parser.push(&collected.text);
                    parsed.extend(parser.finish());
                    let message = AssistantMessage::from_parsed(parsed);
                    let finish_reason = if message.tool_calls.is_some() {
                        FinishReason::ToolCalls
                    } else {
                        collected.finish_reason
                    };
                    (message, finish_reason)
                }
            };
            let logprobs = options.logprobs().map(|_| ChatLogprobs::new(collected.logprobs));
            ChatChoice { index, message, logprobs, finish_reason }
        })
        .collect();
    let completion =
        ChatCompletion { id, object: "chat.completion", created, model, choices, usage: usage.into() };
    Ok(served_by(Json(completion).into_response(), node.as_deref()))
}

/// Writes `chat.completion.chunk`s; every chunk of one stream shares its id and `created`.
struct ChatChunks {
    id: String,
    /// The choice this writer writes.
    index: usize,
    created: u64,
    model: String,
    include_usage: bool,
    /// Reads tool calls out of the text, when the request has tools.
    parser: Option<ToolCallParser>,
    /// Tool calls streamed so far.
    calls: usize,
    /// The log-probabilities not yet sent, when the request asked for them.
    logprobs: Option<Vec<TokenLogprob>>,
}

impl ChatChunks {
    /// A chunk with `delta` and the log-probabilities gathered since the last one.
    fn chunk(&mut self, delta: Delta, finish_reason: Option<FinishReason>) -> Event {
        let logprobs = self.logprobs.as_mut().map(|entries| ChatLogprobs::new(std::mem::take(entries)));
        json_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChunkChoice { index: self.index, delta, logprobs, finish_reason }],
            usage: self.include_usage.then_some(None),
        })
    }
}

impl ChatChunks {
    /// Content as content deltas; each call as two: its id, type and name, then its arguments.
    fn parsed_chunks(&mut self, parsed: Vec<Parsed>) -> Vec<Event> {
        let mut events = Vec::new();
        for item in parsed {
            match item {
                Parsed::Content(text) => {
                    events.push(self.chunk(Delta { content: Some(text), ..Delta::default() }, None))
                }
                Parsed::Call(call) => {
                    let index = self.calls;
                    self.calls += 1;
                    let opening = ToolCallDelta {
                        index,
                        id: Some(call.id),
                        kind: Some("function"),
                        function: FunctionDelta { name: Some(call.name), arguments: String::new() },
                    };
                    let arguments = ToolCallDelta {
                        index,
                        id: None,
                        kind: None,
                        function: FunctionDelta { name: None, arguments: call.arguments },
                    };
                    for delta in [opening, arguments] {
                        events.push(
                            self.chunk(Delta { tool_calls: Some(vec![delta]), ..Delta::default() }, None),
                        );
                    }
                }
            }
        }
        events
    }
}

impl ChunkWriter for ChatChunks {
    fn opening(&mut self) -> Option<Event> {
        let delta = Delta { role: Some("assistant"), content: Some(String::new()), tool_calls: None };
        Some(self.chunk(delta, None))
    }

    fn text(&mut self, text: String) -> Vec<Event> {
        match &mut self.parser {
            None => vec![self.chunk(Delta { content: Some(text), ..Delta::default() }, None)],
            Some(parser) => {
                let parsed = parser.push(&text);
                self.parsed_chunks(parsed)
            }
        }
    }

    fn finish(&mut self, finish_reason: FinishReason) -> Vec<Event> {
        let Some(parser) = &mut self.parser else {
            return vec![self.chunk(Delta::default(), Some(finish_reason))];
        };
        let parsed = parser.finish();
        let finish_reason = if parser.made_calls() { FinishReason::ToolCalls } else { finish_reason };
        let mut events = self.parsed_chunks(parsed);
        events.push(self.chunk(Delta::default(), Some(finish_reason)));
        events
    }

    fn logprobs(&mut self, entry: TokenLogprob) {
        if let Some(entries) = &mut self.logprobs {
            entries.push(entry);
        }
    }

    fn usage(&self, usage: Usage) -> Event {
        json_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
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

    fn messages(json: Value) -> Result<Vec<ChatMessage>, ApiError> {
        parse_messages(Some(json))
    }

    #[test]
    fn text_parts_are_joined_and_developer_becomes_system() {
        let parsed = messages(serde_json::json!([
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "a"},
                {"type": "text", "text": "b"},
            ]},
            {"role": "assistant", "content": null},
        ]))
        .unwrap();
        assert_eq!(parsed[0], ChatMessage::text("system", "be brief"));
        assert_eq!(parsed[1].content, "a\nb");
        assert_eq!(parsed[2].content, "");
    }

    #[test]
    fn image_parts_and_roles_that_are_not_strings_are_refused() {
        let image = serde_json::json!([{"role": "user", "content": [{"type": "image_url"}]}]);
        assert!(messages(image).unwrap_err().to_string().contains("image_url"));
        let number = serde_json::json!([{"role": 3, "content": "x"}]);
        let error = messages(number).unwrap_err();
        assert_eq!(error.body().error.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn user_content_is_required() {
        let error = messages(serde_json::json!([{"role": "user"}])).unwrap_err();
        assert_eq!(error.body().error.param.as_deref(), Some("messages[0].content"));
    }
}
