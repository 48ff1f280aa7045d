//! The network task's side of membership: who is let in. Announcements count only from members
//! (and teach the roster), connected non-members are on probation, relays serve members only, and
//! a running node can move to another cluster when it joins one with a key.

use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId, relay};

use super::super::announcement::Announcement;
use super::super::api_keys::ApiKeyRecords;
use super::super::members::{Probation, Roster};
use super::super::revoked::RevokedPeers;
use super::super::{P2pEvent, RecordSet};
use super::records::RecordFetches;
use super::{Network, announcement_topic};

/// How often the whole roster goes out even when it has not changed: a member that missed it (a
/// lost message, a node that was away) learns the others within this long.
const ROSTER_REFRESH: Duration = Duration::from_secs(30);

/// Which announcements carry the whole roster. With every member's admission record (about 190
/// bytes) in every heartbeat, an announcement grew with the cluster, and the gossip each node
/// carries with the square of its size; yet the roster rarely changes. So an announcement carries
/// the whole roster when it differs from the last one sent, when a peer just subscribed
/// (`Network::greet`), and at least every `ROSTER_REFRESH`; the others carry this node's own
/// admission only, the first record, which is all a node that does not know the author reads.
#[derive(Default)]
pub(super) struct RosterSent {
    last: Option<(Instant, Vec<Vec<u8>>)>,
}

impl RosterSent {
    /// The records to put in an announcement made `now`, given the whole roster's.
    pub(super) fn records_for_announcement(&mut self, records: Vec<Vec<u8>>, now: Instant) -> Vec<Vec<u8>> {
        let sent_lately = self
            .last
            .as_ref()
            .is_some_and(|(at, sent)| *sent == records && now.duration_since(*at) < ROSTER_REFRESH);
        if sent_lately {
            return records.into_iter().take(1).collect();
        }
        self.last = Some((now, records.clone()));
        records
    }

    /// Send the whole roster with the next announcement.
    pub(super) fn forget(&mut self) {
        self.last = None;
    }
}

impl Network {
    pub(super) fn is_member(&self, peer: &PeerId) -> bool {
        self.roster.as_ref().is_none_or(|roster| roster.is_member(peer))
    }

    /// Disconnect the peers whose grace ran out without becoming members, and forget them in the
    /// DHT so that no query dials them again.
    ///
    /// A node that is not a member itself lets everyone be (it must reach its inviter); once it
    /// is one, every connected peer that is not a member is on the clock, also those that
    /// connected before.
    pub(super) fn enforce_membership(&mut self) {
        let Some(roster) = &self.roster else { return };
        let now = Instant::now();
        if roster.includes_this_node() {
            for peer in self.swarm.connected_peers().filter(|peer| !roster.is_member(peer)) {
                self.probation.start(*peer, now);
            }
        }
        for peer in self.probation.expired(now, |peer| roster.is_member(peer)) {
            tracing::warn!(%peer, "disconnected a peer that is not a member (no valid key, no cluster secret)");
            let _ = self.swarm.disconnect_peer_id(peer);
            self.swarm.behaviour_mut().kademlia.remove_peer(&peer);
        }
    }

    /// Reserve a relayed address on each bootstrap peer that is a connected member, once this node
    /// is a member itself (a relay drops non-members that ask).
    pub(super) fn reserve_relays(&mut self) {
        if !self.roster.as_ref().is_none_or(Roster::includes_this_node) {
            return;
        }
        let now = Instant::now();
        let due = self.relays.due(now, |relay| self.swarm.is_connected(relay) && self.is_member(relay));
        for (relay, address) in due {
            match self.swarm.listen_on(address.clone()) {
                Ok(listener) => self.relays.listening(relay, listener),
                Err(error) => {
                    tracing::debug!(%address, %error, "cannot listen through a relay");
                    self.relays.failed(relay, now);
                }
            }
        }
    }

    /// Relays serve members only: a peer off the roster that asks for a reservation or a circuit
    /// is disconnected at once.
    pub(super) fn handle_relay_event(&mut self, event: relay::Event) {
        let (asking, what) = match event {
            relay::Event::ReservationReqAccepted { src_peer_id, .. } => (src_peer_id, "a reservation"),
            relay::Event::CircuitReqAccepted { src_peer_id, dst_peer_id } => {
                tracing::info!(from = %src_peer_id, to = %dst_peer_id, "relaying a circuit");
                (src_peer_id, "a circuit")
            }
            _ => return,
        };
        if !self.is_member(&asking) {
            self.probation.refuse(asking, Instant::now());
            tracing::warn!(peer = %asking, "disconnected a peer that is not a member and asked this relay for {what}");
            let _ = self.swarm.disconnect_peer_id(asking);
        }
    }

    /// Take in a checked announcement: the members it vouches for first, then, if its author is a
    /// member, its revoked digest (fetching the author's list if it differs) and how to reach the
    /// author; then pass it on. Returns whether the author is a member (else the announcement is
    /// held back).
    pub(super) fn receive_announcement(&mut self, source: PeerId, announcement: Announcement) -> bool {
        if !self.learn_members(&source, &announcement) {
            tracing::debug!(peer = %source, "held back an announcement from a peer that is not a member");
            self.probation.hold(source, announcement);
            return false;
        }
        self.records_announced(RecordSet::Revoked, source, announcement.revoked);
        self.records_announced(RecordSet::ApiKeys, source, announcement.api_keys);
        // Announcements may arrive through other nodes: learn how to reach the author directly,
        // for forwarding requests to it, also after a restart.
        self.peer_store.remember(&source, &announcement.addresses, super::super::unix_now());
        for address in announcement.addresses.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
            self.swarm.behaviour_mut().kademlia.add_address(&source, address);
        }
        self.emit(P2pEvent::Announcement(Box::new(announcement)));
        true
    }

    /// Accept the admission records an announcement carries, and its author if it proves it holds
    /// the cluster secret. Returns whether the author is a member.
    pub(super) fn learn_members(&mut self, source: &PeerId, announcement: &Announcement) -> bool {
        let Some(roster) = &mut self.roster else { return true };
        let revoked = &self.revoked;
        // A stranger's records cost a signature check each: from a peer that is not a member yet,
        // only its own admission (the first record) is worth one.
        let records = match roster.is_member(source) {
            true => &announcement.members[..],
            false => &announcement.members[..announcement.members.len().min(1)],
        };
        let mut admitted = roster.learn(records, |peer| revoked.contains(peer));
        if let Some(proof) = &announcement.founder_proof
            && !roster.is_member(source)
            && !revoked.contains(source)
            && roster.admit_founder(*source, proof)
        {
            admitted.push(*source);
        }
        let is_member = roster.is_member(source);
        for peer in &admitted {
            tracing::info!(%peer, vouched_by = %source, "a new member of the cluster");
        }
        if !admitted.is_empty() {
            self.republish();
            self.take_in_new_members();
        }
        is_member
    }

    /// Move to the cluster of `psk` while running (`llmesh join`): the transport takes the new key
    /// for every handshake from now on, connections to the old cluster close, the announcements go
    /// to the new cluster's topic, and the roster is the new cluster's (the configured secret's
    /// admission key applies only to its own cluster).
    pub(super) fn switch_cluster(&mut self, psk: Option<[u8; 32]>) {
        self.cluster_key.set(psk);
        let cluster = self.cluster_key.cluster_id();
        let old_topic = std::mem::replace(&mut self.topic, announcement_topic(&cluster));
        let gossipsub = &mut self.swarm.behaviour_mut().gossipsub;
        gossipsub.unsubscribe(&old_topic);
        if let Err(error) = gossipsub.subscribe(&self.topic) {
            tracing::error!(%error, "cannot subscribe to the new cluster's announcements");
        }
        let admission_key = self.founder.filter(|(founded, _)| Some(*founded) == psk).map(|(_, key)| key);
        self.roster = psk.map(|_| Roster::load(&self.data_dir, &cluster, &self.keypair, admission_key));
        // Revocations are per cluster too; peers blocked for the old one stay blocked until a
        // restart.
        self.revoked = RevokedPeers::load(&self.data_dir, &cluster, &self.keypair);
        for peer in self.revoked.iter() {
            self.swarm.behaviour_mut().blocked.block_peer(*peer);
        }
        *super::super::api_keys::write(&self.api_keys) =
            ApiKeyRecords::load(&self.data_dir, &cluster, self.keypair.public().to_peer_id());
        self.fetches = RecordFetches::default();
        self.probation = Probation::default();
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in connected {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        tracing::info!(%cluster, "moved to another cluster; connections to the old one closed");
        // A node that had no secret listened on loopback only; in a keyed cluster it can listen
        // where it was configured to. (mDNS stays off until the next start.)
        if psk.is_some() {
            for address in std::mem::take(&mut self.held_back_listen) {
                if let Err(error) = self.swarm.listen_on(address.clone()) {
                    tracing::warn!(%address, %error, "cannot listen on a held-back overlay address");
                }
            }
        }
    }

    /// Peers on probation that have become members: stop the clock, and take in the announcement
    /// held back while they were not.
    pub(super) fn take_in_new_members(&mut self) {
        let Some(roster) = &self.roster else { return };
        for (peer, held) in self.probation.release(|peer| roster.is_member(peer)) {
            if let Some(announcement) = held {
                let issued_at_ms = announcement.issued_at_ms;
                if self.receive_announcement(peer, announcement) {
                    self.freshness.taken(peer, issued_at_ms, super::unix_now_ms());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_roster_goes_out_when_it_changes_when_greeting_and_every_refresh() {
        let start = Instant::now();
        let roster = |n: u8| (0..n).map(|i| vec![i; 3]).collect::<Vec<_>>();
        let mut sent = RosterSent::default();
        assert_eq!(sent.records_for_announcement(roster(3), start), roster(3), "the first announcement");
        let heartbeat = start + Duration::from_secs(2);
        assert_eq!(
            sent.records_for_announcement(roster(3), heartbeat),
            roster(1),
            "unchanged: own record only"
        );
        assert_eq!(sent.records_for_announcement(roster(4), heartbeat), roster(4), "a new member");
        assert_eq!(sent.records_for_announcement(roster(4), heartbeat), roster(1));
        sent.forget();
        assert_eq!(sent.records_for_announcement(roster(4), heartbeat), roster(4), "a greeting");
        assert_eq!(
            sent.records_for_announcement(roster(4), heartbeat + ROSTER_REFRESH),
            roster(4),
            "the refresh"
        );
        assert_eq!(
            sent.records_for_announcement(roster(2), heartbeat + ROSTER_REFRESH),
            roster(2),
            "a revocation"
        );
    }
}
