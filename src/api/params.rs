//! The request fields that chat and legacy completions share (sampling, `stop`, `n`, streaming,
//! `response_format`),
//! read from JSON into the engine's `SamplingParams`. Their ranges are checked by
//! `GenerateRequest::validate`, the one check that a host also applies to its peers' requests;
//! this module only refuses what the engine types cannot hold (a string for a number, a negative
//! count) and names the field the client used.
//!
//! Two llmesh extensions, as vLLM has them: `top_k` (0 keeps every token) and `ignore_eos`
//! (generate through end-of-sequence tokens, for benchmarks).

use serde_json::Value;

use super::error::ApiError;
use super::extract::{JsonObject, json_kind};
use super::response_format::parse_response_format;
use crate::engine::{GenerateRequest, InvalidParam, Prompt, SamplingParams, ToolParams};

/// What a generation request asks for besides its prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOptions {
    /// Every sampling field but `max_tokens`, which is resolved by [`Self::sampling_params`].
    sampling: SamplingParams,
    /// `max_completion_tokens`, or else `max_tokens`, when the request sets one.
    pub max_tokens: Option<usize>,
    /// Which of the two the request used, to name it in errors.
    max_tokens_field: &'static str,
    pub stream: bool,
    /// `stream_options.include_usage`: end the stream with a usage chunk.
    pub include_usage: bool,
    /// Choices to generate (`n`).
    pub n: usize,
}

/// The most choices one request may ask for: each holds a KV cache while it runs.
pub const MAX_CHOICES: usize = 8;

impl GenerationOptions {
    /// A chat request's tools.
    pub fn set_tools(&mut self, tools: ToolParams) {
        self.sampling.tools = tools;
    }

    pub fn tools(&self) -> &ToolParams {
        &self.sampling.tools
    }

    /// Log-probabilities with this many alternatives per token.
    pub fn set_logprobs(&mut self, top: Option<usize>) {
        self.sampling.logprobs = top;
    }

    pub fn logprobs(&self) -> Option<usize> {
        self.sampling.logprobs
    }

    /// The engine's parameters, with `default_max_tokens` when the request set no limit.
    pub fn sampling_params(&self, default_max_tokens: usize) -> SamplingParams {
        SamplingParams { max_tokens: self.max_tokens.unwrap_or(default_max_tokens), ..self.sampling.clone() }
    }

    /// The engine request for `prompt` with these options, checked against the limits every
    /// request meets (a 400 naming the field otherwise).
    pub fn request(
        &self,
        model: String,
        prompt: Prompt,
        default_max_tokens: usize,
    ) -> Result<GenerateRequest, ApiError> {
        let request = GenerateRequest { model, prompt, params: self.sampling_params(default_max_tokens) };
        request.validate().map_err(|error| self.invalid(error))?;
        Ok(request)
    }

    /// One engine request per choice (`n`): the same but for the seed (a given seed is counted
    /// up, so the choices differ and are reproducible), sharing one prefill group so that a host
    /// runs the prompt once for all of them.
    pub fn requests(
        &self,
        model: String,
        prompt: Prompt,
        default_max_tokens: usize,
    ) -> Result<Vec<GenerateRequest>, ApiError> {
        let first = self.request(model, prompt, default_max_tokens)?;
        if self.n == 1 {
            return Ok(vec![first]);
        }
        let group = Some(rand::random::<u64>());
        Ok((0..self.n)
            .map(|index| {
                let mut request = first.clone();
                request.params.seed = first.params.seed.map(|seed| seed.wrapping_add(index as u64));
                request.params.prefill_group = group;
                request
            })
            .collect())
    }

    fn invalid(&self, error: InvalidParam) -> ApiError {
        match error.param.as_str() {
            "max_tokens" => ApiError::invalid_param(self.max_tokens_field, error.message),
            _ => error.into(),
        }
    }

    /// Take the shared fields out of `fields`.
    pub fn parse(fields: &mut JsonObject) -> Result<Self, ApiError> {
        let defaults = SamplingParams::default();
        let temperature = fields.optional::<f64>("temperature")?;
        let top_p = fields.optional::<f64>("top_p")?;
        let top_k = optional_count(fields, "top_k")?;
        // `max_completion_tokens` is OpenAI's newer name; it wins when both are sent.
        let max_completion_tokens = optional_count(fields, "max_completion_tokens")?;
        let max_tokens = optional_count(fields, "max_tokens")?;
        let stop = parse_stop(fields.take("stop"))?;
        let seed = parse_seed(fields.take("seed"))?;
        let frequency_penalty = fields.optional::<f64>("frequency_penalty")?;
        let presence_penalty = fields.optional::<f64>("presence_penalty")?;
        let n = match fields.optional::<i64>("n")? {
            None => 1,
            Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => n as usize,
            Some(n) => {
                return Err(ApiError::invalid_param(
                    "n",
                    format!("{n} is out of range for 'n': it must be between 1 and {MAX_CHOICES}."),
                ));
            }
        };
        let logit_bias = parse_logit_bias(fields.take("logit_bias"))?;
        let ignore_eos = fields.optional::<bool>("ignore_eos")?.unwrap_or(defaults.ignore_eos);
        let response_format = parse_response_format(fields.take("response_format"))?;
        let stream = fields.optional::<bool>("stream")?.unwrap_or(false);
        let include_usage = match fields.take("stream_options") {
            None => false,
            Some(Value::Object(mut options)) => match options.remove("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(include)) => include,
                Some(other) => {
                    return Err(ApiError::invalid_param(
                        "stream_options.include_usage",
                        format!("'include_usage' must be a boolean, not {}.", json_kind(&other)),
                    ));
                }
            },
            Some(other) => {
                return Err(ApiError::invalid_param(
                    "stream_options",
                    format!("'stream_options' must be an object, not {}.", json_kind(&other)),
                ));
            }
        };
        let sampling = SamplingParams {
            temperature: temperature.map_or(defaults.temperature, |value| value as f32),
            top_p: top_p.map_or(defaults.top_p, |value| value as f32),
            top_k: top_k.map_or(defaults.top_k, to_usize),
            max_tokens: defaults.max_tokens,
            stop,
            seed,
            frequency_penalty: frequency_penalty.map_or(defaults.frequency_penalty, |v| v as f32),
            presence_penalty: presence_penalty.map_or(defaults.presence_penalty, |v| v as f32),
            ignore_eos,
            response_format,
            tools: ToolParams::default(),
            logprobs: None,
            logit_bias,
            prefill_group: None,
        };
        let max_tokens_field =
            if max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
        let max_tokens = max_completion_tokens.or(max_tokens).map(to_usize);
        Ok(Self { sampling, max_tokens, max_tokens_field, stream, include_usage, n })
    }
}

/// `logit_bias`: an object from token ids (as strings) to biases (numbers).
fn parse_logit_bias(value: Option<Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let invalid = |message: String| ApiError::invalid_param("logit_bias", message);
    let entries = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(entries)) => entries,
        Some(other) => {
            return Err(invalid(format!("'logit_bias' must be an object, not {}.", json_kind(&other))));
        }
    };
    entries
        .into_iter()
        .map(|(key, bias)| {
            let token = key.parse::<u32>().map_err(|_| {
                let key: String = key.chars().take(20).collect();
                invalid(format!("'logit_bias' keys are token ids; '{key}' is not one."))
            })?;
            let bias = bias.as_f64().ok_or_else(|| {
                invalid(format!("The bias of token {token} must be a number, not {}.", json_kind(&bias)))
            })?;
            Ok((token, bias as f32))
        })
        .collect()
}

/// Chat's `logprobs` (a boolean) and `top_logprobs` (0 to 20, only beside `logprobs: true`).
pub fn parse_chat_logprobs(fields: &mut JsonObject) -> Result<Option<usize>, ApiError> {
    let wanted = fields.optional::<bool>("logprobs")?.unwrap_or(false);
    let top = optional_count(fields, "top_logprobs")?;
    match (wanted, top) {
        (false, Some(_)) => {
            Err(ApiError::invalid_param("top_logprobs", "'top_logprobs' needs 'logprobs' set to true."))
        }
        (false, None) => Ok(None),
        (true, top) => Ok(Some(to_usize(top.unwrap_or(0)))),
    }
}

/// Legacy completions' `logprobs`: how many alternatives per token, 0 to 5 (OpenAI's limit).
pub fn parse_completion_logprobs(fields: &mut JsonObject) -> Result<Option<usize>, ApiError> {
    const MAX: u64 = 5;
    match optional_count(fields, "logprobs")? {
        Some(top) if top > MAX => Err(ApiError::invalid_param(
            "logprobs",
            format!("{top} is more than the maximum of {MAX} for 'logprobs'."),
        )),
        top => Ok(top.map(to_usize)),
    }
}

/// An integer that counts something, so cannot be negative.
fn optional_count(fields: &mut JsonObject, name: &str) -> Result<Option<u64>, ApiError> {
    match fields.optional::<i64>(name)? {
        Some(value) if value < 0 => {
            Err(ApiError::invalid_param(name, format!("'{name}' must not be negative, not {value}.")))
        }
        Some(value) => Ok(Some(value.unsigned_abs())),
        None => Ok(None),
    }
}

/// Saturating, for 32-bit targets: the engine clamps to the context window anyway.
fn to_usize(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// `stop` is a string or an array of strings.
fn parse_stop(value: Option<Value>) -> Result<Vec<String>, ApiError> {
    let invalid = |message: String| ApiError::invalid_param("stop", message);
    match value {
        None => Ok(Vec::new()),
        Some(Value::String(stop)) => Ok(vec![stop]),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(stop) => Ok(stop),
                other => {
                    Err(invalid(format!("Each stop sequence must be a string, not {}.", json_kind(&other))))
                }
            })
            .collect(),
        Some(other) => Err(invalid(format!(
            "'stop' must be a string or an array of strings, not {}.",
            json_kind(&other)
        ))),
    }
}

/// OpenAI seeds are signed 64-bit integers; any integer is accepted and its bits kept.
fn parse_seed(value: Option<Value>) -> Result<Option<u64>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    let seed = value.as_u64().or_else(|| value.as_i64().map(|seed| seed as u64));
    seed.map(Some)
        .ok_or_else(|| ApiError::invalid_param("seed", format!("'seed' must be an integer, not {value}.")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: Value) -> Result<GenerationOptions, ApiError> {
        let Value::Object(map) = json else { panic!("not an object") };
        GenerationOptions::parse(&mut JsonObject(map))
    }

    /// Parsed and checked as a handler does.
    fn request(json: Value) -> Result<GenerateRequest, ApiError> {
        parse(json)?.request("m".into(), Prompt::Text("hi".into()), 100)
    }

    fn param_of(json: Value) -> Option<String> {
        request(json).unwrap_err().body().error.param
    }

    #[test]
    fn defaults_apply_when_fields_are_absent_or_null() {
        let options = parse(serde_json::json!({"temperature": null, "stop": null})).unwrap();
        let expected = SamplingParams { max_tokens: 100, ..SamplingParams::default() };
        assert_eq!(options.sampling_params(100), expected);
        assert!(!options.stream && !options.include_usage);
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let options = parse(serde_json::json!({"max_tokens": 5, "max_completion_tokens": 7})).unwrap();
        assert_eq!(options.sampling_params(100).max_tokens, 7);
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        assert_eq!(param_of(serde_json::json!({"temperature": 2.5})).as_deref(), Some("temperature"));
        assert_eq!(param_of(serde_json::json!({"top_p": 0})).as_deref(), Some("top_p"));
        assert_eq!(param_of(serde_json::json!({"top_k": -1})).as_deref(), Some("top_k"));
        assert_eq!(param_of(serde_json::json!({"max_tokens": 0})).as_deref(), Some("max_tokens"));
        assert_eq!(
            param_of(serde_json::json!({"max_completion_tokens": 0})).as_deref(),
            Some("max_completion_tokens")
        );
        assert_eq!(
            param_of(serde_json::json!({"presence_penalty": -3})).as_deref(),
            Some("presence_penalty")
        );
        assert_eq!(param_of(serde_json::json!({"n": 9})).as_deref(), Some("n"));
        assert_eq!(param_of(serde_json::json!({"seed": 1.5})).as_deref(), Some("seed"));
    }

    #[test]
    fn stop_accepts_a_string_or_up_to_four_strings() {
        assert_eq!(request(serde_json::json!({"stop": "x"})).unwrap().params.stop, ["x"]);
        assert_eq!(param_of(serde_json::json!({"stop": ["a", "b", "c", "d", "e"]})).as_deref(), Some("stop"));
        assert_eq!(param_of(serde_json::json!({"stop": [""]})).as_deref(), Some("stop"));
        assert_eq!(param_of(serde_json::json!({"stop": [1]})).as_deref(), Some("stop"));
    }

    #[test]
    fn negative_seeds_keep_their_bits() {
        assert_eq!(parse(serde_json::json!({"seed": -1})).unwrap().sampling.seed, Some(u64::MAX));
    }
}
