//! Entry points for the fuzz targets (`fuzz/`, replayed by `tests/fuzz_corpus.rs`): the frames
//! of the inference protocol, read the way a host reads a request and a router reads replies.

use futures::executor::block_on;
use futures::io::Cursor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::remote::{InferReply, InferRequest};
use crate::engine::{
    ChatMessage, EmbedRequest, Embeddings, EngineError, FinishReason, GenerateRequest, GenerationEvent,
    OriginalPrompt, Prompt, ResponseFormat, SamplingParams, TokenLogprob, Tool, ToolCall, ToolChoice,
    ToolParams, TopLogprob, Usage,
};
use crate::p2p::wire::{read_frame, write_frame};

/// Frames read from one input: a host reads one request, a router a reply stream.
const MAX_FRAMES: usize = 16;

/// Request frames, checked against the limits an HTTP request meets.
pub fn infer_request(data: &[u8]) {
    for request in frames::<InferRequest>(data) {
        let _ = request.validate();
    }
}

/// Reply frames.
pub fn infer_reply(data: &[u8]) {
    frames::<InferReply>(data);
}

/// The frames `data` holds, up to the first that does not decode; each one written again reads
/// back to the same bytes (nothing decoded is out of what the encoder can say).
fn frames<T: Serialize + DeserializeOwned>(data: &[u8]) -> Vec<T> {
    let mut stream = Cursor::new(data);
    let mut frames = Vec::new();
    while frames.len() < MAX_FRAMES
        && let Ok(Some(frame)) = block_on(read_frame::<_, T>(&mut stream))
    {
        let written = encode(&frame);
        let again: T = block_on(read_frame(&mut Cursor::new(&written)))
            .expect("a frame written again reads")
            .expect("a frame written again is there");
        assert_eq!(encode(&again), written, "a frame reads back to other bytes");
        frames.push(frame);
    }
    frames
}

fn encode<T: Serialize>(frame: &T) -> Vec<u8> {
    let mut written = Cursor::new(Vec::new());
    block_on(write_frame(&mut written, frame)).expect("a decoded frame encodes within the limit");
    written.into_inner()
}

/// Seeds for the corpus: real encodings, as `(target, bytes)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let chat = vec![
        ChatMessage::text("system", "Be brief."),
        ChatMessage::text("user", "What is 2+2?"),
        ChatMessage {
            role: "assistant".into(),
            content: String::new(),
            tool_calls: vec![ToolCall {
                id: "call_1".into(),
                name: "add".into(),
                arguments: r#"{"a":2,"b":2}"#.into(),
            }],
            tool_call_id: None,
        },
        ChatMessage { tool_call_id: Some("call_1".into()), ..ChatMessage::text("tool", "4") },
    ];
    let tools = ToolParams {
        tools: vec![Tool {
            name: "add".into(),
            description: "Adds".into(),
            parameters: r#"{"type":"object","properties":{"a":{"type":"number"}}}"#.into(),
        }],
        choice: ToolChoice::Function("add".into()),
        parallel: false,
    };
    let params = SamplingParams {
        temperature: 0.7,
        max_tokens: 64,
        stop: vec!["\n\n".into()],
        seed: Some(42),
        logprobs: Some(2),
        logit_bias: vec![(13, -100.0)],
        response_format: ResponseFormat::JsonSchema { schema: r#"{"type":"object"}"#.into() },
        tools,
        ..SamplingParams::default()
    };
    let requests = [
        InferRequest::Generate(Box::new(GenerateRequest {
            model: "smollm2".into(),
            prompt: Prompt::Chat(chat.clone()),
            params: params.clone(),
        })),
        InferRequest::Generate(Box::new(GenerateRequest {
            model: "smollm2".into(),
            prompt: Prompt::Continue {
                prompt: OriginalPrompt::Text("Once".into()),
                generated: " upon".into(),
            },
            params: SamplingParams::default(),
        })),
        InferRequest::Embed(EmbedRequest { model: "minilm".into(), inputs: vec!["a".into(), "b c".into()] }),
    ];
    let replies = [
        InferReply::Accepted,
        InferReply::Working,
        InferReply::Event(GenerationEvent::Logprobs(TokenLogprob {
            bytes: b"4".to_vec(),
            logprob: -0.1,
            top: vec![TopLogprob { bytes: b"5".to_vec(), logprob: -2.5 }],
        })),
        InferReply::Event(GenerationEvent::Text("4".into())),
        InferReply::Event(GenerationEvent::Done {
            finish_reason: FinishReason::Stop,
            usage: Usage { prompt_tokens: 12, completion_tokens: 1 },
        }),
        InferReply::Embeddings(Embeddings {
            vectors: vec![vec![0.6, 0.8], vec![1.0, 0.0]],
            prompt_tokens: 3,
            served_by: Some("node-b".into()),
        }),
        InferReply::Error(EngineError::QueueFull("smollm2".into())),
    ];
    let mut seeds: Vec<(&'static str, Vec<u8>)> =
        requests.iter().map(|request| ("infer_request", encode(request))).collect();
    seeds.extend(replies.iter().map(|reply| ("infer_reply", encode(reply))));
    seeds.push(("infer_reply", replies.iter().flat_map(encode).collect()));
    seeds
}
