//! The network task's side of revocations (`revoked.rs`): revoking a peer here, cutting off a
//! peer revoked anywhere, and taking in the records members send (`records.rs` fetches them).

use libp2p::PeerId;

use super::super::P2pEvent;
use super::super::revoked::RevocationError;
use super::Network;

impl Network {
    /// Revoke `peer` on this node's word; returns whether it is newly revoked.
    pub(super) fn revoke_here(&mut self, peer: PeerId) -> Result<bool, RevocationError> {
        let new = self.revoked.revoke(peer, &self.keypair)?;
        if new {
            self.enforce_revocation(peer);
            self.republish();
        }
        Ok(new)
    }

    /// Cut `peer` off in this node: its connections are closed and refused, it leaves the roster
    /// and the peers to dial, and the rest of the node hears it left.
    pub(super) fn enforce_revocation(&mut self, peer: PeerId) {
        if peer == *self.swarm.local_peer_id() {
            tracing::error!("this node has been revoked from its cluster");
            return;
        }
        self.swarm.behaviour_mut().blocked.block_peer(peer);
        if let Some(roster) = &mut self.roster {
            roster.remove(&peer);
        }
        self.peer_store.forget(&peer);
        self.explicit_peers
            .retain(|address| !address.iter().any(|p| p == libp2p::multiaddr::Protocol::P2p(peer)));
        tracing::warn!(%peer, "peer revoked: its connections are closed and refused from now on");
        self.emit(P2pEvent::PeerDisconnected(peer.to_string()));
    }

    /// Take in revocation records a member sent, enforcing those that revoke someone new.
    /// Returns how many were refused, and the first reason.
    pub(super) fn take_revocations(&mut self, records: &[Vec<u8>]) -> (usize, Option<RevocationError>) {
        let roster = &self.roster;
        let is_member = |peer: &PeerId| roster.as_ref().is_none_or(|roster| roster.is_member(peer));
        let mut newly_revoked = Vec::new();
        let (mut refusals, mut first) = (0, None);
        for record in records {
            match self.revoked.accept(record, is_member) {
                Ok(Some(peer)) => newly_revoked.push(peer),
                Ok(None) => {}
                Err(error) => {
                    refusals += 1;
                    first.get_or_insert(error);
                }
            }
        }
        for peer in newly_revoked {
            self.enforce_revocation(peer);
        }
        (refusals, first)
    }
}
