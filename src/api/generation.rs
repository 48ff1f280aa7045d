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
pub fn stream_sse<W: ChunkWriter>(events: GenerationStream, writer: W, include_usage: bool) -> Response {
    stream_choices(vec![(events, writer)], include_usage)
}

/// Relay the generations of several choices (`n`) as one SSE stream, each through its own writer
/// (which numbers its chunks), in the order their events arrive; the usage chunk (prompt once,
/// completions summed) and `[DONE]` come once, after the last choice has finished. An error in
/// any choice ends the stream (and so the other choices).
pub fn stream_choices<W: ChunkWriter>(choices: Vec<(GenerationStream, W)>, include_usage: bool) -> Response {
    let mut writers = Vec::with_capacity(choices.len());
    let mut events = Vec::with_capacity(choices.len());
    for (index, (generation, writer)) in choices.into_iter().enumerate() {
        writers.push(writer);
        events.push(choice_events(index, generation));
    }
    let openings: Vec<Event> = writers.iter_mut().filter_map(ChunkWriter::opening).collect();
    let unfinished = writers.len();
    let relay =
        Relay { events: Some(stream::select_all(events)), writers, include_usage, unfinished, usage: None };
    let body = stream::iter(openings)
        .chain(stream::unfold(relay, Relay::step).flat_map(stream::iter))
        .map(Ok::<_, Infallible>);
    sse_response(body)
}

type ChoiceEvents = std::pin::Pin<Box<dyn Stream<Item = (usize, GenerationEvent)> + Send>>;

/// One choice's events, numbered, up to its last.
fn choice_events(index: usize, generation: GenerationStream) -> ChoiceEvents {
    Box::pin(stream::unfold(Some(generation), move |generation| async move {
        let mut generation = generation?;
        let event = generation.recv().await?;
        let rest = (!event.is_last()).then_some(generation);
        Some(((index, event), rest))
    }))
}

fn sse_response(body: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(body).keep_alive(KeepAlive::default()).into_response()
}

/// The state of a relayed stream; `events` is dropped once the generations have ended.
struct Relay<W> {
    events: Option<stream::SelectAll<ChoiceEvents>>,
    writers: Vec<W>,
    include_usage: bool,
    /// Choices that have not finished yet.
    unfinished: usize,
    /// Summed over the finished choices.
    usage: Option<Usage>,
}

impl<W: ChunkWriter> Relay<W> {
    /// The SSE events for the next engine event; `None` once `[DONE]` has been sent.
    async fn step(mut self) -> Option<(Vec<Event>, Self)> {
        let event = self.events.as_mut()?.next().await;
        let sse_events = match event {
            Some((index, GenerationEvent::Text(text))) => {
                return Some((self.writers[index].text(text), self));
            }
            Some((index, GenerationEvent::Logprobs(entry))) => {
                self.writers[index].logprobs(entry);
                return Some((Vec::new(), self));
            }
            Some((index, GenerationEvent::Done { finish_reason, usage })) => {
                let mut sse_events = self.writers[index].finish(finish_reason);
                self.usage = Some(match self.usage {
                    None => usage,
                    Some(sum) => Usage {
                        prompt_tokens: sum.prompt_tokens,
                        completion_tokens: sum.completion_tokens + usage.completion_tokens,
                    },
                });
                self.unfinished -= 1;
                if self.unfinished > 0 {
                    return Some((sse_events, self));
                }
                if let (true, Some(usage)) = (self.include_usage, self.usage) {
                    sse_events.push(self.writers[0].usage(usage));
                }
                sse_events
            }
            Some((_, GenerationEvent::Error(error))) => vec![error_event(&error.into())],
            None => vec![error_event(&ended_early())],
        };
        self.events = None;
        Some((sse_events.into_iter().chain([done_event()]).collect(), self))
    }
}

/// Start one generation per choice, all at once (the host shares their prompt); the first
/// refusal is the answer.
pub async fn generate_choices(
    engine: &crate::engine::SharedEngine,
    requests: Vec<crate::engine::GenerateRequest>,
) -> Result<Vec<GenerationStream>, ApiError> {
    Ok(futures::future::try_join_all(requests.into_iter().map(|request| engine.generate(request))).await?)
}

/// Collect the generations of several choices at once; the usage counts the prompt once and
/// every choice's completion.
pub async fn collect_choices(streams: Vec<GenerationStream>) -> Result<(Vec<Collected>, Usage), ApiError> {
    let collected = futures::future::try_join_all(streams.into_iter().map(collect)).await?;
    let usage = Usage {
        prompt_tokens: collected.first().map_or(0, |choice| choice.usage.prompt_tokens),
        completion_tokens: collected.iter().map(|choice| choice.usage.completion_tokens).sum(),
    };
    Ok((collected, usage))
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
