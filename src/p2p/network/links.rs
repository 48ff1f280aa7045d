//! The network task's links to other nodes: bootstrap peers redialed with backoff, one connection
//! per pair of nodes, a connection made before a stream is opened, and peers whose gossip
//! greeting was lost reconnected.

use std::collections::HashSet;
use std::time::Instant;

use libp2p::core::{ConnectedPoint, Endpoint};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::oneshot;

use super::super::P2pEvent;
use super::{
    GOSSIP_GREETING, Network, OpenConnection, REDIAL_FIRST_BACKOFF, REDIAL_MAX_BACKOFF, RELAYED_OVERLAP,
};

impl Network {
    /// Dial explicit peers that are not connected, each address with its own exponential backoff
    /// (1 s doubling to a minute), reset once connected. A peer's due addresses go into one dial:
    /// a dial to one of them alone would keep the others from being tried until it failed.
    pub(super) fn dial_explicit_peers(&mut self) {
        let now = Instant::now();
        let mut due: Vec<(Option<PeerId>, Vec<Multiaddr>)> = Vec::new();
        for address in self.explicit_peers.clone() {
            let peer = address.iter().find_map(|p| match p {
                Protocol::P2p(peer) => Some(peer),
                _ => None,
            });
            if peer.is_some_and(|peer| self.swarm.is_connected(&peer)) {
                self.redial_backoff.remove(&address);
                continue;
            }
            let (next_attempt, delay) =
                self.redial_backoff.get(&address).copied().unwrap_or((now, REDIAL_FIRST_BACKOFF));
            if now < next_attempt || (peer.is_none() && !self.connections.is_empty()) {
                continue;
            }
            self.redial_backoff.insert(address.clone(), (now + delay, (delay * 2).min(REDIAL_MAX_BACKOFF)));
            match due.iter_mut().find(|(known, _)| known.is_some() && *known == peer) {
                Some((_, addresses)) => addresses.push(address),
                None => due.push((peer, vec![address])),
            }
        }
        for (peer, addresses) in due {
            let options = match peer {
                Some(peer) => DialOpts::peer_id(peer)
                    .addresses(addresses.clone())
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
                None => DialOpts::unknown_peer_id().address(addresses[0].clone()).build(),
            };
            if let Err(error) = self.swarm.dial(options) {
                tracing::debug!(?addresses, %error, "dial failed");
            }
        }
    }

    /// Gossipsub tells a peer which topics it follows once, when they connect. Should that greeting
    /// be lost (it rides whichever connection comes first, and two nodes that dial each other at
    /// once may lose one), the peer never sends us its announcements. A peer connected for
    /// `GOSSIP_GREETING` whose subscription we have not heard of is disconnected, and the redial
    /// that follows greets afresh.
    pub(super) fn reconnect_silent_peers(&mut self) {
        let topic = self.topic.hash();
        let greeted: HashSet<PeerId> = self
            .swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .filter(|(_, topics)| topics.contains(&&topic))
            .map(|(peer, _)| *peer)
            .collect();
        let silent: Vec<PeerId> = self
            .connections
            .iter()
            .filter(|(peer, open)| {
                !greeted.contains(peer) && open.iter().all(|c| c.opened.elapsed() >= GOSSIP_GREETING)
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in silent {
            tracing::info!(%peer, "no announcements can come from this peer (lost gossip greeting); reconnecting");
            if self.swarm.disconnect_peer_id(peer).is_ok() {
                self.regreeting.insert(peer);
            }
        }
    }

    /// A dial to `peer` failed: tell whoever waited to connect, and the rest of the node if the
    /// peer was being greeted afresh (it is gone after all).
    pub(super) fn dial_failed(&mut self, peer: PeerId, error: &str) {
        if self.swarm.is_connected(&peer) {
            return;
        }
        if self.regreeting.remove(&peer) {
            tracing::info!(%peer, "peer disconnected (not reached again after a lost gossip greeting)");
            self.emit(P2pEvent::PeerDisconnected(peer.to_string()));
        }
        for reply in self.awaiting_connection.remove(&peer).unwrap_or_default() {
            let _ = reply.send(Err(error.to_string()));
        }
    }

    /// A peer's last connection closed: if it was closed to greet the peer afresh, dial it again
    /// at once (gossipsub greets on a peer's first connection) and return true.
    pub(super) fn redial_to_greet(&mut self, peer: PeerId) -> bool {
        if !self.regreeting.contains(&peer) {
            return false;
        }
        let options = DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing).build();
        if let Err(error) = self.swarm.dial(options) {
            tracing::info!(%peer, %error, "peer disconnected (cannot dial it again after a lost gossip greeting)");
            self.regreeting.remove(&peer);
            return false;
        }
        true
    }

    /// Answer `reply` once connected to `peer`: at once if it is, else when a dial (this one, or
    /// one already under way) succeeds or fails.
    pub(super) fn connect(&mut self, peer: PeerId, reply: oneshot::Sender<Result<(), String>>) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        let options = DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing).build();
        match self.swarm.dial(options) {
            Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {
                let waiting = self.awaiting_connection.entry(peer).or_default();
                waiting.retain(|reply| !reply.is_closed());
                waiting.push(reply);
            }
            Err(error) => {
                let _ = reply.send(Err(error.to_string()));
            }
        }
    }

    /// Record a new connection, keep one per pair, and answer whoever waited to connect.
    pub(super) fn connection_opened(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        // A hole-punched connection is dialed by both ends at once; the role each was given
        // names its one dialer, the same on both ends.
        let dialer = match endpoint {
            ConnectedPoint::Dialer { role_override: Endpoint::Dialer, .. } => *self.swarm.local_peer_id(),
            ConnectedPoint::Dialer { .. } | ConnectedPoint::Listener { .. } => peer,
        };
        // (On the listening end of a circuit only the local address says it is relayed.)
        let relayed = endpoint.is_relayed();
        tracing::debug!(%peer, relayed, "connected");
        let connection = OpenConnection { id, dialer, opened: Instant::now(), relayed };
        self.regreeting.remove(&peer);
        self.connections.entry(peer).or_default().push(connection);
        self.keep_one_connection(peer);
        for reply in self.awaiting_connection.remove(&peer).unwrap_or_default() {
            let _ = reply.send(Ok(()));
        }
    }

    /// Keep one connection per pair of nodes, choosing by what both ends see alike, never by
    /// timing: a direct connection beats a relayed one; then the connections dialed by the smaller
    /// peer id win (or, if it dialed none, those dialed by the other); among several of those, only
    /// the side that dialed them picks one (its oldest), because the other end may have seen them
    /// open in another order. Losers close at once, before requests use them (a stream on a
    /// connection closed under it can wait for an answer that never comes), except a relayed
    /// connection that a hole punch replaced: it stays for `RELAYED_OVERLAP`, so that the other
    /// end sees the direct connection before the relayed one goes. (Were the relayed one gone
    /// first, the other end would have no connection for a moment, forget what gossip topics
    /// this node follows, and not be told again.)
    pub(super) fn keep_one_connection(&mut self, peer: PeerId) {
        let Some(open) = self.connections.get(&peer) else { return };
        if open.len() < 2 {
            return;
        }
        let local = *self.swarm.local_peer_id();
        let any_direct = open.iter().any(|c| !c.relayed);
        let (pool, mut close): (Vec<&OpenConnection>, Vec<&OpenConnection>) =
            open.iter().partition(|c| !c.relayed || !any_direct);
        let smaller = local.min(peer);
        let chosen_dialer = if pool.iter().any(|c| c.dialer == smaller) { smaller } else { local.max(peer) };
        let (mut chosen, others): (Vec<&OpenConnection>, Vec<&OpenConnection>) =
            pool.into_iter().partition(|c| c.dialer == chosen_dialer);
        close.extend(others);
        if chosen_dialer == local {
            chosen.sort_by_key(|c| c.opened);
            close.extend(chosen.into_iter().skip(1));
        }
        let (later, now): (Vec<&OpenConnection>, Vec<&OpenConnection>) =
            close.into_iter().partition(|c| c.relayed && any_direct);
        let close_at = Instant::now() + RELAYED_OVERLAP;
        let later: Vec<ConnectionId> = later.iter().map(|c| c.id).collect();
        let now: Vec<ConnectionId> = now.iter().map(|c| c.id).collect();
        for id in later {
            if !self.superseded.iter().any(|(_, superseded)| *superseded == id) {
                self.superseded.push((close_at, id));
            }
        }
        for id in now {
            self.swarm.close_connection(id);
        }
    }

    /// Close the relayed connections whose overlap with their direct replacement is over.
    pub(super) fn close_superseded(&mut self) {
        let now = Instant::now();
        let (due, waiting): (Vec<_>, Vec<_>) = self.superseded.drain(..).partition(|(at, _)| *at <= now);
        self.superseded = waiting;
        for (_, id) in due {
            self.swarm.close_connection(id);
        }
    }
}
