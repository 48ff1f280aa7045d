//! Turning an engine `GenerationStream` into an HTTP answer: collected whole, or relayed as
//! server-sent events, one SSE event per engine event as it arrives.
//!
//! No task is spawned: the receiver lives inside the handler future or the SSE body, so when the
//! client goes away the receiver is dropped and the engine cancels the generation.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt, stream};
use serde::Serialize;

use super::error::ApiError;
use crate::engine::{FinishReason, GenerationEvent, GenerationStream, TokenLogprob, Usage};

/// A generation collected whole.
#[derive(Debug)]
pub struct Collected {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// One per generated token, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
}

/// Wait for the whole generation. Cancel-safe: dropping the future drops the stream, which
/// cancels the generation.
pub async fn collect(mut events: GenerationStream) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            GenerationEvent::Text(piece) => text.push_str(&piece),
            GenerationEvent::Logprobs(entry) => logprobs.push(entry),
            GenerationEvent::Done { finish_reason, usage } => {
                return Ok(Collected { text, finish_reason, usage, logprobs });
            }
            GenerationEvent::Error(error) => return Err(error.into()),
        }
    }
    Err(ended_early())
}

fn ended_early() -> ApiError {
    ApiError::Internal("the generation stream closed without a result".into())
}

/// How one endpoint writes its stream chunks (chat and legacy completions differ).
pub trait ChunkWriter: Send + 'static {
    /// Sent before any text (chat announces the assistant role).
    fn opening(&mut self) -> Option<Event>;
    /// The chunks for the next piece of text (none while text is held back).
    fn text(&mut self, text: String) -> Vec<Event>;
    /// A token's log-probability, sent with the next chunk.
    fn logprobs(&mut self, entry: TokenLogprob);
    /// The last chunks: what was held back, then the finish reason.
    fn finish(&mut self, finish_reason: FinishReason) -> Vec<Event>;
    /// The usage chunk, sent after the finish chunk when the client asked for it.
    fn usage(&self, usage: Usage) -> Event;
}

/// Relay a generation as SSE: the writer's chunks, then `data: [DONE]`. An engine error becomes
/// an OpenAI error event followed by `[DONE]` (the 200 status has been sent by then; the engine
/// reports what it can, such as an over-long prompt, before the stream starts).
pub fn stream_sse<W: ChunkWriter>(events: GenerationStream, mut writer: W, include_usage: bool) -> Response {
    let opening = writer.opening();
    let relay = Relay { events: Some(events), writer, include_usage };
    let body = stream::iter(opening)
        .chain(stream::unfold(relay, Relay::step).flat_map(stream::iter))
        .map(Ok::<_, Infallible>);
    sse_response(body)
}

fn sse_response(body: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(body).keep_alive(KeepAlive::default()).into_response()
}

/// The state of a relayed stream; `events` is dropped once the generation has ended.
struct Relay<W> {
    events: Option<GenerationStream>,
    writer: W,
    include_usage: bool,
}

impl<W: ChunkWriter> Relay<W> {
    /// The SSE events for the next engine event; `None` once `[DONE]` has been sent.
    async fn step(mut self) -> Option<(Vec<Event>, Self)> {
        let event = self.events.as_mut()?.recv().await;
        let sse_events = match event {
            Some(GenerationEvent::Text(text)) => return Some((self.writer.text(text), self)),
            Some(GenerationEvent::Logprobs(entry)) => {
                self.writer.logprobs(entry);
                return Some((Vec::new(), self));
            }
            Some(GenerationEvent::Done { finish_reason, usage }) => {
                let mut sse_events = self.writer.finish(finish_reason);
                if self.include_usage {
                    sse_events.push(self.writer.usage(usage));
                }
                sse_events
            }
            Some(GenerationEvent::Error(error)) => vec![error_event(&error.into())],
            None => vec![error_event(&ended_early())],
        };
        self.events = None;
        Some((sse_events.into_iter().chain([done_event()]).collect(), self))
    }
}

/// An SSE event whose data is `value` as JSON.
pub fn json_event(value: &impl Serialize) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(error) => error_event(&ApiError::Internal(format!("serializing a chunk: {error}"))),
    }
}

fn error_event(error: &ApiError) -> Event {
    error.log();
    // The error body is plain strings; should serializing it ever fail, send a fixed one.
    let json = serde_json::to_string(&error.body()).unwrap_or_else(|_| {
        r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.into()
    });
    Event::default().data(json)
}

fn done_event() -> Event {
    Event::default().data("[DONE]")
}
