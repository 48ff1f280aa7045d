//! The limits every request meets before an engine works on it, whoever sent it: the HTTP API
//! checks them on what a client sent, and a host checks them again on what a peer sent, since a
//! peer's request arrives as engine types straight off the wire. One check for both, so that the
//! two can never drift apart.
//!
//! Only what the engine types can express is checked here; JSON's shapes (a string where a number
//! belongs, a negative count) are the API's to refuse.

use super::sampling::{MAX_LOGIT_BIAS_TOKENS, MAX_TOP_LOGPROBS};
use super::{
    ChatMessage, EmbedRequest, EngineError, GenerateRequest, OriginalPrompt, Prompt, SamplingParams,
};

/// Stop sequences one generation may have (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Texts one embedding request may hold (OpenAI's limit): it bounds the work one request queues.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;
/// The roles a chat message may have: the ones every chat template understands.
const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// A request that breaks a limit: which field, and why, in words fit for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidParam {
    /// The field, named as in OpenAI's API (`temperature`, `messages[2].role`, `input`).
    pub param: String,
    pub message: String,
}

impl InvalidParam {
    pub(crate) fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { param: param.into(), message: message.into() }
    }

    /// The engine error that keeps the field's name (for the client's 400).
    pub fn naming_the_field(self) -> EngineError {
        EngineError::InvalidParam { param: self.param, message: self.message }
    }
}

/// A client's string quoted back to it in an error: at most 40 characters, no control characters.
pub fn excerpt(text: &str) -> String {
    text.chars().take(40).map(|c| if c.is_control() { '?' } else { c }).collect()
}

impl From<InvalidParam> for EngineError {
    fn from(error: InvalidParam) -> Self {
        EngineError::InvalidRequest(error.message)
    }
}

impl GenerateRequest {
    /// Check the prompt and the sampling parameters. (The model and its context window are the
    /// engine's to check: only it knows them.)
    pub fn validate(&self) -> Result<(), InvalidParam> {
        self.prompt.validate()?;
        self.params.validate()
    }
}

impl Prompt {
    fn validate(&self) -> Result<(), InvalidParam> {
        match self {
            Prompt::Chat(messages) | Prompt::Continue { prompt: OriginalPrompt::Chat(messages), .. } => {
                validate_messages(messages)
            }
            Prompt::Text(text) | Prompt::Continue { prompt: OriginalPrompt::Text(text), .. } => {
                if text.is_empty() {
                    return Err(InvalidParam::new("prompt", "'prompt' must not be empty."));
                }
                Ok(())
            }
        }
    }
}

fn validate_messages(messages: &[ChatMessage]) -> Result<(), InvalidParam> {
    if messages.is_empty() {
        return Err(InvalidParam::new("messages", "'messages' must contain at least one message."));
    }
    for (index, message) in messages.iter().enumerate() {
        if !CHAT_ROLES.contains(&message.role.as_str()) {
            return Err(InvalidParam::new(
                format!("messages[{index}].role"),
                format!(
                    "Unsupported role '{}' in messages[{index}]: expected one of {}.",
                    message.role,
                    CHAT_ROLES.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

impl SamplingParams {
    /// Check every value against OpenAI's ranges. Comparisons are written so that NaN, which
    /// JSON cannot carry but bincode can, fails them all.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        in_range("temperature", self.temperature, 0.0, 2.0)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InvalidParam::new(
                "top_p",
                format!("{} is out of range for 'top_p': it must be above 0 and at most 1.", self.top_p),
            ));
        }
        if self.max_tokens < 1 {
            return Err(InvalidParam::new(
                "max_tokens",
                format!("{} is less than the minimum of 1 for 'max_tokens'.", self.max_tokens),
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(InvalidParam::new(
                "stop",
                format!("'stop' takes at most {MAX_STOP_SEQUENCES} sequences, not {}.", self.stop.len()),
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(InvalidParam::new("stop", "Stop sequences must not be empty."));
        }
        in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        in_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        if let Some(top) = self.logprobs
            && top > MAX_TOP_LOGPROBS
        {
            return Err(InvalidParam::new(
                "top_logprobs",
                format!("{top} is more than the maximum of {MAX_TOP_LOGPROBS} for 'top_logprobs'."),
            ));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS_TOKENS {
            return Err(InvalidParam::new(
                "logit_bias",
                format!(
                    "'logit_bias' names {} tokens; the limit is {MAX_LOGIT_BIAS_TOKENS}.",
                    self.logit_bias.len()
                ),
            ));
        }
        if let Some((token, bias)) = self.logit_bias.iter().find(|(_, bias)| !(-100.0..=100.0).contains(bias))
        {
            return Err(InvalidParam::new(
                "logit_bias",
                format!("The bias of token {token} is {bias}; it must be between -100 and 100."),
            ));
        }
        self.response_format.validate()?;
        self.tools.validate()
    }
}

fn in_range(param: &str, value: f32, min: f32, max: f32) -> Result<(), InvalidParam> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(InvalidParam::new(
        param,
        format!("{value} is out of range for '{param}': it must be between {min} and {max}."),
    ))
}

impl EmbedRequest {
    /// At least one text, at most [`MAX_EMBEDDING_INPUTS`], none empty.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let invalid = |message: String| Err(InvalidParam::new("input", message));
        if self.inputs.is_empty() {
            return invalid("'input' must not be empty.".into());
        }
        if self.inputs.len() > MAX_EMBEDDING_INPUTS {
            return invalid(format!(
                "'input' holds {} texts; the limit is {MAX_EMBEDDING_INPUTS}.",
                self.inputs.len()
            ));
        }
        if self.inputs.iter().any(String::is_empty) {
            return invalid("Inputs must not be empty strings.".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(role: &str) -> GenerateRequest {
        let message = ChatMessage::text(role, "hi");
        GenerateRequest {
            model: "m".into(),
            prompt: Prompt::Chat(vec![message]),
            params: SamplingParams::default(),
        }
    }

    fn param_of(request: &GenerateRequest) -> String {
        request.validate().expect_err("refused").param
    }

    fn with_params(change: impl FnOnce(&mut SamplingParams)) -> GenerateRequest {
        let mut request = chat("user");
        change(&mut request.params);
        request
    }

    #[test]
    fn a_plain_request_passes() {
        assert_eq!(chat("user").validate(), Ok(()));
        let continued = chat("system").prompt.continued("partial".into());
        assert_eq!(GenerateRequest { prompt: continued, ..chat("user") }.validate(), Ok(()));
    }

    #[test]
    fn every_sampling_limit_names_its_field() {
        type Change = fn(&mut SamplingParams);
        let cases: [(&str, Change); 11] = [
            ("temperature", |p| p.temperature = 2.5),
            ("temperature", |p| p.temperature = f32::NAN),
            ("top_p", |p| p.top_p = 0.0),
            ("top_p", |p| p.top_p = f32::NAN),
            ("max_tokens", |p| p.max_tokens = 0),
            ("stop", |p| p.stop = vec!["x".into(); MAX_STOP_SEQUENCES + 1]),
            ("stop", |p| p.stop = vec![String::new()]),
            ("frequency_penalty", |p| p.frequency_penalty = -2.5),
            ("frequency_penalty", |p| p.frequency_penalty = f32::INFINITY),
            ("presence_penalty", |p| p.presence_penalty = 3.0),
            ("presence_penalty", |p| p.presence_penalty = f32::NAN),
        ];
        for (param, change) in cases {
            assert_eq!(param_of(&with_params(change)), param);
        }
        let most = with_params(|p| {
            p.stop = vec!["x".into(); MAX_STOP_SEQUENCES];
            (p.temperature, p.top_p, p.frequency_penalty, p.presence_penalty) = (2.0, 1.0, -2.0, 2.0);
        });
        assert_eq!(most.validate(), Ok(()), "the limits themselves are allowed");
    }

    #[test]
    fn prompts_must_say_something_in_known_roles() {
        assert_eq!(param_of(&chat("wizard")), "messages[0].role");
        let empty = GenerateRequest { prompt: Prompt::Chat(Vec::new()), ..chat("user") };
        assert_eq!(param_of(&empty), "messages");
        let blank = GenerateRequest { prompt: Prompt::Text(String::new()), ..chat("user") };
        assert_eq!(param_of(&blank), "prompt");
        // A continuation is held to the limits of the prompt it continues.
        let continued =
            GenerateRequest { prompt: chat("wizard").prompt.continued("x".into()), ..chat("user") };
        assert_eq!(param_of(&continued), "messages[0].role");
    }

    #[test]
    fn embedding_inputs_are_bounded_and_not_empty() {
        let embed = |inputs: Vec<String>| EmbedRequest { model: "m".into(), inputs }.validate();
        assert_eq!(embed(vec!["a".into(); MAX_EMBEDDING_INPUTS]), Ok(()));
        for inputs in [Vec::new(), vec![String::new()], vec!["a".into(); MAX_EMBEDDING_INPUTS + 1]] {
            assert_eq!(embed(inputs).expect_err("refused").param, "input");
        }
    }

    #[test]
    fn an_engine_error_keeps_the_message() {
        let error = EngineError::from(InvalidParam::new("stop", "too many"));
        assert_eq!(error, EngineError::InvalidRequest("too many".into()));
    }
}
