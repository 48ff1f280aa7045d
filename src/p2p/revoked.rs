//! The peers thrown out of the cluster, kept in the data dir (`revoked.json`) so a revocation
//! survives restarts, and announced so it reaches every node.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use libp2p::PeerId;

use super::announcement::MAX_REVOKED;
use super::json_file::save_json;

const REVOKED_FILE: &str = "revoked.json";
/// Revoked peers a node keeps.
const MAX_KEPT: usize = 8 * MAX_REVOKED;

#[derive(Debug)]
pub struct RevokedPeers {
    path: PathBuf,
    peers: BTreeSet<PeerId>,
}

impl RevokedPeers {
    pub fn load(data_dir: &Path) -> Self {
        let path = data_dir.join(REVOKED_FILE);
        let peers = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Vec<String>>(&bytes).ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|peer| peer.parse().ok())
            .collect();
        Self { path, peers }
    }

    pub fn contains(&self, peer: &PeerId) -> bool {
        self.peers.contains(peer)
    }

    /// Add a peer and save; returns whether it is new. The list a node keeps is capped at
    /// `MAX_KEPT` (a revocation past that is still enforced by the caller until a restart);
    /// announcements carry the first `MAX_REVOKED`.
    pub fn insert(&mut self, peer: PeerId) -> bool {
        if self.peers.contains(&peer) {
            return false;
        }
        if self.peers.len() >= MAX_KEPT {
            tracing::error!(%peer, "the revoked list is full: this revocation is not kept across restarts");
            return true;
        }
        self.peers.insert(peer);
        if let Err(error) = self.save() {
            tracing::error!(%error, path = %self.path.display(), "cannot save the revoked peers");
        }
        true
    }

    pub fn iter(&self) -> impl Iterator<Item = &PeerId> {
        self.peers.iter()
    }

    /// What an announcement carries.
    pub fn list(&self) -> Vec<String> {
        self.peers.iter().take(MAX_REVOKED).map(PeerId::to_string).collect()
    }

    fn save(&self) -> std::io::Result<()> {
        let all: Vec<String> = self.peers.iter().map(PeerId::to_string).collect();
        save_json(&self.path, &all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let peer = PeerId::random();
        let mut revoked = RevokedPeers::load(dir.path());
        assert!(revoked.insert(peer));
        assert!(!revoked.insert(peer), "already revoked");
        let reloaded = RevokedPeers::load(dir.path());
        assert!(reloaded.contains(&peer));
        assert_eq!(reloaded.list(), vec![peer.to_string()]);
    }
}
