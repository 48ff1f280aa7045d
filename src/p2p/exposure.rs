//! Who can reach the overlay. A node with no cluster secret has nothing to keep strangers out
//! with: every llmesh node that reaches it would be a member, able to use and serve its models,
//! announce fake ones to collect prompts, and revoke nodes. So without a secret the overlay
//! listens on loopback only and mDNS is off, unless the operator asks for an open cluster
//! (`--open-cluster`), which is then said loudly at every start.

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

/// Where the overlay listens and whether it looks for peers on the LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    pub listen: Vec<Multiaddr>,
    pub mdns: bool,
    /// The configured addresses held back while the node has no secret: listened on once it joins
    /// a cluster with a connection key.
    pub held_back: Vec<Multiaddr>,
}

impl Exposure {
    pub fn plan(configured: Vec<Multiaddr>, mdns: bool, has_secret: bool, open: bool) -> Self {
        if has_secret || open {
            return Self { listen: configured, mdns, held_back: Vec::new() };
        }
        let mut listen: Vec<Multiaddr> = Vec::new();
        for address in configured.iter().map(on_loopback) {
            if !listen.contains(&address) {
                listen.push(address);
            }
        }
        let held_back = if listen == configured { Vec::new() } else { configured };
        Self { listen, mdns: false, held_back }
    }

    /// Say at start what the plan means, loudly when the cluster is open to anyone.
    pub fn say_at_start(&self, has_secret: bool, open: bool) {
        if !has_secret && open {
            tracing::warn!(
                "OPEN CLUSTER (--open-cluster): any llmesh node that can reach this machine's overlay \
                 is a member: it can use and serve the models, see every prompt it is sent, and revoke \
                 nodes. Use --cluster-key (see `llmesh cluster-key`) on a network you do not control."
            );
        } else if !self.held_back.is_empty() {
            tracing::info!(
                listen = ?self.listen,
                "no cluster secret: the overlay listens on loopback only and mDNS is off. To let other \
                 machines in, set --cluster-key (`llmesh cluster-key` makes one), join with a connection \
                 key, or pass --open-cluster"
            );
        }
    }
}

/// The same address on the loopback interface of its IP version (an address without an IP
/// component, e.g. a DNS name, is left as it is: listening needs an IP).
fn on_loopback(address: &Multiaddr) -> Multiaddr {
    address
        .iter()
        .map(|protocol| match protocol {
            Protocol::Ip4(_) => Protocol::Ip4(std::net::Ipv4Addr::LOCALHOST),
            Protocol::Ip6(_) => Protocol::Ip6(std::net::Ipv6Addr::LOCALHOST),
            other => other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(list: &[&str]) -> Vec<Multiaddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn without_a_secret_the_overlay_stays_on_loopback_and_off_mdns() {
        let configured = addresses(&["/ip4/0.0.0.0/tcp/7690", "/ip6/::/tcp/7690", "/ip4/10.0.0.5/tcp/7690"]);
        let plan = Exposure::plan(configured.clone(), true, false, false);
        assert_eq!(plan.listen, addresses(&["/ip4/127.0.0.1/tcp/7690", "/ip6/::1/tcp/7690"]));
        assert!(!plan.mdns);
        assert_eq!(plan.held_back, configured, "kept for a later join");
    }

    #[test]
    fn a_secret_or_an_explicit_open_cluster_listens_where_configured() {
        let configured = addresses(&["/ip4/0.0.0.0/tcp/7690"]);
        for (secret, open) in [(true, false), (false, true)] {
            let plan = Exposure::plan(configured.clone(), true, secret, open);
            assert_eq!(plan, Exposure { listen: configured.clone(), mdns: true, held_back: Vec::new() });
        }
    }

    #[test]
    fn loopback_configurations_hold_nothing_back() {
        let configured = addresses(&["/ip4/127.0.0.1/tcp/0"]);
        let plan = Exposure::plan(configured.clone(), false, false, false);
        assert_eq!((plan.listen, plan.held_back), (configured, Vec::new()));
    }
}
