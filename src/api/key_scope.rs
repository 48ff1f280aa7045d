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
            let mut inner = engine.generate(request).await?;
            let served_by = inner.served_by.clone();
            let (sender, receiver) = mpsc::channel(RELAY_CAPACITY);
            // Ends when the generation does or the client goes (dropping `inner` stops it).
            tokio::spawn(async move {
                while let Some(event) = inner.recv().await {
                    if let GenerationEvent::Done { usage, .. } = &event {
                        router.record_key_tokens(&key, &model, usage.prompt_tokens, usage.completion_tokens);
                    }
                    if sender.send(event).await.is_err() {
                        return;
                    }
                }
            });
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
