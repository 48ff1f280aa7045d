//! The network task's side of API keys (`api_keys.rs`): making and revoking keys on this node's
//! word, and taking in the records members send (`records.rs` fetches them).

use libp2p::PeerId;

use super::super::api_keys::{self, ApiKeyError, ApiKeyInfo, KeySpec};
use super::Network;

impl Network {
    /// Make a key, sign it with this node's key, and announce the new digest.
    pub(super) fn create_api_key(&mut self, spec: KeySpec) -> Result<(String, ApiKeyInfo), ApiKeyError> {
        let made = api_keys::write(&self.api_keys).create(spec, &self.keypair)?;
        tracing::info!(key = %made.1.name, "made an API key");
        self.republish();
        Ok(made)
    }

    /// Revoke a key on this node's word; returns whether it was live.
    pub(super) fn revoke_api_key(&mut self, name: &str) -> Result<bool, ApiKeyError> {
        let revoked = api_keys::write(&self.api_keys).revoke(name, &self.keypair)?;
        if revoked {
            tracing::info!(key = %name, "revoked an API key");
            self.republish();
        }
        Ok(revoked)
    }

    /// Take in key records a member sent. Returns how many were refused, and the first reason.
    pub(super) fn take_api_keys(&mut self, records: &[Vec<u8>]) -> (usize, Option<ApiKeyError>) {
        let roster = &self.roster;
        let is_member = |peer: &PeerId| roster.as_ref().is_none_or(|roster| roster.is_member(peer));
        let mut keys = api_keys::write(&self.api_keys);
        let (mut refusals, mut first) = (0, None);
        for record in records {
            if let Err(error) = keys.accept(record, is_member) {
                refusals += 1;
                first.get_or_insert(error);
            }
        }
        (refusals, first)
    }
}
