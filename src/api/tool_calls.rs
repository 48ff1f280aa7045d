//! Tool calling, the API's half: `tools`, `tool_choice` and `parallel_tool_calls` read from a chat
//! request, and the calls read back out of the text the model generates.
//!
//! The engine streams the model's text as it is, tool-call markup included, so that an answer
//! resumed on another host continues the same text. [`ToolCallParser`] turns that text into
//! content and calls, for every format a model may write (see `engine/tools.rs`): Hermes/Qwen
//! `<tool_call>{...}</tool_call>`, Mistral `[TOOL_CALLS][...]`, Llama 3.x `{"name", "parameters"}`
//! (after `<|python_tag|>` or alone), and llmesh's generic `{"tool_calls": [...]}` /
//! `{"response": "..."}`. Text that may still turn out to be a call is held back until it is
//! ruled out; a call whose name is not among the request's tools, or whose JSON does not parse,
//! stays text.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::extract::{JsonObject, json_kind};
use crate::engine::{Tool, ToolCall, ToolChoice, ToolParams, valid_name};

/// The markers after which a call follows, and how its text ends.
const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_MARKER: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";
const MARKERS: [&str; 3] = [HERMES_OPEN, MISTRAL_MARKER, PYTHON_TAG];
/// How the generic format's plain answer begins, in the one layout llmesh generates.
const RESPONSE_OPENING: &str = "{\"response\": \"";

/// The request's `tools`, `tool_choice` and `parallel_tool_calls`.
pub fn parse_tool_params(fields: &mut JsonObject) -> Result<ToolParams, ApiError> {
    let tools = match fields.take("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            items.into_iter().enumerate().map(|(i, item)| parse_tool(i, item)).collect::<Result<_, _>>()?
        }
        Some(other) => {
            return Err(ApiError::invalid_param(
                "tools",
                format!("'tools' must be an array, not {}.", json_kind(&other)),
            ));
        }
    };
    // OpenAI's default: `auto` when there are tools, `none` when there are none.
    let choice = match fields.take("tool_choice") {
        None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(value) => parse_tool_choice(value)?,
    };
    let parallel = fields.optional::<bool>("parallel_tool_calls")?.unwrap_or(true);
    let params = ToolParams { tools, choice, parallel };
    params.validate()?;
    Ok(params)
}

fn parse_tool(index: usize, item: Value) -> Result<Tool, ApiError> {
    let field = |name: &str| format!("tools[{index}].{name}");
    let Value::Object(mut tool) = item else {
        return Err(ApiError::invalid_param(
            format!("tools[{index}]"),
            format!("Each tool must be an object, not {}.", json_kind(&item)),
        ));
    };
    match tool.remove("type") {
        Some(Value::String(kind)) if kind == "function" => {}
        _ => {
            return Err(ApiError::invalid_param(
                field("type"),
                "Only tools of type 'function' are supported.",
            ));
        }
    }
    let Some(Value::Object(mut function)) = tool.remove("function") else {
        return Err(ApiError::invalid_param(
            field("function"),
            format!("'{}' must be an object.", field("function")),
        ));
    };
    let name = match function.remove("name") {
        Some(Value::String(name)) if valid_name(&name) => name,
        _ => {
            return Err(ApiError::invalid_param(
                field("function.name"),
                format!(
                    "'{}' must be 1 to 64 letters, digits, underscores or dashes.",
                    field("function.name")
                ),
            ));
        }
    };
    let description = match function.remove("description") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(description)) => description,
        Some(other) => {
            return Err(ApiError::invalid_param(
                field("function.description"),
                format!("A description must be a string, not {}.", json_kind(&other)),
            ));
        }
    };
    let parameters = match function.remove("parameters") {
        // OpenAI's default: a function that takes no arguments.
        None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
        Some(Value::Object(schema)) => Value::Object(schema),
        Some(other) => {
            return Err(ApiError::invalid_param(
                field("function.parameters"),
                format!("'parameters' must be a JSON Schema object, not {}.", json_kind(&other)),
            ));
        }
    };
    match function.remove("strict") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => {}
        Some(other) => {
            return Err(ApiError::invalid_param(
                field("function.strict"),
                format!("'strict' must be a boolean, not {}.", json_kind(&other)),
            ));
        }
    }
    Ok(Tool { name, description, parameters: parameters.to_string() })
}

fn parse_tool_choice(value: Value) -> Result<ToolChoice, ApiError> {
    const EXPECTED: &str =
        "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}";
    let invalid = || ApiError::invalid_param("tool_choice", format!("'tool_choice' must be {EXPECTED}."));
    match value {
        Value::String(choice) => match choice.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            _ => Err(invalid()),
        },
        Value::Object(mut choice) => {
            if choice.remove("type") != Some(Value::String("function".into())) {
                return Err(invalid());
            }
            match choice.remove("function") {
                Some(Value::Object(mut function)) => match function.remove("name") {
                    Some(Value::String(name)) => Ok(ToolChoice::Function(name)),
                    _ => Err(ApiError::invalid_param(
                        "tool_choice.function.name",
                        "A function name is required.",
                    )),
                },
                _ => Err(invalid()),
            }
        }
        _ => Err(invalid()),
    }
}

/// An assistant message's `tool_calls`.
pub fn parse_message_tool_calls(index: usize, value: Option<Value>) -> Result<Vec<ToolCall>, ApiError> {
    let param = format!("messages[{index}].tool_calls");
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ApiError::invalid_param(
                param,
                format!("'tool_calls' must be an array, not {}.", json_kind(&other)),
            ));
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(call_index, item)| {
            let invalid = |what: &str| {
                ApiError::invalid_param(
                    format!("{param}[{call_index}]{what}"),
                    format!("A tool call needs {}.", &what[1..]),
                )
            };
            let Value::Object(mut call) = item else { return Err(invalid(".function")) };
            let id = match call.remove("id") {
                Some(Value::String(id)) => id,
                _ => return Err(invalid(".id")),
            };
            let Some(Value::Object(mut function)) = call.remove("function") else {
                return Err(invalid(".function"));
            };
            let name = match function.remove("name") {
                Some(Value::String(name)) => name,
                _ => return Err(invalid(".function.name")),
            };
            let arguments = match function.remove("arguments") {
                Some(Value::String(arguments)) => arguments,
                // Some clients send the object itself.
                Some(value @ Value::Object(_)) => value.to_string(),
                None | Some(Value::Null) => "{}".to_string(),
                Some(_) => return Err(invalid(".function.arguments")),
            };
            Ok(ToolCall { id, name, arguments })
        })
        .collect()
}

/// What the generated text is, read so far.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Content(String),
    Call(ToolCall),
}

/// Reads content and calls out of generated text, piece by piece.
pub struct ToolCallParser {
    names: Vec<String>,
    state: State,
    /// Text not yet handed out.
    buffer: String,
    calls: usize,
    /// Whitespace right after a call is dropped (it separates calls).
    after_call: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Nothing but whitespace yet.
    Start,
    /// Free text, watching for a marker.
    Text,
    /// Inside `<tool_call>`, until `</tool_call>`.
    Hermes,
    /// After `[TOOL_CALLS]` or `<|python_tag|>`, or an answer that began as JSON: read at the end.
    Rest,
    /// Inside the generic format's `"response"` string.
    ResponseString,
    /// After the response string's closing quote: the object's end, dropped.
    AfterResponse,
}

impl ToolCallParser {
    pub fn new(tools: &ToolParams) -> Self {
        let names = tools.tools.iter().map(|tool| tool.name.clone()).collect();
        Self { names, state: State::Start, buffer: String::new(), calls: 0, after_call: false }
    }

    /// Whether any call was read.
    pub fn made_calls(&self) -> bool {
        self.calls > 0
    }

    /// More generated text; what can be told of it now.
    pub fn push(&mut self, text: &str) -> Vec<Parsed> {
        self.buffer.push_str(text);
        let mut out = Vec::new();
        loop {
            let before = (self.state, self.buffer.len());
            match self.state {
                State::Start => self.start(),
                State::Text => self.text(&mut out),
                State::Hermes => self.hermes(&mut out),
                State::ResponseString => self.response_string(&mut out),
                State::Rest => {}
                State::AfterResponse => self.buffer.clear(),
            }
            if (self.state, self.buffer.len()) == before {
                return out;
            }
        }
    }

    /// The generation ended: whatever was held back, read as well as it can be.
    pub fn finish(&mut self) -> Vec<Parsed> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buffer);
        match self.state {
            State::Start | State::Text => push_content(&mut out, rest),
            State::Hermes => match self.call_from_json(&rest) {
                Some(call) => out.push(Parsed::Call(call)),
                None => push_content(&mut out, format!("{HERMES_OPEN}{rest}")),
            },
            State::Rest => self.read_rest(rest, &mut out),
            State::ResponseString | State::AfterResponse => {}
        }
        self.state = State::AfterResponse;
        out
    }

    fn start(&mut self) {
        let trimmed = self.buffer.trim_start();
        if trimmed.starts_with('{') || trimmed.starts_with('[') {
            if let Some(answer) = trimmed.strip_prefix(RESPONSE_OPENING) {
                self.buffer = answer.to_string();
                self.state = State::ResponseString;
            } else if RESPONSE_OPENING.starts_with(trimmed) {
                // Could still be the generic plain answer: wait.
            } else {
                self.state = State::Rest;
            }
        } else if !trimmed.is_empty() {
            self.state = State::Text;
        }
    }

    fn text(&mut self, out: &mut Vec<Parsed>) {
        if self.after_call {
            self.buffer = self.buffer.trim_start().to_string();
            if self.buffer.is_empty() {
                return;
            }
            self.after_call = false;
        }
        let found =
            MARKERS.iter().filter_map(|marker| self.buffer.find(marker).map(|at| (at, *marker))).min();
        if let Some((at, marker)) = found {
            let after = self.buffer.split_off(at + marker.len());
            self.buffer.truncate(at);
            push_content(out, std::mem::replace(&mut self.buffer, after));
            self.state = if marker == HERMES_OPEN { State::Hermes } else { State::Rest };
            return;
        }
        // Hold back a tail that may begin a marker.
        let held = MARKERS.iter().map(|marker| partial_suffix(&self.buffer, marker)).max().unwrap_or(0);
        let sendable = self.buffer.len() - held;
        let rest = self.buffer.split_off(sendable);
        push_content(out, std::mem::replace(&mut self.buffer, rest));
    }

    fn hermes(&mut self, out: &mut Vec<Parsed>) {
        let Some(at) = self.buffer.find(HERMES_CLOSE) else { return };
        let rest = self.buffer.split_off(at + HERMES_CLOSE.len());
        let call_text = std::mem::replace(&mut self.buffer, rest);
        let json = &call_text[..at];
        match self.call_from_json(json) {
            Some(call) => {
                out.push(Parsed::Call(call));
                self.after_call = true;
            }
            None => push_content(out, format!("{HERMES_OPEN}{call_text}")),
        }
        self.state = State::Text;
    }

    /// The generic format's `{"response": "..."}`: the string's characters as they come.
    fn response_string(&mut self, out: &mut Vec<Parsed>) {
        let mut decoded = String::new();
        let mut consumed = 0;
        let mut chars = self.buffer.char_indices().peekable();
        let mut closed = false;
        while let Some((at, c)) = chars.next() {
            match c {
                '"' => {
                    consumed = at + 1;
                    closed = true;
                    break;
                }
                '\\' => {
                    let escape = &self.buffer[at..];
                    let Some((c, length)) = unescape(escape) else {
                        if escape_may_continue(escape) {
                            break;
                        }
                        // Not JSON after all: hand the rest out as it is.
                        decoded.push_str(escape);
                        consumed = self.buffer.len();
                        break;
                    };
                    decoded.push(c);
                    consumed = at + length;
                    while chars.peek().is_some_and(|(next, _)| *next < consumed) {
                        chars.next();
                    }
                }
                c => {
                    decoded.push(c);
                    consumed = at + c.len_utf8();
                }
            }
        }
        self.buffer.drain(..consumed);
        push_content(out, decoded);
        if closed {
            self.state = State::AfterResponse;
        }
    }

    /// Text after `[TOOL_CALLS]` or `<|python_tag|>`, or an answer that began as JSON.
    fn read_rest(&mut self, rest: String, out: &mut Vec<Parsed>) {
        let body = rest.trim_start();
        let body =
            [MISTRAL_MARKER, PYTHON_TAG].iter().find_map(|marker| body.strip_prefix(marker)).unwrap_or(body);
        let json: Option<Value> = serde_json::from_str(body.trim()).ok();
        let calls = match &json {
            Some(Value::Object(object)) if object.len() == 1 && object.contains_key("response") => {
                let content = match &object["response"] {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                return push_content(out, content);
            }
            Some(Value::Object(object)) => match object.get("tool_calls") {
                Some(Value::Array(items)) => self.calls_from_items(items),
                _ => self.call_from_object(object).map(|call| vec![call]),
            },
            Some(Value::Array(items)) => self.calls_from_items(items),
            _ => None,
        };
        match calls {
            Some(calls) if !calls.is_empty() => out.extend(calls.into_iter().map(Parsed::Call)),
            _ => push_content(out, rest),
        }
    }

    fn calls_from_items(&mut self, items: &[Value]) -> Option<Vec<ToolCall>> {
        items.iter().map(|item| item.as_object().and_then(|object| self.call_from_object(object))).collect()
    }

    fn call_from_json(&mut self, json: &str) -> Option<ToolCall> {
        match serde_json::from_str::<Value>(json.trim()).ok()? {
            Value::Object(object) => self.call_from_object(&object),
            _ => None,
        }
    }

    /// `{"name": ..., "arguments" | "parameters": {...}}`, naming one of the request's tools.
    fn call_from_object(&mut self, object: &Map<String, Value>) -> Option<ToolCall> {
        let name = object.get("name")?.as_str()?;
        if !self.names.iter().any(|known| known == name) {
            return None;
        }
        let arguments = match object.get("arguments").or_else(|| object.get("parameters")) {
            None | Some(Value::Null) => "{}".to_string(),
            // Some models write the arguments as a JSON string.
            Some(Value::String(text)) if serde_json::from_str::<Value>(text).is_ok() => text.clone(),
            Some(value) => value.to_string(),
        };
        self.calls += 1;
        Some(ToolCall { id: call_id(), name: name.to_string(), arguments })
    }
}

fn push_content(out: &mut Vec<Parsed>, text: String) {
    if text.is_empty() {
        return;
    }
    if let Some(Parsed::Content(previous)) = out.last_mut() {
        previous.push_str(&text);
    } else {
        out.push(Parsed::Content(text));
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&length| {
            text.is_char_boundary(text.len() - length) && marker.starts_with(&text[text.len() - length..])
        })
        .unwrap_or(0)
}

/// A JSON escape at the start of `text`: the character and the escape's length.
fn unescape(text: &str) -> Option<(char, usize)> {
    let mut chars = text.chars();
    chars.next()?;
    let c = match chars.next()? {
        '"' => '"',
        '\\' => '\\',
        '/' => '/',
        'b' => '\u{8}',
        'f' => '\u{c}',
        'n' => '\n',
        'r' => '\r',
        't' => '\t',
        'u' => {
            let high = u32::from_str_radix(text.get(2..6)?, 16).ok()?;
            if !(0xD800..0xDC00).contains(&high) {
                return Some((char::from_u32(high).unwrap_or('\u{fffd}'), 6));
            }
            let low =
                text.get(6..12)?.strip_prefix("\\u").and_then(|hex| u32::from_str_radix(hex, 16).ok())?;
            let code = 0x10000 + ((high - 0xD800) << 10) + (low.wrapping_sub(0xDC00) & 0x3FF);
            return Some((char::from_u32(code).unwrap_or('\u{fffd}'), 12));
        }
        _ => return None,
    };
    Some((c, 2))
}

/// Whether `text`, an escape cut short, may still become a whole one.
fn escape_may_continue(text: &str) -> bool {
    let hex = |part: &str| part.chars().all(|c| c.is_ascii_hexdigit());
    if !text.is_ascii() {
        return false;
    }
    match text.len() {
        1 => true,
        2..6 => text.starts_with("\\u") && hex(&text[2..]),
        6..12 => {
            text.starts_with("\\u") && hex(&text[2..6]) && "\\u".starts_with(&text[6..text.len().min(8)])
        }
        _ => false,
    }
}

/// A fresh call id in OpenAI's style.
fn call_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &id[..24])
}

#[cfg(test)]
mod tests;
