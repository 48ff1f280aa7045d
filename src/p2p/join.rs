//! The join protocol (`/llmesh/join/2`): a new node presents its connection key to the inviting
//! node over an authenticated stream; the inviter checks that it issued the invitation, for this
//! cluster, that it has not expired and has uses left, admits the node and answers with its roster,
//! or says why not. Presenting a key again once admitted (the answer was lost) spends no use.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::invitation::{Invitation, InvitationError, InvitationLedger, MAX_INVITATION_BYTES};
use super::json_file::save_json;
use super::members::{Credentials, MAX_ADMISSION_BYTES, MAX_MEMBERS};
use super::transport::ClusterKey;
use super::wire::{read_frame_within, write_frame};
use super::{Command, P2pError, P2pHandle, P2pStream};

pub const JOIN_PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/join/2");
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
const JOINED_FILE: &str = "cluster.json";
/// The largest join frame either side reads. The largest message is the answer: a full roster of
/// the largest admission records (each with its length), a founder proof and the tags; a key is
/// at most twice `MAX_INVITATION_BYTES` (base64 of the sealed invitation). About 66 KiB, where
/// the generic frame limit would let each of the `MAX_PENDING_JOINS` a stranger may hold open
/// make the inviter buffer 8 MiB.
pub const MAX_JOIN_FRAME_BYTES: usize = MAX_MEMBERS * (MAX_ADMISSION_BYTES + 8) + 64;
const _: () = assert!(MAX_JOIN_FRAME_BYTES >= 2 * MAX_INVITATION_BYTES + 64);

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum JoinReply {
    /// Admitted: the inviter's roster, which now includes the new node.
    Accepted(Credentials),
    Refused(InvitationError),
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What the inviter checks a presented key against.
pub struct Inviter {
    pub peer_id: String,
    /// The cluster key in force (it changes when this node joins another cluster while running).
    pub cluster: ClusterKey,
    pub ledger: Arc<Mutex<InvitationLedger>>,
}

/// Where a peer presenting a key stands with the roster (asked of the network task).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Already admitted: a retry after a lost answer, or a founder. No use is spent.
    Member,
    /// Not a member, and the roster has room.
    Room,
    /// Not a member, and the roster is full.
    Full,
}

impl Inviter {
    /// Check that `key` is an invitation of this node for this cluster, then spend one of its
    /// uses unless the peer is a member already.
    fn redeem(&self, key: &str, standing: Standing) -> Result<Invitation, InvitationError> {
        let invitation = Invitation::from_key(key)?;
        if invitation.inviter != self.peer_id {
            return Err(InvitationError::UnknownInvitation);
        }
        if invitation.cluster_id != self.cluster.cluster_id() {
            return Err(InvitationError::WrongCluster(invitation.cluster_id));
        }
        match standing {
            Standing::Member => Ok(invitation),
            Standing::Full => Err(InvitationError::ClusterFull),
            Standing::Room => {
                let mut ledger = self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                ledger.redeem(&invitation, unix_now())?;
                Ok(invitation)
            }
        }
    }
}

/// Join requests answered at once; more are closed unanswered.
const MAX_PENDING_JOINS: usize = 16;

/// Answer join requests, each in its own task (a peer that opens a stream and says nothing holds
/// one slot for `JOIN_TIMEOUT`, not the whole server), until the inbound join streams end. An
/// accepted node is put on the roster by the network task (`commands`).
pub async fn serve_joins(
    mut incoming: libp2p_stream::IncomingStreams,
    inviter: Inviter,
    commands: mpsc::Sender<Command>,
) {
    let inviter = Arc::new(inviter);
    let slots = Arc::new(Semaphore::new(MAX_PENDING_JOINS));
    while let Some((peer, stream)) = incoming.next().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many join requests at once; closed one unanswered");
            continue;
        };
        let (inviter, commands) = (inviter.clone(), commands.clone());
        tokio::spawn(async move {
            answer_join(peer, stream, &inviter, &commands).await;
            drop(slot);
        });
    }
}

async fn answer_join(
    peer: PeerId,
    mut stream: P2pStream,
    inviter: &Inviter,
    commands: &mpsc::Sender<Command>,
) {
    let key = match tokio::time::timeout(
        JOIN_TIMEOUT,
        read_frame_within::<_, String>(&mut stream, MAX_JOIN_FRAME_BYTES),
    )
    .await
    {
        Ok(Ok(Some(key))) => key,
        _ => return,
    };
    let Some(standing) = ask(commands, |reply| Command::Standing(peer, reply)).await else { return };
    let reply = match inviter.redeem(&key, standing) {
        Ok(invitation) => match ask(commands, |reply| Command::Admit(peer, reply)).await {
            Some(Some(credentials)) => {
                tracing::info!(%peer, invitation = %invitation.id_hex(), "admitted a node with a connection key");
                JoinReply::Accepted(credentials)
            }
            Some(None) => JoinReply::Refused(InvitationError::ClusterFull),
            None => return,
        },
        Err(error) => {
            tracing::warn!(%peer, %error, "refused a node's connection key");
            JoinReply::Refused(error)
        }
    };
    let _ = tokio::time::timeout(JOIN_TIMEOUT, write_frame(&mut stream, &reply)).await;
}

/// Ask the network task; `None` once it has stopped.
async fn ask<T>(
    commands: &mpsc::Sender<Command>,
    command: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Option<T> {
    let (reply, answer) = oneshot::channel();
    commands.send(command(reply)).await.ok()?;
    answer.await.ok()
}

/// Present `key` to the node that issued it. Returns the invitation and the inviter's roster.
pub async fn join(p2p: &P2pHandle, key: &str) -> Result<(Invitation, Credentials), P2pError> {
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
        read_frame_within::<_, JoinReply>(&mut stream, MAX_JOIN_FRAME_BYTES).await
    };
    match tokio::time::timeout(JOIN_TIMEOUT, exchange).await {
        Ok(Ok(Some(JoinReply::Accepted(credentials)))) => Ok((invitation, credentials)),
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
    /// The cluster joined before, if any. A file that exists but cannot be read or parsed is an
    /// error: falling back to the configured cluster (or to none) would quietly move the node.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, String> {
        let path = data_dir.join(JOINED_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|error| {
            format!(
                "{} is damaged ({error}); move it away and join again with a connection key",
                path.display()
            )
        })
    }

    /// Written whole and synced (mode 0600: it holds the pre-shared key).
    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        save_json(&data_dir.join(JOINED_FILE), self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p2p::wire::write_frame;

    #[tokio::test]
    async fn a_full_roster_of_the_largest_records_fits_a_join_frame() {
        let credentials = Credentials {
            records: vec![vec![0xff; MAX_ADMISSION_BYTES]; MAX_MEMBERS],
            founder_proof: Some([7; 32]),
        };
        let mut bytes = futures::io::Cursor::new(Vec::new());
        write_frame(&mut bytes, &JoinReply::Accepted(credentials.clone())).await.unwrap();
        bytes.set_position(0);
        let read = read_frame_within::<_, JoinReply>(&mut bytes, MAX_JOIN_FRAME_BYTES).await.unwrap();
        assert!(matches!(read, Some(JoinReply::Accepted(roster)) if roster == credentials));
    }

    #[tokio::test]
    async fn a_longer_frame_is_refused_from_its_length_alone() {
        let length = (MAX_JOIN_FRAME_BYTES as u32 + 1).to_be_bytes();
        let mut bytes = futures::io::Cursor::new(length.to_vec());
        let error = read_frame_within::<_, String>(&mut bytes, MAX_JOIN_FRAME_BYTES).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    }
}
