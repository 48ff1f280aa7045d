//! The peers thrown out of the cluster: one signed revocation record per revoked peer, kept in the
//! data dir (`revoked.json`) so a revocation survives restarts, and spread to every node.
//!
//! A record says "`peer` is revoked from this cluster", signed by the member that revoked it. A
//! node takes a record only when it names a valid ed25519 peer id (what every llmesh node has; the
//! made-up ids a short identity multihash allows are refused), is for this cluster, and its signer
//! is a member (or this node). Announcements carry only a digest of the set (count and hash of
//! the revoked peer ids); a node whose digest differs from a member's fetches that member's whole
//! list over a stream (`network/revocations.rs`), so every revocation spreads however long the
//! list, at a bounded cost per message.
//!
//! Bounds: a signer has at most `MAX_PER_SIGNER` records here and the list at most `MAX_KEPT`.
//! What is over either is refused, loudly, never evicting a record already kept: one member
//! flooding made-up revocations fills its own quota and nothing else. A record kept stays kept,
//! also when its signer is revoked later (it was a member's word when it came).

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libp2p::PeerId;
use libp2p::identity::{KeyType, Keypair, PublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::announcement::RecordsDigest;
use super::json_file::save_json;
use super::signed::{self, EnvelopeError};

const REVOKED_FILE: &str = "revoked.json";
/// Records one signer may have kept: as many as a full roster has members.
pub const MAX_PER_SIGNER: usize = super::members::MAX_MEMBERS;
/// Records kept in all: 64 signers at their quota.
pub const MAX_KEPT: usize = 64 * MAX_PER_SIGNER;
/// The largest signed revocation record accepted (they are about 170 bytes).
pub const MAX_REVOCATION_BYTES: usize = 512;

/// "`peer` is revoked from `cluster_id`", signed by the member that revoked it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Revocation {
    cluster_id: String,
    peer: Vec<u8>,
    /// Unix seconds.
    revoked_at: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RevocationError {
    #[error("revocation record {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("revocation record for another cluster ({0})")]
    WrongCluster(String),
    #[error("{0} is not the peer id of an llmesh node (an ed25519 key)")]
    NotEd25519(String),
    #[error("revocation signed by {0}, which is not a member")]
    NotAMember(PeerId),
    #[error("{0} has revoked the most peers a node may ({MAX_PER_SIGNER})")]
    SignerFull(PeerId),
    #[error("the revoked list is full ({MAX_KEPT} peers)")]
    Full,
}

/// A kept record: who signed it, and its bytes as signed.
#[derive(Debug, Clone)]
struct Kept {
    signer: PeerId,
    record: Vec<u8>,
}

/// `revoked.json`. The peer ids are there for the operator's eyes; the records are what counts.
#[derive(Serialize, Deserialize)]
struct RevokedFile {
    cluster_id: String,
    records: Vec<FileEntry>,
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    peer: String,
    signer: String,
    /// The signed record, base64.
    record: String,
}

#[derive(Debug)]
pub struct RevokedPeers {
    path: PathBuf,
    cluster_id: String,
    local: PeerId,
    peers: BTreeMap<PeerId, Kept>,
    per_signer: HashMap<PeerId, usize>,
    /// The digest of `peers`, computed when asked after a change.
    digest: Cell<Option<RecordsDigest>>,
    /// Records taken in since the file was last written.
    unsaved: bool,
}

/// Whether `peer` is an ed25519 peer id: an identity multihash (code 0) of the 36-byte protobuf
/// encoding of an ed25519 public key, as every llmesh node's is.
pub fn is_ed25519(peer: &PeerId) -> bool {
    let bytes = peer.to_bytes();
    let Some(key) = bytes.strip_prefix(&[0x00, 36]) else { return false };
    PublicKey::try_decode_protobuf(key)
        .is_ok_and(|key| key.key_type() == KeyType::Ed25519 && key.to_peer_id() == *peer)
}

impl RevokedPeers {
    /// Load the records kept in `data_dir` for `cluster_id` (those for another cluster, or that no
    /// longer check, are dropped). A list from before records were signed (plain peer ids) is
    /// taken as this node's own revocations and signed anew, valid ids only, within its quota.
    pub fn load(data_dir: &Path, cluster_id: &str, keypair: &Keypair) -> Self {
        let local = keypair.public().to_peer_id();
        let mut revoked = Self {
            path: data_dir.join(REVOKED_FILE),
            cluster_id: cluster_id.to_string(),
            local,
            peers: BTreeMap::new(),
            per_signer: HashMap::new(),
            digest: Cell::new(None),
            unsaved: false,
        };
        let bytes = std::fs::read(&revoked.path).unwrap_or_default();
        if let Ok(file) = serde_json::from_slice::<RevokedFile>(&bytes) {
            if file.cluster_id == cluster_id {
                for entry in file.records {
                    if let Ok(record) = STANDARD.decode(&entry.record)
                        && let Ok((peer, signer)) = revoked.check(&record)
                    {
                        revoked.keep(peer, signer, record);
                    }
                }
            }
        } else if let Ok(legacy) = serde_json::from_slice::<Vec<String>>(&bytes) {
            let mut dropped = 0;
            for peer in legacy.iter().filter_map(|peer| peer.parse::<PeerId>().ok()) {
                dropped += usize::from(revoked.revoke(peer, keypair).is_err());
            }
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    "dropped revocations kept before records were signed (invalid ids, or too many)"
                );
            }
        }
        revoked.save_if_changed();
        revoked
    }

    pub fn contains(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    pub fn iter(&self) -> impl Iterator<Item = &PeerId> {
        self.peers.keys()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.peers.len()
    }

    /// What announcements carry: how many peers are revoked, and a hash of their ids.
    pub fn digest(&self) -> RecordsDigest {
        if let Some(digest) = self.digest.get() {
            return digest;
        }
        let mut hash = Sha256::new();
        for peer in self.peers.keys() {
            let bytes = peer.to_bytes();
            hash.update([bytes.len() as u8]);
            hash.update(&bytes);
        }
        let count = u32::try_from(self.peers.len()).unwrap_or(u32::MAX);
        let digest = RecordsDigest { count, hash: hash.finalize().into() };
        self.digest.set(Some(digest));
        digest
    }

    /// Every record, for a member that asks (its digest differs from ours).
    pub fn records(&self) -> Vec<Vec<u8>> {
        self.peers.values().map(|kept| kept.record.clone()).collect()
    }

    /// Revoke `peer` on this node's word (its operator asked), and save at once. Returns whether
    /// it was not revoked before. The record kept for it becomes this node's own even when
    /// another member's was kept, so a revocation stays convincing after its first signer leaves.
    pub fn revoke(&mut self, peer: PeerId, keypair: &Keypair) -> Result<bool, RevocationError> {
        if !is_ed25519(&peer) {
            return Err(RevocationError::NotEd25519(peer.to_string()));
        }
        let known = self.peers.get(&peer);
        if known.is_some_and(|kept| kept.signer == self.local) {
            return Ok(false);
        }
        self.check_room(&self.local, known.is_some())?;
        let revocation = Revocation {
            cluster_id: self.cluster_id.clone(),
            peer: peer.to_bytes(),
            revoked_at: super::unix_now(),
        };
        let record = signed::seal::<_, MAX_REVOCATION_BYTES>(&revocation, keypair)?;
        let new = known.is_none();
        self.keep(peer, self.local, record);
        self.save_if_changed();
        Ok(new)
    }

    /// Take in a record another node holds; returns the peer it newly revokes, if any. Call
    /// `save_if_changed` once a batch is taken in.
    pub fn accept(
        &mut self,
        record: &[u8],
        is_member: impl Fn(&PeerId) -> bool,
    ) -> Result<Option<PeerId>, RevocationError> {
        // One record per peer is enough: a peer already revoked costs no signature check.
        let unverified: Revocation = signed::read_unverified::<_, MAX_REVOCATION_BYTES>(record)?;
        if PeerId::from_bytes(&unverified.peer).is_ok_and(|peer| self.peers.contains_key(&peer)) {
            return Ok(None);
        }
        let (peer, signer) = self.check(record)?;
        if signer != self.local && !is_member(&signer) {
            return Err(RevocationError::NotAMember(signer));
        }
        self.check_room(&signer, false)?;
        self.keep(peer, signer, record.to_vec());
        Ok(Some(peer))
    }

    /// Write the file if records were taken in since it was last written.
    pub fn save_if_changed(&mut self) {
        if !self.unsaved {
            return;
        }
        let records = self
            .peers
            .iter()
            .map(|(peer, kept)| FileEntry {
                peer: peer.to_string(),
                signer: kept.signer.to_string(),
                record: STANDARD.encode(&kept.record),
            })
            .collect();
        let file = RevokedFile { cluster_id: self.cluster_id.clone(), records };
        match save_json(&self.path, &file) {
            Ok(()) => self.unsaved = false,
            Err(error) => {
                tracing::error!(%error, path = %self.path.display(), "cannot save the revoked peers")
            }
        }
    }

    /// Whether `signer` may have one more record kept (`replacing`: one of ours takes the place
    /// of another's, so the list does not grow).
    fn check_room(&self, signer: &PeerId, replacing: bool) -> Result<(), RevocationError> {
        if self.per_signer.get(signer).copied().unwrap_or(0) >= MAX_PER_SIGNER {
            return Err(RevocationError::SignerFull(*signer));
        }
        if !replacing && self.peers.len() >= MAX_KEPT {
            return Err(RevocationError::Full);
        }
        Ok(())
    }

    /// Check a record's signature, cluster and peer; returns the revoked peer and the signer.
    fn check(&self, record: &[u8]) -> Result<(PeerId, PeerId), RevocationError> {
        let (revocation, signer): (Revocation, PeerId) = signed::open::<_, MAX_REVOCATION_BYTES>(record)?;
        if revocation.cluster_id != self.cluster_id {
            return Err(RevocationError::WrongCluster(revocation.cluster_id));
        }
        let peer = PeerId::from_bytes(&revocation.peer)
            .map_err(|_| RevocationError::NotEd25519(format!("{:02x?}", revocation.peer)))?;
        if !is_ed25519(&peer) {
            return Err(RevocationError::NotEd25519(peer.to_string()));
        }
        Ok((peer, signer))
    }

    fn keep(&mut self, peer: PeerId, signer: PeerId, record: Vec<u8>) {
        if let Some(replaced) = self.peers.insert(peer, Kept { signer, record })
            && let Some(count) = self.per_signer.get_mut(&replaced.signer)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_signer.remove(&replaced.signer);
            }
        }
        *self.per_signer.entry(signer).or_default() += 1;
        self.digest.set(None);
        self.unsaved = true;
    }
}

#[cfg(test)]
mod tests;
