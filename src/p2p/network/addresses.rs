//! Overlay addresses as this node hands them out: parsed from the configuration, each ending in
//! this node's peer id, loopback ones left out when there is anything else.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::p2p::P2pError;

/// The addresses worth giving to other machines: each once, and loopback ones only when there is
/// nothing else (another machine dialing 127.0.0.1 reaches itself, not us).
pub(super) fn reachable<'a>(addresses: impl Iterator<Item = &'a Multiaddr>) -> Vec<Multiaddr> {
    let mut unique: Vec<Multiaddr> = Vec::new();
    for address in addresses {
        if !unique.contains(address) {
            unique.push(address.clone());
        }
    }
    let is_loopback = |address: &Multiaddr| {
        address.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_loopback(),
            Protocol::Ip6(ip) => ip.is_loopback(),
            _ => false,
        })
    };
    if unique.iter().any(|address| !is_loopback(address)) {
        unique.retain(|address| !is_loopback(address));
    }
    unique
}

/// `address` ending in `/p2p/<peer>`, added unless it ends so already (a relayed listen address
/// names this node after its `/p2p-circuit`).
pub(super) fn with_peer(address: Multiaddr, peer: PeerId) -> Multiaddr {
    match address.iter().last() {
        Some(Protocol::P2p(last)) if last == peer => address,
        _ => address.with(Protocol::P2p(peer)),
    }
}

/// Multiaddresses from the configuration; the first that does not parse is the error.
pub(super) fn parse_addresses(addresses: &[String]) -> Result<Vec<Multiaddr>, P2pError> {
    addresses.iter().map(|address| parse_address(address)).collect()
}

fn parse_address(address: &str) -> Result<Multiaddr, P2pError> {
    address.parse().map_err(|e: libp2p::multiaddr::Error| P2pError::Address {
        address: address.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_duplicate_addresses_are_left_out_when_others_exist() {
        let parse = |a: &str| a.parse::<Multiaddr>().unwrap();
        let lan = parse("/ip4/10.1.2.3/tcp/7690");
        let loopback = parse("/ip4/127.0.0.1/tcp/7690");
        assert_eq!(reachable([&lan, &loopback, &lan].into_iter()), vec![lan.clone()]);
        assert_eq!(reachable([&loopback].into_iter()), vec![loopback.clone()], "loopback alone is kept");
    }
}
