//! Tool calling, the engine's half: the tools a request offers, how the model is told about them,
//! and the grammar that keeps its calls well formed. (Reading the calls back out of the text is
//! the API's half, `api/tool_calls.rs`: the engine streams plain text, so a call resumed on
//! another host reads the same.)
//!
//! How a model is told depends on its chat template, read once at load ([`ToolFormat`]):
//! - a template that renders `tools` itself in a format llmesh knows gets them as the `tools`
//!   variable, and its calls are grammar-constrained in that format: Hermes/Qwen
//!   `<tool_call>{json}</tool_call>`, Llama 3.x's bare `{"name", "parameters"}` object, Mistral's
//!   `[TOOL_CALLS][...]` array;
//! - any other template (SmolLM2's, Gemma's) is *generic*: the tools are described in the system
//!   message, and the whole answer is one JSON object, `{"tool_calls": [...]}` or
//!   `{"response": "..."}`, held to that shape by the grammar (llama.cpp's generic format).
//!
//! `tool_choice` decides where the grammar starts. `required` and a named function constrain the
//! answer from its first token. `auto` leaves a native model free until it writes its call
//! marker: from there on the call is constrained (a lazy grammar, [`GrammarPlan::AfterMarker`]).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::grammar::{ResponseFormat, close_objects, json_layout, parse_schema_text};
use super::validation::{InvalidParam, excerpt};
use super::{ChatMessage, ToolCall};

/// Tools one request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// 1 to 64 letters, digits, underscores and dashes.
    pub name: String,
    pub description: String,
    /// The JSON Schema of its arguments, as JSON text (an object).
    pub parameters: String,
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum ToolChoice {
    /// The model decides between text and calls.
    #[default]
    Auto,
    /// No calls: the tools are not shown to the model.
    None,
    /// At least one call.
    Required,
    /// A call of this function.
    Function(String),
}

/// A request's tools and what it lets the model do with them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolParams {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// Whether one answer may hold several calls (OpenAI's default: yes).
    pub parallel: bool,
}

impl Default for ToolParams {
    fn default() -> Self {
        Self { tools: Vec::new(), choice: ToolChoice::Auto, parallel: true }
    }
}

impl ToolParams {
    /// Whether the model is offered tools at all.
    pub fn active(&self) -> bool {
        !self.tools.is_empty() && self.choice != ToolChoice::None
    }

    /// The limits the API and a host check alike.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        if self.tools.len() > MAX_TOOLS {
            return Err(InvalidParam::new(
                "tools",
                format!("'tools' holds {} tools; the limit is {MAX_TOOLS}.", self.tools.len()),
            ));
        }
        for (index, tool) in self.tools.iter().enumerate() {
            if !valid_name(&tool.name) {
                return Err(InvalidParam::new(
                    format!("tools[{index}].function.name"),
                    "A function name must be 1 to 64 letters, digits, underscores or dashes.",
                ));
            }
            if self.tools[..index].iter().any(|other| other.name == tool.name) {
                return Err(InvalidParam::new(
                    format!("tools[{index}].function.name"),
                    format!("Two tools are named '{}'.", tool.name),
                ));
            }
            parse_schema_text(&tool.parameters, &format!("tools[{index}].function.parameters"))?;
        }
        match &self.choice {
            ToolChoice::Required | ToolChoice::Function(_) if self.tools.is_empty() => {
                Err(InvalidParam::new(
                    "tool_choice",
                    "'tool_choice' asks for a tool call, but the request has no 'tools'.",
                ))
            }
            ToolChoice::Function(name) if !self.tools.iter().any(|tool| &tool.name == name) => {
                Err(InvalidParam::new(
                    "tool_choice",
                    format!("'tool_choice' names function '{}', which is not among 'tools'.", excerpt(name)),
                ))
            }
            _ => Ok(()),
        }
    }

    /// The tools the model may call under `choice`.
    fn callable(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(|tool| match &self.choice {
            ToolChoice::Function(name) => &tool.name == name,
            _ => true,
        })
    }

    /// The `tools` variable of a chat template: OpenAI's shape, parameters as objects.
    pub fn template_tools(&self) -> Vec<Value> {
        self.tools
            .iter()
            .map(|tool| {
                json!({"type": "function", "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": schema_value(&tool.parameters),
                }})
            })
            .collect()
    }
}

/// OpenAI's rule for function names.
pub fn valid_name(name: &str) -> bool {
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    !name.is_empty() && name.len() <= 64 && name.chars().all(valid)
}

/// How a model writes its tool calls, from its chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (Hermes, Qwen 2.5 and 3).
    Hermes,
    /// A bare `{"name": ..., "parameters": {...}}` object (Llama 3.1 to 3.3).
    Llama3,
    /// `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` (Mistral).
    Mistral,
    /// The template knows no tools: llmesh describes them and asks for one JSON object.
    Generic,
}

impl ToolFormat {
    /// The format a template's source shows (a template that does not render `tools` is generic).
    pub fn of_template(source: Option<&str>) -> Self {
        let Some(source) = source.filter(|source| source.contains("tools")) else {
            return ToolFormat::Generic;
        };
        if source.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if source.contains("<|python_tag|>") || source.contains("ipython") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Generic
        }
    }

    /// Whether the template is given the `tools` variable (else llmesh describes them).
    pub fn template_renders_tools(self) -> bool {
        self != ToolFormat::Generic
    }

    /// The key a call's arguments go under.
    fn arguments_key(self) -> &'static str {
        if self == ToolFormat::Llama3 { "parameters" } else { "arguments" }
    }

    /// Where a call starts in free text (`auto`), for the formats whose calls are marked.
    fn marker(self) -> Option<&'static str> {
        match self {
            ToolFormat::Hermes => Some("<tool_call>"),
            ToolFormat::Llama3 => Some("{\""),
            ToolFormat::Mistral => Some("[TOOL_CALLS]"),
            ToolFormat::Generic => None,
        }
    }
}

/// What one generation's grammar is, and from where it applies.
#[derive(Debug)]
pub enum GrammarPlan {
    /// No grammar.
    Free,
    /// From the first token.
    Now(llguidance::api::TopLevelGrammar),
    /// From where `marker` first appears in the output (the grammar matches the marker too).
    /// `at_start`: only if the output begins with it.
    AfterMarker { marker: &'static str, at_start: bool, grammar: llguidance::api::TopLevelGrammar },
}

/// The grammar for a generation with these tools and response format, in `format`.
pub fn grammar_plan(
    tools: &ToolParams,
    response_format: &ResponseFormat,
    format: ToolFormat,
) -> Result<GrammarPlan, InvalidParam> {
    if !tools.active() {
        return Ok(match response_format.grammar()? {
            Some(grammar) => GrammarPlan::Now(grammar),
            None => GrammarPlan::Free,
        });
    }
    let must_call = tools.choice != ToolChoice::Auto;
    let calls = call_schema(tools, format)?;
    if format == ToolFormat::Generic {
        let tool_calls = calls_object(calls, tools.parallel);
        let schema = if must_call {
            tool_calls
        } else {
            let response = match response_format {
                ResponseFormat::Text => json!({"type": "string"}),
                ResponseFormat::JsonObject => json!({"type": "object"}),
                ResponseFormat::JsonSchema { schema } => {
                    Value::Object(parse_schema_text(schema, super::grammar::SCHEMA_PARAM)?)
                }
            };
            let response = json!({"type": "object", "properties": {"response": response},
                "required": ["response"], "additionalProperties": false});
            json!({"anyOf": [tool_calls, response]})
        };
        return Ok(GrammarPlan::Now(json_grammar(schema)));
    }
    if response_format.is_constrained() {
        return Err(InvalidParam::new(
            "response_format",
            "'response_format' and 'tools' cannot be combined for this model: its chat template \
             writes tool calls in its own format. Send one or the other.",
        ));
    }
    let grammar = lark_grammar(&calls, format, tools.parallel);
    let Some(marker) = format.marker().filter(|_| !must_call) else {
        return Ok(GrammarPlan::Now(grammar));
    };
    Ok(GrammarPlan::AfterMarker { marker, at_start: format == ToolFormat::Llama3, grammar })
}

/// One call of any callable tool: `{"name": <const>, "arguments": <its schema>}`. Arguments
/// are what the function declares: an object schema that does not say whether other properties
/// may appear gets none (as in OpenAI's strict mode; nested objects too, `close_objects`), or a
/// small model fills its arguments with whatever keys come to it.
fn call_schema(tools: &ToolParams, format: ToolFormat) -> Result<Value, InvalidParam> {
    let key = format.arguments_key();
    let variants: Vec<Value> = tools
        .callable()
        .map(|tool| {
            let mut arguments = schema_value(&tool.parameters);
            if let Value::Object(schema) = &mut arguments
                && schema.get("type").and_then(Value::as_str) == Some("object")
            {
                // The arguments themselves even without `properties`: a function that declares
                // none takes none.
                schema.entry("additionalProperties").or_insert(Value::Bool(false));
            }
            close_objects(&mut arguments);
            json!({
                "type": "object",
                "properties": {"name": {"const": tool.name}, key: arguments},
                "required": ["name", key],
                "additionalProperties": false,
            })
        })
        .collect();
    match variants.len() {
        0 => Err(InvalidParam::new("tool_choice", "No tool can be called.")),
        1 => Ok(variants.into_iter().next().expect("one variant")),
        _ => Ok(json!({"anyOf": variants})),
    }
}

/// The generic format's `{"tool_calls": [call, ...]}`.
fn calls_object(call: Value, parallel: bool) -> Value {
    let mut array = json!({"type": "array", "items": call, "minItems": 1});
    if !parallel {
        array["maxItems"] = 1.into();
    }
    json!({"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"],
        "additionalProperties": false})
}

fn json_grammar(mut schema: Value) -> llguidance::api::TopLevelGrammar {
    schema["x-guidance"] = json_layout();
    llguidance::api::TopLevelGrammar::from_json_schema(schema)
}

/// A native format's calls as a Lark grammar around the call's JSON Schema.
fn lark_grammar(call: &Value, format: ToolFormat, parallel: bool) -> llguidance::api::TopLevelGrammar {
    let mut call = call.clone();
    call["x-guidance"] = json_layout();
    let rules = match format {
        ToolFormat::Hermes => {
            let more = if parallel { r#" ("\n" tool_call)*"# } else { "" };
            format!("start: tool_call{more}\ntool_call: \"<tool_call>\\n\" call \"\\n</tool_call>\"\n")
        }
        ToolFormat::Llama3 => "start: call\n".to_string(),
        ToolFormat::Mistral => {
            let more = if parallel { r#" (", " call)*"# } else { "" };
            format!("start: \"[TOOL_CALLS][\" call{more} \"]\"\n")
        }
        ToolFormat::Generic => unreachable!("the generic format is a JSON Schema"),
    };
    llguidance::api::TopLevelGrammar::from_lark(format!("{rules}call: %json {call}\n"))
}

/// A schema the API has checked is a JSON object; anything else reads as "any value".
fn schema_value(text: &str) -> Value {
    serde_json::from_str::<Map<String, Value>>(text).map(Value::Object).unwrap_or_else(|_| json!({}))
}

/// The conversation as a template that knows no tools sees it: the tools described in the system
/// message, the assistant's calls written as the JSON it answers with, and tool results as a
/// user turn (templates such as Gemma's accept only alternating user and assistant turns).
pub fn generic_messages(messages: &[ChatMessage], tools: &ToolParams) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    let instructions = tools.active().then(|| generic_instructions(tools));
    let mut rest = messages;
    if let Some(instructions) = instructions {
        match messages.first() {
            Some(first) if first.role == "system" => {
                out.push(ChatMessage::text("system", format!("{}\n\n{instructions}", first.content)));
                rest = &messages[1..];
            }
            _ => out.push(ChatMessage::text("system", instructions)),
        }
    }
    for message in rest {
        if message.role == "tool" {
            let result = json!({"tool_call_id": message.tool_call_id, "content": message.content});
            let line = laid_out(&json!({"tool_result": result}));
            match out.last_mut() {
                Some(previous) if previous.role == "user" && previous.tool_call_id.is_some() => {
                    previous.content.push('\n');
                    previous.content.push_str(&line);
                }
                _ => {
                    let mut turn = ChatMessage::text("user", line);
                    // Marks the turn as tool results, so that the next one joins it.
                    turn.tool_call_id = message.tool_call_id.clone();
                    out.push(turn);
                }
            }
        } else if message.role == "assistant" && !message.tool_calls.is_empty() {
            out.push(ChatMessage::text("assistant", generic_calls_text(&message.tool_calls)));
        } else {
            out.push(ChatMessage::text(&message.role, message.content.clone()));
        }
    }
    out
}

/// Calls as the generic format writes them.
fn generic_calls_text(calls: &[ToolCall]) -> String {
    let calls: Vec<Value> = calls
        .iter()
        .map(|call| json!({"name": call.name, "arguments": arguments_value(&call.arguments)}))
        .collect();
    laid_out(&json!({"tool_calls": calls}))
}

/// JSON in the one layout llmesh generates (`{"a": 1, "b": [2, 3]}`), so that past calls read
/// as the model would write them.
fn laid_out(value: &Value) -> String {
    match value {
        Value::Array(items) => format!("[{}]", items.iter().map(laid_out).collect::<Vec<_>>().join(", ")),
        Value::Object(object) => {
            let members: Vec<String> = object
                .iter()
                .map(|(key, value)| format!("{}: {}", Value::from(key.as_str()), laid_out(value)))
                .collect();
            format!("{{{}}}", members.join(", "))
        }
        scalar => scalar.to_string(),
    }
}

/// A call's arguments as JSON when they parse (templates expect an object), else the text.
pub fn arguments_value(arguments: &str) -> Value {
    serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_string()))
}

fn generic_instructions(tools: &ToolParams) -> String {
    let tools: Vec<Value> = tools
        .callable()
        .map(|tool| {
            json!({"name": tool.name, "description": tool.description,
                "parameters": schema_value(&tool.parameters)})
        })
        .collect();
    let listed = serde_json::to_string_pretty(&tools).unwrap_or_default();
    format!(
        "You can call these tools:\n{listed}\n\nAnswer with one JSON object. To call tools: \
         {{\"tool_calls\": [{{\"name\": \"<tool name>\", \"arguments\": {{...}}}}]}}. To answer \
         directly: {{\"response\": \"<your answer>\"}}. After a call, the results come back as \
         {{\"tool_result\": ...}}."
    )
}

#[cfg(test)]
mod tests;
