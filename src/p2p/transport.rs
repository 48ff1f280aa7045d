//! The transport: TCP, then (when the cluster has a secret) libp2p's private-network layer keyed
//! by that secret, then Noise for authenticated encryption and Yamux for streams.
//!
//! Why pnet: a node without the cluster secret fails the very first handshake, before Noise, so
//! it can neither connect, nor read announcements, nor send requests; nothing else in the stack
//! needs to know about membership. pnet wraps TCP only, so a node with a secret does not listen
//! on QUIC.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::Duration;

use futures::future::Either;
use hmac::{Hmac, KeyInit, Mac};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PnetError, PreSharedKey};
use libp2p::{PeerId, Transport, noise, relay, tcp, yamux};
use sha2::{Digest, Sha256};

/// PBKDF2 rounds for keys derived from the cluster secret. Every connection key carries the
/// pre-shared key, so a guessable secret (the API key, by default) must be expensive to find from
/// it: about 40-80 ms per guess here, paid once per node start.
const SECRET_ROUNDS: u32 = 200_000;

/// The pre-shared key for a cluster secret, stretched with PBKDF2 under a domain salt, so that
/// the same string used elsewhere gives an unrelated key.
pub fn cluster_psk(secret: &str) -> [u8; 32] {
    stretch(secret, b"llmesh cluster key v2")
}

/// The founders' admission key for a cluster secret, from the same secret under another salt.
/// Invitations carry only the pre-shared key, so a node that joined with a key can pass the
/// transport's handshake but cannot prove it knows the secret (see `members.rs`).
pub fn admission_key(secret: &str) -> [u8; 32] {
    stretch(secret, b"llmesh admission key v2")
}

/// `pbkdf2_sha256` with `SECRET_ROUNDS`, remembered for the life of the process: a node derives
/// the same keys several times as it starts (and tests start many nodes with one secret).
fn stretch(secret: &str, salt: &'static [u8]) -> [u8; 32] {
    type Derived = HashMap<(&'static [u8], [u8; 32]), [u8; 32]>;
    static DERIVED: LazyLock<Mutex<Derived>> = LazyLock::new(Mutex::default);
    // Keyed by a digest, so the map holds no secret in the clear.
    let entry = (salt, <[u8; 32]>::from(Sha256::digest(secret.as_bytes())));
    if let Some(key) = DERIVED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&entry) {
        return *key;
    }
    let key = pbkdf2_sha256(secret.as_bytes(), salt, SECRET_ROUNDS);
    let mut derived = DERIVED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if derived.len() >= 16 {
        derived.clear();
    }
    derived.insert(entry, key);
    key
}

/// PBKDF2-HMAC-SHA256 (RFC 8018) for one 32-byte block.
fn pbkdf2_sha256(password: &[u8], salt: &[u8], rounds: u32) -> [u8; 32] {
    let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(password)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    let mut mac = keyed.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut block: [u8; 32] = mac.finalize().into_bytes().into();
    let mut key = block;
    for _ in 1..rounds {
        let mut mac = keyed.clone();
        mac.update(&block);
        block = mac.finalize().into_bytes().into();
        for (byte, next) in key.iter_mut().zip(block) {
            *byte ^= next;
        }
    }
    key
}

/// A short public name for the cluster, used in the gossip topic (never the secret itself).
pub fn cluster_id(psk: Option<&[u8; 32]>) -> String {
    match psk {
        None => "open".to_string(),
        Some(psk) => {
            let digest = Sha256::digest(psk);
            digest[..8].iter().map(|byte| format!("{byte:02x}")).collect()
        }
    }
}

/// The pre-shared key in force, read at every handshake, so that a running node can move to
/// another cluster (`llmesh join`) without rebinding its sockets.
#[derive(Debug, Clone, Default)]
pub struct ClusterKey(Arc<RwLock<Option<[u8; 32]>>>);

impl ClusterKey {
    pub fn new(psk: Option<[u8; 32]>) -> Self {
        Self(Arc::new(RwLock::new(psk)))
    }

    pub fn get(&self) -> Option<[u8; 32]> {
        *self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn set(&self, psk: Option<[u8; 32]>) {
        *self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = psk;
    }

    /// The cluster's public id under the key in force.
    pub fn cluster_id(&self) -> String {
        cluster_id(self.get().as_ref())
    }
}

/// How long a connection may take from TCP accepted (or circuit opened) to ready: the pre-shared
/// key's nonces, Noise's three messages and two protocol choices, about three round trips, under
/// two seconds even relayed between continents. Ten leave room for a few lost packets; a peer
/// that connects and says nothing holds a file descriptor this long (and the connection limits
/// bound how many such peers there are at once).
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP or a relayed circuit, then the same layers on both: a relayed connection is keyed and
/// authenticated end to end, the relay only passes bytes along.
pub fn build_transport(
    keypair: &Keypair,
    cluster_key: ClusterKey,
    relay: relay::client::Transport,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let maybe_private = tcp.or_transport(relay).and_then(move |socket, _| {
        let psk = cluster_key.get().map(PreSharedKey::new);
        async move {
            match psk {
                Some(psk) => PnetConfig::new(psk).handshake(socket).await.map(Either::Left),
                None => Ok::<_, PnetError>(Either::Right(socket)),
            }
        }
    });
    Ok(maybe_private
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(keypair)?)
        .multiplex(yamux::Config::default())
        .timeout(UPGRADE_TIMEOUT)
        .boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_the_published_test_vectors() {
        let hex = |key: [u8; 32]| key.iter().map(|b| format!("{b:02x}")).collect::<String>();
        // RFC 7914 section 11 / the common PBKDF2-HMAC-SHA256 vectors.
        assert_eq!(
            hex(pbkdf2_sha256(b"password", b"salt", 1)),
            "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"
        );
        assert_eq!(
            hex(pbkdf2_sha256(b"password", b"salt", 2)),
            "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43"
        );
        assert_eq!(
            hex(pbkdf2_sha256(b"password", b"salt", 4096)),
            "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
        );
    }

    #[test]
    fn secrets_map_to_distinct_keys_and_public_ids() {
        let a = cluster_psk("team-secret");
        assert_eq!(a, cluster_psk("team-secret"));
        assert_ne!(a, cluster_psk("other-secret"));
        assert_ne!(a, admission_key("team-secret"), "an invitation's key must not admit founders");
        assert_eq!(cluster_id(None), "open");
        let id = cluster_id(Some(&a));
        assert_eq!(id.len(), 16);
        assert_ne!(id, cluster_id(Some(&cluster_psk("other-secret"))));
    }
}
