//! The join protocol (`/llmesh/join/1`): a new node presents its connection key to the inviting
//! node over an authenticated stream; the inviter checks that it issued the invitation, for this
//! cluster, that it has not expired and has uses left, and answers yes or why not.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use super::invitation::{Invitation, InvitationError, InvitationLedger};
use super::wire::{read_frame, write_frame};
use super::{Command, P2pError, P2pHandle};

pub const JOIN_PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/join/2");
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
const JOINED_FILE: &str = "cluster.json";

#[derive(Debug, Serialize, Deserialize)]
enum JoinReply {
    /// Admitted: the inviter's roster, which now includes the new node.
    Accepted {
        members: Vec<Vec<u8>>,
    },
    Refused(InvitationError),
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What the inviter checks a presented key against.
pub struct Inviter {
    pub peer_id: String,
    pub cluster_id: String,
    pub ledger: Arc<Mutex<InvitationLedger>>,
}

impl Inviter {
    fn check(&self, key: &str) -> Result<Invitation, InvitationError> {
        let invitation = Invitation::from_key(key)?;
        if invitation.inviter != self.peer_id {
            return Err(InvitationError::UnknownInvitation);
        }
        if invitation.cluster_id != self.cluster_id {
            return Err(InvitationError::WrongCluster(invitation.cluster_id));
        }
        let mut ledger = self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        ledger.redeem(&invitation, unix_now())?;
        Ok(invitation)
    }
}

/// Answer join requests until the stream of inbound join streams ends; an accepted node is put on
/// the roster by the network task (`commands`).
pub async fn serve_joins(
    mut incoming: libp2p_stream::IncomingStreams,
    inviter: Inviter,
    commands: tokio::sync::mpsc::Sender<Command>,
) {
    while let Some((peer, mut stream)) = incoming.next().await {
        let key = match tokio::time::timeout(JOIN_TIMEOUT, read_frame::<_, String>(&mut stream)).await {
            Ok(Ok(Some(key))) => key,
            _ => continue,
        };
        let reply = match inviter.check(&key) {
            Ok(invitation) => {
                let (reply, answer) = tokio::sync::oneshot::channel();
                if commands.send(Command::Admit(peer, reply)).await.is_err() {
                    return;
                }
                match answer.await {
                    Ok(Some(members)) => {
                        tracing::info!(%peer, invitation = %invitation.id_hex(), "admitted a node with a connection key");
                        JoinReply::Accepted { members }
                    }
                    Ok(None) => JoinReply::Refused(InvitationError::ClusterFull),
                    Err(_) => return,
                }
            }
            Err(error) => {
                tracing::warn!(%peer, %error, "refused a node's connection key");
                JoinReply::Refused(error)
            }
        };
        let _ = write_frame(&mut stream, &reply).await;
    }
}

/// Present `key` to the node that issued it. Returns the invitation and the inviter's roster.
pub async fn join(p2p: &P2pHandle, key: &str) -> Result<(Invitation, Vec<Vec<u8>>), P2pError> {
    let invitation = Invitation::from_key(key).map_err(P2pError::Invitation)?;
    let mut stream = p2p.open(&invitation.inviter, JOIN_PROTOCOL).await.map_err(|error| {
        P2pError::Join(format!(
            "could not reach the inviting node at {}: {error}",
            if invitation.addresses.is_empty() {
                "(no addresses)".to_string()
            } else {
                invitation.addresses.join(", ")
            }
        ))
    })?;
    let exchange = async {
        write_frame(&mut stream, &key.trim().to_string()).await?;
        read_frame::<_, JoinReply>(&mut stream).await
    };
    match tokio::time::timeout(JOIN_TIMEOUT, exchange).await {
        Ok(Ok(Some(JoinReply::Accepted { members }))) => Ok((invitation, members)),
        Ok(Ok(Some(JoinReply::Refused(error)))) => Err(P2pError::Invitation(error)),
        Ok(Ok(None)) | Ok(Err(_)) => Err(P2pError::Join("the inviting node closed the connection".into())),
        Err(_) => Err(P2pError::Join("the inviting node did not answer".into())),
    }
}

/// The cluster a node joined with a key, kept in its data dir (mode 0600) so that it rejoins
/// after a restart without the key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinedCluster {
    /// The id of the invitation used, so that starting again with the same key does not
    /// present it twice.
    pub invitation: String,
    pub cluster_psk: Option<[u8; 32]>,
    pub peers: Vec<String>,
}

impl JoinedCluster {
    pub fn load(data_dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(data_dir.join(JOINED_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(JOINED_FILE);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path)?;
        file.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)
    }
}
