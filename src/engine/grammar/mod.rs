//! Constrained decoding: the `response_format` a client asks for, compiled by llguidance into a
//! grammar over the model's tokens, and applied to each step's logits so that only tokens that
//! keep the output inside the grammar can be sampled.
//!
//! Three pieces, with three lifetimes:
//! - [`ResponseFormat`], part of a request's `SamplingParams`: plain data that travels to a
//!   remote host (the schema as JSON text, since bincode cannot carry a `serde_json::Value`);
//! - [`GrammarCompiler`], one per model, made at load and built by the first constrained
//!   request: the vocabulary's trie (`vocabulary.rs`) and llguidance's `ParserFactory`, shared
//!   by every request;
//! - [`TokenConstraint`], one per constrained generation, compiled on the blocking thread that
//!   prepares the prompt and then owned by the generation on the worker: each step it masks the
//!   logits, then is told which token was sampled.
//!
//! JSON is generated in one fixed layout (`{"a": 1, "b": [2, 3]}`, no newlines): free whitespace
//! lets a small model wander off into blank lines until it runs out of tokens.

pub mod fuzz;
mod small_vocabulary;
mod vocabulary;

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;
use toktrie::{SimpleVob, TokEnv};

use super::EngineError;
use super::validation::InvalidParam;
use vocabulary::{ModelVocabulary, TokenSpeller};

/// A schema's JSON text may be this long (a generous bound: real schemas are a few KiB).
pub const MAX_SCHEMA_BYTES: usize = 256 * 1024;
/// Where a bad schema is reported, in OpenAI's words.
pub const SCHEMA_PARAM: &str = "response_format.json_schema.schema";
/// Error messages from llguidance are cut to this many characters before they reach a client.
const MAX_MESSAGE_CHARS: usize = 600;

/// What the generated text must be (OpenAI's `response_format`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum ResponseFormat {
    /// Anything.
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// A JSON value valid against this JSON Schema, given as JSON text (an object).
    JsonSchema { schema: String },
}

impl ResponseFormat {
    pub fn is_constrained(&self) -> bool {
        !matches!(self, ResponseFormat::Text)
    }

    /// What needs no model to check: the schema's size and that it is a JSON object. (What it
    /// asks for is checked when it is compiled, by the host that runs it.)
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let ResponseFormat::JsonSchema { schema } = self else { return Ok(()) };
        parse_schema_text(schema, SCHEMA_PARAM).map(|_| ())
    }

    /// The schema llguidance compiles, with the layout of the output fixed.
    pub(super) fn grammar(&self) -> Result<Option<TopLevelGrammar>, InvalidParam> {
        let mut schema = match self {
            ResponseFormat::Text => return Ok(None),
            ResponseFormat::JsonObject => serde_json::Map::from_iter([("type".into(), "object".into())]),
            ResponseFormat::JsonSchema { schema } => parse_schema_text(schema, SCHEMA_PARAM)?,
        };
        // llguidance reads its options from the schema's `x-guidance`; a client's own is replaced.
        schema.insert("x-guidance".into(), json_layout());
        Ok(Some(TopLevelGrammar::from_json_schema(Value::Object(schema))))
    }
}

/// llguidance's options for the one JSON layout llmesh generates.
pub(super) fn json_layout() -> Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

/// Give every object schema within `schema` that names its `properties` and says nothing of
/// `additionalProperties` an `additionalProperties: false`: no keys but those it names, as
/// OpenAI's strict mode requires of every object (OpenAI refuses a schema without it; llmesh
/// closes it), or a small model goes on adding keys of its own until it runs out of tokens. An
/// object without `properties` (a free-form map) is left open. Subschemas are looked for only
/// under the keywords that hold them, so a property called "properties" is not taken for one;
/// serde_json bounds the nesting.
pub fn close_objects(schema: &mut Value) {
    let Value::Object(map) = schema else { return };
    if map.contains_key("properties") {
        map.entry("additionalProperties").or_insert(Value::Bool(false));
    }
    for (key, child) in map.iter_mut() {
        match (key.as_str(), child) {
            (
                "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas",
                Value::Object(named),
            ) => named.values_mut().for_each(close_objects),
            ("anyOf" | "oneOf" | "allOf" | "prefixItems" | "items", Value::Array(list)) => {
                list.iter_mut().for_each(close_objects)
            }
            (
                "items"
                | "additionalProperties"
                | "additionalItems"
                | "not"
                | "if"
                | "then"
                | "else"
                | "contains"
                | "unevaluatedProperties"
                | "unevaluatedItems",
                child,
            ) => close_objects(child),
            _ => {}
        }
    }
}

/// A schema given as JSON text: a JSON object of bounded size, or an error naming `param`.
pub(super) fn parse_schema_text(
    schema: &str,
    param: &str,
) -> Result<serde_json::Map<String, Value>, InvalidParam> {
    if schema.len() > MAX_SCHEMA_BYTES {
        return Err(InvalidParam::new(
            param,
            format!("The schema is {} bytes long; the limit is {MAX_SCHEMA_BYTES}.", schema.len()),
        ));
    }
    match serde_json::from_str::<Value>(schema) {
        Ok(Value::Object(schema)) => Ok(schema),
        Ok(_) => Err(InvalidParam::new(param, "The schema must be a JSON object.")),
        Err(error) => Err(InvalidParam::new(param, format!("The schema is not valid JSON: {error}."))),
    }
}

/// One model's grammar machinery: its tokens as bytes, and llguidance's parser factory over the
/// vocabulary's trie, built on first use. The factory is the costly part (gemma-3's 262,144
/// tokens: 1.4 s and about 140 MiB, most of it llguidance's pre-sliced tries that make masks
/// fast), and most nodes are never sent a `response_format`: they do not pay for it at load.
pub struct GrammarCompiler {
    speller: TokenSpeller,
    /// Built by the first constrained request (one builds, others wait for it); a vocabulary
    /// llguidance cannot take is remembered as the error.
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl GrammarCompiler {
    /// Check the vocabulary's end tokens and size (cheap); the factory is built on first use.
    pub fn new(tokenizer: Arc<Tokenizer>, eos_token_ids: &[u32]) -> Result<Self, String> {
        Ok(Self { speller: TokenSpeller::new(tokenizer, eos_token_ids)?, factory: OnceLock::new() })
    }

    /// The factory, built now if no request has needed it before. A vocabulary llguidance
    /// cannot take is an error, never a panic.
    pub fn ready(&self) -> Result<&ParserFactory, String> {
        let built = self.factory.get_or_init(|| {
            let started = std::time::Instant::now();
            let build = || -> Result<ParserFactory, String> {
                let vocabulary: TokEnv = Arc::new(ModelVocabulary::new(&self.speller));
                let mut factory =
                    ParserFactory::new_simple(&vocabulary).map_err(|error| error.to_string())?;
                factory.quiet();
                // Errors name what went wrong, without the parser's state and the whole grammar.
                factory.limits_mut().verbose_errors = false;
                Ok(factory)
            };
            let built = std::panic::catch_unwind(AssertUnwindSafe(build))
                .unwrap_or_else(|_| Err("llguidance panicked on the vocabulary".into()));
            match &built {
                Ok(_) => {
                    tracing::debug!(seconds = started.elapsed().as_secs_f32(), "grammar vocabulary built")
                }
                Err(error) => {
                    tracing::warn!(%error, "no constrained decoding (response_format, tools) for this model")
                }
            }
            built
        });
        built.as_ref().map_err(Clone::clone)
    }

    /// A token's bytes (a special token's name), for log-probabilities.
    pub fn token_bytes(&self, token: u32) -> Vec<u8> {
        if token >= self.speller.size() {
            return Vec::new();
        }
        let bytes = self.speller.bytes(token);
        match bytes.strip_prefix(&[toktrie::TokTrie::SPECIAL_TOKEN_MARKER]) {
            Some(name) => name.to_vec(),
            None => bytes,
        }
    }

    /// The constraint for one generation. A schema llguidance cannot compile (unsupported
    /// keywords, one no value satisfies, beyond its limits) is the client's error, naming `param`
    /// (where the schema came from). Slow for large schemas: run it off the async runtime.
    pub fn compile_grammar(
        &self,
        grammar: TopLevelGrammar,
        param: &str,
    ) -> Result<TokenConstraint, EngineError> {
        let factory = self.ready().map_err(|error| EngineError::InvalidParam {
            param: param.into(),
            message: format!(
                "This model's vocabulary cannot be used for constrained decoding: {}",
                cut(&error)
            ),
        })?;
        let parser = factory.create_parser(grammar).map_err(|error| EngineError::InvalidParam {
            param: param.into(),
            message: format!("The schema cannot be used: {}", cut(&error.to_string())),
        })?;
        let matcher = Matcher::new(Ok(parser));
        let vocabulary_size = factory.tok_env().tok_trie().vocab_size();
        Ok(TokenConstraint { matcher, vocabulary_size })
    }
}

/// One generation's grammar: which tokens may come next, given those sampled so far.
pub struct TokenConstraint {
    matcher: Matcher,
    vocabulary_size: usize,
}

impl TokenConstraint {
    /// The tokens the grammar allows next. Fails if the matcher failed or allows nothing. The
    /// slow part of a step (tens to hundreds of microseconds): the worker runs it while the
    /// forward pass runs.
    pub fn allowed_tokens(&mut self) -> Result<SimpleVob, String> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|error| cut(&error.to_string()))?;
        if allowed.is_zero() {
            return Err("the grammar allows no token".into());
        }
        Ok(allowed)
    }

    /// Set every token not in `allowed` to -inf, tokens beyond the vocabulary (a model's padding
    /// rows) too.
    pub fn mask(&self, allowed: &SimpleVob, logits: &mut [f32]) {
        let known = logits.len().min(self.vocabulary_size);
        for (token, logit) in logits[..known].iter_mut().enumerate() {
            if !allowed.is_allowed(token as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        logits[known..].fill(f32::NEG_INFINITY);
    }

    /// The generation sampled `token` (one the last mask allowed).
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|error| cut(&error.to_string()))
    }

    /// Whether the output is complete: the grammar allows nothing more but the end.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Advance through text already generated (a continuation on another host): its bytes as
    /// the vocabulary's tokens, whatever tokens produced them.
    pub fn accept_text(&mut self, text: &str) -> Result<(), String> {
        let tokens = self
            .matcher
            .tok_env()
            .map_err(|error| error.to_string())?
            .tok_trie()
            .greedy_tokenize(text.as_bytes());
        self.matcher.consume_tokens(&tokens).map_err(|error| cut(&error.to_string()))
    }
}

/// A generation's grammar: applied from the first token, or waiting for a marker in the output
/// (a tool call under `tool_choice: auto`) and applied from there, the marker included.
pub struct GenerationGrammar {
    constraint: TokenConstraint,
    state: State,
}

enum State {
    Active,
    Waiting {
        marker: &'static str,
        /// Only a marker at the very start of the output counts.
        at_start: bool,
        /// The output so far, or its tail (where a marker may still begin).
        text: String,
    },
    /// The output began without its marker: the grammar never applies.
    Never,
}

impl GenerationGrammar {
    pub fn now(constraint: TokenConstraint) -> Self {
        Self { constraint, state: State::Active }
    }

    pub fn after_marker(constraint: TokenConstraint, marker: &'static str, at_start: bool) -> Self {
        Self { constraint, state: State::Waiting { marker, at_start, text: String::new() } }
    }

    /// The constraint, while it masks the logits.
    pub fn active(&mut self) -> Option<&mut TokenConstraint> {
        matches!(self.state, State::Active).then_some(&mut self.constraint)
    }

    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active)
    }

    /// Output text, seen while the grammar waits for its marker (an active grammar follows the
    /// tokens instead). Once the marker shows, the text from it on goes to the constraint.
    pub fn observe_text(&mut self, piece: &str) -> Result<(), String> {
        let State::Waiting { marker, at_start, text } = &mut self.state else { return Ok(()) };
        let searched_from = floor_char_boundary(text, text.len().saturating_sub(marker.len()));
        text.push_str(piece);
        let found = if *at_start {
            if text.starts_with(*marker) {
                Some(0)
            } else if marker.starts_with(text.as_str()) {
                return Ok(());
            } else {
                self.state = State::Never;
                return Ok(());
            }
        } else {
            text[searched_from..].find(*marker).map(|at| searched_from + at)
        };
        match found {
            Some(at) => {
                let from_marker = text.split_off(at);
                self.state = State::Active;
                self.constraint.accept_text(&from_marker)
            }
            None => {
                // Only the tail can still begin a marker.
                let keep_from = floor_char_boundary(text, text.len().saturating_sub(marker.len()));
                text.drain(..keep_from);
                Ok(())
            }
        }
    }
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

fn cut(message: &str) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((at, _)) => format!("{}…", &message[..at]),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests;
