//! A running llmesh node: the engine with its models plus the HTTP API, started by
//! `Node::spawn` and stopped in order by `shutdown` + `join`.
//!
//! Shutdown order: stop accepting connections, let requests in flight finish (axum's graceful
//! shutdown), then drop the engine, whose worker threads finish what they hold and exit.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiConfig};
use crate::config::Config;
use crate::engine::{self, EngineError, LocalEngine, ModelSpec, SharedEngine};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot listen on {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

pub struct Node {
    http_address: SocketAddr,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), NodeError>>,
}

impl Node {
    /// Load the configured models (downloading `hf:` ones), then serve the API.
    pub async fn spawn(config: Config) -> Result<Self, NodeError> {
        let engine = load_engine(&config).await?;
        Self::spawn_with_engine(config, engine).await
    }

    /// Serve the API over a ready engine (tests put a fake one here).
    pub async fn spawn_with_engine(config: Config, engine: SharedEngine) -> Result<Self, NodeError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| NodeError::Bind { address: config.listen, source })?;
        let http_address =
            listener.local_addr().map_err(|source| NodeError::Bind { address: config.listen, source })?;
        let app = api::app(
            engine,
            ApiConfig { api_key: config.api_key.clone(), max_body_bytes: config.limits.max_body_bytes },
        );
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .map_err(NodeError::Serve)
        });
        tracing::info!(%http_address, "serving the OpenAI API");
        Ok(Self { http_address, shutdown, server })
    }

    pub fn http_address(&self) -> SocketAddr {
        self.http_address
    }

    /// Stop accepting requests; those in flight finish. Wait for that with `join`.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn join(self) -> Result<(), NodeError> {
        match self.server.await {
            Ok(result) => result,
            Err(panic) => Err(NodeError::Serve(std::io::Error::other(panic.to_string()))),
        }
    }
}

async fn load_engine(config: &Config) -> Result<SharedEngine, EngineError> {
    let entries = config.models.clone();
    let limits = config.limits.queue();
    let engine = tokio::task::spawn_blocking(move || {
        let specs = entries
            .iter()
            .map(|entry| {
                Ok(ModelSpec { id: entry.id.clone(), path: engine::resolve_model_path(&entry.path)? })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        LocalEngine::load(&specs, limits, &engine::default_device())
    })
    .await
    .map_err(|e| EngineError::Inference(format!("model loading panicked: {e}")))??;
    Ok(Arc::new(engine))
}
