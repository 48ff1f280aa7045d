//! Membership by peer id. In a cluster with a secret, a node belongs to the cluster because its
//! peer id is on the roster, not because it passed the transport's pre-shared key: every
//! connection key carries that key, and a revoked node keeps it.
//!
//! How a peer gets on the roster:
//! - A founder, configured with the cluster secret, puts `founder_proof` (an HMAC of its peer id
//!   under the admission key derived from the secret) in its announcements; members that hold the
//!   secret check it. Connection keys never carry the admission key.
//! - A member admits a node that redeems one of its connection keys (`join.rs`) and hands it the
//!   roster; the new node takes its inviter as the first member it trusts.
//!
//! Each admission is a record signed by the member that admitted the peer. A node accepts a
//! record when its signer is already a member, and then signs its own record for the peer, so
//! what a node announces is, apart from its own admission, records it vouches for itself: a
//! member's word is enough for everyone who trusts that member, and nothing depends on the member
//! who first admitted a peer staying in the cluster. Revoked peers are taken off and never
//! accepted again (the caller passes them in).
//!
//! Clusters without a secret are open: anyone who reaches them is a member, and no roster is
//! kept (`Network` holds `None`).
//!
//! [`Probation`] gives a connected peer that is not a member a short time to become one (its
//! first announcement, or redeeming a key), then closes the connection and refuses it for a while.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::announcement::Announcement;
use super::json_file::save_json;
use super::signed::{self, EnvelopeError};

/// Members a roster holds (and one announcement carries).
pub const MAX_MEMBERS: usize = 128;
/// The largest signed admission record accepted.
pub const MAX_ADMISSION_BYTES: usize = 512;
/// How long a connected peer that is not a member may stay connected to become one.
pub const MEMBER_GRACE: Duration = Duration::from_secs(10);
/// How long a peer dropped for not being a member stays refused (not dialed, and given only
/// `JOIN_WINDOW` when it connects), unless it becomes a member meanwhile.
const REFUSAL_COOLDOWN: Duration = Duration::from_secs(600);
/// How long a refused peer that connects again may stay: enough to redeem a connection key.
pub const JOIN_WINDOW: Duration = Duration::from_secs(3);
/// Announcements of non-members held at once (one per peer).
const MAX_HELD: usize = 64;
/// Refused peers remembered at once; the oldest refusal is forgotten first.
const MAX_REFUSED: usize = 4096;
const MEMBERS_FILE: &str = "members.json";

/// "`member` belongs to the cluster", signed by the member that admitted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Admission {
    cluster_id: String,
    member: Vec<u8>,
    /// Unix seconds.
    admitted_at: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemberError {
    #[error("admission record {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("admission record for another cluster ({0})")]
    WrongCluster(String),
    #[error("admission record names an invalid peer id")]
    BadPeer,
    #[error("the inviting node {0} is not a member of this cluster")]
    NotAMember(String),
}

/// What an inviter hands the node it admits: its roster, and its founder proof if it holds the
/// secret (so that a founder joining with a key can check the inviter at once).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub records: Vec<Vec<u8>>,
    pub founder_proof: Option<[u8; 32]>,
}

/// A checked admission: who was admitted, and by whom.
struct Checked {
    member: PeerId,
    sponsor: PeerId,
}

/// An HMAC-SHA256 of the peer id under the cluster's admission key.
pub fn founder_proof(admission_key: &[u8; 32], peer: &PeerId) -> [u8; 32] {
    founder_mac(admission_key, peer).finalize().into_bytes().into()
}

fn founder_mac(admission_key: &[u8; 32], peer: &PeerId) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(admission_key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(b"llmesh founder v1\0");
    mac.update(&peer.to_bytes());
    mac
}

#[derive(Serialize, Deserialize)]
struct MembersFile {
    cluster_id: String,
    /// Signed admission records, base64.
    records: Vec<String>,
}

pub struct Roster {
    path: PathBuf,
    cluster_id: String,
    keypair: Keypair,
    local: PeerId,
    admission_key: Option<[u8; 32]>,
    /// Each member with the record this node keeps for it: signed by this node, except this
    /// node's own, which is signed by whoever admitted it (itself, for a founder).
    members: BTreeMap<PeerId, Vec<u8>>,
    /// Records taken in since the file was last written (see `save_if_changed`).
    unsaved: bool,
}

impl Roster {
    /// Load the roster kept in `data_dir` for `cluster_id` (records for another cluster are
    /// dropped). A node holding the admission key is a founder and admits itself.
    pub fn load(
        data_dir: &Path,
        cluster_id: &str,
        keypair: &Keypair,
        admission_key: Option<[u8; 32]>,
    ) -> Self {
        let local = keypair.public().to_peer_id();
        let mut roster = Self {
            path: data_dir.join(MEMBERS_FILE),
            cluster_id: cluster_id.to_string(),
            keypair: keypair.clone(),
            local,
            admission_key,
            members: BTreeMap::new(),
            unsaved: false,
        };
        let saved = std::fs::read(&roster.path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<MembersFile>(&bytes).ok())
            .filter(|file| file.cluster_id == cluster_id);
        for record in saved.iter().flat_map(|file| &file.records) {
            // Our own disk is trusted for who vouched, but every record must still be intact.
            if let Some(bytes) = STANDARD.decode(record).ok()
                && let Ok(checked) = roster.check(&bytes)
            {
                roster.members.insert(checked.member, bytes);
            }
        }
        if admission_key.is_some() && !roster.members.contains_key(&local) {
            roster.admit(local);
        }
        roster
    }

    pub fn is_member(&self, peer: &PeerId) -> bool {
        self.members.contains_key(peer)
    }

    pub fn is_full(&self) -> bool {
        self.members.len() >= MAX_MEMBERS
    }

    /// Whether this node itself is on its roster (a founder, or admitted with a key).
    pub fn includes_this_node(&self) -> bool {
        self.is_member(&self.local)
    }

    /// The records to announce: this node's own admission first, then those it vouches for.
    pub fn records(&self) -> Vec<Vec<u8>> {
        let own = self.members.get(&self.local).into_iter();
        let others = self.members.iter().filter(|(peer, _)| **peer != self.local).map(|(_, record)| record);
        own.chain(others).take(MAX_MEMBERS).cloned().collect()
    }

    pub fn credentials(&self) -> Credentials {
        Credentials { records: self.records(), founder_proof: self.founder_proof() }
    }

    /// This node's proof that it holds the cluster secret, when it does.
    pub fn founder_proof(&self) -> Option<[u8; 32]> {
        self.admission_key.as_ref().map(|key| founder_proof(key, &self.local))
    }

    /// Admit `peer` on this node's word (it redeemed a key here, or is this node), and write the
    /// roster at once. Returns whether it is new; a full roster admits no one.
    pub fn admit(&mut self, peer: PeerId) -> bool {
        let admitted = self.sign_admission(peer);
        self.save_if_changed();
        admitted
    }

    /// Sign `peer`'s admission and add it to the roster, without saving it.
    fn sign_admission(&mut self, peer: PeerId) -> bool {
        if self.members.contains_key(&peer) || self.members.len() >= MAX_MEMBERS {
            return false;
        }
        let admission = Admission {
            cluster_id: self.cluster_id.clone(),
            member: peer.to_bytes(),
            admitted_at: super::unix_now(),
        };
        match signed::seal::<_, MAX_ADMISSION_BYTES>(&admission, &self.keypair) {
            Ok(record) => {
                self.members.insert(peer, record);
                self.unsaved = true;
                true
            }
            Err(error) => {
                tracing::error!(%error, "cannot sign an admission record");
                false
            }
        }
    }

    /// Admit `peer` if `proof` shows it holds the cluster secret. Only a node that holds the
    /// secret itself can tell; the others learn of the founder from members that can. Written to
    /// the file by the next `save_if_changed`, like what `learn` takes in.
    pub fn admit_founder(&mut self, peer: PeerId, proof: &[u8; 32]) -> bool {
        let Some(key) = &self.admission_key else { return false };
        if founder_mac(key, &peer).verify_slice(proof).is_err() {
            tracing::warn!(%peer, "refused a founder proof that does not match the cluster secret");
            return false;
        }
        self.sign_admission(peer)
    }

    /// Accept the records whose signer is a member (or becomes one through another record of the
    /// same batch), vouching for each in turn. Returns the peers newly admitted. Written to the
    /// file by the next `save_if_changed`: the overlay's task calls it once a second, since saving
    /// each record as it came (two fsyncs of the whole file) stalled every node when tens of
    /// founders met. A record lost to a crash before then is learned again from the members'
    /// announcements, which carry the whole roster now and then.
    pub fn learn(&mut self, records: &[Vec<u8>], is_revoked: impl Fn(&PeerId) -> bool) -> Vec<PeerId> {
        let mut pending: Vec<&Vec<u8>> = records
            .iter()
            .take(MAX_MEMBERS)
            .filter(|record| match self.unverified_member(record) {
                Some(member) => !is_revoked(&member) && !self.is_member(&member),
                None => false,
            })
            .collect();
        let mut admitted = Vec::new();
        loop {
            let before = pending.len();
            pending.retain(|record| {
                let Ok(checked) = self.check(record) else { return false };
                if is_revoked(&checked.sponsor) || is_revoked(&checked.member) {
                    return false;
                }
                if !self.is_member(&checked.sponsor) {
                    return true;
                }
                if checked.member == self.local {
                    // Our own admission by another member: keep it, it convinces others.
                    if !self.is_member(&self.local) {
                        self.members.insert(self.local, (*record).clone());
                        self.unsaved = true;
                    }
                } else if self.sign_admission(checked.member) {
                    admitted.push(checked.member);
                }
                false
            });
            if pending.is_empty() || pending.len() == before {
                return admitted;
            }
        }
    }

    /// Take the roster a node's inviter handed over. A node that is not a member yet trusts its
    /// inviter (it signed the key and accepted us), and through it every record it vouches for. A
    /// member already has a roster to check the inviter against: anyone who kept an old key can
    /// sign a key of their own, and a member that trusted it would vouch for them to everyone.
    pub fn adopt(
        &mut self,
        inviter: PeerId,
        credentials: &Credentials,
        is_revoked: impl Fn(&PeerId) -> bool,
    ) -> Result<(), MemberError> {
        let records = &credentials.records;
        if is_revoked(&inviter) {
            return Err(MemberError::NotAMember(inviter.to_string()));
        }
        if self.includes_this_node() {
            if let Some(proof) = &credentials.founder_proof {
                self.admit_founder(inviter, proof);
            }
            self.learn(records, &is_revoked);
            if !self.is_member(&inviter) {
                return Err(MemberError::NotAMember(inviter.to_string()));
            }
            return Ok(());
        }
        self.admit(inviter);
        self.learn(records, is_revoked);
        // Joining is kept at once: the node must come back a member after any restart.
        self.save_if_changed();
        Ok(())
    }

    /// Take `peer` off the roster (it was revoked).
    pub fn remove(&mut self, peer: &PeerId) {
        if self.members.remove(peer).is_some() {
            self.save();
        }
    }

    fn unverified_member(&self, record: &[u8]) -> Option<PeerId> {
        let admission: Admission = signed::read_unverified::<_, MAX_ADMISSION_BYTES>(record).ok()?;
        PeerId::from_bytes(&admission.member).ok()
    }

    fn check(&self, record: &[u8]) -> Result<Checked, MemberError> {
        let (admission, sponsor): (Admission, PeerId) = signed::open::<_, MAX_ADMISSION_BYTES>(record)?;
        if admission.cluster_id != self.cluster_id {
            return Err(MemberError::WrongCluster(admission.cluster_id));
        }
        let member = PeerId::from_bytes(&admission.member).map_err(|_| MemberError::BadPeer)?;
        Ok(Checked { member, sponsor })
    }

    /// Write the roster if it changed since it was last written.
    pub fn save_if_changed(&mut self) {
        if self.unsaved {
            self.save();
        }
    }

    fn save(&mut self) {
        let file = MembersFile {
            cluster_id: self.cluster_id.clone(),
            records: self.members.values().map(|record| STANDARD.encode(record)).collect(),
        };
        match save_json(&self.path, &file) {
            Ok(()) => self.unsaved = false,
            Err(error) => {
                self.unsaved = true;
                tracing::error!(%error, path = %self.path.display(), "cannot save the cluster's members");
            }
        }
    }
}

/// Connected peers that are not members (with their latest announcement, taken in if they become
/// members, so a node that just joined need not wait for the next heartbeat), and peers recently
/// dropped for not being members.
///
/// The clock is per peer id, not per connection: reconnecting does not start it again. A refused
/// peer that connects again gets `JOIN_WINDOW`, long enough to redeem a connection key.
#[derive(Default)]
pub struct Probation {
    deadline: HashMap<PeerId, Instant>,
    held: HashMap<PeerId, Announcement>,
    refused: HashMap<PeerId, Instant>,
}

impl Probation {
    /// Start the clock for a peer that connected without being a member (if it is not running).
    pub fn start(&mut self, peer: PeerId, now: Instant) {
        let grace = if self.recently_refused(&peer, now) { JOIN_WINDOW } else { MEMBER_GRACE };
        self.deadline.entry(peer).or_insert(now + grace);
    }

    /// The peer disconnected: what it announced is dropped; its clock runs on.
    pub fn end(&mut self, peer: &PeerId) {
        self.held.remove(peer);
    }

    /// Keep the latest announcement of a connected peer that is not a member (yet): a node that
    /// is joining holds its inviter's. At most `MAX_HELD` are kept.
    pub fn hold(&mut self, peer: PeerId, announcement: Announcement) {
        if self.held.len() < MAX_HELD || self.held.contains_key(&peer) {
            self.held.insert(peer, announcement);
        }
    }

    /// The peers that have become members: their clock stops, and the announcement held for
    /// each (if any) is handed back.
    pub fn release(&mut self, is_member: impl Fn(&PeerId) -> bool) -> Vec<(PeerId, Option<Announcement>)> {
        let members: Vec<PeerId> =
            self.deadline.keys().chain(self.held.keys()).filter(|peer| is_member(peer)).copied().collect();
        let mut released: Vec<(PeerId, Option<Announcement>)> = Vec::new();
        for peer in members {
            self.deadline.remove(&peer);
            if !released.iter().any(|(known, _)| *known == peer) {
                released.push((peer, self.held.remove(&peer)));
            }
        }
        released
    }

    /// Whether `peer` was dropped for not being a member within the cooldown.
    pub fn recently_refused(&self, peer: &PeerId, now: Instant) -> bool {
        self.refused.get(peer).is_some_and(|at| now.duration_since(*at) < REFUSAL_COOLDOWN)
    }

    /// The peers whose time ran out without becoming members: they are to be disconnected, and
    /// are refused for the cooldown. Members and long-refused peers are forgotten.
    pub fn expired(&mut self, now: Instant, is_member: impl Fn(&PeerId) -> bool) -> Vec<PeerId> {
        self.deadline.retain(|peer, _| !is_member(peer));
        self.refused.retain(|peer, at| !is_member(peer) && now.duration_since(*at) < REFUSAL_COOLDOWN);
        let expired: Vec<PeerId> =
            self.deadline.iter().filter(|(_, deadline)| now >= **deadline).map(|(peer, _)| *peer).collect();
        for peer in &expired {
            self.refuse(*peer, now);
        }
        expired
    }

    /// Refuse `peer` from now on for the cooldown (it is being disconnected).
    pub fn refuse(&mut self, peer: PeerId, now: Instant) {
        self.deadline.remove(&peer);
        self.held.remove(&peer);
        if self.refused.len() >= MAX_REFUSED
            && let Some(oldest) = self.refused.iter().min_by_key(|(_, at)| **at).map(|(peer, _)| *peer)
        {
            self.refused.remove(&oldest);
        }
        self.refused.insert(peer, now);
    }
}

#[cfg(test)]
mod tests;
