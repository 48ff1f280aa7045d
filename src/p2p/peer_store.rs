//! The peers this node has met, with the addresses they announced, kept in the data dir
//! (`peers.json`) so that a restarted node reaches the cluster again through any of them, not
//! only through its configured or inviting peers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use super::json_file::save_json;

const PEERS_FILE: &str = "peers.json";
/// Peers remembered at most; the ones seen longest ago are forgotten first.
const MAX_PEERS: usize = 256;
const ADDRESSES_PER_PEER: usize = 4;

#[derive(Debug)]
pub struct PeerStore {
    path: PathBuf,
    /// Peer id → (addresses, Unix seconds last seen).
    peers: BTreeMap<String, (Vec<String>, u64)>,
    dirty: bool,
}

impl PeerStore {
    pub fn load(data_dir: &Path) -> Self {
        let path = data_dir.join(PEERS_FILE);
        let peers = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self { path, peers, dirty: false }
    }

    /// Every remembered address, each ending in /p2p/<peer id>.
    pub fn addresses(&self) -> Vec<Multiaddr> {
        self.peers
            .iter()
            .filter_map(|(peer, (addresses, _))| Some((peer.parse::<PeerId>().ok()?, addresses)))
            .flat_map(|(peer, addresses)| {
                addresses.iter().filter_map(move |a| a.parse::<Multiaddr>().ok()?.with_p2p(peer).ok())
            })
            .collect()
    }

    pub fn remember(&mut self, peer: &PeerId, addresses: &[String], now: u64) {
        let addresses: Vec<String> = addresses
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .map(|a| {
                a.into_iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect::<Multiaddr>().to_string()
            })
            .take(ADDRESSES_PER_PEER)
            .collect();
        if addresses.is_empty() {
            return;
        }
        let changed = self.peers.get(&peer.to_string()).is_none_or(|(known, _)| *known != addresses);
        self.peers.insert(peer.to_string(), (addresses, now));
        if self.peers.len() > MAX_PEERS
            && let Some(oldest) =
                self.peers.iter().min_by_key(|(_, (_, seen))| *seen).map(|(peer, _)| peer.clone())
        {
            self.peers.remove(&oldest);
        }
        self.dirty |= changed;
    }

    pub fn forget(&mut self, peer: &PeerId) {
        self.dirty |= self.peers.remove(&peer.to_string()).is_some();
    }

    /// Write the file if anything changed since the last save.
    pub fn save(&mut self) {
        if !self.dirty {
            return;
        }
        match save_json(&self.path, &self.peers) {
            Ok(()) => self.dirty = false,
            Err(error) => tracing::warn!(%error, path = %self.path.display(), "cannot save the known peers"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_peers_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let peer = PeerId::random();
        let mut store = PeerStore::load(dir.path());
        store.remember(&peer, &[format!("/ip4/10.0.0.7/tcp/7690/p2p/{peer}")], 1);
        store.save();
        let reloaded = PeerStore::load(dir.path());
        assert_eq!(reloaded.addresses(), vec![format!("/ip4/10.0.0.7/tcp/7690/p2p/{peer}").parse().unwrap()]);
        let mut reloaded = reloaded;
        reloaded.forget(&peer);
        reloaded.save();
        assert!(PeerStore::load(dir.path()).addresses().is_empty());
    }
}
