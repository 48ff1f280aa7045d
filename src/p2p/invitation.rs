//! Connection keys: `llmesh://join/<base64url>` strings that let a machine join the cluster with
//! one copy-paste. A key holds an invitation signed by the inviting node: the cluster's public id
//! and secret, the inviter's peer id and addresses, a random id, an expiry and a number of uses.
//! The inviter alone keeps the count of uses left (`InvitationLedger`, persisted in its data dir)
//! and checks every presented invitation against it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libp2p::identity::Keypair;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::json_file::save_json;
use super::signed::{self, EnvelopeError};

pub const KEY_PREFIX: &str = "llmesh://join/";
pub const INVITATION_VERSION: u16 = 1;
/// The largest signed invitation accepted.
pub const MAX_INVITATION_BYTES: usize = 8 * 1024;
const LEDGER_FILE: &str = "invitations.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invitation {
    pub version: u16,
    /// The cluster's public id (from its secret; "open" without one).
    pub cluster_id: String,
    /// The overlay's pre-shared key, which the joining node needs to pass the first handshake:
    /// the key derived from the cluster secret, never the secret itself (which may be the API key).
    pub cluster_psk: Option<[u8; 32]>,
    pub inviter: String,
    /// Where the inviter can be reached, each ending in /p2p/<inviter>.
    pub addresses: Vec<String>,
    pub id: [u8; 16],
    /// Unix seconds.
    pub expires_at: u64,
    pub uses: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum InvitationError {
    #[error("this is not an llmesh connection key (it must start with {KEY_PREFIX})")]
    NotAKey,
    #[error("the connection key is damaged: {0}")]
    Malformed(String),
    #[error("the connection key was tampered with: its signature does not match")]
    Tampered,
    #[error("the connection key expired at {0} (Unix time); ask for a new one")]
    Expired(u64),
    #[error("the connection key has already been used; ask for a new one")]
    UsedUp,
    #[error("this node did not issue the connection key")]
    UnknownInvitation,
    #[error("the connection key is for another cluster ({0})")]
    WrongCluster(String),
    #[error("the cluster already has as many members as it can hold")]
    ClusterFull,
    #[error("the connection key version {0} is not supported")]
    UnknownVersion(u16),
}

impl From<EnvelopeError> for InvitationError {
    fn from(error: EnvelopeError) -> Self {
        match error {
            EnvelopeError::BadSignature => InvitationError::Tampered,
            other => InvitationError::Malformed(other.to_string()),
        }
    }
}

impl Invitation {
    /// A new invitation with a random id.
    pub fn new(
        cluster_id: String,
        cluster_psk: Option<[u8; 32]>,
        inviter: String,
        addresses: Vec<String>,
        expires_at: u64,
        uses: u32,
    ) -> Self {
        let mut id = [0u8; 16];
        rand::rng().fill_bytes(&mut id);
        Self {
            version: INVITATION_VERSION,
            cluster_id,
            cluster_psk,
            inviter,
            addresses,
            id,
            expires_at,
            uses,
        }
    }

    /// The connection key: the invitation signed by the inviter.
    pub fn to_key(&self, keypair: &Keypair) -> Result<String, InvitationError> {
        let sealed = signed::seal::<_, MAX_INVITATION_BYTES>(self, keypair)?;
        Ok(format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(sealed)))
    }

    /// Read a connection key and check that its inviter signed it. Expiry and uses are the
    /// inviter's to check (`InvitationLedger::redeem`).
    pub fn from_key(key: &str) -> Result<Self, InvitationError> {
        let encoded = key.trim().strip_prefix(KEY_PREFIX).ok_or(InvitationError::NotAKey)?;
        if encoded.len() > MAX_INVITATION_BYTES * 2 {
            return Err(InvitationError::Malformed("too long".into()));
        }
        let sealed =
            URL_SAFE_NO_PAD.decode(encoded).map_err(|e| InvitationError::Malformed(e.to_string()))?;
        let (invitation, signer): (Invitation, _) = signed::open::<_, MAX_INVITATION_BYTES>(&sealed)?;
        if invitation.version != INVITATION_VERSION {
            return Err(InvitationError::UnknownVersion(invitation.version));
        }
        if signer.to_string() != invitation.inviter {
            return Err(InvitationError::Tampered);
        }
        Ok(invitation)
    }

    pub fn id_hex(&self) -> String {
        self.id.iter().map(|byte| format!("{byte:02x}")).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct LedgerEntry {
    uses_left: u32,
    expires_at: u64,
}

/// The invitations this node issued and how many uses each has left. Saved after every change.
#[derive(Debug)]
pub struct InvitationLedger {
    path: PathBuf,
    entries: HashMap<String, LedgerEntry>,
}

impl InvitationLedger {
    pub fn load(data_dir: &Path) -> Self {
        let path = data_dir.join(LEDGER_FILE);
        let entries = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self { path, entries }
    }

    pub fn record(&mut self, invitation: &Invitation) -> std::io::Result<()> {
        let entry = LedgerEntry { uses_left: invitation.uses, expires_at: invitation.expires_at };
        self.entries.insert(invitation.id_hex(), entry);
        self.save()
    }

    /// Use one of an invitation's uses, if it has any left and has not expired.
    pub fn redeem(&mut self, invitation: &Invitation, now: u64) -> Result<(), InvitationError> {
        let id = invitation.id_hex();
        let entry = self.entries.get_mut(&id).ok_or(InvitationError::UnknownInvitation)?;
        if now >= entry.expires_at {
            return Err(InvitationError::Expired(entry.expires_at));
        }
        if entry.uses_left == 0 {
            return Err(InvitationError::UsedUp);
        }
        entry.uses_left -= 1;
        // Forget long-expired invitations so the file stays small.
        self.entries.retain(|_, entry| entry.expires_at + 7 * 86_400 > now);
        self.save().map_err(|e| InvitationError::Malformed(format!("cannot save the ledger: {e}")))
    }

    fn save(&self) -> std::io::Result<()> {
        save_json(&self.path, &self.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invitation(keypair: &Keypair, uses: u32, expires_at: u64) -> Invitation {
        Invitation::new(
            "0123456789abcdef".into(),
            Some([7; 32]),
            keypair.public().to_peer_id().to_string(),
            vec!["/ip4/10.8.0.2/tcp/7690".into()],
            expires_at,
            uses,
        )
    }

    #[test]
    fn a_key_round_trips() {
        let keypair = Keypair::generate_ed25519();
        let original = invitation(&keypair, 1, 2_000_000_000);
        let key = original.to_key(&keypair).unwrap();
        assert!(key.starts_with("llmesh://join/"));
        assert_eq!(Invitation::from_key(&key).unwrap(), original);
        assert_eq!(Invitation::from_key(&format!("  {key}\n")).unwrap(), original, "pasted with whitespace");
    }

    #[test]
    fn tampering_is_detected() {
        let keypair = Keypair::generate_ed25519();
        let key = invitation(&keypair, 1, 2_000_000_000).to_key(&keypair).unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(key.strip_prefix(KEY_PREFIX).unwrap()).unwrap();
        let middle = bytes.len() / 3;
        bytes[middle] ^= 0x01;
        let tampered = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
        assert!(matches!(
            Invitation::from_key(&tampered),
            Err(InvitationError::Tampered | InvitationError::Malformed(_))
        ));
        // Signed by one node while naming another as the inviter.
        let other = Keypair::generate_ed25519();
        let forged = invitation(&keypair, 1, 2_000_000_000).to_key(&other).unwrap();
        assert_eq!(Invitation::from_key(&forged), Err(InvitationError::Tampered));
        assert_eq!(Invitation::from_key("https://example.com"), Err(InvitationError::NotAKey));
        assert!(matches!(Invitation::from_key("llmesh://join/!!!"), Err(InvitationError::Malformed(_))));
    }

    #[test]
    fn expiry_and_use_count_are_enforced_by_the_ledger() {
        let keypair = Keypair::generate_ed25519();
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = InvitationLedger::load(dir.path());
        let twice = invitation(&keypair, 2, 1_000);
        ledger.record(&twice).unwrap();
        assert_eq!(ledger.redeem(&twice, 500), Ok(()));
        // The count survives a restart.
        let mut ledger = InvitationLedger::load(dir.path());
        assert_eq!(ledger.redeem(&twice, 600), Ok(()));
        assert_eq!(ledger.redeem(&twice, 700), Err(InvitationError::UsedUp));
        let expired = invitation(&keypair, 5, 1_000);
        ledger.record(&expired).unwrap();
        assert_eq!(ledger.redeem(&expired, 1_000), Err(InvitationError::Expired(1_000)));
        let unknown = invitation(&keypair, 1, 5_000);
        assert_eq!(ledger.redeem(&unknown, 10), Err(InvitationError::UnknownInvitation));
    }
}
