//! The node's configuration: one documented serde tree, read from a TOML file (`--config`), with
//! command-line flags and environment variables laid over it. `Config::default()` runs on a
//! laptop: loopback only, no key, no models.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::QueueLimits;
use crate::router::RoutingConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid llmesh config: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("--model must look like ID=PATH (got '{0}')")]
    ModelFlag(String),
    #[error(
        "the cluster key has {0} characters; it must have at least {MIN_CLUSTER_KEY_CHARS} \
         (`llmesh cluster-key` prints an unguessable one)"
    )]
    WeakClusterKey(usize),
}

/// The shortest cluster secret accepted. Anyone who records one connection can test guesses of the
/// secret offline (see ARCHITECTURE.md's threat model), so a short one is refused outright; the
/// keys `llmesh cluster-key` makes have 256 random bits.
pub const MIN_CLUSTER_KEY_CHARS: usize = 16;

/// A new cluster secret: 32 random bytes, base64url (43 characters).
pub fn new_cluster_key() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the HTTP API listens. Loopback by default: exposing the port is an explicit choice.
    pub listen: SocketAddr,
    /// Names (`name` or `name:port`) the HTTP API answers to besides `localhost`, `127.0.0.1` and
    /// `[::1]`: a reverse proxy's or a VPN name. A node listening on loopback refuses every other
    /// `Host` (a web page's DNS rebinding); one listening elsewhere does so once names are given.
    pub allowed_hosts: Vec<String>,
    /// When set, every /v1 route requires `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
    /// The models this node hosts.
    pub models: Vec<ModelEntry>,
    pub limits: Limits,
    /// The human name shown everywhere; default: the host name.
    pub name: Option<String>,
    /// Where the node keeps its identity (node.key); default: the platform data directory
    /// (`$XDG_DATA_HOME/llmesh`, `~/.local/share/llmesh`, or `~/Library/Application Support/llmesh`).
    pub data_dir: Option<PathBuf>,
    /// Multiaddresses the overlay listens on.
    pub p2p_listen: Vec<String>,
    /// Peers to dial (and redial) where multicast does not pass: VPNs, routed subnets.
    pub peers: Vec<String>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// Relay connections between members that cannot reach each other directly, and reserve a
    /// relayed address on the `peers` (or the inviter) so that others can reach this node through
    /// them.
    pub relay: bool,
    /// The cluster secret: nodes without the same one cannot connect. At least
    /// `MIN_CLUSTER_KEY_CHARS` characters; `llmesh cluster-key` prints a random one. Without it (and
    /// without a cluster joined with a connection key) the overlay listens on loopback only, unless
    /// `open_cluster` is set.
    pub cluster_key: Option<String>,
    /// With no cluster secret, listen on the configured overlay addresses anyway and let any llmesh
    /// node that reaches them in as a member (mDNS included). Off by default: an open cluster lets
    /// anyone on the network use the models, announce fake ones to collect prompts, and revoke nodes.
    pub open_cluster: bool,
    /// Addresses others reach this node at beyond its listen addresses (a VPN address, a port
    /// forward); put into connection keys.
    pub external_addresses: Vec<String>,
    /// A connection key (`llmesh://join/...`) to join a cluster with. Once joined, the node
    /// remembers the cluster in its data dir and rejoins after a restart without it.
    pub join: Option<String>,
    pub routing: RoutingConfig,
    /// On SIGTERM or `llmesh drain`: how long, in seconds, the node waits for the answers it is
    /// producing before it exits anyway (those are then resumed on other hosts).
    pub drain_timeout: u64,
}

/// The overlay's default listen address: every interface, TCP port 7690.
pub const DEFAULT_P2P_LISTEN: &str = "/ip4/0.0.0.0/tcp/7690";

/// One hosted model: `id` is the name clients use; `path` a .gguf file, a folder with
/// model.safetensors + config.json + tokenizer.json, or `hf:owner/repo/file.gguf`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub id: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Generations of one model run at once (batched into each forward step).
    pub max_active_per_model: usize,
    /// Requests of one model that wait for a place; one more gets 429 with Retry-After.
    pub max_queued_per_model: usize,
    /// Tokens of recent generations' KV caches kept per model, so that a prompt starting with
    /// what one of them ran (a system prompt, the earlier turns of a chat) reuses it; 0 turns it off.
    pub prompt_cache_tokens_per_model: usize,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Threads the engine computes on, shared by every model: the model's own thread plus
    /// `compute_threads - 1` workers. 0 picks one per physical core. The environment variable
    /// `LLMESH_THREADS` overrides it.
    pub compute_threads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            allowed_hosts: Vec::new(),
            api_key: None,
            models: Vec::new(),
            limits: Limits::default(),
            name: None,
            data_dir: None,
            p2p_listen: vec![DEFAULT_P2P_LISTEN.to_string()],
            peers: Vec::new(),
            mdns: true,
            relay: true,
            cluster_key: None,
            open_cluster: false,
            external_addresses: Vec::new(),
            join: None,
            routing: RoutingConfig::default(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// Seconds a draining node waits for its answers to finish.
pub const DEFAULT_DRAIN_TIMEOUT: u64 = 30;

impl Default for Limits {
    fn default() -> Self {
        let queue = QueueLimits::default();
        Self {
            max_active_per_model: queue.max_active,
            max_queued_per_model: queue.max_queued,
            prompt_cache_tokens_per_model: queue.prompt_cache_tokens,
            max_body_bytes: 4 * 1024 * 1024,
            compute_threads: 0,
        }
    }
}

impl Limits {
    pub fn queue(&self) -> QueueLimits {
        QueueLimits {
            max_active: self.max_active_per_model,
            max_queued: self.max_queued_per_model,
            prompt_cache_tokens: self.prompt_cache_tokens_per_model,
        }
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source: Box::new(source) })
    }

    /// The secret that keeps strangers out of the overlay (see `cluster_key`). The API key never
    /// doubles as one: it travels in every HTTP request, and a cluster secret must not.
    pub fn cluster_secret(&self) -> Result<Option<&str>, ConfigError> {
        match self.cluster_key.as_deref() {
            Some(secret) if secret.chars().count() < MIN_CLUSTER_KEY_CHARS => {
                Err(ConfigError::WeakClusterKey(secret.chars().count()))
            }
            secret => Ok(secret),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        let home = || std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        if cfg!(target_os = "macos") {
            return home().join("Library/Application Support/llmesh");
        }
        match std::env::var_os("XDG_DATA_HOME") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("llmesh"),
            _ => home().join(".local/share/llmesh"),
        }
    }

    /// Add a model given as `ID=PATH` on the command line; it replaces a file entry with the same id.
    pub fn add_model_flag(&mut self, flag: &str) -> Result<(), ConfigError> {
        let (id, path) = flag
            .split_once('=')
            .filter(|(id, path)| !id.is_empty() && !path.is_empty())
            .ok_or_else(|| ConfigError::ModelFlag(flag.to_string()))?;
        self.models.retain(|model| model.id != id);
        self.models.push(ModelEntry { id: id.to_string(), path: path.to_string() });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_settings_parse_and_defaults_fill_the_rest() {
        let config: Config = toml::from_str(
            r#"
            listen = "0.0.0.0:9000"
            [[models]]
            id = "chat"
            path = "models/chat.gguf"
            [limits]
            max_queued_per_model = 3
            "#,
        )
        .unwrap();
        assert_eq!(config.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.models, vec![ModelEntry { id: "chat".into(), path: "models/chat.gguf".into() }]);
        assert_eq!(config.limits.max_queued_per_model, 3);
        assert_eq!(config.limits.max_body_bytes, Limits::default().max_body_bytes);
    }

    #[test]
    fn the_api_key_never_doubles_as_the_cluster_secret() {
        let mut config =
            Config { api_key: Some("an-api-key-long-enough-to-pass".into()), ..Config::default() };
        assert_eq!(config.cluster_secret().unwrap(), None);
        config.cluster_key = Some("a-cluster-secret-of-our-team".into());
        assert_eq!(config.cluster_secret().unwrap(), Some("a-cluster-secret-of-our-team"));
        assert_eq!(Config::default().cluster_secret().unwrap(), None);
    }

    #[test]
    fn new_cluster_keys_are_random_and_long_enough() {
        let (a, b) = (new_cluster_key(), new_cluster_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        let config = Config { cluster_key: Some(a), ..Config::default() };
        assert!(config.cluster_secret().is_ok());
    }

    #[test]
    fn short_cluster_secrets_are_refused() {
        let config = Config { cluster_key: Some("team-secret".into()), ..Config::default() };
        assert!(matches!(config.cluster_secret(), Err(ConfigError::WeakClusterKey(11))));
        let config = Config { cluster_key: Some("é".repeat(MIN_CLUSTER_KEY_CHARS)), ..Config::default() };
        assert!(config.cluster_secret().is_ok(), "counted in characters, not bytes");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("lisen = \"127.0.0.1:1\"").is_err());
    }

    #[test]
    fn model_flags_override_file_entries() {
        let mut config = Config::default();
        config.models.push(ModelEntry { id: "chat".into(), path: "old.gguf".into() });
        config.add_model_flag("chat=new.gguf").unwrap();
        config.add_model_flag("embed=dir=with=equals").unwrap();
        assert_eq!(config.models[0], ModelEntry { id: "chat".into(), path: "new.gguf".into() });
        assert_eq!(config.models[1].path, "dir=with=equals");
        assert!(config.add_model_flag("no-equals").is_err());
        assert!(config.add_model_flag("=path").is_err());
    }
}
