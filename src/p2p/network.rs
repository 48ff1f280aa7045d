//! The network task: owns the Swarm, runs discovery (mDNS, Kademlia, identify, explicit peers),
//! publishes and checks announcements, keeps one connection per pair of nodes, and answers the
//! handle's commands. Nothing here blocks: every command is answered from the task's own state or
//! by a swarm call, and events go out with `try_send` (never waiting on their consumer).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::identity::Keypair;
use libp2p::kad;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, dcutr, identify, mdns, ping, relay};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::announcement::Announcement;
use super::api_keys::{ApiKeyRecords, SharedApiKeys};
use super::exposure::Exposure;
use super::identity::load_or_create_keypair;
use super::invitation::{Invitation, InvitationLedger};
use super::join::{Inviter, JOIN_PROTOCOL, Standing, serve_joins};
use super::members::{Credentials, Probation, Roster};
use super::peer_store::PeerStore;
use super::relay::Relays;
use super::revoked::RevokedPeers;
use super::transport::ClusterKey;
use super::{Command, INFER_PROTOCOL, InboundStreams, P2pConfig, P2pError, P2pEvent, P2pHandle, RecordSet};

mod addresses;
mod announcements;
mod api_keys;
mod dht;
mod gossip;
mod links;
mod membership;
mod records;
mod revocations;
mod swarm;

use addresses::{parse_addresses, reachable, with_peer};
use announcements::{Freshness, Greetings};
use membership::RosterSent;
use records::{RecordFetches, serve_records};
use swarm::{Behaviour, BehaviourEvent, build_swarm};

/// How often explicit peers are checked (each is dialed again on its own backoff).
const REDIAL_INTERVAL: Duration = Duration::from_secs(1);
const REDIAL_FIRST_BACKOFF: Duration = Duration::from_secs(1);
const REDIAL_MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a relayed connection stays open beside the direct one a hole punch made.
const RELAYED_OVERLAP: Duration = Duration::from_secs(2);
const EVENTS_CAPACITY: usize = 256;
const MAX_INVITATION_ADDRESSES: usize = 16;
const BOOTSTRAP_INTERVAL: Duration = Duration::from_secs(30);
const COMMANDS_CAPACITY: usize = 64;
/// How long a connected peer may go without our knowing it subscribed to the announcements.
const GOSSIP_GREETING: Duration = Duration::from_secs(6);
/// Addresses one announcement carries (relayed ones included).
const MAX_ANNOUNCED_ADDRESSES: usize = 16;

struct OpenConnection {
    id: ConnectionId,
    /// The peer id of the side that dialed.
    dialer: PeerId,
    opened: Instant,
    /// Through a relay (`/p2p-circuit`), which both ends can tell.
    relayed: bool,
}

struct Network {
    swarm: Swarm<Behaviour>,
    topic: IdentTopic,
    events: mpsc::Sender<P2pEvent>,
    /// The last announcement published, re-sent when a new peer subscribes or the revoked list
    /// changes.
    last_announcement: Option<Announcement>,
    /// When the last announcement published was stamped (Unix milliseconds).
    last_issued_ms: u64,
    /// Greetings of new subscribers, limited per peer and in all.
    greetings: Greetings,
    /// The latest announcement taken from each author, so that none is taken twice.
    freshness: Freshness,
    revoked: RevokedPeers,
    /// The API keys, shared with the handle (the HTTP API looks secrets up there).
    api_keys: SharedApiKeys,
    /// Fetches of other members' records (revocations, API keys).
    fetches: RecordFetches,
    /// For the streams this task opens itself (fetching records).
    stream_control: libp2p_stream::Control,
    /// This task's own command queue, for the tasks it starts to report back on.
    commands: mpsc::Sender<Command>,
    keypair: Keypair,
    last_bootstrap: Option<Instant>,
    peer_store: PeerStore,
    explicit_peers: Vec<Multiaddr>,
    /// Per explicit peer address: when to dial next, and the delay after that.
    redial_backoff: HashMap<Multiaddr, (Instant, Duration)>,
    /// Open connections per peer.
    connections: HashMap<PeerId, Vec<OpenConnection>>,
    /// Relayed connections that a direct one replaced, and when to close them.
    superseded: Vec<(Instant, ConnectionId)>,
    /// Peers disconnected on purpose to be greeted afresh (`reconnect_silent_peers`), redialed
    /// as soon as their connections are gone; the rest of the node is not told they left.
    regreeting: HashSet<PeerId>,
    listen_addresses: Vec<Multiaddr>,
    provided: HashSet<String>,
    /// Who waits for a connection to a peer (`Command::Connect`).
    awaiting_connection: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>>,
    provider_queries: HashMap<kad::QueryId, (oneshot::Sender<Vec<String>>, HashSet<PeerId>)>,
    /// The pre-shared key in force, shared with the transport and the join server.
    cluster_key: ClusterKey,
    /// The configured cluster key and the admission key that goes with it (a founder's), kept to
    /// reload the roster when the node moves between clusters.
    founder: Option<([u8; 32], [u8; 32])>,
    data_dir: PathBuf,
    /// Listen addresses not used while the node had no cluster secret (see `exposure.rs`).
    held_back_listen: Vec<Multiaddr>,
    external_addresses: Vec<Multiaddr>,
    ledger: Arc<Mutex<InvitationLedger>>,
    /// Who belongs to the cluster; `None` in an open cluster (no secret), where anyone does.
    roster: Option<Roster>,
    /// When the whole roster was last announced, and what it was.
    roster_sent: RosterSent,
    probation: Probation,
    /// Relayed addresses reserved on bootstrap peers (none when relaying is off).
    relays: Relays,
}

pub async fn spawn(
    config: P2pConfig,
    shutdown: CancellationToken,
) -> Result<(P2pHandle, mpsc::Receiver<P2pEvent>, InboundStreams), P2pError> {
    let keypair = load_or_create_keypair(&config.data_dir)?;
    let peer_id = keypair.public().to_peer_id();
    let psk = config.cluster_psk;
    let cluster_key = ClusterKey::new(psk);
    let topic = announcement_topic(&cluster_key.cluster_id());
    let configured = parse_addresses(&config.listen)?;
    let exposure = Exposure::plan(configured, config.mdns, psk.is_some(), config.open_cluster);
    exposure.say_at_start(psk.is_some(), config.open_cluster);
    let mut swarm = build_swarm(&keypair, cluster_key.clone(), exposure.mdns, config.relay)?;
    let mut control = swarm.behaviour().stream.new_control();
    let inbound = control.accept(INFER_PROTOCOL).map_err(|e| P2pError::Setup(e.to_string()))?;
    let join_requests = control.accept(JOIN_PROTOCOL).map_err(|e| P2pError::Setup(e.to_string()))?;
    let ledger = Arc::new(Mutex::new(InvitationLedger::load(&config.data_dir)));
    let cluster = cluster_key.cluster_id();
    let (commands, command_receiver) = mpsc::channel(COMMANDS_CAPACITY);
    let inviter =
        Inviter { peer_id: peer_id.to_string(), cluster: cluster_key.clone(), ledger: ledger.clone() };
    tokio::spawn(serve_joins(join_requests, inviter, commands.clone()));
    for set in RecordSet::ALL {
        let requests = control.accept(set.protocol()).map_err(|e| P2pError::Setup(e.to_string()))?;
        tokio::spawn(serve_records(set, requests, commands.clone()));
    }
    let roster = psk.map(|_| Roster::load(&config.data_dir, &cluster, &keypair, config.admission_key));
    if roster.as_ref().is_some_and(|roster| !roster.includes_this_node()) {
        tracing::warn!(
            "this node is not a member of its cluster: start it once with `llmesh serve --join KEY`, \
             or give it the cluster secret"
        );
    }
    let external_addresses = parse_addresses(&config.external_addresses)?;
    for address in &external_addresses {
        swarm.add_external_address(address.clone());
    }
    swarm.behaviour_mut().gossipsub.subscribe(&topic).map_err(|e| P2pError::Setup(e.to_string()))?;
    swarm.behaviour_mut().kademlia.set_mode(Some(kad::Mode::Server));
    for address in &exposure.listen {
        swarm.listen_on(address.clone()).map_err(|e| P2pError::Setup(format!("listen on {address}: {e}")))?;
    }
    let mut explicit_peers = parse_addresses(&config.peers)?;
    let relays = Relays::new(config.relay, &explicit_peers);
    let peer_store = PeerStore::load(&config.data_dir);
    for address in peer_store.addresses() {
        if !explicit_peers.contains(&address) {
            explicit_peers.push(address);
        }
    }
    let revoked = RevokedPeers::load(&config.data_dir, &cluster, &keypair);
    for peer in revoked.iter() {
        swarm.behaviour_mut().blocked.block_peer(*peer);
    }
    let api_keys: SharedApiKeys =
        Arc::new(std::sync::RwLock::new(ApiKeyRecords::load(&config.data_dir, &cluster, peer_id)));
    let (events, events_receiver) = mpsc::channel(EVENTS_CAPACITY);
    tracing::info!(%peer_id, cluster = %topic, mdns = exposure.mdns, private = psk.is_some(), "p2p node starting");
    let network = Network {
        swarm,
        topic,
        events,
        last_announcement: None,
        last_issued_ms: 0,
        greetings: Greetings::default(),
        freshness: Freshness::default(),
        revoked,
        api_keys: api_keys.clone(),
        fetches: RecordFetches::default(),
        stream_control: control.clone(),
        commands: commands.clone(),
        keypair: keypair.clone(),
        last_bootstrap: None,
        peer_store,
        redial_backoff: HashMap::new(),
        explicit_peers,
        connections: HashMap::new(),
        superseded: Vec::new(),
        regreeting: HashSet::new(),
        listen_addresses: Vec::new(),
        provided: HashSet::new(),
        awaiting_connection: HashMap::new(),
        provider_queries: HashMap::new(),
        cluster_key: cluster_key.clone(),
        founder: psk.zip(config.admission_key),
        data_dir: config.data_dir.clone(),
        held_back_listen: exposure.held_back,
        external_addresses,
        ledger,
        roster,
        roster_sent: RosterSent::default(),
        probation: Probation::default(),
        relays,
    };
    tokio::spawn(network.run(keypair, command_receiver, shutdown));
    let inbound = InboundStreams::new(inbound, commands.clone());
    let handle = P2pHandle {
        peer_id,
        commands,
        control,
        data_dir: config.data_dir,
        cluster_key,
        fixed_cluster: config.fixed_cluster,
        api_keys,
    };
    Ok((handle, events_receiver, inbound))
}

/// The gossip topic of a cluster's announcements.
fn announcement_topic(cluster_id: &str) -> IdentTopic {
    IdentTopic::new(format!("llmesh/{cluster_id}/nodes/1"))
}

/// Unix milliseconds now.
fn unix_now_ms() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

impl Network {
    async fn run(
        mut self,
        keypair: Keypair,
        mut commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) {
        let mut redial = tokio::time::interval(REDIAL_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = redial.tick() => {
                    if self.greetings.due(Instant::now()) {
                        self.greet();
                    }
                    self.enforce_membership();
                    self.reconnect_silent_peers();
                    self.reserve_relays();
                    self.dial_explicit_peers();
                    self.close_superseded();
                    self.bootstrap_dht();
                    if let Some(roster) = &mut self.roster {
                        roster.save_if_changed();
                    }
                }
                command = commands.recv() => match command {
                    Some(command) => self.handle_command(command, &keypair),
                    None => break,
                },
                event = futures::StreamExt::select_next_some(&mut self.swarm) => self.handle_event(event),
            }
        }
        self.peer_store.save();
        self.revoked.save_if_changed();
        super::api_keys::write(&self.api_keys).save_if_changed();
        if let Some(roster) = &mut self.roster {
            roster.save_if_changed();
        }
        tracing::info!("p2p node stopped");
    }

    fn handle_command(&mut self, command: Command, keypair: &Keypair) {
        match command {
            Command::Announce(announcement) => {
                self.last_announcement = Some(*announcement);
                self.republish();
            }
            Command::Revoke(peer, reply) => {
                let _ = reply.send(self.revoke_here(peer));
            }
            Command::RecordsFor(set, peer, reply) => {
                let _ = reply.send(self.records_for(set, &peer));
            }
            Command::RecordPage(set, from, records) => self.take_record_page(set, from, records),
            Command::RecordFetchEnded { set, from, complete } => self.record_fetch_ended(set, from, complete),
            Command::CreateApiKey(spec, reply) => {
                let _ = reply.send(self.create_api_key(spec));
            }
            Command::RevokeApiKey(name, reply) => {
                let _ = reply.send(self.revoke_api_key(&name));
            }
            Command::ListenAddresses(reply) => {
                let _ = reply.send(self.announced_addresses());
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().map(|peer| peer.to_string()).collect());
            }
            Command::ProvideModels(ids) => self.provide(ids.into_iter().collect()),
            Command::Invite { uses, expires_at, reply } => {
                let _ = reply.send(self.invite(keypair, uses, expires_at));
            }
            Command::AddAddresses(peer, addresses, reply) => {
                for address in &addresses {
                    self.swarm.behaviour_mut().kademlia.add_address(&peer, address.clone());
                    // Keep it reachable: redialed like a --peer if the link drops.
                    let address = with_peer(address.clone(), peer);
                    self.relays.add_candidate(&address);
                    if !self.explicit_peers.contains(&address) {
                        self.explicit_peers.push(address);
                    }
                }
                if !self.swarm.is_connected(&peer) {
                    let options = DialOpts::peer_id(peer)
                        .addresses(addresses)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(error) = self.swarm.dial(options) {
                        tracing::debug!(%peer, %error, "dial failed");
                    }
                }
                let _ = reply.send(());
            }
            Command::Admit(peer, reply) => {
                let credentials = self.roster.as_mut().map_or(Some(Credentials::default()), |roster| {
                    roster.admit(peer);
                    roster.is_member(&peer).then(|| roster.credentials())
                });
                self.republish();
                self.take_in_new_members();
                let _ = reply.send(credentials);
            }
            Command::Adopt { inviter, credentials, reply } => {
                let mut adopted = Ok(());
                if let Some(roster) = &mut self.roster {
                    let revoked = &self.revoked;
                    adopted = roster.adopt(inviter, &credentials, |peer| revoked.contains(peer));
                    self.republish();
                    self.take_in_new_members();
                }
                let _ = reply.send(adopted.map_err(|error| P2pError::Join(error.to_string())));
            }
            Command::Standing(peer, reply) => {
                let standing = match &self.roster {
                    Some(roster) if roster.is_member(&peer) => Standing::Member,
                    Some(roster) if roster.is_full() => Standing::Full,
                    _ => Standing::Room,
                };
                let _ = reply.send(standing);
            }
            Command::SwitchCluster { psk, reply } => {
                self.switch_cluster(psk);
                let _ = reply.send(());
            }
            Command::Connect(peer, reply) => self.connect(peer, reply),
            Command::IsMember(peer, reply) => {
                let _ = reply.send(self.is_member(&peer));
            }
            Command::FindProviders(model_id, reply) => {
                let query = self.swarm.behaviour_mut().kademlia.get_providers(kad::RecordKey::new(&model_id));
                self.provider_queries.insert(query, (reply, HashSet::new()));
            }
        }
    }

    fn invite(&mut self, keypair: &Keypair, uses: u32, expires_at: u64) -> Result<String, P2pError> {
        let peer = *self.swarm.local_peer_id();
        let addresses = reachable(self.external_addresses.iter().chain(&self.listen_addresses))
            .into_iter()
            .map(|address| with_peer(address, peer).to_string())
            .take(MAX_INVITATION_ADDRESSES)
            .collect();
        let invitation = Invitation::new(
            self.cluster_key.cluster_id(),
            self.cluster_key.get(),
            peer.to_string(),
            addresses,
            expires_at,
            uses,
        );
        let key = invitation.to_key(keypair).map_err(P2pError::Invitation)?;
        let mut ledger = self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        ledger
            .record(&invitation)
            .map_err(|e| P2pError::Setup(format!("cannot save the invitation: {e}")))?;
        tracing::info!(invitation = %invitation.id_hex(), uses, expires_at, "issued a connection key");
        Ok(key)
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let peer = *self.swarm.local_peer_id();
                tracing::info!(address = %with_peer(address.clone(), peer), "p2p listening");
                // What a relay hands the members that reserve on it: the addresses it listens on
                // (members share networks with it, so these are reachable to someone).
                if !address.iter().any(|p| p == Protocol::P2pCircuit) {
                    self.swarm.add_external_address(address.clone());
                }
                self.listen_addresses.push(address);
                self.republish();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.swarm.remove_external_address(&address);
                self.listen_addresses.retain(|a| *a != address);
                self.republish();
            }
            SwarmEvent::ListenerClosed { listener_id, addresses, .. } => {
                self.listen_addresses.retain(|a| !addresses.contains(a));
                self.republish();
                if let Some(relay) = self.relays.listener_closed(listener_id, Instant::now()) {
                    tracing::info!(%relay, "the relayed address through this peer closed; will ask again");
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                // A node that is not a member itself has nothing to keep others out of, and must
                // reach its inviter.
                if !self.is_member(&peer_id) && self.roster.as_ref().is_some_and(Roster::includes_this_node) {
                    self.probation.start(peer_id, Instant::now());
                }
                self.connection_opened(peer_id, connection_id, &endpoint);
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                if let Some(open) = self.connections.get_mut(&peer_id) {
                    open.retain(|connection| connection.id != connection_id);
                }
                if num_established == 0 {
                    self.connections.remove(&peer_id);
                    self.probation.end(&peer_id);
                    self.greetings.forget(&peer_id);
                    self.fetches.forget(&peer_id);
                    if !self.redial_to_greet(peer_id) {
                        tracing::info!(peer = %peer_id, cause = ?cause, "peer disconnected");
                        self.emit(P2pEvent::PeerDisconnected(peer_id.to_string()));
                    }
                }
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                tracing::debug!(from = %send_back_addr, %error, "refused an incoming connection");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "could not connect");
                if let Some(peer) = peer_id {
                    self.dial_failed(peer, &error.to_string());
                }
            }
            SwarmEvent::Behaviour(event) => self.handle_behaviour_event(event),
            _ => {}
        }
    }

    fn handle_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let now = Instant::now();
                for (peer, address) in found {
                    if self.probation.recently_refused(&peer, now) {
                        continue;
                    }
                    self.swarm.behaviour_mut().kademlia.add_address(&peer, address.clone());
                    if !self.swarm.is_connected(&peer) {
                        let options = DialOpts::peer_id(peer)
                            .addresses(vec![address])
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .build();
                        let _ = self.swarm.dial(options);
                    }
                }
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })
                if self.is_member(&peer_id) =>
            {
                for address in info.listen_addrs {
                    self.swarm.behaviour_mut().kademlia.add_address(&peer_id, address);
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                // Only members' announcements travel on: gossip forwards nothing else.
                let acceptance = match message.source {
                    Some(source) if !self.revoked.contains(&source) => {
                        match Announcement::verify(&message.data, &source) {
                            Ok(announcement) => self.take_announcement(source, announcement),
                            Err(error) => {
                                tracing::warn!(peer = %source, %error, "dropped an announcement");
                                MessageAcceptance::Reject
                            }
                        }
                    }
                    _ => MessageAcceptance::Reject,
                };
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
            }
            BehaviourEvent::Ping(ping::Event { result: Err(ping::Failure::Unsupported), .. }) => {}
            BehaviourEvent::Ping(ping::Event { peer, connection, result: Err(error) }) => {
                // A peer whose machine vanished (power, cable, sleep) sends no reset: without
                // this its connection, and every request on it, would wait for TCP to give up.
                tracing::info!(%peer, %error, "the peer stopped answering pings; closing its connection");
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result: Ok(connection) }) => {
                tracing::info!(peer = %remote_peer_id, ?connection, "connected directly through a hole punched in NAT");
            }
            BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result: Err(error) }) => {
                tracing::info!(peer = %remote_peer_id, %error, "no direct connection through NAT; staying relayed");
            }
            BehaviourEvent::Relay(event) => self.handle_relay_event(event),
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal: false,
                ..
            }) => {
                tracing::info!(relay = %relay_peer_id, "reachable through a relay as well");
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic }) => {
                tracing::debug!(peer = %peer_id, %topic, "peer subscribed");
                if topic == self.topic.hash()
                    && self.is_member(&peer_id)
                    && self.greetings.subscribed(peer_id, Instant::now())
                {
                    self.greet();
                }
            }
            BehaviourEvent::Kademlia(kad::Event::OutboundQueryProgressed { id, result, step, .. }) => {
                self.provider_query_progressed(id, result, step.last);
            }
            BehaviourEvent::Kademlia(kad::Event::InboundRequest { request }) => {
                self.inbound_dht_request(request)
            }
            _ => {}
        }
    }

    /// Hand an event to the rest of the node without ever waiting: the consumer may itself be
    /// waiting on this task (a command's reply), so a full queue drops the event instead. Both
    /// kinds recover on their own: announcements repeat every heartbeat, and a node whose
    /// disconnect was dropped is declared offline once its announcements stop.
    fn emit(&mut self, event: P2pEvent) {
        if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
            tracing::warn!(?event, "event queue full; dropped an event");
        }
    }
}
