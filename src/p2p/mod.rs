//! The overlay network: libp2p with TCP (+ pnet when the cluster has a secret), Noise, Yamux,
//! mDNS, Kademlia, identify, ping, gossipsub announcements and raw streams for inference.
//!
//! Only this folder imports libp2p. One task (`network.rs`) owns the Swarm; the rest of llmesh
//! holds a cloneable [`P2pHandle`] whose commands carry their reply channel, receives
//! [`P2pEvent`]s on a bounded channel, and gets inbound inference streams from [`InboundStreams`].
//! Peers are named by their peer id as a string at this border.

mod announcement;
mod api_keys;
mod exposure;
#[doc(hidden)]
pub mod fuzz;
mod identity;
pub mod invitation;
mod join;
mod json_file;
mod members;
mod network;
mod peer_store;
mod relay;
mod revoked;
mod signed;
mod transport;
pub mod wire;

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use announcement::{
    ANNOUNCEMENT_VERSION, KeyUsageReport, MAX_ANNOUNCEMENT_BYTES, MAX_KEY_REPORTS, MIN_ANNOUNCEMENT_VERSION,
};
pub use announcement::{
    AnnouncedLoad, AnnouncedModel, Announcement, AnnouncementError, Hardware, RecordsDigest, ResourceUsage,
    printable,
};
pub use api_keys::{ApiKeyError, ApiKeyInfo, KeyGrant, KeyLookup, KeySpec, MAX_KEY_MODELS, valid_key_name};
pub use invitation::{Invitation, InvitationError};
pub use join::{JoinedCluster, unix_now};
pub use members::MAX_MEMBERS;
pub use transport::UPGRADE_TIMEOUT;
pub use transport::{admission_key, cluster_id, cluster_psk};

/// The protocol requests are forwarded on. A new incompatible framing gets a new number.
///
/// 3: requests carry `response_format` (after the other sampling parameters) and errors may be
/// `InvalidParam`. A node on 2 would refuse such a frame (trailing bytes) or, were the field
/// optional, generate free text where JSON was asked for; on a new name it is never chosen to
/// answer: opening the stream fails, which the router treats as a host that cannot answer.
pub const INFER_PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/infer/3");

/// A bidirectional stream to a peer (futures' AsyncRead + AsyncWrite).
pub type P2pStream = libp2p::Stream;

/// How long opening a stream (dialing included) may take.
const OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct P2pConfig {
    /// Where the node's identity (node.key) lives.
    pub data_dir: PathBuf,
    /// Multiaddresses to listen on, e.g. `/ip4/0.0.0.0/tcp/7690`.
    pub listen: Vec<String>,
    /// Multiaddresses of peers to dial (and redial) for networks where multicast does not pass.
    pub peers: Vec<String>,
    pub mdns: bool,
    /// Relay circuits for other members, and reserve relayed addresses on the bootstrap peers.
    pub relay: bool,
    /// The pre-shared key from the cluster secret (`cluster_psk`): nodes with another (or no)
    /// key cannot connect at all.
    pub cluster_psk: Option<[u8; 32]>,
    /// The founders' key from the cluster secret (`admission_key`), only on nodes configured with
    /// the secret itself; nodes that joined with a connection key have the pre-shared key only.
    pub admission_key: Option<[u8; 32]>,
    /// The cluster key was configured explicitly (`--cluster-key`): joining another cluster while
    /// running is refused, since the next start would go back to the configured one.
    pub fixed_cluster: bool,
    /// Listen where configured, mDNS included, even with no cluster secret (see `exposure.rs`).
    pub open_cluster: bool,
    /// Addresses others can reach this node at beyond its listen addresses (a VPN address, a
    /// port forward), put into invitations and advertised.
    pub external_addresses: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error("node identity {path}: {reason}")]
    Identity { path: PathBuf, reason: String },
    #[error("invalid multiaddress '{address}': {reason}")]
    Address { address: String, reason: String },
    #[error("invalid peer id '{0}'")]
    PeerId(String),
    #[error("cannot set up the p2p network: {0}")]
    Setup(String),
    #[error("cannot reach {peer}: {reason}")]
    Unreachable { peer: String, reason: String },
    #[error("the p2p network has stopped")]
    Stopped,
    #[error(transparent)]
    Invitation(InvitationError),
    #[error("cannot join: {0}")]
    Join(String),
    #[error("cannot revoke: {0}")]
    Revocation(String),
    #[error(transparent)]
    ApiKey(ApiKeyError),
}

/// The sets of signed records every member keeps a copy of, each spread by a digest in
/// announcements and fetched over a stream of its own (`network/records.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum RecordSet {
    Revoked,
    ApiKeys,
}

/// What the network tells the rest of the node.
#[derive(Debug, Clone)]
pub enum P2pEvent {
    /// A valid, signed announcement from a peer.
    Announcement(Box<Announcement>),
    /// The last connection to a peer closed (it left, or its link died).
    PeerDisconnected(String),
}

enum Command {
    Announce(Box<Announcement>),
    ListenAddresses(oneshot::Sender<Vec<String>>),
    ConnectedPeers(oneshot::Sender<Vec<String>>),
    ProvideModels(Vec<String>),
    FindProviders(String, oneshot::Sender<Vec<String>>),
    Invite {
        uses: u32,
        expires_at: u64,
        reply: oneshot::Sender<Result<String, P2pError>>,
    },
    AddAddresses(PeerId, Vec<Multiaddr>, oneshot::Sender<()>),
    Revoke(PeerId, oneshot::Sender<Result<bool, revoked::RevocationError>>),
    /// A member asks for the records of a set: `None` when it is not a member.
    RecordsFor(RecordSet, PeerId, oneshot::Sender<Option<Vec<Vec<u8>>>>),
    /// A page of the records a member sent (`network/records.rs`).
    RecordPage(RecordSet, PeerId, Vec<Vec<u8>>),
    /// A fetch of a member's records ended; `complete` when it read them all.
    RecordFetchEnded {
        set: RecordSet,
        from: PeerId,
        complete: bool,
    },
    CreateApiKey(KeySpec, oneshot::Sender<Result<(String, ApiKeyInfo), ApiKeyError>>),
    RevokeApiKey(String, oneshot::Sender<Result<bool, ApiKeyError>>),
    /// Admit a peer that redeemed a connection key here; replies with the roster to hand it, or
    /// `None` when the roster is full.
    Admit(PeerId, oneshot::Sender<Option<members::Credentials>>),
    /// Take the roster the inviting node handed over.
    Adopt {
        inviter: PeerId,
        credentials: members::Credentials,
        reply: oneshot::Sender<Result<(), P2pError>>,
    },
    IsMember(PeerId, oneshot::Sender<bool>),
    /// Reply once connected to the peer (dialing it if need be), or why not.
    Connect(PeerId, oneshot::Sender<Result<(), String>>),
    /// Move to the cluster of this pre-shared key: connections to the old one close.
    SwitchCluster {
        psk: Option<[u8; 32]>,
        reply: oneshot::Sender<()>,
    },
    Standing(PeerId, oneshot::Sender<join::Standing>),
}

/// A cloneable handle to the network task.
#[derive(Clone)]
pub struct P2pHandle {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    data_dir: PathBuf,
    cluster_key: transport::ClusterKey,
    fixed_cluster: bool,
    api_keys: api_keys::SharedApiKeys,
}

/// Inbound inference streams waiting to be served. libp2p-stream holds one inbound stream at a
/// time and resets any that arrives while one is waiting, so a task moves them here as soon as
/// they come. (Streams opened in the same instant can still be reset; entry nodes send those
/// requests again.)
const INBOUND_BACKLOG: usize = 256;

/// Inbound inference streams from members, with the peer that opened each. Streams from peers
/// that are not members are closed unanswered.
pub struct InboundStreams {
    backlog: mpsc::Receiver<(PeerId, P2pStream)>,
    commands: mpsc::Sender<Command>,
}

impl InboundStreams {
    fn new(incoming: libp2p_stream::IncomingStreams, commands: mpsc::Sender<Command>) -> Self {
        let (sender, backlog) = mpsc::channel(INBOUND_BACKLOG);
        tokio::spawn(move_to_backlog(incoming, sender));
        Self { backlog, commands }
    }

    pub async fn next(&mut self) -> Option<(String, P2pStream)> {
        while let Some((peer, stream)) = self.backlog.recv().await {
            let (reply, answer) = oneshot::channel();
            self.commands.send(Command::IsMember(peer, reply)).await.ok()?;
            if answer.await.ok()? {
                return Some((peer.to_string(), stream));
            }
            tracing::warn!(%peer, "refused an inference stream from a peer that is not a member");
        }
        None
    }
}

async fn move_to_backlog(
    mut incoming: libp2p_stream::IncomingStreams,
    backlog: mpsc::Sender<(PeerId, P2pStream)>,
) {
    loop {
        let (peer, stream) = tokio::select! {
            next = incoming.next() => match next {
                Some(next) => next,
                None => return,
            },
            // Dropping `incoming` stops libp2p-stream offering the protocol to peers.
            _ = backlog.closed() => return,
        };
        match backlog.try_send((peer, stream)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(%peer, "too many inference streams waiting; closed one unanswered");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// Start the network task. It runs until `shutdown` is cancelled.
pub async fn spawn(
    config: P2pConfig,
    shutdown: CancellationToken,
) -> Result<(P2pHandle, mpsc::Receiver<P2pEvent>, InboundStreams), P2pError> {
    network::spawn(config, shutdown).await
}

impl P2pHandle {
    pub fn peer_id(&self) -> String {
        self.peer_id.to_string()
    }

    /// Publish this node's announcement (signed by the network task with the node key).
    pub async fn announce(&self, announcement: Announcement) -> Result<(), P2pError> {
        self.commands.send(Command::Announce(Box::new(announcement))).await.map_err(|_| P2pError::Stopped)
    }

    /// Addresses this node listens on, each ending in /p2p/<peer id>.
    pub async fn listen_addresses(&self) -> Result<Vec<String>, P2pError> {
        self.ask(Command::ListenAddresses).await
    }

    pub async fn connected_peers(&self) -> Result<Vec<String>, P2pError> {
        self.ask(Command::ConnectedPeers).await
    }

    /// Advertise these model ids as Kademlia provider records (replacing the previous set).
    pub async fn provide_models(&self, model_ids: Vec<String>) -> Result<(), P2pError> {
        self.commands.send(Command::ProvideModels(model_ids)).await.map_err(|_| P2pError::Stopped)
    }

    /// Peers that advertise `model_id` in the DHT (dialed, so their announcements follow).
    pub async fn find_providers(&self, model_id: &str) -> Result<Vec<String>, P2pError> {
        let model_id = model_id.to_string();
        self.ask(|reply| Command::FindProviders(model_id, reply)).await
    }

    /// Open an inference stream to `peer`, dialing it if needed.
    pub async fn open_stream(&self, peer: &str) -> Result<P2pStream, P2pError> {
        self.open(peer, INFER_PROTOCOL).await
    }

    /// Open a stream once the peer is connected. libp2p-stream dials by itself when it sees no
    /// connection, but a stream asked for while a connection is being set up can wait forever
    /// (its dial is refused as redundant and the stream never finds the connection), so the
    /// network task connects first.
    async fn open(&self, peer: &str, protocol: StreamProtocol) -> Result<P2pStream, P2pError> {
        let peer_id: PeerId = peer.parse().map_err(|_| P2pError::PeerId(peer.to_string()))?;
        let mut control = self.control.clone();
        let unreachable = |reason: String| P2pError::Unreachable { peer: peer.to_string(), reason };
        let open = async {
            self.ask(|reply| Command::Connect(peer_id, reply)).await?.map_err(unreachable)?;
            control.open_stream(peer_id, protocol).await.map_err(|error| unreachable(error.to_string()))
        };
        tokio::time::timeout(OPEN_STREAM_TIMEOUT, open).await.map_err(|_| unreachable("timed out".into()))?
    }

    /// Issue a connection key for `uses` joins until `expires_at` (Unix seconds).
    pub async fn invite(&self, uses: u32, expires_at: u64) -> Result<String, P2pError> {
        self.ask(|reply| Command::Invite { uses, expires_at, reply }).await?
    }

    /// Throw `peer` out of the cluster: close its connections and refuse it from now on, here
    /// and (through a signed record every member fetches) on every node. Returns whether it was
    /// not revoked before.
    pub async fn revoke(&self, peer: &str) -> Result<bool, P2pError> {
        let peer_id: PeerId = peer.parse().map_err(|_| P2pError::PeerId(peer.to_string()))?;
        if peer_id == self.peer_id {
            return Err(P2pError::PeerId(format!("{peer} is this node itself")));
        }
        if !revoked::is_ed25519(&peer_id) {
            return Err(P2pError::PeerId(format!("{peer} is not the peer id of an llmesh node")));
        }
        self.ask(|reply| Command::Revoke(peer_id, reply))
            .await?
            .map_err(|error| P2pError::Revocation(error.to_string()))
    }

    /// Make an API key that works on every node of the cluster once the record has spread (a
    /// gossip round); returns its secret, which is shown once and kept nowhere.
    pub async fn create_api_key(&self, spec: KeySpec) -> Result<(String, ApiKeyInfo), P2pError> {
        self.ask(|reply| Command::CreateApiKey(spec, reply)).await?.map_err(P2pError::ApiKey)
    }

    /// Revoke an API key on every node; returns whether it was live.
    pub async fn revoke_api_key(&self, name: &str) -> Result<bool, P2pError> {
        let name = name.to_string();
        self.ask(|reply| Command::RevokeApiKey(name, reply)).await?.map_err(P2pError::ApiKey)
    }

    /// What a presented secret may do (`now`: Unix seconds, for expiry).
    pub fn lookup_api_key(&self, secret: &str, now: u64) -> KeyLookup {
        api_keys::read(&self.api_keys).lookup(secret, now)
    }

    /// Every API key this node knows, revoked ones included.
    pub fn api_keys(&self) -> Vec<ApiKeyInfo> {
        api_keys::read(&self.api_keys).list()
    }

    /// Join with a connection key while running. A node in another cluster moves to the key's
    /// cluster (its old connections close; it goes back if the join fails), unless its cluster
    /// key was configured explicitly, which the next start would return to.
    pub async fn join_running(&self, key: &str) -> Result<Invitation, P2pError> {
        let invitation = Invitation::from_key(key).map_err(P2pError::Invitation)?;
        let previous = self.cluster_key.get();
        let moving = invitation.cluster_psk != previous;
        if moving {
            if self.fixed_cluster {
                return Err(P2pError::Join(
                    "this node is configured with another cluster's key (--cluster-key); remove it and \
                     restart with `llmesh serve --join KEY`"
                        .into(),
                ));
            }
            let psk = invitation.cluster_psk;
            self.ask(|reply| Command::SwitchCluster { psk, reply }).await?;
        }
        let invitation = match self.join(key).await {
            Ok(invitation) => invitation,
            Err(error) => {
                if moving {
                    let _ = self.ask(|reply| Command::SwitchCluster { psk: previous, reply }).await;
                }
                return Err(error);
            }
        };
        let joined = JoinedCluster {
            invitation: invitation.id_hex(),
            cluster_psk: invitation.cluster_psk,
            peers: invitation.addresses.clone(),
        };
        joined
            .save(&self.data_dir)
            .map_err(|e| P2pError::Join(format!("joined, but cannot remember it: {e}")))?;
        Ok(invitation)
    }

    /// Join the cluster with a connection key: reach the inviter at the key's addresses and
    /// present the key. Returns the invitation it held.
    pub async fn join(&self, key: &str) -> Result<Invitation, P2pError> {
        let invitation = Invitation::from_key(key).map_err(P2pError::Invitation)?;
        let peer: PeerId =
            invitation.inviter.parse().map_err(|_| P2pError::PeerId(invitation.inviter.clone()))?;
        let addresses = invitation.addresses.iter().filter_map(|address| address.parse().ok()).collect();
        self.ask(|reply| Command::AddAddresses(peer, addresses, reply)).await?;
        let (invitation, credentials) = join::join(self, key).await?;
        self.ask(|reply| Command::Adopt { inviter: peer, credentials, reply }).await??;
        Ok(invitation)
    }

    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, P2pError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).await.map_err(|_| P2pError::Stopped)?;
        answer.await.map_err(|_| P2pError::Stopped)
    }
}
