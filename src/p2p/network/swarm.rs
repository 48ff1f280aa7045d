//! The Swarm's parts: which protocols a node speaks (`Behaviour`) and how they are configured,
//! over the transport of `transport.rs`.

use std::num::NonZeroUsize;
use std::time::Duration;

use libp2p::gossipsub::{self, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::swarm::{NetworkBehaviour, behaviour::toggle::Toggle};
use libp2p::{
    StreamProtocol, Swarm, allow_block_list, connection_limits, dcutr, identify, mdns, ping, relay,
};

use super::super::P2pError;
use super::super::announcement::MAX_ANNOUNCEMENT_BYTES;
use super::super::members::MAX_MEMBERS;
use super::super::relay::server_config;
use super::super::transport::{ClusterKey, build_transport};

const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/kad/1.0.0");
const IDENTIFY_PROTOCOL: &str = "/llmesh/id/1.0.0";

/// Connections being set up (TCP accepted, the transport's handshakes not done) from others at
/// once: each holds a file descriptor for up to the transport's upgrade timeout. A whole roster
/// redialing this node at once fits; the rest retry with backoff.
const MAX_PENDING_INCOMING: u32 = MAX_MEMBERS as u32;
/// Established connections others opened: every member once, with as much again for peers on
/// probation and the brief overlaps below.
const MAX_ESTABLISHED_INCOMING: u32 = 2 * MAX_MEMBERS as u32;
/// Established connections in all, dialed ones included.
const MAX_ESTABLISHED: u32 = 4 * MAX_MEMBERS as u32;
/// Connections to one peer. A pair keeps one (`links.rs`), but for a moment there can be three: a
/// relayed one and the two a hole punch's simultaneous dials make.
const MAX_ESTABLISHED_PER_PEER: u32 = 4;

/// The connection limits above. A connection over a limit is refused before its handshake (a
/// pending one) or closed once established, and the swarm reports it as a connection error.
fn connection_limits() -> connection_limits::ConnectionLimits {
    connection_limits::ConnectionLimits::default()
        .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
        .with_max_established_incoming(Some(MAX_ESTABLISHED_INCOMING))
        .with_max_established(Some(MAX_ESTABLISHED))
        .with_max_established_per_peer(Some(MAX_ESTABLISHED_PER_PEER))
}

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) limits: connection_limits::Behaviour,
    pub(super) gossipsub: gossipsub::Behaviour,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) kademlia: kad::Behaviour<MemoryStore>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) stream: libp2p_stream::Behaviour,
    pub(super) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(super) relay: Toggle<relay::Behaviour>,
    pub(super) relay_client: relay::client::Behaviour,
    /// Hole punching: two members talking through a relay try to connect directly.
    pub(super) dcutr: Toggle<dcutr::Behaviour>,
}

pub(super) fn build_swarm(
    keypair: &Keypair,
    cluster_key: ClusterKey,
    use_mdns: bool,
    use_relay: bool,
) -> Result<Swarm<Behaviour>, P2pError> {
    let setup = |e: &dyn std::fmt::Display| P2pError::Setup(e.to_string());
    let peer_id = keypair.public().to_peer_id();
    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_secs(1))
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_ANNOUNCEMENT_BYTES)
        .build()
        .map_err(|e| setup(&e))?;
    let gossipsub = gossipsub::Behaviour::new(MessageAuthenticity::Signed(keypair.clone()), gossip_config)
        .map_err(|e| setup(&e))?;
    let mdns = if use_mdns {
        let config = mdns::Config { query_interval: Duration::from_secs(5), ..mdns::Config::default() };
        Some(mdns::tokio::Behaviour::new(config, peer_id).map_err(|e| setup(&e))?)
    } else {
        None
    };
    let (relay_transport, relay_client) = relay::client::new(peer_id);
    let relay_server = use_relay.then(|| {
        let mut server = relay::Behaviour::new(peer_id, server_config());
        // By default libp2p relays only once it has confirmed public addresses; members relay for
        // each other on any network they share.
        server.set_status(Some(relay::Status::Enable));
        server
    });
    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
    kad_config.set_replication_factor(NonZeroUsize::new(8).unwrap_or(NonZeroUsize::MIN));
    // Inbound provider records and values are handed to the network task, which stores members'
    // provider records only (`dht.rs`): a peer on probation must not fill the store or pose as
    // a model's host.
    kad_config.set_record_filtering(kad::StoreInserts::FilterBoth);
    let behaviour = Behaviour {
        limits: connection_limits::Behaviour::new(connection_limits()),
        gossipsub,
        mdns: Toggle::from(mdns),
        kademlia: kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_config),
        identify: identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), keypair.public())
                .with_agent_version(format!("llmesh/{}", env!("CARGO_PKG_VERSION"))),
        ),
        ping: ping::Behaviour::new(
            ping::Config::new().with_interval(Duration::from_secs(2)).with_timeout(Duration::from_secs(4)),
        ),
        stream: libp2p_stream::Behaviour::new(),
        blocked: allow_block_list::Behaviour::default(),
        relay: Toggle::from(relay_server),
        relay_client,
        dcutr: Toggle::from(use_relay.then(|| dcutr::Behaviour::new(peer_id))),
    };
    let transport = build_transport(keypair, cluster_key, relay_transport).map_err(|e| setup(&e))?;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
        .with_tokio()
        .with_other_transport(|_| transport)
        .map_err(|e| setup(&e))?
        .with_behaviour(|_| behaviour)
        .map_err(|e| setup(&e))?
        .with_swarm_config(|config| config.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();
    Ok(swarm)
}
