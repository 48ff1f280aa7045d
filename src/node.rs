//! A running llmesh node: the local engine, the p2p overlay, the router over both, and the HTTP
//! API in front. Started by `Node::spawn`, stopped in order by `shutdown` + `join`.
//!
//! Shutdown order: stop accepting HTTP connections and let requests in flight finish
//! (`api::serve` drains), then stop the router and the p2p task (peers see the connections close
//! and drop this node at once), then drop the engine, whose worker threads finish and exit.
//! Dropping a `Node` without `join` stops everything at once. `drain` comes before all that: the
//! node announces that it is going away and lets the generations it runs finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiConfig};
use crate::config::Config;
use crate::engine::{self, EngineError, LocalEngine, ModelSpec, SharedEngine};
use crate::p2p::{self, Invitation, JoinedCluster, P2pConfig, P2pError};
use crate::router::{NodeIdentity, Router};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    P2p(#[from] P2pError),
    #[error("cannot listen on {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// How often a draining node looks at what it still runs.
const DRAIN_POLL: Duration = Duration::from_millis(50);

pub struct Node {
    http_address: SocketAddr,
    p2p_addresses: Vec<String>,
    router: Router,
    http_shutdown: CancellationToken,
    cluster_shutdown: CancellationToken,
    server: Option<JoinHandle<Result<(), NodeError>>>,
}

impl Node {
    /// Load the configured models (downloading `hf:` ones), join the cluster, serve the API.
    pub async fn spawn(config: Config) -> Result<Self, NodeError> {
        let engine = load_engine(&config).await?;
        Self::spawn_with_engine(config, engine).await
    }

    /// The same over a ready local engine (tests put a fake or tiny one here).
    pub async fn spawn_with_engine(config: Config, local: SharedEngine) -> Result<Self, NodeError> {
        let http_shutdown = CancellationToken::new();
        let cluster_shutdown = CancellationToken::new();
        let data_dir = config.data_dir();
        let membership = Membership::resolve(&config, &data_dir)?;
        let p2p_config = P2pConfig {
            data_dir: data_dir.clone(),
            listen: config.p2p_listen.clone(),
            peers: membership.peers.clone(),
            mdns: config.mdns,
            relay: config.relay,
            cluster_psk: membership.cluster_psk,
            admission_key: membership.admission_key,
            fixed_cluster: config.cluster_key.is_some(),
            open_cluster: config.open_cluster,
            external_addresses: config.external_addresses.clone(),
        };
        let (p2p, events, inbound) = p2p::spawn(p2p_config, cluster_shutdown.clone()).await?;
        if let Some((key, invitation)) = &membership.joining {
            p2p.join(key).await?;
            let joined = JoinedCluster {
                invitation: invitation.id_hex(),
                cluster_psk: invitation.cluster_psk,
                peers: invitation.addresses.clone(),
            };
            if let Err(error) = joined.save(&data_dir) {
                tracing::warn!(%error, "joined, but cannot remember the cluster for the next start");
            }
            tracing::info!(inviter = %invitation.inviter, "joined the cluster with a connection key");
        }
        let p2p_addresses = wait_for_listen_addresses(&p2p, &config).await;
        let identity = NodeIdentity {
            name: config.name.clone().unwrap_or_else(crate::hardware::host_name),
            peer_id: p2p.peer_id(),
            started_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        tracing::info!(name = %identity.name, peer_id = %identity.peer_id, addresses = ?p2p_addresses, "node identity");
        let router = Router::start(
            identity,
            local,
            p2p,
            events,
            inbound,
            config.routing.clone(),
            cluster_shutdown.clone(),
        );

        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| NodeError::Bind { address: config.listen, source })?;
        let http_address =
            listener.local_addr().map_err(|source| NodeError::Bind { address: config.listen, source })?;
        let app = api::node_app(
            router.clone(),
            ApiConfig {
                api_key: config.api_key.clone(),
                max_body_bytes: config.limits.max_body_bytes,
                allowed_hosts: api::allowed_hosts(http_address, &config.allowed_hosts),
            },
        );
        let stop = http_shutdown.clone();
        let server =
            tokio::spawn(async move { api::serve(listener, app, stop).await.map_err(NodeError::Serve) });
        tracing::info!(%http_address, "serving the OpenAI API");
        Ok(Self {
            http_address,
            p2p_addresses,
            router,
            http_shutdown,
            cluster_shutdown,
            server: Some(server),
        })
    }

    pub fn http_address(&self) -> SocketAddr {
        self.http_address
    }

    /// Overlay addresses other nodes can use with `--peer`, each ending in /p2p/<peer id>.
    pub fn p2p_addresses(&self) -> &[String] {
        &self.p2p_addresses
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Leave the cluster gently: announce draining at once (routers stop choosing this node, its
    /// `/health` answers 503), let the generations it runs finish for at most `timeout`, then
    /// stop. Past the timeout it stops anyway: the answers it still produces break off and their
    /// entry nodes resume them on other hosts.
    pub async fn drain(self, timeout: Duration) -> Result<(), NodeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.router.start_draining();
        loop {
            let load = self.router.local_load();
            if load.in_flight + load.queued == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    in_flight = load.in_flight,
                    "drain timeout: stopping with answers still running; they resume elsewhere"
                );
                return Ok(());
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        tracing::info!("drained: every answer finished");
        self.shutdown();
        match tokio::time::timeout_at(deadline, self.join()).await {
            Ok(result) => result,
            // Requests relayed to other hosts outlived the timeout: dropped with the node.
            Err(_) => Ok(()),
        }
    }

    /// Stop accepting requests; those in flight finish. Wait for that with `join`.
    pub fn shutdown(&self) {
        self.http_shutdown.cancel();
    }

    pub async fn join(mut self) -> Result<(), NodeError> {
        let result = match self.server.take() {
            Some(server) => match server.await {
                Ok(result) => result,
                Err(panic) => Err(NodeError::Serve(std::io::Error::other(panic.to_string()))),
            },
            None => Ok(()),
        };
        self.cluster_shutdown.cancel();
        result
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.http_shutdown.cancel();
        self.cluster_shutdown.cancel();
    }
}

/// Which cluster to be part of: the one a connection key names, the one joined before (kept in
/// the data dir), or the one the config describes.
struct Membership {
    cluster_psk: Option<[u8; 32]>,
    /// Only when the configured secret is this cluster's own (not on a node that joins another
    /// cluster with a connection key).
    admission_key: Option<[u8; 32]>,
    peers: Vec<String>,
    /// A key still to present to its inviter.
    joining: Option<(String, Invitation)>,
}

impl Membership {
    fn resolve(config: &Config, data_dir: &std::path::Path) -> Result<Self, NodeError> {
        let mut peers = config.peers.clone();
        let secret = config.cluster_secret()?;
        // A cluster.json that cannot be read is an error, never a reason to fall back to another
        // cluster (or to none): the node would silently leave the one it joined.
        let joined = JoinedCluster::load(data_dir).map_err(P2pError::Setup)?;
        let Some(key) = &config.join else {
            let mut cluster_psk = secret.map(p2p::cluster_psk);
            if let Some(joined) = joined {
                if secret.is_none() {
                    cluster_psk = joined.cluster_psk;
                }
                peers.extend(joined.peers);
            }
            let admission_key = admission_key(secret, cluster_psk);
            return Ok(Self { cluster_psk, admission_key, peers, joining: None });
        };
        let invitation = Invitation::from_key(key).map_err(P2pError::Invitation)?;
        peers.extend(invitation.addresses.iter().cloned());
        let already_joined = joined.is_some_and(|joined| joined.invitation == invitation.id_hex());
        let cluster_psk = invitation.cluster_psk;
        let joining = (!already_joined).then(|| (key.clone(), invitation));
        let admission_key = admission_key(secret, cluster_psk);
        Ok(Self { cluster_psk, admission_key, peers, joining })
    }
}

fn admission_key(secret: Option<&str>, cluster_psk: Option<[u8; 32]>) -> Option<[u8; 32]> {
    let secret = secret?;
    (Some(p2p::cluster_psk(secret)) == cluster_psk).then(|| p2p::admission_key(secret))
}

/// The overlay reports its listen addresses asynchronously; wait briefly so callers (and the
/// start-up log) can use them.
async fn wait_for_listen_addresses(p2p: &p2p::P2pHandle, config: &Config) -> Vec<String> {
    for _ in 0..50 {
        match p2p.listen_addresses().await {
            Ok(addresses) if !addresses.is_empty() || config.p2p_listen.is_empty() => return addresses,
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(_) => break,
        }
    }
    Vec::new()
}

async fn load_engine(config: &Config) -> Result<SharedEngine, EngineError> {
    let entries = config.models.clone();
    let limits = config.limits.queue();
    // One pool per process: where several nodes share one (tests), the first one's count holds.
    let threads = engine::kernels::pool::configure_threads(config.limits.compute_threads);
    tracing::info!(threads, configured = config.limits.compute_threads, "compute threads");
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
