//! The router: which node serves a request. It implements `Engine` over the local engine plus
//! every other node of the cluster, so the API neither knows nor cares where a model runs.
//!
//! Tasks it owns (started by `Router::start`): the membership task, which keeps the
//! `ClusterView` from the p2p events and publishes this node's announcement, and the inbound
//! task, which serves other nodes' requests on the local engine.

mod balance;
mod breaker;
mod cluster;
mod dispatch;
#[doc(hidden)]
pub mod fuzz;
mod key_usage;
mod keys;
mod membership;
mod remote;
mod stats;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use balance::{Balancer, Candidate, Strategy};
pub use breaker::{Breaker, BreakerState};
pub use cluster::{ClusterView, DEPARTED_GRACE, NodeRecord, OFFLINE_AFTER, OFFLINE_LISTED_FOR, RemoteHost};
pub use key_usage::{ModelUsage, OverLimit, WINDOW_SECS};
pub use keys::KeyWithUsage;
/// Speaking to a host directly, as the router does (tools and tests use it too).
pub use remote::{InferReply, InferRequest, forward_embed, forward_generate};
pub use stats::{CountersSnapshot, Histogram, LATENCY_BUCKETS, Percentiles, RoutingStats, StatsSnapshot};

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use dispatch::{LOCAL_KEY, Target};

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

/// How the router picks hosts and how hard it tries (`[routing]` in the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// "least-loaded" (default), "power-of-two", "round-robin" or "local-first".
    pub strategy: Strategy,
    /// Hosts tried for one request before giving up (failures before the first byte).
    pub max_attempts: usize,
    /// How long a request waits for a slot when every host of its model is full, before 429.
    pub saturation_wait_ms: u64,
    /// Requests that may wait for a slot at once on this node; more get 429 at once.
    pub max_waiting: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self { strategy: Strategy::default(), max_attempts: 3, saturation_wait_ms: 5000, max_waiting: 256 }
    }
}

impl RoutingConfig {
    fn saturation_wait(&self) -> Duration {
        Duration::from_millis(self.saturation_wait_ms)
    }
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
    routing: RoutingConfig,
    balancer: Balancer,
    /// Per remote host (peer id).
    breakers: std::sync::Mutex<HashMap<String, Breaker>>,
    /// Requests this node has in flight per target ("local" or peer id).
    outstanding: std::sync::Mutex<HashMap<String, u32>>,
    waiting: Arc<Semaphore>,
    stats: RoutingStats,
    /// What this node last announced about itself.
    announced: RwLock<Option<crate::p2p::Announcement>>,
    /// Set once the node is draining: it announces so, takes no new work (peers' requests are
    /// refused with `ShuttingDown`, its own go to other hosts) and finishes what it runs.
    draining: Arc<AtomicBool>,
    /// Woken when something asks the node to drain (`POST /api/drain`).
    drain_requested: Notify,
    /// What each API key used through this node.
    key_meter: key_usage::KeyMeter,
    /// The origin of the meter's seconds.
    started: Instant,
}

impl Router {
    /// Start routing: keep the cluster view, announce this node, serve peers' requests.
    pub fn start(
        node: NodeIdentity,
        local: SharedEngine,
        p2p: P2pHandle,
        events: mpsc::Receiver<P2pEvent>,
        inbound: InboundStreams,
        routing: RoutingConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let inner = Arc::new(RouterInner {
            node,
            local: local.clone(),
            cluster: RwLock::default(),
            p2p,
            balancer: Balancer::new(routing.strategy),
            breakers: Default::default(),
            outstanding: Default::default(),
            waiting: Arc::new(Semaphore::new(routing.max_waiting)),
            stats: RoutingStats::default(),
            announced: RwLock::default(),
            routing,
            draining: Arc::new(AtomicBool::new(false)),
            drain_requested: Notify::new(),
            key_meter: key_usage::KeyMeter::default(),
            started: Instant::now(),
        });
        let draining = inner.draining.clone();
        tokio::spawn(membership::run(inner.clone(), events, shutdown.clone()));
        tokio::spawn(async move {
            tokio::select! {
                _ = remote::serve_inbound(inbound, local, draining) => {}
                _ = shutdown.cancelled() => {}
            }
        });
        Self { inner }
    }

    /// A snapshot of the other online nodes as this node sees them.
    pub fn cluster_nodes(&self) -> Vec<NodeRecord> {
        self.inner.read_cluster().nodes().cloned().collect()
    }

    /// Nodes that went offline in the last ten minutes.
    pub fn offline_nodes(&self) -> Vec<NodeRecord> {
        self.inner.read_cluster().offline_nodes().cloned().collect()
    }

    /// Peer ids this node holds a connection to.
    pub async fn connected_peers(&self) -> Vec<String> {
        self.inner.p2p.connected_peers().await.unwrap_or_default()
    }

    pub fn node(&self) -> &NodeIdentity {
        &self.inner.node
    }

    /// Issue a connection key for `uses` joins, valid for `valid_for`.
    pub async fn invite(
        &self,
        uses: u32,
        valid_for: Duration,
    ) -> Result<(String, u64), crate::p2p::P2pError> {
        let expires_at = crate::p2p::unix_now().saturating_add(valid_for.as_secs());
        let key = self.inner.p2p.invite(uses, expires_at).await?;
        Ok((key, expires_at))
    }

    /// Join with a connection key while running (see `P2pHandle::join_running`); returns the
    /// inviter's peer id.
    pub async fn join(&self, key: &str) -> Result<String, crate::p2p::P2pError> {
        Ok(self.inner.p2p.join_running(key).await?.inviter)
    }

    /// Throw a node out of the cluster (see `P2pHandle::revoke`).
    pub async fn revoke(&self, peer_id: &str) -> Result<bool, crate::p2p::P2pError> {
        self.inner.p2p.revoke(peer_id).await
    }

    /// Stop taking new work (see `RouterInner::draining`) and wake whoever waits in
    /// `drain_requested`. Returns false when the node was draining already.
    pub fn start_draining(&self) -> bool {
        let first = !self.inner.draining.swap(true, Ordering::Relaxed);
        if first {
            tracing::info!("draining: no new work; finishing what runs");
        }
        self.inner.drain_requested.notify_waiters();
        self.inner.drain_requested.notify_one();
        first
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Returns once something has asked this node to drain.
    pub async fn drain_requested(&self) {
        let notified = self.inner.drain_requested.notified();
        if self.is_draining() {
            return;
        }
        notified.await;
    }

    /// This node's latest announcement (`None` until the first one, right after start).
    pub fn own_announcement(&self) -> Option<crate::p2p::Announcement> {
        self.inner.announced.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// How busy the local engine is.
    /// This node's own engine: the models it hosts, loaded and unloaded at run time.
    pub fn local_engine(&self) -> &SharedEngine {
        &self.inner.local
    }

    pub fn local_load(&self) -> EngineLoad {
        self.inner.local.load()
    }

    /// Remote hosts (peer ids) whose circuit breaker keeps requests away now.
    pub fn open_breakers(&self) -> Vec<String> {
        let breakers = self.inner.breakers.lock().unwrap_or_else(|p| p.into_inner());
        breakers.iter().filter(|(_, breaker)| breaker.is_open()).map(|(peer, _)| peer.clone()).collect()
    }
}

impl RouterInner {
    /// Seconds since the router started (the key meter's clock).
    fn seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

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

    fn lock_outstanding(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.outstanding.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn waiting_slot(&self, model_id: &str) -> Result<OwnedSemaphorePermit, EngineError> {
        self.waiting.clone().try_acquire_owned().map_err(|_| EngineError::QueueFull(model_id.to_string()))
    }

    /// Every node that hosts `model_id`, this one included, with its announced load.
    fn all_hosts(&self, model_id: &str) -> Vec<(Target, u32)> {
        let mut hosts = Vec::new();
        if self.hosts_locally(model_id) && !self.draining.load(Ordering::Relaxed) {
            let load = self.local.load();
            let target = Target { key: LOCAL_KEY.into(), name: self.node.name.clone(), is_local: true };
            hosts.push((target, (load.in_flight + load.queued) as u32));
        }
        hosts.extend(self.read_cluster().remote_hosts(model_id).into_iter().map(|host| {
            (Target { key: host.peer_id, name: host.name, is_local: false }, host.announced_load)
        }));
        hosts
    }

    /// The host for the next attempt: `Ok(None)` when every host is excluded or its breaker is
    /// open, an error when the model has no host at all.
    async fn choose(
        &self,
        model_id: &str,
        excluded: &HashSet<String>,
    ) -> Result<Option<Target>, EngineError> {
        let mut hosts = self.all_hosts(model_id);
        if hosts.is_empty() && !self.read_cluster().recently_departed(model_id, Instant::now()) {
            hosts = self
                .look_up_providers(model_id)
                .await
                .into_iter()
                .map(|host| {
                    (Target { key: host.peer_id, name: host.name, is_local: false }, host.announced_load)
                })
                .collect();
        }
        if hosts.is_empty() {
            return Err(self.no_host_error(model_id));
        }
        let now = tokio::time::Instant::now();
        let mut breakers = self.breakers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let outstanding = self.lock_outstanding();
        let available: Vec<(Target, Candidate)> = hosts
            .into_iter()
            .filter(|(target, _)| !excluded.contains(&target.key))
            .filter(|(target, _)| {
                target.is_local || breakers.get(&target.key).is_none_or(|b| b.available(now))
            })
            .map(|(target, announced_load)| {
                let candidate = Candidate {
                    key: target.key.clone(),
                    is_local: target.is_local,
                    outstanding: outstanding.get(&target.key).copied().unwrap_or(0),
                    announced_load,
                };
                (target, candidate)
            })
            .collect();
        let candidates: Vec<Candidate> = available.iter().map(|(_, candidate)| candidate.clone()).collect();
        let Some(index) = self.balancer.choose(&candidates, &mut rand::rng()) else { return Ok(None) };
        let target = available[index].0.clone();
        if !target.is_local {
            breakers.entry(target.key.clone()).or_default().allow(now);
        }
        Ok(Some(target))
    }

    /// Whether a target is still part of the cluster (this node always is).
    fn is_member(&self, target: &Target) -> bool {
        target.is_local || self.read_cluster().name_of(&target.key).is_some()
    }

    fn no_host_error(&self, model_id: &str) -> EngineError {
        let unloading_here = self
            .local
            .model_states()
            .iter()
            .any(|model| model.id == model_id && model.state == crate::engine::ModelState::Unloading);
        let draining_here = self.draining.load(Ordering::Relaxed) && self.hosts_locally(model_id);
        if unloading_here || draining_here {
            // Still finishing its answers here, and no other host: "try again later".
            EngineError::ShuttingDown(model_id.to_string())
        } else if let incompatible = self.read_cluster().incompatible_hosts(model_id)
            && !incompatible.is_empty()
        {
            let hosts: Vec<String> =
                incompatible.iter().map(|(name, version)| format!("{name} (llmesh {version})")).collect();
            EngineError::Unavailable(format!(
                "model '{model_id}' is served only by nodes of another llmesh version, which this one \
                 (llmesh {}) cannot send requests to: {}; run the same version on both",
                env!("CARGO_PKG_VERSION"),
                hosts.join(", ")
            ))
        } else if self.read_cluster().recently_departed(model_id, Instant::now()) {
            EngineError::Unavailable(format!(
                "model '{model_id}' has no host right now: its last host left the cluster or stopped serving it"
            ))
        } else {
            EngineError::UnknownModel(model_id.to_string())
        }
    }

    fn breaker_succeeded(&self, target: &Target) {
        if !target.is_local {
            let mut breakers = self.breakers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            breakers.entry(target.key.clone()).or_default().succeeded();
        }
    }

    fn breaker_failed(&self, target: &Target) {
        if !target.is_local {
            let mut breakers = self.breakers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let breaker = breakers.entry(target.key.clone()).or_default();
            breaker.failed(tokio::time::Instant::now());
            if breaker.is_open() {
                tracing::warn!(host = %target.name, "circuit breaker open: not sending to this host for a while");
            }
        }
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
        dispatch::generate(self.inner.clone(), request).boxed()
    }

    fn embed(&self, request: EmbedRequest) -> BoxFuture<'static, Result<Embeddings, EngineError>> {
        dispatch::embed(self.inner.clone(), request).boxed()
    }

    fn load(&self) -> EngineLoad {
        self.inner.local.load()
    }
}
