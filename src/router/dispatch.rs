//! Sending a request to a host and keeping it alive: choose a host (`balance`), skip hosts whose
//! circuit breaker is open, retry elsewhere when a host fails or refuses before answering, wait a
//! bounded time when every host is saturated, and, when a remote host dies in the middle of an
//! answer, resume it on another host so the client sees one uninterrupted stream.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};

use super::stats::Outcome;
use super::{RouterInner, remote};
use crate::engine::{
    EmbedRequest, Embeddings, EngineError, FinishReason, GenerateRequest, GenerationEvent, GenerationStream,
    Usage,
};

/// Events buffered between the router's relay and the API.
const RELAY_EVENTS: usize = 32;
/// Resumptions of one answer after its host died mid-stream.
const MAX_FAILOVERS: usize = 2;
/// First pause when every host is saturated; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(800);

/// Where a request runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// "local" or the host's peer id.
    pub key: String,
    pub name: String,
    pub is_local: bool,
}

pub const LOCAL_KEY: &str = "local";

/// Counts a request as in flight to its target for as long as it lives.
pub struct InFlight {
    inner: Arc<RouterInner>,
    key: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut outstanding = self.inner.lock_outstanding();
        if let Some(count) = outstanding.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                outstanding.remove(&self.key);
            }
        }
    }
}

fn in_flight(inner: &Arc<RouterInner>, key: &str) -> InFlight {
    *inner.lock_outstanding().entry(key.to_string()).or_insert(0) += 1;
    InFlight { inner: inner.clone(), key: key.to_string() }
}

/// Hosts a request must not go to (`excluded`), and hosts it goes back to, after a pause, only
/// once no other is left (`set_aside`: members that failed, which may have lost a connection
/// only; a model's only host may just be changing connections).
#[derive(Default)]
struct Avoid {
    excluded: HashSet<String>,
    set_aside: HashSet<String>,
}

impl Avoid {
    fn set_aside(&mut self, key: &str) {
        self.excluded.insert(key.to_string());
        self.set_aside.insert(key.to_string());
    }
}

/// Run `attempt` on a host, trying others when one fails before answering (at most
/// `max_attempts` failures in all; a member that failed twice is set aside). Refusals for being
/// full are waited out until `saturation_wait` passes, then reported as `QueueFull`.
async fn with_retries<T, F, Fut>(
    inner: &Arc<RouterInner>,
    model: &str,
    avoid: &mut Avoid,
    mut attempt: F,
) -> Result<(Target, T, InFlight), EngineError>
where
    F: FnMut(Target) -> Fut,
    Fut: Future<Output = Result<T, EngineError>>,
{
    let deadline = Instant::now() + inner.routing.saturation_wait();
    let mut backoff = FIRST_BACKOFF;
    let mut saturated: HashSet<String> = HashSet::new();
    let mut failures = 0;
    let mut failed_hosts: HashSet<String> = HashSet::new();
    let mut last_error: Option<EngineError> = None;
    loop {
        let Some(target) = inner.choose(model, &avoid.excluded).await? else {
            if !saturated.is_empty() && Instant::now() + backoff < deadline {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                avoid.excluded.retain(|key| !saturated.contains(key));
                saturated.clear();
                continue;
            }
            if !avoid.set_aside.is_empty() {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                let Avoid { excluded, set_aside } = avoid;
                excluded.retain(|key| !set_aside.contains(key));
                set_aside.clear();
                continue;
            }
            return Err(last_error.unwrap_or_else(|| inner.no_host_error(model)));
        };
        let guard = in_flight(inner, &target.key);
        match attempt(target.clone()).await {
            Ok(value) => {
                inner.breaker_succeeded(&target);
                return Ok((target, value, guard));
            }
            Err(EngineError::QueueFull(model)) => {
                tracing::debug!(host = %target.name, "host is full");
                saturated.insert(target.key.clone());
                avoid.excluded.insert(target.key);
                last_error = Some(EngineError::QueueFull(model));
            }
            Err(error @ (EngineError::Unavailable(_) | EngineError::ShuttingDown(_))) => {
                tracing::warn!(host = %target.name, %error, "host failed before answering; retrying");
                inner.breaker_failed(&target);
                inner.stats.retried(model, &target.name);
                // A host that is still a member may have lost only a connection (a new one is
                // dialed for the next stream): give it one more chance, others first.
                let failed_before = !failed_hosts.insert(target.key.clone());
                if !inner.is_member(&target) {
                    avoid.excluded.insert(target.key);
                } else if failed_before {
                    avoid.set_aside(&target.key);
                }
                failures += 1;
                if failures >= inner.routing.max_attempts {
                    return Err(error);
                }
                last_error = Some(error);
            }
            Err(other) => return Err(other),
        }
    }
}

pub async fn generate(
    inner: Arc<RouterInner>,
    request: GenerateRequest,
) -> Result<GenerationStream, EngineError> {
    let started = Instant::now();
    let _waiting = inner.waiting_slot(&request.model)?;
    let start = start_generation(&inner, &request, &mut Avoid::default()).await;
    let (target, stream, guard) = match start {
        Ok(started) => started,
        Err(error) => {
            inner.stats.finished(failed(&request.model, None, started));
            return Err(error);
        }
    };
    let (events, receiver) = mpsc::channel(RELAY_EVENTS);
    let served_by = target.name.clone();
    tokio::spawn(relay(inner, request, Running { target, stream, _guard: guard }, events, started));
    Ok(GenerationStream::new(receiver).served_by(served_by))
}

struct Running {
    target: Target,
    stream: GenerationStream,
    _guard: InFlight,
}

async fn start_generation(
    inner: &Arc<RouterInner>,
    request: &GenerateRequest,
    avoid: &mut Avoid,
) -> Result<(Target, GenerationStream, InFlight), EngineError> {
    with_retries(inner, &request.model, avoid, |target| {
        let inner = inner.clone();
        let request = request.clone();
        async move {
            if target.is_local {
                inner.local.generate(request).await
            } else {
                remote::forward_generate(&inner.p2p, &target.key, &target.name, request).await
            }
        }
    })
    .await
}

/// Copy events to the client; on a remote host's death mid-answer, resume on another host.
async fn relay(
    inner: Arc<RouterInner>,
    request: GenerateRequest,
    mut running: Running,
    events: mpsc::Sender<GenerationEvent>,
    started: Instant,
) {
    let mut delivered = String::new();
    let mut pieces: usize = 0;
    // Pieces delivered when the answer last moved to another host: that host counts them as
    // prompt, not as its completion.
    let mut pieces_before_resume: usize = 0;
    let mut first_token = None;
    let mut failovers = 0;
    let mut avoid = Avoid::default();
    loop {
        let event = tokio::select! {
            event = running.stream.recv() => event,
            _ = events.closed() => return,
        };
        let event = match event {
            Some(GenerationEvent::Text(text)) => {
                first_token.get_or_insert_with(|| started.elapsed());
                delivered.push_str(&text);
                pieces += 1;
                if events.send(GenerationEvent::Text(text)).await.is_err() {
                    return;
                }
                continue;
            }
            Some(event @ GenerationEvent::Logprobs(_)) => {
                if events.send(event).await.is_err() {
                    return;
                }
                continue;
            }
            Some(GenerationEvent::Done { finish_reason, usage }) => {
                let usage = if failovers > 0 { resumed_usage(usage, pieces_before_resume) } else { usage };
                inner.stats.finished(Outcome {
                    model: &request.model,
                    node: Some(&running.target.name),
                    ok: true,
                    tokens: usage.completion_tokens as u64,
                    first_token,
                    total: started.elapsed(),
                });
                let _ = events.send(GenerationEvent::Done { finish_reason, usage }).await;
                return;
            }
            Some(GenerationEvent::Error(error)) => error,
            None => EngineError::Unavailable(format!("{} stopped answering", running.target.name)),
        };
        let resumable = !running.target.is_local && matches!(event, EngineError::Unavailable(_));
        if resumable && failovers < MAX_FAILOVERS {
            tracing::warn!(host = %running.target.name, error = %event, "host died mid-answer; resuming elsewhere");
            inner.breaker_failed(&running.target);
            inner.stats.failed_over(&request.model, &running.target.name);
            // Others first; the same host again only if it is still a member and the only one.
            if inner.is_member(&running.target) {
                avoid.set_aside(&running.target.key);
            } else {
                avoid.excluded.insert(running.target.key.clone());
            }
            match resume(&inner, &request, &delivered, pieces, &mut avoid).await {
                Ok(Some(next)) => {
                    running = next;
                    failovers += 1;
                    pieces_before_resume = pieces;
                    continue;
                }
                Ok(None) => {
                    // Nothing left to generate: the answer was complete but for its ending.
                    let usage = Usage { prompt_tokens: 0, completion_tokens: pieces };
                    let _ = events
                        .send(GenerationEvent::Done { finish_reason: FinishReason::Length, usage })
                        .await;
                    return;
                }
                Err(error) => tracing::warn!(%error, "could not resume the answer"),
            }
        }
        inner.stats.finished(failed(&request.model, Some(&running.target.name), started));
        let _ = events.send(GenerationEvent::Error(event)).await;
        return;
    }
}

/// Continue an answer elsewhere: the same prompt followed by what was already sent.
async fn resume(
    inner: &Arc<RouterInner>,
    request: &GenerateRequest,
    delivered: &str,
    pieces: usize,
    avoid: &mut Avoid,
) -> Result<Option<Running>, EngineError> {
    // Each text piece carries at least one token, so this never grants more than was asked.
    let remaining = request.params.max_tokens.saturating_sub(pieces);
    if remaining == 0 {
        return Ok(None);
    }
    let mut continued = request.clone();
    continued.prompt = request.prompt.continued(delivered.to_string());
    continued.params.max_tokens = remaining;
    let (target, stream, guard) = start_generation(inner, &continued, avoid).await?;
    tracing::info!(host = %target.name, "answer resumed");
    Ok(Some(Running { target, stream, _guard: guard }))
}

/// Usage of a resumed answer: the final host counted the text delivered before it took over
/// (`pieces_before`) as prompt. (Counted in text pieces, about one token each.)
fn resumed_usage(last: Usage, pieces_before: usize) -> Usage {
    Usage {
        prompt_tokens: last.prompt_tokens.saturating_sub(pieces_before),
        completion_tokens: pieces_before + last.completion_tokens,
    }
}

fn failed<'a>(model: &'a str, node: Option<&'a str>, started: Instant) -> Outcome<'a> {
    Outcome { model, node, ok: false, tokens: 0, first_token: None, total: started.elapsed() }
}

pub async fn embed(inner: Arc<RouterInner>, request: EmbedRequest) -> Result<Embeddings, EngineError> {
    let started = Instant::now();
    let _waiting = inner.waiting_slot(&request.model)?;
    let result = with_retries(&inner, &request.model, &mut Avoid::default(), |target| {
        let inner = inner.clone();
        let request = request.clone();
        async move {
            if target.is_local {
                let embeddings = inner.local.embed(request).await?;
                Ok(Embeddings { served_by: Some(inner.node.name.clone()), ..embeddings })
            } else {
                remote::forward_embed(&inner.p2p, &target.key, &target.name, request).await
            }
        }
    })
    .await;
    let node = result.as_ref().ok().map(|(target, _, _)| target.name.clone());
    inner.stats.finished(Outcome {
        model: &request.model,
        node: node.as_deref(),
        ok: result.is_ok(),
        tokens: 0,
        first_token: None,
        total: started.elapsed(),
    });
    result.map(|(_, embeddings, _)| embeddings)
}
