//! Relaying for members that cannot reach each other directly (two homes behind NAT, two subnets
//! without a route between them) but can both reach a third member.
//!
//! Every node runs libp2p's circuit relay v2 server, and reserves a relayed address on each of
//! its bootstrap peers (`--peer`, or the inviter of a joined node) once both are members and
//! connected. The relayed addresses (`.../p2p/<relay>/p2p-circuit/p2p/<node>`) are announced with
//! the others; a node that cannot dial a member directly reaches it through the circuit. The relay
//! serves members only: a peer that is not on the roster and asks for a reservation or a circuit
//! is disconnected at once (see `Network::handle_relay_event`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, relay};

/// How long to wait before asking a relay again after it refused or dropped a reservation.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// The relay server's limits: circuits carry whole conversations between members, so they are
/// long and unmetered; the number of reservations and circuits stays bounded.
pub fn server_config() -> relay::Config {
    relay::Config {
        max_reservations: 256,
        max_reservations_per_peer: 4,
        max_circuits: 256,
        max_circuits_per_peer: 16,
        max_circuit_duration: Duration::from_secs(24 * 60 * 60),
        max_circuit_bytes: 0,
        ..relay::Config::default()
    }
}

enum Reservation {
    Listening(ListenerId),
    RetryAt(Instant),
}

/// The relays this node reserves an address on, and how each reservation stands.
pub struct Relays {
    enabled: bool,
    /// Bootstrap peers: each peer id with an address it was given at.
    candidates: Vec<(PeerId, Multiaddr)>,
    reservations: HashMap<PeerId, Reservation>,
}

impl Relays {
    /// Relay candidates are the bootstrap addresses that name their peer (none when relaying is
    /// off).
    pub fn new(enabled: bool, bootstrap: &[Multiaddr]) -> Self {
        let mut relays = Self { enabled, candidates: Vec::new(), reservations: HashMap::new() };
        for address in bootstrap {
            relays.add_candidate(address);
        }
        relays
    }

    /// Another bootstrap address (an inviter met while running).
    pub fn add_candidate(&mut self, address: &Multiaddr) {
        let peer = address.iter().find_map(|p| match p {
            Protocol::P2p(peer) => Some(peer),
            _ => None,
        });
        if let Some(peer) = peer
            && self.enabled
            && !self.candidates.iter().any(|(known, _)| *known == peer)
        {
            self.candidates.push((peer, address.clone()));
        }
    }

    /// The circuit addresses to listen on now: relays that `usable` accepts (connected members)
    /// and that have no reservation or whose retry time has come. The caller listens on each and
    /// reports the listener with `listening`.
    pub fn due(&self, now: Instant, usable: impl Fn(&PeerId) -> bool) -> Vec<(PeerId, Multiaddr)> {
        self.candidates
            .iter()
            .filter(|(peer, _)| match self.reservations.get(peer) {
                None => true,
                Some(Reservation::Listening(_)) => false,
                Some(Reservation::RetryAt(at)) => now >= *at,
            })
            .filter(|(peer, _)| usable(peer))
            .map(|(peer, address)| (*peer, address.clone().with(Protocol::P2pCircuit)))
            .collect()
    }

    pub fn listening(&mut self, relay: PeerId, listener: ListenerId) {
        self.reservations.insert(relay, Reservation::Listening(listener));
    }

    /// A listen attempt failed at once, or a relayed listener closed: try that relay again later.
    pub fn failed(&mut self, relay: PeerId, now: Instant) {
        self.reservations.insert(relay, Reservation::RetryAt(now + RETRY_AFTER));
    }

    /// The relay whose listener this was, if any (the reservation is then marked for a retry).
    pub fn listener_closed(&mut self, listener: ListenerId, now: Instant) -> Option<PeerId> {
        let relay = self.reservations.iter().find_map(|(relay, reservation)| match reservation {
            Reservation::Listening(id) if *id == listener => Some(*relay),
            _ => None,
        })?;
        self.failed(relay, now);
        Some(relay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_asked_once_and_retried_after_a_failure() {
        let relay = PeerId::random();
        let address: Multiaddr = format!("/ip4/10.0.0.1/tcp/7690/p2p/{relay}").parse().unwrap();
        let unnamed: Multiaddr = "/ip4/10.0.0.2/tcp/7690".parse().unwrap();
        assert!(Relays::new(false, std::slice::from_ref(&address)).due(Instant::now(), |_| true).is_empty());
        let mut relays = Relays::new(true, &[address.clone(), unnamed, address.clone()]);
        let now = Instant::now();
        assert!(relays.due(now, |_| false).is_empty(), "not connected, or not a member");
        let due = relays.due(now, |_| true);
        assert_eq!(due, vec![(relay, address.with(Protocol::P2pCircuit))]);

        let listener = ListenerId::next();
        relays.listening(relay, listener);
        assert!(relays.due(now, |_| true).is_empty(), "already listening");
        assert_eq!(relays.listener_closed(ListenerId::next(), now), None);
        assert_eq!(relays.listener_closed(listener, now), Some(relay));
        assert!(relays.due(now, |_| true).is_empty(), "waits before asking again");
        assert_eq!(relays.due(now + RETRY_AFTER, |_| true).len(), 1);
    }
}
