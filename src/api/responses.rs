//! `POST /v1/responses`: OpenAI's Responses API, stateless. A request is translated into the chat
//! request it amounts to (`input` items → messages, `instructions` → a system message, flat
//! function tools → chat tools, `text.format` → `response_format`, `max_output_tokens` →
//! `max_tokens`) and read by the chat endpoint's own parser, so both check the same things; the
//! answer comes back as a `response` object with `message` and `function_call` output items, or
//! as the Responses API's stream of typed events.
//!
//! Nothing is stored: `previous_response_id` is refused with a 400 that says to send the whole
//! conversation in `input` (which is what the Agents SDK does by default).

use axum::Json;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::auth::Caller;
use super::chat::{ChatCompletionRequest, DEFAULT_CHAT_MAX_TOKENS};
use super::error::ApiError;
use super::extract::{FromJsonObject, JsonBody, JsonObject, json_kind};
use super::generation::{ChunkWriter, collect, stream_sse};
use super::tool_calls::{Parsed, ToolCallParser};
use super::types::unix_now;
use super::{AppState, served_by};
use crate::engine::{EngineError, FinishReason, Prompt, TokenLogprob, ToolCall, Usage, excerpt};

/// A Responses request: the chat request it amounts to, and what the answer echoes back.
pub struct ResponsesRequest {
    chat: ChatCompletionRequest,
    stream: bool,
    /// The request's own fields that the `response` object repeats.
    echo: Map<String, Value>,
}

impl FromJsonObject for ResponsesRequest {
    fn from_json_object(mut fields: JsonObject) -> Result<Self, ApiError> {
        if let Some(id) = fields.take("previous_response_id") {
            return Err(ApiError::invalid_param(
                "previous_response_id",
                format!(
                    "llmesh keeps no responses (got {}): send the whole conversation in 'input' instead.",
                    json_kind(&id)
                ),
            ));
        }
        let mut echo = Map::new();
        let mut chat = Map::new();
        let model = fields.take("model");
        chat.insert("model".into(), model.clone().unwrap_or(Value::Null));
        echo.insert("model".into(), model.unwrap_or(Value::Null));
        let instructions = fields.take("instructions");
        let mut messages = Vec::new();
        match &instructions {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => messages.push(json!({"role": "system", "content": text})),
            Some(other) => {
                return Err(ApiError::invalid_param(
                    "instructions",
                    format!("'instructions' must be a string, not {}.", json_kind(other)),
                ));
            }
        }
        messages.extend(input_messages(fields.take("input"))?);
        chat.insert("messages".into(), Value::Array(messages));
        echo.insert("instructions".into(), instructions.unwrap_or(Value::Null));
        for (from, to) in [
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("max_output_tokens", "max_tokens"),
            ("parallel_tool_calls", "parallel_tool_calls"),
        ] {
            let value = fields.take(from);
            echo.insert(from.into(), value.clone().unwrap_or(Value::Null));
            if let Some(value) = value {
                chat.insert(to.into(), value);
            }
        }
        let tools = fields.take("tools");
        echo.insert("tools".into(), tools.clone().unwrap_or_else(|| json!([])));
        if let Some(tools) = tools {
            chat.insert("tools".into(), chat_tools(tools)?);
        }
        let tool_choice = fields.take("tool_choice");
        echo.insert("tool_choice".into(), tool_choice.clone().unwrap_or_else(|| json!("auto")));
        if let Some(choice) = tool_choice {
            chat.insert("tool_choice".into(), chat_tool_choice(choice));
        }
        let text = fields.take("text");
        echo.insert("text".into(), text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})));
        if let Some(format) = text_format(text)? {
            chat.insert("response_format".into(), format);
        }
        let stream = fields.optional::<bool>("stream")?.unwrap_or(false);
        let chat = ChatCompletionRequest::from_json_object(JsonObject(chat)).map_err(responses_error)?;
        Ok(Self { chat, stream, echo })
    }
}

/// `input`: a string (one user message) or a list of items.
fn input_messages(value: Option<Value>) -> Result<Vec<Value>, ApiError> {
    let items = match value {
        None | Some(Value::Null) => return Err(ApiError::invalid_param("input", "'input' is required.")),
        Some(Value::String(text)) => return Ok(vec![json!({"role": "user", "content": text})]),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "input",
                format!("'input' must be a string or an array of items, not {}.", json_kind(&other)),
            ));
        }
    };
    let mut messages: Vec<Value> = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let param = |field: &str| format!("input[{index}]{field}");
        let Value::Object(mut item) = item else {
            return Err(ApiError::invalid_param(param(""), "Each input item must be an object."));
        };
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("message").to_string();
        match kind.as_str() {
            "message" => {
                let role = item.remove("role").unwrap_or(Value::Null);
                let content = message_content(index, item.remove("content"))?;
                messages.push(json!({"role": role, "content": content}));
            }
            "function_call" => {
                let call = json!({"id": item.get("call_id"), "type": "function", "function": {
                    "name": item.get("name"), "arguments": item.get("arguments")}});
                // Calls of one turn join one assistant message.
                match messages.last_mut() {
                    Some(last) if last["role"] == "assistant" && last.get("tool_calls").is_some() => {
                        last["tool_calls"].as_array_mut().expect("an array").push(call);
                    }
                    _ => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let output = match item.remove("output") {
                    Some(Value::String(text)) => text,
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                messages
                    .push(json!({"role": "tool", "tool_call_id": item.get("call_id"), "content": output}));
            }
            // Reasoning items of another model mean nothing to this one.
            "reasoning" => {}
            other => {
                return Err(ApiError::invalid_param(
                    param(".type"),
                    format!("Input items of type '{}' are not supported.", excerpt(other)),
                ));
            }
        }
    }
    Ok(messages)
}

/// A message's content: a string, or text parts (`input_text`, `output_text`) joined.
fn message_content(index: usize, value: Option<Value>) -> Result<Value, ApiError> {
    let parts = match value {
        Some(Value::Array(parts)) => parts,
        Some(other) => return Ok(other),
        None => return Ok(Value::Null),
    };
    let mut texts = Vec::with_capacity(parts.len());
    for (part_index, part) in parts.into_iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str).unwrap_or_default();
        match (kind, part.get("text").and_then(Value::as_str)) {
            ("input_text" | "output_text" | "text", Some(text)) => texts.push(text.to_string()),
            _ => {
                return Err(ApiError::invalid_param(
                    format!("input[{index}].content[{part_index}].type"),
                    format!("Content parts of type '{}' are not supported: only text is.", excerpt(kind)),
                ));
            }
        }
    }
    Ok(Value::String(texts.join("\n")))
}

/// The Responses API's flat function tools in the chat shape.
fn chat_tools(tools: Value) -> Result<Value, ApiError> {
    let Value::Array(tools) = tools else {
        return Err(ApiError::invalid_param("tools", "'tools' must be an array."));
    };
    let tools = tools
        .into_iter()
        .map(|tool| match tool {
            Value::Object(mut tool) => {
                let kind = tool.remove("type").unwrap_or(Value::Null);
                json!({"type": kind, "function": Value::Object(tool)})
            }
            other => other,
        })
        .collect();
    Ok(Value::Array(tools))
}

/// `{"type": "function", "name": ...}` in the chat shape; the rest as it is.
fn chat_tool_choice(choice: Value) -> Value {
    match choice {
        Value::Object(mut choice) if choice.get("type") == Some(&json!("function")) => {
            json!({"type": "function", "function": {"name": choice.remove("name")}})
        }
        other => other,
    }
}

/// `text.format` as a chat `response_format` (the Responses API's `json_schema` is flat).
fn text_format(text: Option<Value>) -> Result<Option<Value>, ApiError> {
    let text = match text {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(text)) => text,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "text",
                format!("'text' must be an object, not {}.", json_kind(&other)),
            ));
        }
    };
    Ok(match text.get("format") {
        None | Some(Value::Null) => None,
        Some(Value::Object(format)) if format.get("type") == Some(&json!("json_schema")) => {
            let mut schema = format.clone();
            schema.remove("type");
            Some(json!({"type": "json_schema", "json_schema": schema}))
        }
        Some(other) => Some(other.clone()),
    })
}

/// An error about the chat request this one became, naming the Responses API's field instead.
fn responses_error(error: ApiError) -> ApiError {
    match error {
        ApiError::InvalidRequest { message, param: Some(param) } => {
            ApiError::InvalidRequest { message, param: Some(responses_param(&param)) }
        }
        ApiError::Engine(EngineError::InvalidParam { param, message }) => {
            ApiError::Engine(EngineError::InvalidParam { param: responses_param(&param), message })
        }
        other => other,
    }
}

fn responses_param(param: &str) -> String {
    if let Some(rest) = param.strip_prefix("response_format") {
        return format!("text.format{}", rest.replacen(".json_schema", "", 1));
    }
    if param == "max_tokens" {
        return "max_output_tokens".into();
    }
    if let Some(rest) = param.strip_prefix("tools[")
        && let Some((index, field)) = rest.split_once("].function")
    {
        return format!("tools[{index}]{field}");
    }
    if let Some(rest) = param.strip_prefix("messages") {
        return format!("input{rest}");
    }
    param.to_string()
}

pub async fn create_response(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<ResponsesRequest>,
) -> Result<Response, ApiError> {
    let ResponsesRequest { chat, stream, echo } = request;
    tracing::Span::current().record("model", chat.model.as_str());
    let ChatCompletionRequest { model, messages, options } = chat;
    let engine = state.engine_for(&caller, &model).map_err(responses_error)?;
    let tools = options.tools();
    let default_max_tokens = state.context_length(&model).unwrap_or(DEFAULT_CHAT_MAX_TOKENS);
    let request =
        options.request(model, Prompt::Chat(messages), default_max_tokens).map_err(responses_error)?;
    let events = engine.generate(request).await.map_err(|error| responses_error(error.into()))?;
    let node = events.served_by.clone();
    let mut writer = ResponseEvents::new(echo, tools.active().then(|| ToolCallParser::new(tools)));
    if stream {
        return Ok(served_by(stream_sse(events, writer, true), node.as_deref()));
    }
    let collected = collect(events).await.map_err(responses_error)?;
    writer.text(collected.text);
    writer.finish(collected.finish_reason);
    let response = writer.response(Some(collected.usage));
    Ok(served_by(Json(response).into_response(), node.as_deref()))
}

/// Builds the `response` object and, when streamed, its events.
struct ResponseEvents {
    id: String,
    created_at: u64,
    echo: Map<String, Value>,
    parser: Option<ToolCallParser>,
    /// The output items so far; the last may still be open (a message being written).
    output: Vec<Value>,
    /// Whether the last output item is a message still being written.
    message_open: bool,
    finish_reason: Option<FinishReason>,
    sequence_number: u64,
}

impl ResponseEvents {
    fn new(echo: Map<String, Value>, parser: Option<ToolCallParser>) -> Self {
        Self {
            id: format!("resp_{}", uuid::Uuid::new_v4().simple()),
            created_at: unix_now(),
            echo,
            parser,
            output: Vec::new(),
            message_open: false,
            finish_reason: None,
            sequence_number: 0,
        }
    }

    /// The `response` object as it stands (`usage` once known).
    fn response(&self, usage: Option<Usage>) -> Value {
        let status = match self.finish_reason {
            None => "in_progress",
            Some(FinishReason::Length) => "incomplete",
            Some(_) => "completed",
        };
        let mut response = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": (status == "incomplete").then(|| json!({"reason": "max_output_tokens"})),
            "output": self.output,
            "previous_response_id": null,
            "store": false,
            "metadata": {},
            "usage": usage.map(|usage| json!({
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            })),
        });
        let object = response.as_object_mut().expect("an object");
        for (key, value) in &self.echo {
            object.insert(key.clone(), value.clone());
        }
        if object.get("parallel_tool_calls").is_none_or(Value::is_null) {
            object.insert("parallel_tool_calls".into(), Value::Bool(true));
        }
        response
    }

    fn event(&mut self, kind: &str, mut data: Value) -> Event {
        data["type"] = kind.into();
        data["sequence_number"] = self.sequence_number.into();
        self.sequence_number += 1;
        Event::default().event(kind).data(data.to_string())
    }

    /// Text and calls as output items, with the events that report them.
    fn parsed(&mut self, parsed: Vec<Parsed>) -> Vec<Event> {
        let mut events = Vec::new();
        for item in parsed {
            match item {
                Parsed::Content(text) => {
                    if !self.message_open {
                        events.extend(self.open_message());
                    }
                    let index = self.output.len() - 1;
                    let message = &mut self.output[index];
                    let item_id = message["id"].clone();
                    let written =
                        message["content"][0]["text"].as_str().unwrap_or_default().to_string() + &text;
                    message["content"][0]["text"] = written.into();
                    let delta = json!({"item_id": item_id, "output_index": index, "content_index": 0,
                        "delta": text, "logprobs": []});
                    events.push(self.event("response.output_text.delta", delta));
                }
                Parsed::Call(call) => {
                    events.extend(self.close_message());
                    events.extend(self.function_call(call));
                }
            }
        }
        events
    }

    fn open_message(&mut self) -> Vec<Event> {
        let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
        let item =
            json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []});
        self.output.push(item.clone());
        self.message_open = true;
        let index = self.output.len() - 1;
        let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
        self.output[index]["content"] = json!([part.clone()]);
        vec![
            self.event("response.output_item.added", json!({"output_index": index, "item": item})),
            self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            ),
        ]
    }

    fn close_message(&mut self) -> Vec<Event> {
        if !self.message_open {
            return Vec::new();
        }
        self.message_open = false;
        let index = self.output.len() - 1;
        self.output[index]["status"] = "completed".into();
        let item = self.output[index].clone();
        let part = item["content"][0].clone();
        let id = item["id"].clone();
        vec![
            self.event(
                "response.output_text.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "text": part["text"], "logprobs": []}),
            ),
            self.event(
                "response.content_part.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            ),
            self.event("response.output_item.done", json!({"output_index": index, "item": item})),
        ]
    }

    fn function_call(&mut self, call: ToolCall) -> Vec<Event> {
        let id = format!("fc_{}", uuid::Uuid::new_v4().simple());
        let index = self.output.len();
        let mut item = json!({"type": "function_call", "id": id, "call_id": call.id, "name": call.name,
            "arguments": "", "status": "in_progress"});
        let added = self.event("response.output_item.added", json!({"output_index": index, "item": item}));
        let delta = self.event(
            "response.function_call_arguments.delta",
            json!({"item_id": id, "output_index": index, "delta": call.arguments}),
        );
        let done = self.event(
            "response.function_call_arguments.done",
            json!({"item_id": id, "output_index": index, "name": call.name, "arguments": call.arguments}),
        );
        item["arguments"] = call.arguments.into();
        item["status"] = "completed".into();
        self.output.push(item.clone());
        let item_done = self.event("response.output_item.done", json!({"output_index": index, "item": item}));
        vec![added, delta, done, item_done]
    }
}

impl ChunkWriter for ResponseEvents {
    fn opening(&mut self) -> Option<Event> {
        let created = self.event("response.created", json!({"response": self.response(None)}));
        Some(created)
    }

    fn text(&mut self, text: String) -> Vec<Event> {
        let parsed = match &mut self.parser {
            Some(parser) => parser.push(&text),
            None => vec![Parsed::Content(text)],
        };
        self.parsed(parsed)
    }

    fn logprobs(&mut self, _entry: TokenLogprob) {}

    /// Closes the output; `response.completed` follows from `usage`, which always comes.
    fn finish(&mut self, finish_reason: FinishReason) -> Vec<Event> {
        let parsed = self.parser.as_mut().map(ToolCallParser::finish).unwrap_or_default();
        let mut events = self.parsed(parsed);
        events.extend(self.close_message());
        self.finish_reason = Some(finish_reason);
        events
    }

    fn usage(&self, usage: Usage) -> Event {
        let response = self.response(Some(usage));
        let kind = if self.finish_reason == Some(FinishReason::Length) {
            "response.incomplete"
        } else {
            "response.completed"
        };
        let data = json!({"type": kind, "sequence_number": self.sequence_number, "response": response});
        Event::default().event(kind).data(data.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(value: Value) -> Result<ResponsesRequest, ApiError> {
        let Value::Object(fields) = value else { panic!("an object") };
        ResponsesRequest::from_json_object(JsonObject(fields))
    }

    #[test]
    fn input_items_become_the_chat_they_amount_to() {
        let parsed = request(json!({
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"},
                {"type": "function_call", "call_id": "call_2", "name": "time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                {"type": "reasoning", "summary": []},
            ],
            "tools": [{"type": "function", "name": "weather"}, {"type": "function", "name": "time"}],
            "tool_choice": {"type": "function", "name": "time"},
            "max_output_tokens": 5,
        }))
        .expect("valid");
        let messages = &parsed.chat.messages;
        assert_eq!(messages.len(), 4, "{messages:#?}");
        assert_eq!((messages[0].role.as_str(), messages[0].content.as_str()), ("system", "Be brief."));
        assert_eq!(messages[2].tool_calls.len(), 2, "calls of one turn share a message");
        assert_eq!(messages[3].tool_call_id.as_deref(), Some("call_1"));
        let params = parsed.chat.options.sampling_params(100);
        assert_eq!(params.max_tokens, 5);
        assert_eq!(params.tools.choice, crate::engine::ToolChoice::Function("time".into()));
    }

    #[test]
    fn errors_name_the_responses_fields() {
        let param_of = |value: Value| {
            let error = request(value).err().expect("refused");
            error.body().error.param.expect("a param")
        };
        let base = |extra: Value| {
            let mut body = json!({"model": "m", "input": "hi"});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            body
        };
        assert_eq!(param_of(json!({"model": "m"})), "input");
        assert_eq!(param_of(base(json!({"previous_response_id": "resp_1"}))), "previous_response_id");
        assert_eq!(param_of(base(json!({"tools": [{"type": "web_search"}]}))), "tools[0].type");
        assert_eq!(param_of(base(json!({"tools": [{"type": "function", "name": "a b"}]}))), "tools[0].name");
        assert_eq!(param_of(base(json!({"max_output_tokens": -1}))), "max_output_tokens");
        assert_eq!(
            param_of(base(json!({"text": {"format": {"type": "json_schema", "schema": {}}}}))),
            "text.format.name"
        );
        assert_eq!(
            param_of(json!({"model": "m", "input": [{"type": "image_generation_call"}]})),
            "input[0].type"
        );
    }
}
