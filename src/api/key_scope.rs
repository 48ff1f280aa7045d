//! What a user key sees of the engine: only its models (any other is a 404, as if it did not
//! exist), within its limits (429 with `Retry-After`), and every answer's tokens counted
//! against it. The admin sees the engine as it is.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use crate::engine::{
    EmbedRequest, Embeddings, Engine, EngineError, GenerateRequest, GenerationEvent, GenerationStream,
    ModelInfo, SharedEngine,
};
use crate::p2p::KeyGrant;
use crate::router::Router;

/// Events relayed between a user's generation and the API (the engine's own streams are bounded
/// the same way).
const RELAY_CAPACITY: usize = 64;

impl AppState {
    /// The engine as `caller` may use it for a request of `model`: for a user key, refused when
    /// the model is not one of its own or it is over a limit, and metered.
    pub(super) fn engine_for(&self, caller: &Caller, model: &str) -> Result<SharedEngine, ApiError> {
        let (Caller::User(grant), Some(router)) = (caller, &self.router) else {
            return Ok(self.engine.clone());
        };
        if !grant.may_use(model) {
            return Err(EngineError::UnknownModel(model.to_string()).into());
        }
        router.admit_key(grant, model).map_err(|over| ApiError::RateLimited {
            key: grant.name.clone(),
            limit: over.limit,
            retry_after_secs: over.retry_after_secs,
        })?;
        Ok(Arc::new(KeyScope { engine: self.engine.clone(), grant: grant.clone(), router: router.clone() }))
    }

    /// The models `caller` may see.
    pub(super) fn models_for(&self, caller: &Caller) -> Vec<ModelInfo> {
        let models = self.engine.models();
        match caller {
            Caller::Admin => models,
            Caller::User(grant) => models.into_iter().filter(|model| grant.may_use(&model.id)).collect(),
        }
    }
}

/// The engine behind one user key's request.
struct KeyScope {
    engine: SharedEngine,
    grant: KeyGrant,
    router: Router,
}

impl Engine for KeyScope {
    fn models(&self) -> Vec<ModelInfo> {
        self.engine.models().into_iter().filter(|model| self.grant.may_use(&model.id)).collect()
    }

    fn generate(
        &self,
        request: GenerateRequest,
    ) -> BoxFuture<'static, Result<GenerationStream, EngineError>> {
        if !self.grant.may_use(&request.model) {
            return futures::future::ready(Err(EngineError::UnknownModel(request.model))).boxed();
        }
        let (engine, router, key, model) =
            (self.engine.clone(), self.router.clone(), self.grant.name.clone(), request.model.clone());
        async move {
            let inner = engine.generate(request).await?;
            let served_by = inner.served_by.clone();
            let (sender, receiver) = mpsc::channel(RELAY_CAPACITY);
            tokio::spawn(relay_counting(inner, sender, move |prompt, completion| {
                router.record_key_tokens(&key, &model, prompt, completion);
            }));
            let stream = GenerationStream::new(receiver);
            Ok(match served_by {
                Some(node) => stream.served_by(node),
                None => stream,
            })
        }
        .boxed()
    }

    fn embed(&self, request: EmbedRequest) -> BoxFuture<'static, Result<Embeddings, EngineError>> {
        if !self.grant.may_use(&request.model) {
            return futures::future::ready(Err(EngineError::UnknownModel(request.model))).boxed();
        }
        let (engine, router, key, model) =
            (self.engine.clone(), self.router.clone(), self.grant.name.clone(), request.model.clone());
        async move {
            let embeddings = engine.embed(request).await?;
            router.record_key_tokens(&key, &model, embeddings.prompt_tokens, 0);
            Ok(embeddings)
        }
        .boxed()
    }
}

/// Relay a generation's events to `sender`, and count its tokens once with `record(prompt,
/// completion)`: the engine's own count when the answer ends; else (the client went away, or the
/// generation failed) the text pieces it produced, about a token each, with no prompt tokens, which
/// only the end reports. Ends when the generation does or the client goes (dropping `inner` stops
/// the generation).
async fn relay_counting(
    mut inner: GenerationStream,
    sender: mpsc::Sender<GenerationEvent>,
    record: impl FnOnce(usize, usize),
) {
    let mut pieces = 0;
    while let Some(event) = inner.recv().await {
        match &event {
            GenerationEvent::Text(_) => pieces += 1,
            GenerationEvent::Done { usage, .. } => {
                let (prompt, completion) = (usage.prompt_tokens, usage.completion_tokens);
                let _ = sender.send(event).await;
                record(prompt, completion);
                return;
            }
            _ => {}
        }
        if sender.send(event).await.is_err() {
            break;
        }
    }
    if pieces > 0 {
        record(0, pieces);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::engine::{FinishReason, Usage};

    /// Relay `events`, the receiving end dropped after `read` of them; what was recorded.
    async fn relayed(events: Vec<GenerationEvent>, read: usize) -> Vec<(usize, usize)> {
        let (engine_side, inner) = mpsc::channel(16);
        for event in events {
            engine_side.send(event).await.unwrap();
        }
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let (sender, mut client) = mpsc::channel(1);
        let log = recorded.clone();
        let relay = tokio::spawn(relay_counting(GenerationStream::new(inner), sender, move |p, c| {
            log.lock().unwrap().push((p, c));
        }));
        for _ in 0..read {
            client.recv().await.expect("an event");
        }
        drop(client);
        drop(engine_side); // a generation still running would be stopped by the relay leaving
        relay.await.unwrap();
        Arc::try_unwrap(recorded).unwrap().into_inner().unwrap()
    }

    fn text(piece: &str) -> GenerationEvent {
        GenerationEvent::Text(piece.into())
    }

    #[tokio::test]
    async fn a_whole_answer_counts_what_the_engine_says() {
        let usage = Usage { prompt_tokens: 12, completion_tokens: 3 };
        let done = GenerationEvent::Done { finish_reason: FinishReason::Length, usage };
        assert_eq!(relayed(vec![text("a"), text("b"), text("c"), done], 4).await, vec![(12, 3)]);
    }

    #[tokio::test]
    async fn an_answer_the_client_left_counts_the_pieces_made() {
        // Read two, then gone: the third was made (and sent into the full channel) too.
        let events = vec![text("a"), text("b"), text("c"), text("d")];
        let recorded = relayed(events, 2).await;
        assert_eq!(recorded.len(), 1);
        assert!((2..=4).contains(&recorded[0].1) && recorded[0].0 == 0, "{recorded:?}");
        let failed = vec![text("a"), GenerationEvent::Error(EngineError::Inference("broke".into()))];
        assert_eq!(relayed(failed, 2).await, vec![(0, 1)]);
        assert_eq!(relayed(vec![], 0).await, vec![], "nothing made, nothing counted");
    }
}
