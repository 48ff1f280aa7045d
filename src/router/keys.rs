//! The router's side of API keys: the cluster-wide records live in the p2p layer (made, revoked
//! and looked up there); what each key used is counted here (`key_usage.rs`) and announced.

use std::collections::BTreeMap;

use serde::Serialize;

use super::key_usage::{MinuteUse, ModelUsage, OverLimit};
use super::{Router, RouterInner};
use crate::p2p::{ApiKeyInfo, KeyGrant, KeyLookup, KeySpec, KeyUsageReport, P2pError};

/// A key with its use: through this node by model, and through every online node in all.
#[derive(Debug, Clone, Serialize)]
pub struct KeyWithUsage {
    #[serde(flatten)]
    pub key: ApiKeyInfo,
    /// Through this node, by model, since it started.
    pub usage_here: BTreeMap<String, ModelUsage>,
    /// Through every online node (their latest announcements), since each started.
    pub usage: ModelUsage,
    /// Requests and tokens in the last minute across the cluster, as its limits count them.
    pub minute_requests: u64,
    pub minute_tokens: u64,
}

impl Router {
    /// Make an API key that works on every node; returns its secret (shown once, kept nowhere).
    pub async fn create_api_key(&self, spec: KeySpec) -> Result<(String, ApiKeyInfo), P2pError> {
        self.inner.p2p.create_api_key(spec).await
    }

    /// Revoke an API key on every node; returns whether it was live.
    pub async fn revoke_api_key(&self, name: &str) -> Result<bool, P2pError> {
        self.inner.p2p.revoke_api_key(name).await
    }

    /// What a presented secret may do.
    pub fn lookup_api_key(&self, secret: &str) -> KeyLookup {
        self.inner.p2p.lookup_api_key(secret, crate::p2p::unix_now())
    }

    /// Admit one request of a user key for `model`, within its limits counted across the cluster.
    pub fn admit_key(&self, grant: &KeyGrant, model: &str) -> Result<(), OverLimit> {
        let others = self.others_minute(&grant.name);
        self.inner.key_meter.admit(grant, model, others, self.inner.seconds())
    }

    /// Count the tokens of an answer given to a user key.
    pub fn record_key_tokens(&self, key: &str, model: &str, prompt_tokens: usize, completion_tokens: usize) {
        let now = self.inner.seconds();
        self.inner.key_meter.record_tokens(key, model, prompt_tokens as u64, completion_tokens as u64, now);
    }

    /// Each key's use of each model through this node (for `/metrics`).
    pub fn key_usage_here(&self) -> BTreeMap<String, BTreeMap<String, ModelUsage>> {
        self.inner.key_meter.by_model()
    }

    /// Every key this node knows, revoked ones included, with its use.
    pub fn api_keys(&self) -> Vec<KeyWithUsage> {
        let mut here = self.key_usage_here();
        let own = self.inner.key_reports();
        let others: Vec<KeyUsageReport> =
            self.cluster_nodes().into_iter().flat_map(|node| node.announcement.key_usage).collect();
        self.inner
            .p2p
            .api_keys()
            .into_iter()
            .map(|key| {
                let reports = || own.iter().chain(&others).filter(|report| report.key == key.name);
                let usage = reports().fold(ModelUsage::default(), |sum, report| ModelUsage {
                    requests: sum.requests + report.requests,
                    prompt_tokens: sum.prompt_tokens + report.prompt_tokens,
                    completion_tokens: sum.completion_tokens + report.completion_tokens,
                });
                let minute_requests = reports().map(|report| u64::from(report.minute_requests)).sum();
                let minute_tokens = reports().map(|report| report.minute_tokens).sum();
                let usage_here = here.remove(&key.name).unwrap_or_default();
                KeyWithUsage { key, usage_here, usage, minute_requests, minute_tokens }
            })
            .collect()
    }

    /// What the other online nodes last announced of a key's use in the last minute.
    fn others_minute(&self, key: &str) -> MinuteUse {
        let cluster = self.inner.read_cluster();
        cluster
            .nodes()
            .flat_map(|node| node.announcement.key_usage.iter())
            .filter(|report| report.key == key)
            .fold(MinuteUse::default(), |sum, report| MinuteUse {
                requests: sum.requests + u64::from(report.minute_requests),
                tokens: sum.tokens + report.minute_tokens,
            })
    }
}

impl RouterInner {
    /// What this node announces about the keys used through it.
    pub(super) fn key_reports(&self) -> Vec<KeyUsageReport> {
        self.key_meter.reports(self.seconds())
    }
}
