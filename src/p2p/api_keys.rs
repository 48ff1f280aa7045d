//! API keys as cluster-wide records: one signed record per key, kept in the data dir
//! (`api_keys.json`) and spread to every node the way revocations are (`network/records.rs`).
//!
//! A record holds the key's name, the SHA-256 of its secret (never the secret: it is printed once
//! to whoever made the key), the models it may use, its limits and expiry, signed by the member
//! that made it. Revoking a key signs the same record again with `revoked_at` set; a revoked
//! record always wins over a live one, so a revocation cannot be undone by an old copy, and the
//! name is not reused. Two live records of one name (made on two nodes at once) resolve the same
//! way on every node: the earlier, then the smaller record. A node takes a record only when it is
//! for this cluster, within bounds, and its signer is a member (or this node).
//!
//! Bounds: at most `MAX_KEYS` records (revoked ones included) and `MAX_KEYS_PER_SIGNER` per
//! signer; what is over either is refused, never evicting a record already kept.
//!
//! The store is shared (`SharedApiKeys`): the network task writes it, the HTTP API reads it on
//! every request (`lookup`, which compares secrets' hashes in constant time).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::announcement::RecordsDigest;
use super::json_file::save_json;
use super::signed::{self, EnvelopeError};

const KEYS_FILE: &str = "api_keys.json";
/// Records kept in all, revoked keys included.
pub const MAX_KEYS: usize = 1024;
/// Records one signer may have kept.
pub const MAX_KEYS_PER_SIGNER: usize = 256;
/// The largest signed key record accepted (a key with its full list of models is about 1.5 KB).
pub const MAX_KEY_RECORD_BYTES: usize = 4096;
/// Models one key may be limited to.
pub const MAX_KEY_MODELS: usize = 32;
const MAX_MODEL_ID: usize = 256;
/// What every secret starts with, so that one pasted in the wrong place is recognisable.
const SECRET_PREFIX: &str = "sk-llmesh-";

/// The signed payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KeyRecord {
    cluster_id: String,
    name: String,
    secret_hash: [u8; 32],
    /// Empty: every model.
    models: Vec<String>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    /// Unix seconds.
    expires_at: Option<u64>,
    created_at: u64,
    revoked_at: Option<u64>,
}

/// What a new key is made with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySpec {
    pub name: String,
    /// Empty: every model.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    /// Unix seconds.
    #[serde(default)]
    pub expires_at: Option<u64>,
}

/// A key as operators see it: everything but its secret's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKeyInfo {
    pub name: String,
    pub models: Vec<String>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub expires_at: Option<u64>,
    pub created_at: u64,
    /// The peer id of the node that made (or last revoked) it.
    pub signed_by: String,
    pub revoked_at: Option<u64>,
}

/// What a request presenting a user key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGrant {
    pub name: String,
    /// Empty: every model.
    pub models: Vec<String>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

impl KeyGrant {
    pub fn may_use(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|allowed| allowed == model)
    }
}

/// The answer to a presented secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLookup {
    Valid(KeyGrant),
    /// A key that was valid until `expires_at`.
    Expired(String),
    /// No live key has this secret (revoked keys included).
    Unknown,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiKeyError {
    #[error("key record {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("key record for another cluster ({0})")]
    WrongCluster(String),
    #[error(
        "'{0}' is not a valid key name: 1 to 64 letters, digits, '.', '_' or '-', first a letter or digit"
    )]
    InvalidName(String),
    #[error("{0}")]
    OutOfBounds(String),
    #[error("a key named '{0}' exists already")]
    Exists(String),
    #[error("a key named '{0}' was revoked; names are not reused")]
    WasRevoked(String),
    #[error("no key is named '{0}'")]
    NotFound(String),
    #[error("key record signed by {0}, which is not a member")]
    NotAMember(PeerId),
    #[error("{0} has made the most keys a node may ({MAX_KEYS_PER_SIGNER})")]
    SignerFull(PeerId),
    #[error("the cluster holds the most keys it may ({MAX_KEYS}, revoked ones included)")]
    Full,
}

#[derive(Debug, Clone)]
struct Kept {
    key: KeyRecord,
    signer: PeerId,
    record: Vec<u8>,
}

impl Kept {
    /// Whether this record takes the place of `other` for the same name: a revocation beats a
    /// live key; otherwise the earlier, then the smaller record, so every node keeps the same.
    fn supersedes(&self, other: &Kept) -> bool {
        let rank = |kept: &Kept| (kept.key.revoked_at.is_none(), kept.key.created_at);
        (rank(self), &self.record) < (rank(other), &other.record)
    }

    fn info(&self) -> ApiKeyInfo {
        let key = &self.key;
        ApiKeyInfo {
            name: key.name.clone(),
            models: key.models.clone(),
            requests_per_minute: key.requests_per_minute,
            tokens_per_minute: key.tokens_per_minute,
            expires_at: key.expires_at,
            created_at: key.created_at,
            signed_by: self.signer.to_string(),
            revoked_at: key.revoked_at,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct KeysFile {
    cluster_id: String,
    records: Vec<FileEntry>,
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    name: String,
    signer: String,
    /// The signed record, base64.
    record: String,
}

/// The keys this node knows, shared between the network task and the HTTP API.
pub type SharedApiKeys = Arc<RwLock<ApiKeyRecords>>;

pub fn read(keys: &SharedApiKeys) -> RwLockReadGuard<'_, ApiKeyRecords> {
    keys.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn write(keys: &SharedApiKeys) -> RwLockWriteGuard<'_, ApiKeyRecords> {
    keys.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug)]
pub struct ApiKeyRecords {
    path: PathBuf,
    cluster_id: String,
    local: PeerId,
    keys: BTreeMap<String, Kept>,
    per_signer: HashMap<PeerId, usize>,
    digest: Option<RecordsDigest>,
    unsaved: bool,
}

/// The SHA-256 of a secret, as records hold it.
fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Key names: 1 to 64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit
/// (they appear in metrics labels, logs and URL paths as they are; `..` would not survive a
/// browser's path).
pub fn valid_key_name(name: &str) -> bool {
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    name.len() <= 64 && name.starts_with(|c: char| c.is_ascii_alphanumeric()) && name.chars().all(valid)
}

impl ApiKeyRecords {
    /// Load the records kept in `data_dir` for `cluster_id`; those for another cluster, or that
    /// no longer check, are dropped.
    pub fn load(data_dir: &Path, cluster_id: &str, local: PeerId) -> Self {
        let mut keys = Self {
            path: data_dir.join(KEYS_FILE),
            cluster_id: cluster_id.to_string(),
            local,
            keys: BTreeMap::new(),
            per_signer: HashMap::new(),
            digest: None,
            unsaved: false,
        };
        let bytes = std::fs::read(&keys.path).unwrap_or_default();
        if let Ok(file) = serde_json::from_slice::<KeysFile>(&bytes)
            && file.cluster_id == cluster_id
        {
            for entry in file.records {
                if let Ok(record) = STANDARD.decode(&entry.record) {
                    let _ = keys.accept(&record, |_| true);
                }
            }
            keys.unsaved = false;
        }
        keys
    }

    /// Make a key on this node's word and save at once; returns its secret, which nothing keeps.
    pub fn create(&mut self, spec: KeySpec, keypair: &Keypair) -> Result<(String, ApiKeyInfo), ApiKeyError> {
        if let Some(kept) = self.keys.get(&spec.name) {
            return Err(match kept.key.revoked_at {
                Some(_) => ApiKeyError::WasRevoked(spec.name),
                None => ApiKeyError::Exists(spec.name),
            });
        }
        let random: String = rand::random::<[u8; 32]>().iter().map(|byte| format!("{byte:02x}")).collect();
        let secret = format!("{SECRET_PREFIX}{random}");
        let key = KeyRecord {
            cluster_id: self.cluster_id.clone(),
            name: spec.name,
            secret_hash: hash_secret(&secret),
            models: spec.models,
            requests_per_minute: spec.requests_per_minute,
            tokens_per_minute: spec.tokens_per_minute,
            expires_at: spec.expires_at,
            created_at: super::unix_now(),
            revoked_at: None,
        };
        check_bounds(&key)?;
        self.check_room(&self.local, false)?;
        let record = signed::seal::<_, MAX_KEY_RECORD_BYTES>(&key, keypair)?;
        let kept = Kept { key, signer: self.local, record };
        let info = kept.info();
        self.keep(kept);
        self.save_if_changed();
        Ok((secret, info))
    }

    /// Revoke the key `name` on this node's word and save at once. Returns whether it was live.
    pub fn revoke(&mut self, name: &str, keypair: &Keypair) -> Result<bool, ApiKeyError> {
        let Some(kept) = self.keys.get(name) else { return Err(ApiKeyError::NotFound(name.to_string())) };
        if kept.key.revoked_at.is_some() {
            return Ok(false);
        }
        let key = KeyRecord { revoked_at: Some(super::unix_now()), ..kept.key.clone() };
        // The name is kept already: only this node's own quota may grow.
        if kept.signer != self.local {
            self.check_room(&self.local, true)?;
        }
        let record = signed::seal::<_, MAX_KEY_RECORD_BYTES>(&key, keypair)?;
        self.keep(Kept { key, signer: self.local, record });
        self.save_if_changed();
        Ok(true)
    }

    /// Take in a record another node holds; returns whether it changed what this node keeps.
    /// Call `save_if_changed` once a batch is taken in.
    pub fn accept(
        &mut self,
        record: &[u8],
        is_member: impl Fn(&PeerId) -> bool,
    ) -> Result<bool, ApiKeyError> {
        let unverified: KeyRecord = signed::read_unverified::<_, MAX_KEY_RECORD_BYTES>(record)?;
        // A record already kept costs no signature check.
        if self.keys.get(&unverified.name).is_some_and(|kept| kept.record == record) {
            return Ok(false);
        }
        let (key, signer): (KeyRecord, PeerId) = signed::open::<_, MAX_KEY_RECORD_BYTES>(record)?;
        if key.cluster_id != self.cluster_id {
            return Err(ApiKeyError::WrongCluster(key.cluster_id));
        }
        check_bounds(&key)?;
        if signer != self.local && !is_member(&signer) {
            return Err(ApiKeyError::NotAMember(signer));
        }
        let candidate = Kept { key, signer, record: record.to_vec() };
        let known = self.keys.get(&candidate.key.name);
        if known.is_some_and(|kept| !candidate.supersedes(kept)) {
            return Ok(false);
        }
        if known.is_none_or(|kept| kept.signer != signer) {
            self.check_room(&signer, known.is_some())?;
        }
        self.keep(candidate);
        Ok(true)
    }

    /// What `secret` may do, comparing its hash with every live key's in constant time (the time
    /// depends on how many keys there are, never on which matches or how closely).
    pub fn lookup(&self, secret: &str, now: u64) -> KeyLookup {
        let offered = hash_secret(secret);
        let mut found: Option<&Kept> = None;
        for kept in self.keys.values().filter(|kept| kept.key.revoked_at.is_none()) {
            if bool::from(kept.key.secret_hash[..].ct_eq(&offered[..])) {
                found = Some(kept);
            }
        }
        let Some(kept) = found else { return KeyLookup::Unknown };
        let key = &kept.key;
        if key.expires_at.is_some_and(|expires_at| expires_at <= now) {
            return KeyLookup::Expired(key.name.clone());
        }
        KeyLookup::Valid(KeyGrant {
            name: key.name.clone(),
            models: key.models.clone(),
            requests_per_minute: key.requests_per_minute,
            tokens_per_minute: key.tokens_per_minute,
        })
    }

    /// Every key, revoked ones included, by name.
    pub fn list(&self) -> Vec<ApiKeyInfo> {
        self.keys.values().map(Kept::info).collect()
    }

    /// How many keys there are, and a hash of their records, for announcements.
    pub fn digest(&mut self) -> RecordsDigest {
        if let Some(digest) = self.digest {
            return digest;
        }
        let mut hash = Sha256::new();
        for (name, kept) in &self.keys {
            hash.update([name.len() as u8]);
            hash.update(name.as_bytes());
            hash.update(Sha256::digest(&kept.record));
        }
        let count = u32::try_from(self.keys.len()).unwrap_or(u32::MAX);
        let digest = RecordsDigest { count, hash: hash.finalize().into() };
        self.digest = Some(digest);
        digest
    }

    /// Every record, for a member that asks (its digest differs from ours).
    pub fn records(&self) -> Vec<Vec<u8>> {
        self.keys.values().map(|kept| kept.record.clone()).collect()
    }

    /// Write the file if records were taken in since it was last written.
    pub fn save_if_changed(&mut self) {
        if !self.unsaved {
            return;
        }
        let records = self
            .keys
            .iter()
            .map(|(name, kept)| FileEntry {
                name: name.clone(),
                signer: kept.signer.to_string(),
                record: STANDARD.encode(&kept.record),
            })
            .collect();
        let file = KeysFile { cluster_id: self.cluster_id.clone(), records };
        match save_json(&self.path, &file) {
            Ok(()) => self.unsaved = false,
            Err(error) => tracing::error!(%error, path = %self.path.display(), "cannot save the API keys"),
        }
    }

    /// Whether `signer` may have one more record kept (`replacing`: it takes the place of one
    /// kept for the same name, so the store does not grow).
    fn check_room(&self, signer: &PeerId, replacing: bool) -> Result<(), ApiKeyError> {
        if self.per_signer.get(signer).copied().unwrap_or(0) >= MAX_KEYS_PER_SIGNER {
            return Err(ApiKeyError::SignerFull(*signer));
        }
        if !replacing && self.keys.len() >= MAX_KEYS {
            return Err(ApiKeyError::Full);
        }
        Ok(())
    }

    fn keep(&mut self, kept: Kept) {
        let signer = kept.signer;
        if let Some(replaced) = self.keys.insert(kept.key.name.clone(), kept)
            && let Some(count) = self.per_signer.get_mut(&replaced.signer)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_signer.remove(&replaced.signer);
            }
        }
        *self.per_signer.entry(signer).or_default() += 1;
        self.digest = None;
        self.unsaved = true;
    }
}

/// A record's fields within bounds: a valid name, at most `MAX_KEY_MODELS` printable model ids.
fn check_bounds(key: &KeyRecord) -> Result<(), ApiKeyError> {
    if !valid_key_name(&key.name) {
        return Err(ApiKeyError::InvalidName(super::printable(&key.name)));
    }
    if key.requests_per_minute == Some(0) || key.tokens_per_minute == Some(0) {
        return Err(ApiKeyError::OutOfBounds("a limit of 0 would make a key that can do nothing".into()));
    }
    if key.models.len() > MAX_KEY_MODELS {
        return Err(ApiKeyError::OutOfBounds(format!("a key may name at most {MAX_KEY_MODELS} models")));
    }
    let model_ok = |model: &String| {
        !model.is_empty() && model.len() <= MAX_MODEL_ID && super::printable(model) == *model
    };
    if !key.models.iter().all(model_ok) {
        return Err(ApiKeyError::OutOfBounds("a model id is empty, too long or unprintable".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
