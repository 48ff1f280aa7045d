//! Entry points for the fuzz targets (`fuzz/`, replayed by `tests/fuzz_corpus.rs`): request
//! bodies read by the real extractor ([`JsonBody`]) into each endpoint's request type, and chat
//! requests rendered into prompts by real chat templates.

use std::sync::OnceLock;

use axum::body::Body;
use axum::extract::{FromRequest, Request};

use super::DEFAULT_MAX_BODY_BYTES;
use super::chat::{ChatCompletionRequest, DEFAULT_CHAT_MAX_TOKENS};
use super::completions::{CompletionRequest, DEFAULT_COMPLETION_MAX_TOKENS};
use super::embeddings::EmbeddingRequest;
use super::extract::{BodyLimit, FromJsonObject, JsonBody};
use super::responses::ResponsesRequest;
use crate::engine::{ChatTemplate, Prompt};

/// A Hermes-style template (Qwen 2.5's shape): it shows the tools itself and writes calls in
/// `<tool_call>` tags, where ChatML leaves both to llmesh.
const HERMES_TEMPLATE: &str = "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\
{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\
Return each call as JSON within <tool_call></tool_call> tags.<|im_end|>\n{% endif %}\
{%- for message in messages %}\
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n{{ message.content }}\
{% for call in message.tool_calls %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", \
\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n\
{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n\
{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}\
{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A request body for one of the four endpoints, chosen by the first byte.
pub fn request(data: &[u8]) {
    let Some((&endpoint, body)) = data.split_first() else { return };
    match endpoint % 4 {
        0 => {
            if let Some(chat) = extract::<ChatCompletionRequest>(body) {
                let _ =
                    chat.options.requests(chat.model, Prompt::Chat(chat.messages), DEFAULT_CHAT_MAX_TOKENS);
            }
        }
        1 => {
            if let Some(completion) = extract::<CompletionRequest>(body) {
                let prompt = Prompt::Text(completion.prompt);
                let _ = completion.options.requests(completion.model, prompt, DEFAULT_COMPLETION_MAX_TOKENS);
            }
        }
        2 => {
            extract::<EmbeddingRequest>(body);
        }
        _ => {
            extract::<ResponsesRequest>(body);
        }
    }
}

/// A chat request body, rendered by ChatML and by a template that shows tools itself.
pub fn chat_template(data: &[u8]) {
    static TEMPLATES: OnceLock<[ChatTemplate; 2]> = OnceLock::new();
    let templates = TEMPLATES.get_or_init(|| {
        let compile = |source| ChatTemplate::new(source, None, Some("<|im_end|>".into())).expect("compiles");
        [compile(None), compile(Some(HERMES_TEMPLATE))]
    });
    let Some(chat) = extract::<ChatCompletionRequest>(data) else { return };
    for template in templates {
        if let Ok(prompt) = template.render(&chat.messages, chat.options.tools()) {
            assert!(prompt.ends_with("<|im_start|>assistant\n"), "the prompt ends where the reply begins");
        }
    }
}

/// A chat request body whose `response_format` and `tools` become a grammar, walked on a small
/// vocabulary as a model would sample under it (`engine::grammar::fuzz`). The first byte picks
/// the tool format and the walk's tokens.
pub fn structured_output(data: &[u8]) {
    let Some((&seed, body)) = data.split_first() else { return };
    let Some(chat) = extract::<ChatCompletionRequest>(body) else { return };
    let prompt = Prompt::Chat(chat.messages);
    let Ok(requests) = chat.options.requests(chat.model, prompt, DEFAULT_CHAT_MAX_TOKENS) else { return };
    if let Some(request) = requests.first() {
        crate::engine::fuzz_grammar_walk(&request.params, seed);
    }
}

/// What the endpoint's extractor makes of `body`, as a handler would get it.
fn extract<T: FromJsonObject>(body: &[u8]) -> Option<T> {
    let request = Request::new(Body::from(body.to_vec()));
    let limit = BodyLimit(DEFAULT_MAX_BODY_BYTES);
    futures::executor::block_on(JsonBody::<T>::from_request(request, &limit))
        .ok()
        .map(|JsonBody(value)| value)
}

/// Seeds for the corpus, as `(target, bytes)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let chat = r#"{"model":"smollm2","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"What is 2+2?"}]},{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"add","arguments":"{\"a\":2,\"b\":2}"}}]},{"role":"tool","tool_call_id":"call_1","content":"4"}],"tools":[{"type":"function","function":{"name":"add","description":"Adds","parameters":{"type":"object","properties":{"a":{"type":"number"},"b":{"type":"number"}},"required":["a","b"]}}}],"tool_choice":"auto","temperature":0.2,"top_p":0.9,"max_tokens":32,"stop":["\n\n"],"seed":7,"n":2,"logprobs":true,"top_logprobs":2,"logit_bias":{"13":-100},"stream":true,"response_format":{"type":"json_schema","json_schema":{"name":"answer","schema":{"type":"object","properties":{"n":{"type":"integer"}}},"strict":true}}}"#;
    let simple_chat = r#"{"model":"smollm2","messages":[{"role":"user","content":"Hello"}]}"#;
    let completion = r#"{"model":"smollm2","prompt":["Once upon a time"],"max_tokens":16,"logprobs":2,"echo":false,"stop":"\n","frequency_penalty":0.5,"presence_penalty":0.1,"response_format":{"type":"json_object"}}"#;
    let embeddings = r#"{"model":"all-minilm","input":["first text","second"],"encoding_format":"base64"}"#;
    let responses = r#"{"model":"smollm2","instructions":"Be brief.","input":[{"role":"user","content":[{"type":"input_text","text":"Hi"}]},{"type":"function_call","call_id":"c1","name":"add","arguments":"{}"},{"type":"function_call_output","call_id":"c1","output":"4"}],"tools":[{"type":"function","name":"add","parameters":{"type":"object"}}],"tool_choice":"required","max_output_tokens":20,"text":{"format":{"type":"json_schema","name":"a","schema":{"type":"object"}}},"stream":false}"#;
    let with_endpoint = |endpoint: u8, body: &str| [&[endpoint][..], body.as_bytes()].concat();
    let mut seeds = vec![
        ("api_request", with_endpoint(0, chat)),
        ("api_request", with_endpoint(0, simple_chat)),
        ("api_request", with_endpoint(1, completion)),
        ("api_request", with_endpoint(2, embeddings)),
        ("api_request", with_endpoint(3, responses)),
        ("chat_template", chat.as_bytes().to_vec()),
        ("chat_template", simple_chat.as_bytes().to_vec()),
    ];
    let structured = [
        r#"{"model":"m","messages":[{"role":"user","content":"Hi"}],"response_format":{"type":"json_object"}}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"Hi"}],"response_format":{"type":"json_schema","json_schema":{"name":"city","strict":true,"schema":{"type":"object","properties":{"name":{"type":"string","maxLength":20},"population":{"type":"integer","minimum":0},"tags":{"type":"array","items":{"enum":["big","old"]},"maxItems":3},"coast":{"anyOf":[{"type":"boolean"},{"type":"null"}]}},"required":["name","population"],"additionalProperties":false}}}}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"Weather?"}],"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"},"unit":{"enum":["celsius","fahrenheit"]}},"required":["city"]}}},{"type":"function","function":{"name":"get_time"}}],"tool_choice":"required","parallel_tool_calls":true}"#,
    ];
    for (index, body) in structured.iter().enumerate() {
        // Seeds 0..4 pick each tool format once over the corpus.
        seeds.push(("structured_output", with_endpoint(index as u8, body)));
        seeds.push(("structured_output", with_endpoint(index as u8 + 3, body)));
    }
    seeds
}
