//! Gossip on the announcement topic: signing and publishing this node's announcement (with the
//! digests and roster the network task keeps), and taking the announcements of others once each.

use std::time::Instant;

use libp2p::PeerId;
use libp2p::gossipsub::{self, MessageAcceptance};

use super::super::announcement::Announcement;
use super::addresses::{reachable, with_peer};
use super::announcements::Stale;
use super::{MAX_ANNOUNCED_ADDRESSES, Network, unix_now_ms};

impl Network {
    /// Publish the announcement with the whole roster, for peers that just subscribed.
    pub(super) fn greet(&mut self) {
        self.roster_sent.forget();
        self.republish();
    }

    /// Sign and publish the last announcement, with the current revoked digest and roster (in
    /// full when `RosterSent` says so). Each publication is stamped later than the one before
    /// (receivers take each once).
    pub(super) fn republish(&mut self) {
        let addresses = self.announced_addresses();
        let Some(announcement) = &mut self.last_announcement else { return };
        announcement.addresses = addresses;
        announcement.revoked = self.revoked.digest();
        announcement.api_keys = super::super::api_keys::write(&self.api_keys).digest();
        announcement.issued_at_ms = announcement.issued_at_ms.max(self.last_issued_ms.saturating_add(1));
        self.last_issued_ms = announcement.issued_at_ms;
        if let Some(roster) = &self.roster {
            announcement.members =
                self.roster_sent.records_for_announcement(roster.records(), Instant::now());
            announcement.founder_proof = roster.founder_proof();
        }
        match announcement.sign(&self.keypair) {
            Ok(bytes) => self.publish(bytes),
            Err(error) => tracing::error!(%error, "cannot sign our announcement"),
        }
    }

    /// The addresses to give other machines, relayed ones included, each ending in /p2p/<us>.
    pub(super) fn announced_addresses(&self) -> Vec<String> {
        let peer = *self.swarm.local_peer_id();
        reachable(self.listen_addresses.iter())
            .into_iter()
            .map(|address| with_peer(address, peer).to_string())
            .take(MAX_ANNOUNCED_ADDRESSES)
            .collect()
    }

    pub(super) fn publish(&mut self, bytes: Vec<u8>) {
        let topic = self.topic.clone();
        match self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
            Ok(_) | Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
            Err(error) => tracing::debug!(%error, "announcement not published"),
        }
    }

    /// Take a verified announcement if it is recent and newer than the last from its author (a
    /// replay or an overtaken one is not passed on, and costs its forwarder nothing).
    pub(super) fn take_announcement(
        &mut self,
        source: PeerId,
        announcement: Announcement,
    ) -> MessageAcceptance {
        let now_ms = unix_now_ms();
        let issued_at_ms = announcement.issued_at_ms;
        match self.freshness.check(&source, issued_at_ms, now_ms) {
            Ok(()) => {}
            Err(Stale::OutOfWindow) => {
                tracing::debug!(peer = %source, issued_at_ms, now_ms, "ignored an announcement issued too far from now");
                return MessageAcceptance::Ignore;
            }
            Err(Stale::NotNewer) => return MessageAcceptance::Ignore,
        }
        if !self.receive_announcement(source, announcement) {
            return MessageAcceptance::Ignore;
        }
        self.freshness.taken(source, issued_at_ms, now_ms);
        MessageAcceptance::Accept
    }
}
