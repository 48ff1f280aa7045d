//! The transport: TCP, then (when the cluster has a secret) libp2p's private-network layer keyed
//! by that secret, then Noise for authenticated encryption and Yamux for streams.
//!
//! Why pnet: a node without the cluster secret fails the very first handshake, before Noise, so
//! it can neither connect, nor read announcements, nor send requests; nothing else in the stack
//! needs to know about membership. pnet wraps TCP only, so a node with a secret does not listen
//! on QUIC.

use std::time::Duration;

use futures::future::Either;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PnetError, PreSharedKey};
use libp2p::{PeerId, Transport, noise, relay, tcp, yamux};
use sha2::{Digest, Sha256};

/// The pre-shared key for a cluster secret: SHA-256 of the secret with a domain prefix, so the
/// same string used elsewhere gives an unrelated key.
pub fn cluster_psk(secret: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"llmesh cluster key v1\0");
    hasher.update(secret.as_bytes());
    hasher.finalize().into()
}

/// The founders' admission key for a cluster secret, from the same secret under another domain
/// prefix. Invitations carry only the pre-shared key, so a node that joined with a key can pass
/// the transport's handshake but cannot prove it knows the secret (see `members.rs`).
pub fn admission_key(secret: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"llmesh admission key v1\0");
    hasher.update(secret.as_bytes());
    hasher.finalize().into()
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

/// TCP or a relayed circuit, then the same layers on both: a relayed connection is keyed and
/// authenticated end to end, the relay only passes bytes along.
pub fn build_transport(
    keypair: &Keypair,
    psk: Option<[u8; 32]>,
    relay: relay::client::Transport,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let psk = psk.map(PreSharedKey::new);
    let maybe_private = tcp.or_transport(relay).and_then(move |socket, _| async move {
        match psk {
            Some(psk) => PnetConfig::new(psk).handshake(socket).await.map(Either::Left),
            None => Ok::<_, PnetError>(Either::Right(socket)),
        }
    });
    Ok(maybe_private
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(keypair)?)
        .multiplex(yamux::Config::default())
        .timeout(Duration::from_secs(20))
        .boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

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
