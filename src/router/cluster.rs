//! `ClusterView`: every node's latest announcement, as this node sees them. Pure state with the
//! clock passed in, so expiry and the departure grace period are unit-tested without waiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::engine::{ModelHost, ModelInfo, ModelKind};
use crate::p2p::{AnnouncedModel, Announcement};

/// A node that has not announced itself for this long is declared offline (heartbeats come every
/// two seconds, so this is three missed ones).
pub const OFFLINE_AFTER: Duration = Duration::from_secs(6);
/// After a model's last host leaves, requests for it get 503 "unavailable" rather than 404 for
/// this long, since hosts restart.
pub const DEPARTED_GRACE: Duration = Duration::from_secs(60);

/// Offline nodes stay listed (as offline) this long.
pub const OFFLINE_LISTED_FOR: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct NodeRecord {
    pub announcement: Announcement,
    pub last_seen: Instant,
    /// When this node first saw it online (this time round).
    pub online_since: Instant,
    /// When it went offline; `None` while online.
    pub offline_since: Option<Instant>,
}

/// A remote node that can serve a model, with what the router needs to choose among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteHost {
    pub peer_id: String,
    pub name: String,
    /// Requests in flight plus queued, as last announced.
    pub announced_load: u32,
}

#[derive(Debug, Default)]
pub struct ClusterView {
    nodes: HashMap<String, NodeRecord>,
    /// Nodes that left or went silent, kept for the operator's view.
    offline: HashMap<String, NodeRecord>,
    /// Models whose last remote host went away, and when.
    departed: HashMap<String, Instant>,
}

/// Whether a node serves this node's inference protocol.
fn speaks_our_protocol(announcement: &Announcement) -> bool {
    announcement
        .infer_protocols
        .iter()
        .any(|protocol| protocol.as_str() == crate::p2p::INFER_PROTOCOL.as_ref())
}

impl ClusterView {
    /// Record an announcement; an older one than what we hold is ignored, and so is one not newer
    /// than the last of a node that went offline (played back, it would bring the node back).
    pub fn apply(&mut self, announcement: Announcement, now: Instant) {
        let previous = self.nodes.get(&announcement.peer_id);
        if previous.is_some_and(|known| known.announcement.issued_at_ms > announcement.issued_at_ms) {
            return;
        }
        let departed = self.offline.get(&announcement.peer_id);
        if departed.is_some_and(|left| left.announcement.issued_at_ms >= announcement.issued_at_ms) {
            return;
        }
        let dropped: Vec<String> = previous
            .map(|known| {
                let still_hosted = |id: &str| announcement.models.iter().any(|model| model.id == id);
                known
                    .announcement
                    .models
                    .iter()
                    .map(|m| m.id.clone())
                    .filter(|id| !still_hosted(id))
                    .collect()
            })
            .unwrap_or_default();
        if previous.is_none() {
            tracing::info!(
                node = %announcement.name,
                peer = %announcement.peer_id,
                models = announcement.models.len(),
                "node joined"
            );
        }
        for model in &announcement.models {
            self.departed.remove(&model.id);
        }
        let online_since = previous.map_or(now, |known| known.online_since);
        self.offline.remove(&announcement.peer_id);
        self.nodes.insert(
            announcement.peer_id.clone(),
            NodeRecord { announcement, last_seen: now, online_since, offline_since: None },
        );
        for id in dropped {
            if self.remote_hosts(&id).is_empty() {
                self.departed.insert(id, now);
            }
        }
    }

    /// Forget a node (it disconnected or went silent). Its models that no one else hosts enter the
    /// grace period.
    pub fn remove(&mut self, peer_id: &str, now: Instant) -> Option<NodeRecord> {
        let record = self.nodes.remove(peer_id)?;
        for model in &record.announcement.models {
            if self.remote_hosts(&model.id).is_empty() {
                self.departed.insert(model.id.clone(), now);
            }
        }
        self.offline.insert(peer_id.to_string(), NodeRecord { offline_since: Some(now), ..record.clone() });
        Some(record)
    }

    /// Nodes that went offline in the last ten minutes.
    pub fn offline_nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.offline.values()
    }

    /// Declare silent nodes offline; returns their names.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let silent: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, record)| now.duration_since(record.last_seen) > OFFLINE_AFTER)
            .map(|(peer, _)| peer.clone())
            .collect();
        self.departed.retain(|_, since| now.duration_since(*since) <= DEPARTED_GRACE);
        self.offline.retain(|_, record| {
            record.offline_since.is_some_and(|since| now.duration_since(since) <= OFFLINE_LISTED_FOR)
        });
        silent
            .iter()
            .filter_map(|peer| self.remove(peer, now))
            .map(|record| record.announcement.name)
            .collect()
    }

    pub fn remote_hosts(&self, model_id: &str) -> Vec<RemoteHost> {
        let mut hosts: Vec<RemoteHost> = self
            .nodes
            .values()
            .filter(|record| !record.announcement.draining && speaks_our_protocol(&record.announcement))
            .filter(|record| record.announcement.models.iter().any(|model| model.id == model_id))
            .map(|record| RemoteHost {
                peer_id: record.announcement.peer_id.clone(),
                name: record.announcement.name.clone(),
                announced_load: record
                    .announcement
                    .load
                    .in_flight
                    .saturating_add(record.announcement.load.queued),
            })
            .collect();
        hosts.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        hosts
    }

    /// The nodes (name, llmesh version) that serve `model_id` but speak none of this node's
    /// inference protocols: another llmesh version that this one cannot hand requests to.
    pub fn incompatible_hosts(&self, model_id: &str) -> Vec<(String, String)> {
        self.nodes
            .values()
            .filter(|record| !speaks_our_protocol(&record.announcement))
            .filter(|record| record.announcement.models.iter().any(|model| model.id == model_id))
            .map(|record| (record.announcement.name.clone(), record.announcement.software_version.clone()))
            .collect()
    }

    /// Whether a model recently lost its last host (and so deserves 503, not 404).
    pub fn recently_departed(&self, model_id: &str, now: Instant) -> bool {
        self.departed.get(model_id).is_some_and(|since| now.duration_since(*since) <= DEPARTED_GRACE)
    }

    /// Every remote model, once per id, with all its hosts.
    pub fn models(&self) -> Vec<ModelInfo> {
        let mut models: HashMap<String, ModelInfo> = HashMap::new();
        for record in self.nodes.values() {
            let announcement = &record.announcement;
            for model in &announcement.models {
                let host =
                    ModelHost { name: announcement.name.clone(), peer_id: announcement.peer_id.clone() };
                models
                    .entry(model.id.clone())
                    .or_insert_with(|| model_info(model, announcement.started_at))
                    .hosts
                    .push(host);
            }
        }
        models.into_values().collect()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    pub fn name_of(&self, peer_id: &str) -> Option<&str> {
        self.nodes.get(peer_id).map(|record| record.announcement.name.as_str())
    }
}

fn model_info(model: &AnnouncedModel, created: u64) -> ModelInfo {
    ModelInfo {
        id: model.id.clone(),
        kind: if model.kind == "embeddings" { ModelKind::Embeddings } else { ModelKind::Chat },
        architecture: model.architecture.clone(),
        quantization: model.quantization.clone(),
        context_length: model.context_length as usize,
        parameters: model.parameters,
        file_bytes: model.file_bytes,
        created,
        hosts: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p2p::{ANNOUNCEMENT_VERSION, AnnouncedLoad, Hardware};

    fn announcement(peer: &str, models: &[&str], issued_at_ms: u64) -> Announcement {
        Announcement {
            version: ANNOUNCEMENT_VERSION,
            peer_id: peer.into(),
            name: format!("node-{peer}"),
            addresses: Vec::new(),
            models: models
                .iter()
                .map(|id| AnnouncedModel {
                    id: id.to_string(),
                    kind: "chat".into(),
                    architecture: "llama".into(),
                    quantization: "Q4_1".into(),
                    context_length: 2048,
                    parameters: 0,
                    file_bytes: 0,
                })
                .collect(),
            hardware: Hardware::default(),
            usage: Default::default(),
            load: AnnouncedLoad::default(),
            software_version: "test".into(),
            started_at: 0,
            issued_at_ms,
            revoked: Default::default(),
            members: Vec::new(),
            founder_proof: None,
            draining: false,
            infer_protocols: vec![crate::p2p::INFER_PROTOCOL.to_string()],
            api_keys: Default::default(),
            key_usage: Vec::new(),
        }
    }

    #[test]
    fn models_list_every_host() {
        let now = Instant::now();
        let mut view = ClusterView::default();
        view.apply(announcement("a", &["chat", "embed"], 1), now);
        view.apply(announcement("b", &["chat"], 1), now);
        let mut models = view.models();
        models.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(models.len(), 2);
        let mut hosts: Vec<_> = models[0].hosts.iter().map(|h| h.name.as_str()).collect();
        hosts.sort();
        assert_eq!(hosts, ["node-a", "node-b"]);
        assert_eq!(view.remote_hosts("embed").len(), 1);
    }

    #[test]
    fn stale_announcements_are_ignored() {
        let now = Instant::now();
        let mut view = ClusterView::default();
        view.apply(announcement("a", &["new"], 5), now);
        view.apply(announcement("a", &["old"], 4), now);
        assert_eq!(view.remote_hosts("new").len(), 1);
        assert!(view.remote_hosts("old").is_empty());
    }

    #[test]
    fn silent_nodes_expire_and_their_models_enter_the_grace_period() {
        let start = Instant::now();
        let mut view = ClusterView::default();
        view.apply(announcement("a", &["chat"], 1), start);
        assert!(view.expire(start + OFFLINE_AFTER / 2).is_empty());
        assert_eq!(view.expire(start + OFFLINE_AFTER + Duration::from_secs(1)), ["node-a"]);
        assert!(view.models().is_empty());
        assert_eq!(view.offline_nodes().count(), 1, "listed as offline for a while");
        let gone = start + OFFLINE_AFTER + Duration::from_secs(1);
        assert!(view.recently_departed("chat", gone));
        view.expire(gone + DEPARTED_GRACE + Duration::from_secs(1));
        assert!(!view.recently_departed("chat", gone + DEPARTED_GRACE + Duration::from_secs(1)));
        view.expire(gone + OFFLINE_LISTED_FOR + Duration::from_secs(1));
        assert_eq!(view.offline_nodes().count(), 0);
    }

    #[test]
    fn a_node_that_comes_back_is_online_again() {
        let now = Instant::now();
        let mut view = ClusterView::default();
        view.apply(announcement("a", &["chat"], 1), now);
        view.remove("a", now);
        assert_eq!(view.offline_nodes().count(), 1);
        view.apply(announcement("a", &["chat"], 2), now + Duration::from_secs(5));
        assert_eq!(view.offline_nodes().count(), 0);
        assert_eq!(view.nodes().next().unwrap().online_since, now + Duration::from_secs(5));
    }

    #[test]
    fn a_model_with_another_host_does_not_depart() {
        let now = Instant::now();
        let mut view = ClusterView::default();
        view.apply(announcement("a", &["chat"], 1), now);
        view.apply(announcement("b", &["chat"], 1), now);
        view.remove("a", now);
        assert!(!view.recently_departed("chat", now));
        view.remove("b", now);
        assert!(view.recently_departed("chat", now));
        view.apply(announcement("b", &["chat"], 2), now);
        assert!(!view.recently_departed("chat", now));
    }

    #[test]
    fn a_departed_node_is_not_brought_back_by_its_last_announcement_played_again() {
        let now = Instant::now();
        let mut view = ClusterView::default();
        view.apply(announcement("a", &["chat"], 5), now);
        view.remove("a", now);
        view.apply(announcement("a", &["chat"], 5), now + Duration::from_secs(70));
        view.apply(announcement("a", &["chat"], 4), now + Duration::from_secs(70));
        assert!(view.remote_hosts("chat").is_empty(), "replayed announcements stay ignored");
        view.apply(announcement("a", &["chat"], 6), now + Duration::from_secs(71));
        assert_eq!(view.remote_hosts("chat").len(), 1, "a new one brings it back");
    }

    #[test]
    fn an_announced_load_at_the_limit_saturates() {
        let mut huge = announcement("a", &["chat"], 1);
        huge.load = AnnouncedLoad { in_flight: u32::MAX, queued: u32::MAX };
        let mut view = ClusterView::default();
        view.apply(huge, Instant::now());
        assert_eq!(view.remote_hosts("chat")[0].announced_load, u32::MAX);
    }
}
