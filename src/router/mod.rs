//! The router: which node serves a request. It implements `Engine` over the local engine plus
//! every other node of the cluster, so the API neither knows nor cares where a model runs.
//!
//! Tasks it owns (started by `Router::start`): the membership task, which keeps the
//! `ClusterView` from the p2p events and publishes this node's announcement, and the inbound
//! task, which serves other nodes' requests on the local engine.

mod cluster;
mod membership;
mod remote;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use rand::seq::IndexedRandom;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use cluster::{ClusterView, DEPARTED_GRACE, NodeRecord, OFFLINE_AFTER, RemoteHost};

use crate::engine::{
    EmbedRequest, Embeddings, Engine, EngineError, EngineLoad, GenerateRequest, GenerationStream, ModelHost,
    ModelInfo, SharedEngine,
};
use crate::p2p::{InboundStreams, P2pEvent, P2pHandle};

/// How long a request for a model nobody announces waits for the DHT to name a host.
const PROVIDER_LOOKUP: Duration = Duration::from_secs(2);

/// This node's identity as the router shows it.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub peer_id: String,
    /// Unix seconds.
    pub started_at: u64,
}

#[derive(Clone)]
pub struct Router {
    inner: Arc<RouterInner>,
}

struct RouterInner {
    node: NodeIdentity,
    local: SharedEngine,
    cluster: RwLock<ClusterView>,
    p2p: P2pHandle,
}

impl Router {
    /// Start routing: keep the cluster view, announce this node, serve peers' requests.
    pub fn start(
        node: NodeIdentity,
        local: SharedEngine,
        p2p: P2pHandle,
        events: mpsc::Receiver<P2pEvent>,
        inbound: InboundStreams,
        shutdown: CancellationToken,
    ) -> Self {
        let inner = Arc::new(RouterInner { node, local: local.clone(), cluster: RwLock::default(), p2p });
        tokio::spawn(membership::run(inner.clone(), events, shutdown.clone()));
        tokio::spawn(async move {
            tokio::select! {
                _ = remote::serve_inbound(inbound, local) => {}
                _ = shutdown.cancelled() => {}
            }
        });
        Self { inner }
    }

    /// A snapshot of the other nodes as this node sees them.
    pub fn cluster_nodes(&self) -> Vec<NodeRecord> {
        self.inner.read_cluster().nodes().cloned().collect()
    }

    /// Peer ids this node holds a connection to.
    pub async fn connected_peers(&self) -> Vec<String> {
        self.inner.p2p.connected_peers().await.unwrap_or_default()
    }

    pub fn node(&self) -> &NodeIdentity {
        &self.inner.node
    }
}

impl RouterInner {
    fn read_cluster(&self) -> std::sync::RwLockReadGuard<'_, ClusterView> {
        // A panic while holding the lock leaves plain data behind; keep serving with it.
        self.cluster.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_cluster(&self) -> std::sync::RwLockWriteGuard<'_, ClusterView> {
        self.cluster.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn hosts_locally(&self, model_id: &str) -> bool {
        self.local.models().iter().any(|model| model.id == model_id)
    }

    fn self_as_host(&self) -> ModelHost {
        ModelHost { name: self.node.name.clone(), peer_id: self.node.peer_id.clone() }
    }

    /// A remote host for `model_id`: the least loaded by announcement, ties broken at random so a
    /// burst does not pile onto one node.
    async fn choose_remote(&self, model_id: &str) -> Result<RemoteHost, EngineError> {
        let mut hosts = self.read_cluster().remote_hosts(model_id);
        if hosts.is_empty() {
            if self.read_cluster().recently_departed(model_id, Instant::now()) {
                return Err(EngineError::Unavailable(format!(
                    "model '{model_id}' has no host right now: its last host left the cluster"
                )));
            }
            hosts = self.look_up_providers(model_id).await;
        }
        let least = hosts.iter().map(|host| host.announced_load).min();
        let candidates: Vec<&RemoteHost> =
            hosts.iter().filter(|host| Some(host.announced_load) == least).collect();
        candidates
            .choose(&mut rand::rng())
            .map(|host| (*host).clone())
            .ok_or_else(|| EngineError::UnknownModel(model_id.to_string()))
    }

    /// Ask the DHT who provides a model nobody has announced, then give their announcements a
    /// moment to arrive.
    async fn look_up_providers(&self, model_id: &str) -> Vec<RemoteHost> {
        let providers = tokio::time::timeout(PROVIDER_LOOKUP, self.p2p.find_providers(model_id)).await;
        let Ok(Ok(providers)) = providers else { return Vec::new() };
        if providers.is_empty() {
            return Vec::new();
        }
        tracing::info!(model = %model_id, providers = providers.len(), "found hosts through the DHT");
        let deadline = Instant::now() + PROVIDER_LOOKUP;
        while Instant::now() < deadline {
            let hosts = self.read_cluster().remote_hosts(model_id);
            if !hosts.is_empty() {
                return hosts;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Vec::new()
    }

    async fn generate(self: Arc<Self>, request: GenerateRequest) -> Result<GenerationStream, EngineError> {
        if self.hosts_locally(&request.model) {
            let stream = self.local.generate(request).await?;
            return Ok(stream.served_by(self.node.name.clone()));
        }
        let host = self.choose_remote(&request.model).await?;
        tracing::debug!(model = %request.model, host = %host.name, "forwarding");
        remote::forward_generate(&self.p2p, &host.peer_id, &host.name, request).await
    }

    async fn embed(self: Arc<Self>, request: EmbedRequest) -> Result<Embeddings, EngineError> {
        if self.hosts_locally(&request.model) {
            let embeddings = self.local.embed(request).await?;
            return Ok(Embeddings { served_by: Some(self.node.name.clone()), ..embeddings });
        }
        let host = self.choose_remote(&request.model).await?;
        tracing::debug!(model = %request.model, host = %host.name, "forwarding");
        remote::forward_embed(&self.p2p, &host.peer_id, &host.name, request).await
    }
}

impl Engine for Router {
    fn models(&self) -> Vec<ModelInfo> {
        let mut models: Vec<ModelInfo> = self
            .inner
            .local
            .models()
            .into_iter()
            .map(|model| ModelInfo { hosts: vec![self.inner.self_as_host()], ..model })
            .collect();
        for remote in self.inner.read_cluster().models() {
            match models.iter_mut().find(|model| model.id == remote.id) {
                Some(model) => model.hosts.extend(remote.hosts),
                None => models.push(remote),
            }
        }
        models.sort_by(|a, b| a.id.cmp(&b.id));
        models
    }

    fn generate(
        &self,
        request: GenerateRequest,
    ) -> BoxFuture<'static, Result<GenerationStream, EngineError>> {
        self.inner.clone().generate(request).boxed()
    }

    fn embed(&self, request: EmbedRequest) -> BoxFuture<'static, Result<Embeddings, EngineError>> {
        self.inner.clone().embed(request).boxed()
    }

    fn load(&self) -> EngineLoad {
        self.inner.local.load()
    }
}
