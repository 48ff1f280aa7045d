//! Renders a chat conversation into a model's prompt with the model's own Jinja chat template,
//! the way Hugging Face `transformers` does (`apply_chat_template`), so prompts match what the
//! model was trained on.
//!
//! The template is compiled once, when the model loads. Rendering sees what `transformers`
//! passes: `messages`, `add_generation_prompt` (always true: we always want the reply),
//! `bos_token`, `eos_token`, `raise_exception(message)` and `strftime_now(format)`, with Python
//! string methods (`.strip()`, `.startswith()`, ...) through minijinja-contrib's pycompat.
//! A template that calls `raise_exception` is rejecting the conversation, so that becomes
//! `EngineError::InvalidRequest` and reaches the client as a 400.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{Environment, ErrorKind, context};

use super::tools::{ToolFormat, ToolParams, arguments_value, generic_messages};
use super::{ChatMessage, EngineError};

const TEMPLATE_NAME: &str = "chat_template";

/// Used when a model carries no template: ChatML, which most small instruct models speak.
const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A model's compiled chat template and the special tokens it may mention.
#[derive(Debug)]
pub struct ChatTemplate {
    environment: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// How the model writes tool calls, read from the template's source.
    tool_format: ToolFormat,
}

impl ChatTemplate {
    /// Compiles `source` (ChatML when `None`). A template that does not parse is an error here,
    /// not at the first request.
    pub fn new(
        source: Option<&str>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, EngineError> {
        let mut environment = Environment::new();
        // transformers' settings; keep_trailing_newline stays false, as there.
        environment.set_trim_blocks(true);
        environment.set_lstrip_blocks(true);
        environment.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        environment.add_function("raise_exception", raise_exception);
        environment.add_function("strftime_now", strftime_now);
        environment
            .add_template_owned(TEMPLATE_NAME, source.unwrap_or(CHATML_TEMPLATE).to_owned())
            .map_err(|err| EngineError::Inference(format!("the chat template is invalid: {err}")))?;
        Ok(Self { environment, bos_token, eos_token, tool_format: ToolFormat::of_template(source) })
    }

    pub fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    /// The prompt for `messages`, ending where the assistant's reply begins. The tools are shown
    /// to the model the way its format wants (see `tools.rs`).
    pub fn render(&self, messages: &[ChatMessage], tools: &ToolParams) -> Result<String, EngineError> {
        let template = self
            .environment
            .get_template(TEMPLATE_NAME)
            .map_err(|err| EngineError::Inference(format!("the chat template is missing: {err}")))?;
        let generic;
        let (messages, tools) = if self.tool_format.template_renders_tools() {
            (messages, tools.active().then(|| tools.template_tools()))
        } else {
            generic = generic_messages(messages, tools);
            (generic.as_slice(), None)
        };
        let messages: Vec<serde_json::Value> = messages.iter().map(message_value).collect();
        template
            .render(context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(render_error)
    }
}

/// A message as `transformers` hands it to a template: `tool_calls` and `tool_call_id` only where
/// the message has them (templates test `message.tool_calls is defined`), a call's arguments as
/// an object.
fn message_value(message: &ChatMessage) -> serde_json::Value {
    let mut value = serde_json::json!({"role": message.role, "content": message.content});
    if !message.tool_calls.is_empty() {
        let calls: Vec<serde_json::Value> = message
            .tool_calls
            .iter()
            .map(|call| {
                serde_json::json!({"id": call.id, "type": "function", "function": {
                    "name": call.name, "arguments": arguments_value(&call.arguments)}})
            })
            .collect();
        value["tool_calls"] = calls.into();
    }
    if let Some(id) = &message.tool_call_id {
        value["tool_call_id"] = id.as_str().into();
    }
    value
}

/// Marks the errors `raise_exception` makes, to tell them from the template's own bugs.
#[derive(Debug)]
struct RaisedByTemplate;

impl fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("raised by the chat template")
    }
}

impl std::error::Error for RaisedByTemplate {}

fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message).with_source(RaisedByTemplate))
}

fn render_error(err: minijinja::Error) -> EngineError {
    let raised = std::error::Error::source(&err).is_some_and(|source| source.is::<RaisedByTemplate>());
    match (raised, err.detail()) {
        (true, Some(message)) => EngineError::InvalidRequest(message.to_owned()),
        _ => EngineError::Inference(format!("the chat template failed: {err}")),
    }
}

/// Python's `datetime.now().strftime(format)`, in UTC (the server's zone is nobody's business).
fn strftime_now(format: String) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format_utc(&format, now.as_secs())
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// The strftime directives chat templates use; any other is copied as it is.
fn format_utc(format: &str, unix_seconds: u64) -> String {
    let days = unix_seconds / 86_400;
    let seconds_of_day = unix_seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let weekday = WEEKDAYS[((days + 3) % 7) as usize]; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];
    let (hour, minute, second) = (seconds_of_day / 3600, seconds_of_day / 60 % 60, seconds_of_day % 60);

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(directive) = chars.next() else {
            out.push('%');
            break;
        };
        let piece = match directive {
            'Y' => year.to_string(),
            'y' => format!("{:02}", year % 100),
            'm' => format!("{month:02}"),
            'd' => format!("{day:02}"),
            'e' => format!("{day:>2}"),
            'j' => format!("{day_of_year:03}"),
            'H' => format!("{hour:02}"),
            'I' => format!("{:02}", (hour + 11) % 12 + 1),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_owned(),
            'M' => format!("{minute:02}"),
            'S' => format!("{second:02}"),
            'B' => month_name.to_owned(),
            'b' | 'h' => month_name[..3].to_owned(),
            'A' => weekday.to_owned(),
            'a' => weekday[..3].to_owned(),
            '%' => "%".to_owned(),
            other => format!("%{other}"),
        };
        out.push_str(&piece);
    }
    out
}

/// Year, month (1-12) and day (1-31) of a count of days since 1970-01-01 (Howard Hinnant's
/// algorithm for the proleptic Gregorian calendar).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // March is 0
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The inverse of `civil_from_days`.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year % 400;
    let month_index = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use candle_core::quantized::gguf_file;

    use super::*;

    fn conversation(turns: &[(&str, &str)]) -> Vec<ChatMessage> {
        let message = |(role, content): &(&str, &str)| ChatMessage::text(role, *content);
        turns.iter().map(message).collect()
    }

    fn smollm2_template() -> String {
        let path = std::env::var_os("LLMESH_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
            .join("SmolLM2-135M-Instruct.Q4_1.gguf");
        let mut file = std::fs::File::open(&path)
            .unwrap_or_else(|err| panic!("{}: {err}; run scripts/fetch-models.sh", path.display()));
        let content = gguf_file::Content::read(&mut file).expect("reads the GGUF header");
        match content.metadata.get("tokenizer.chat_template") {
            Some(gguf_file::Value::String(template)) => template.clone(),
            other => panic!("SmolLM2 should carry a chat template, found {other:?}"),
        }
    }

    #[test]
    fn chatml_fallback_renders_a_conversation() {
        let template = ChatTemplate::new(None, None, None).expect("compiles");
        let prompt = template
            .render(&conversation(&[("system", "You are terse."), ("user", "Hi!")]), &ToolParams::default())
            .expect("renders");
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_template_renders_as_transformers_does() {
        let template = ChatTemplate::new(Some(&smollm2_template()), None, None).expect("compiles");
        let with_system =
            conversation(&[("system", "You are a helpful assistant."), ("user", "What is 2+2?")]);
        assert_eq!(
            template.render(&with_system, &ToolParams::default()).expect("renders"),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            template.render(&conversation(&[("user", "Hi")]), &ToolParams::default()).expect("renders"),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn template_sees_special_tokens_and_python_string_methods() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m.content.startswith('  ') %}\
                      {{ m.content.strip().upper() }}{% endif %}{% endfor %}{{ eos_token }}";
        let template =
            ChatTemplate::new(Some(source), Some("<s>".into()), Some("</s>".into())).expect("compiles");
        let prompt =
            template.render(&conversation(&[("user", "  hi  ")]), &ToolParams::default()).expect("renders");
        assert_eq!(prompt, "<s>HI</s>");
    }

    #[test]
    fn raise_exception_is_an_invalid_request() {
        let source = "{% if messages[0]['role'] != 'user' %}\
                      {{ raise_exception('Conversation roles must alternate user/assistant') }}\
                      {% endif %}ok";
        let template = ChatTemplate::new(Some(source), None, None).expect("compiles");
        assert_eq!(
            template.render(&conversation(&[("user", "Hi")]), &ToolParams::default()).expect("renders"),
            "ok"
        );
        let err = template.render(&conversation(&[("assistant", "Hi")]), &ToolParams::default()).unwrap_err();
        assert_eq!(
            err,
            EngineError::InvalidRequest("Conversation roles must alternate user/assistant".into())
        );
    }

    #[test]
    fn other_template_failures_are_internal_errors() {
        let template = ChatTemplate::new(Some("{{ messages[0].content.no_such_method() }}"), None, None)
            .expect("compiles");
        let err = template.render(&conversation(&[("user", "Hi")]), &ToolParams::default()).unwrap_err();
        assert!(matches!(err, EngineError::Inference(_)), "{err:?}");
    }

    #[test]
    fn syntax_error_fails_at_compile_time() {
        let err = ChatTemplate::new(Some("{% for message in messages %}{{ message"), None, None).unwrap_err();
        assert!(
            matches!(&err, EngineError::Inference(m) if m.contains("chat template is invalid")),
            "{err:?}"
        );
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // 2023-11-14 22:13:20 UTC, a Tuesday.
        assert_eq!(format_utc("%d %b %Y", 1_700_000_000), "14 Nov 2023");
        assert_eq!(
            format_utc("%A %H:%M:%S %j %I%p %y-%m-%e %%%Q", 1_700_000_000),
            "Tuesday 22:13:20 318 10PM 23-11-14 %%Q"
        );
        assert_eq!(format_utc("%a %B %d %Y", 951_782_400), "Tue February 29 2000");
        assert_eq!(format_utc("%Y-%m-%d %j", 0), "1970-01-01 001");
        let now = strftime_now("%Y".into());
        assert!(now.len() == 4 && now.as_str() >= "2024", "{now}");
    }
}
