//! Requests carried over the overlay on `/llmesh/infer/3` streams.
//!
//! One stream per request. The entry node writes an `InferRequest`; the host answers `Accepted`
//! (the engine took it) or `Error` (the same `EngineError` a local call gives), then, for a
//! generation, one `Event` frame per engine event. Either side dropping the stream ends it: the
//! host notices the closed read half and drops the generation, which cancels it; the entry node
//! turns an early end into a clear `Unavailable` error instead of hanging. `forward_*` return
//! only once the host has sent its first answer, so anything that fails before that is safe to
//! retry elsewhere.
//!
//! A host trusts no request. It is decoded with the frame's byte limit, from types none of which
//! contains itself, so the decoder's depth is bounded as well as its input; then it is held to
//! the limits an HTTP client's request meets (`GenerateRequest::validate`, `EmbedRequest::validate`)
//! before the engine sees it.
//!
//! A connection can also die without a word: a pulled cable sends no reset, and a connection
//! closed gracefully under a stream leaves its reads waiting forever. So a host with nothing to
//! send for `HEARTBEAT` sends `Working`, and each side gives the other up after `SILENCE_LIMIT`
//! without a byte moving.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, FutureExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

use crate::engine::{
    EmbedRequest, Embeddings, EngineError, GenerateRequest, GenerationEvent, GenerationStream, InvalidParam,
    SharedEngine,
};
use crate::p2p::wire::{Watchdog, read_frame, write_frame};
use crate::p2p::{InboundStreams, P2pHandle, P2pStream};

/// How long a host with nothing to send waits before saying it is still working.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long either side waits for a byte to arrive or to leave before giving the other up.
const SILENCE_LIMIT: Duration = Duration::from_secs(8);
/// Requests served at once for other nodes; more wait for the stream to be accepted.
const MAX_INBOUND_REQUESTS: usize = 256;
/// How long a host waits for the request frame after a stream opens.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const EVENTS_PER_FORWARD: usize = 32;
/// Times a request is sent again to a host that is still connected but reset its stream before
/// answering. A host that has too many streams waiting to be accepted resets the newest without
/// reading it, so sending again is safe: nothing ran.
const MAX_RESENDS: u32 = 4;
const FIRST_RESEND_PAUSE: Duration = Duration::from_millis(25);

#[derive(Debug, Serialize, Deserialize)]
pub enum InferRequest {
    Generate(Box<GenerateRequest>),
    Embed(EmbedRequest),
}

impl InferRequest {
    /// The limits an HTTP client's request meets, which a peer's must meet too.
    pub(super) fn validate(&self) -> Result<(), InvalidParam> {
        match self {
            InferRequest::Generate(request) => request.validate(),
            InferRequest::Embed(request) => request.validate(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum InferReply {
    /// The host's engine accepted the generation; events follow.
    Accepted,
    Event(GenerationEvent),
    Embeddings(Embeddings),
    Error(EngineError),
    /// The host is still at it (queued, prefilling, computing) and has nothing else to send.
    Working,
}

/// The next reply other than `Working`, or `TimedOut` after `SILENCE_LIMIT` without a byte.
/// `heard` is set once any frame arrived: the host has read the request.
async fn read_reply<R: AsyncRead + Unpin>(
    stream: &mut R,
    heard: &mut bool,
) -> std::io::Result<Option<InferReply>> {
    loop {
        let frame = read_frame(&mut Watchdog::new(stream, SILENCE_LIMIT)).await?;
        *heard |= frame.is_some();
        match frame {
            Some(InferReply::Working) => continue,
            frame => return Ok(frame),
        }
    }
}

/// Write one frame, failing with `TimedOut` after `SILENCE_LIMIT` without a byte taken (a
/// reader that went away without a word stops taking bytes).
async fn write_within<W: AsyncWrite + Unpin, T: Serialize>(stream: &mut W, frame: &T) -> std::io::Result<()> {
    write_frame(&mut Watchdog::new(stream, SILENCE_LIMIT), frame).await
}

fn lost(host: &str, reason: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(format!("host {host} failed before answering: {reason}"))
}

/// Send `request` to `peer_id` (named `host`) and read the first reply. A host that is still
/// connected but reset the stream before saying anything did not read the request (its accept
/// queue was full), so the request is sent again; never after a timeout or a `Working`, when
/// the host may have it.
async fn send(
    p2p: &P2pHandle,
    peer_id: &str,
    host: &str,
    request: &InferRequest,
) -> Result<(P2pStream, InferReply), EngineError> {
    let mut pause = FIRST_RESEND_PAUSE;
    let mut resends = 0;
    loop {
        let mut stream = p2p.open_stream(peer_id).await.map_err(|error| lost(host, error))?;
        let mut heard = false;
        let reply = match write_within(&mut stream, request).await {
            Ok(()) => read_reply(&mut stream, &mut heard).await,
            Err(error) => Err(error),
        };
        let (reason, unread) = match reply {
            Ok(Some(reply)) => return Ok((stream, reply)),
            Ok(None) => ("the stream closed".to_string(), !heard),
            Err(error) => (error.to_string(), !heard && error.kind() != std::io::ErrorKind::TimedOut),
        };
        let connected =
            || async { p2p.connected_peers().await.is_ok_and(|peers| peers.iter().any(|p| p == peer_id)) };
        if !unread || resends == MAX_RESENDS || !connected().await {
            return Err(lost(host, reason));
        }
        tracing::debug!(%host, %reason, "the host reset the stream unread; sending again");
        resends += 1;
        tokio::time::sleep(pause.mul_f64(0.5 + rand::random::<f64>())).await;
        pause *= 2;
    }
}

/// Run a generation on `peer_id` (named `host`), relaying its events.
pub async fn forward_generate(
    p2p: &P2pHandle,
    peer_id: &str,
    host: &str,
    request: GenerateRequest,
) -> Result<GenerationStream, EngineError> {
    let (mut stream, reply) = send(p2p, peer_id, host, &InferRequest::Generate(Box::new(request))).await?;
    match reply {
        InferReply::Accepted => {}
        InferReply::Error(error) => return Err(error),
        other => return Err(lost(host, format!("unexpected reply {other:?}"))),
    }
    // Wait for the first event, so a host that dies before answering can still be replaced
    // without the client noticing.
    let first = match read_reply(&mut stream, &mut true).await {
        Ok(Some(InferReply::Event(GenerationEvent::Error(error)))) => return Err(error),
        Ok(Some(InferReply::Event(event))) => event,
        Ok(Some(other)) => return Err(lost(host, format!("unexpected reply {other:?}"))),
        Ok(None) => return Err(lost(host, "the stream closed")),
        Err(error) => return Err(lost(host, error)),
    };
    let (events, receiver) = mpsc::channel(EVENTS_PER_FORWARD);
    let more = !first.is_last();
    // The channel is new and empty: the first event always fits.
    let _ = events.try_send(first);
    if more {
        tokio::spawn(relay_events(stream, events, host.to_string()));
    }
    Ok(GenerationStream::new(receiver).served_by(host))
}

/// Copy event frames to `events` until the generation ends, the host goes away, or the reader
/// drops `events` (then the stream is dropped too, which cancels the remote generation).
async fn relay_events(mut stream: P2pStream, events: mpsc::Sender<GenerationEvent>, host: String) {
    let mut heard = true;
    loop {
        let frame = tokio::select! {
            frame = read_reply(&mut stream, &mut heard) => frame,
            _ = events.closed() => return,
        };
        let event = match frame {
            Ok(Some(InferReply::Event(event))) => event,
            Ok(Some(other)) => GenerationEvent::Error(lost(&host, format!("unexpected reply {other:?}"))),
            Ok(None) => GenerationEvent::Error(EngineError::Unavailable(format!(
                "host {host} went away in the middle of the answer"
            ))),
            Err(error) => GenerationEvent::Error(EngineError::Unavailable(format!(
                "host {host} went away in the middle of the answer: {error}"
            ))),
        };
        let last = event.is_last();
        if events.send(event).await.is_err() || last {
            return;
        }
    }
}

/// Compute embeddings on `peer_id` (named `host`).
pub async fn forward_embed(
    p2p: &P2pHandle,
    peer_id: &str,
    host: &str,
    request: EmbedRequest,
) -> Result<Embeddings, EngineError> {
    let (_, reply) = send(p2p, peer_id, host, &InferRequest::Embed(request)).await?;
    match reply {
        InferReply::Embeddings(embeddings) => {
            Ok(Embeddings { served_by: Some(host.to_string()), ..embeddings })
        }
        InferReply::Error(error) => Err(error),
        other => Err(lost(host, format!("unexpected reply {other:?}"))),
    }
}

/// Serve other nodes' requests on the local engine until the inbound streams end. Beyond
/// `MAX_INBOUND_REQUESTS` at once, requests are refused as `QueueFull` (the entry node tries
/// another host or waits), up to as many refusals at once again; past that, streams are dropped.
/// While `draining`, new requests are answered `ShuttingDown`, so entry nodes take them elsewhere.
pub async fn serve_inbound(mut inbound: InboundStreams, engine: SharedEngine, draining: Arc<AtomicBool>) {
    let slots = Arc::new(Semaphore::new(MAX_INBOUND_REQUESTS));
    let refusals = Arc::new(Semaphore::new(MAX_INBOUND_REQUESTS));
    while let Some((peer, stream)) = inbound.next().await {
        let span = tracing::info_span!("inbound", peer = %peer, request_id = %uuid::Uuid::new_v4());
        let work = match (slots.clone().try_acquire_owned(), refusals.clone().try_acquire_owned()) {
            (Ok(slot), _) => {
                let engine = engine.clone();
                let draining = draining.clone();
                async move {
                    if let Err(error) = serve_one(stream, engine, &draining).await {
                        tracing::debug!(%error, "inbound request ended early");
                    }
                    drop(slot);
                }
                .boxed()
            }
            (Err(_), Ok(refusal)) => async move {
                refuse(stream).await;
                drop(refusal);
            }
            .boxed(),
            (Err(_), Err(_)) => {
                tracing::warn!(%peer, "too many inbound requests; dropped one unread");
                continue;
            }
        };
        tokio::spawn(tracing::Instrument::instrument(work, span));
    }
}

/// The request frame a new stream starts with, within `REQUEST_TIMEOUT`; `None` if the entry
/// node closed the stream first.
async fn read_request<R: AsyncRead + Unpin>(stream: &mut R) -> std::io::Result<Option<InferRequest>> {
    tokio::time::timeout(REQUEST_TIMEOUT, read_frame(stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request frame"))?
}

/// Answer a request with `QueueFull` for its model.
async fn refuse(mut stream: P2pStream) {
    let model = match read_request(&mut stream).await {
        Ok(Some(InferRequest::Generate(request))) => request.model,
        Ok(Some(InferRequest::Embed(request))) => request.model,
        _ => return,
    };
    tracing::debug!(%model, "refused a request: this host serves too many already");
    let _ = write_within(&mut stream, &InferReply::Error(EngineError::QueueFull(model))).await;
}

async fn serve_one(
    mut stream: P2pStream,
    engine: SharedEngine,
    draining: &AtomicBool,
) -> std::io::Result<()> {
    let Some(request) = read_request(&mut stream).await? else { return Ok(()) };
    if let Err(invalid) = request.validate() {
        // Only the field is logged: the message may quote the peer's text.
        tracing::warn!(param = %invalid.param, "refused a peer's request that breaks a limit");
        return write_within(&mut stream, &InferReply::Error(invalid.into())).await;
    }
    if draining.load(Ordering::Relaxed) {
        let model = match &request {
            InferRequest::Generate(request) => request.model.clone(),
            InferRequest::Embed(request) => request.model.clone(),
        };
        tracing::debug!(%model, "refused a peer's request: this node is draining");
        return write_within(&mut stream, &InferReply::Error(EngineError::ShuttingDown(model))).await;
    }
    match request {
        InferRequest::Embed(request) => {
            tracing::debug!(model = %request.model, inputs = request.inputs.len(), "embedding for a peer");
            let reply = match working(&mut stream, engine.embed(request)).await? {
                Ok(embeddings) => InferReply::Embeddings(embeddings),
                Err(error) => InferReply::Error(error),
            };
            write_within(&mut stream, &reply).await
        }
        InferRequest::Generate(request) => {
            tracing::debug!(model = %request.model, "generating for a peer");
            let mut generation = match working(&mut stream, engine.generate(*request)).await? {
                Ok(generation) => generation,
                Err(error) => return write_within(&mut stream, &InferReply::Error(error)).await,
            };
            let (mut reader, mut writer) = stream.split();
            write_within(&mut writer, &InferReply::Accepted).await?;
            // The entry node sends nothing more: any read result means it closed or reset.
            let mut closed = Box::pin(async move {
                let mut byte = [0u8; 1];
                reader.read(&mut byte).await
            });
            let mut heartbeat = heartbeats();
            loop {
                let event = tokio::select! {
                    event = generation.recv() => event,
                    _ = &mut closed => {
                        tracing::debug!("the entry node went away; cancelling");
                        return Ok(());
                    }
                    _ = heartbeat.tick() => {
                        write_within(&mut writer, &InferReply::Working).await?;
                        continue;
                    }
                };
                let Some(event) = event else { return Ok(()) };
                let last = event.is_last();
                write_within(&mut writer, &InferReply::Event(event)).await?;
                if last {
                    return Ok(());
                }
                heartbeat.reset();
            }
        }
    }
}

/// Ticks every `HEARTBEAT`, starting one `HEARTBEAT` from now.
fn heartbeats() -> tokio::time::Interval {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// Run `work`, telling the entry node on `stream` every `HEARTBEAT` that it is still going.
async fn working<W: AsyncWrite + Unpin, F: Future>(stream: &mut W, work: F) -> std::io::Result<F::Output> {
    let mut work = std::pin::pin!(work);
    let mut heartbeat = heartbeats();
    loop {
        tokio::select! {
            output = &mut work => return Ok(output),
            _ = heartbeat.tick() => write_within(stream, &InferReply::Working).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ChatMessage, Prompt, SamplingParams};

    fn frame(bytes: &[u8]) -> futures::io::Cursor<Vec<u8>> {
        let length = u32::try_from(bytes.len()).unwrap().to_be_bytes();
        futures::io::Cursor::new([&length[..], bytes].concat())
    }

    /// The bincode of a generation request for model "m" whose prompt is `depth` continuations
    /// nested around `Text("x")`, written by hand: what a hostile member can send whatever the
    /// types say.
    fn nested_continuations(depth: usize) -> Vec<u8> {
        let plain = InferRequest::Generate(Box::new(GenerateRequest {
            model: "m".into(),
            prompt: Prompt::Text("x".into()),
            params: SamplingParams::default(),
        }));
        let plain = bincode::serde::encode_to_vec(&plain, bincode::config::standard()).unwrap();
        // Generate (variant 0), the model (length 1, "m"), Text (variant 1, length 1, "x"), params.
        let (head, rest) = plain.split_at(3);
        let (text, params) = rest.split_at(3);
        assert_eq!((head, text), (&[0, 1, b'm'][..], &[1, 1, b'x'][..]));
        // Continue is variant 2: its prompt comes first, then what was generated (empty here).
        [head, &vec![2; depth], text, &vec![0; depth], params].concat()
    }

    /// `Prompt` as it was when a continuation held a `Box<Prompt>`.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum NestingPrompt {
        Chat(Vec<ChatMessage>),
        Text(String),
        Continue { prompt: Box<NestingPrompt>, generated: String },
    }

    #[test]
    fn every_continuation_the_router_sent_before_encodes_as_it_did() {
        // The router only ever continued a client's prompt, one level deep; those bytes, and
        // only those, are what `OriginalPrompt` takes, so nodes on either side of the change
        // still understand each other on `/llmesh/infer/2`.
        let codec = bincode::config::standard();
        let messages = vec![ChatMessage::text("user", "hi")];
        let cases = [
            (
                Prompt::Chat(messages.clone()).continued("Hel".into()),
                NestingPrompt::Continue {
                    prompt: Box::new(NestingPrompt::Chat(messages)),
                    generated: "Hel".into(),
                },
            ),
            (
                Prompt::Text("once".into()).continued(" upon".into()),
                NestingPrompt::Continue {
                    prompt: Box::new(NestingPrompt::Text("once".into())),
                    generated: " upon".into(),
                },
            ),
        ];
        for (prompt, before) in cases {
            let bytes = bincode::serde::encode_to_vec(&prompt, codec).unwrap();
            assert_eq!(bytes, bincode::serde::encode_to_vec(&before, codec).unwrap());
            let (decoded, _): (NestingPrompt, _) = bincode::serde::decode_from_slice(&bytes, codec).unwrap();
            assert_eq!(decoded, before);
        }
    }

    #[tokio::test]
    async fn deeply_nested_continuations_are_refused_not_a_stack_overflow() {
        let bytes = nested_continuations(100_000);
        assert!(bytes.len() < 256 * 1024, "a small frame: {} bytes", bytes.len());
        let error = read_request(&mut frame(&bytes)).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
    }
}
