//! Bare overlay peers for tests that speak the p2p protocols directly: no router, no engine, no
//! heartbeat (they announce only when told to), on loopback with mDNS and relaying off.

#![allow(dead_code)]

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use llmesh::p2p::{
    ANNOUNCEMENT_VERSION, AnnouncedLoad, AnnouncedModel, Announcement, Hardware, Invitation, P2pConfig,
    ResourceUsage,
};

/// A bare peer's configuration: its data in `dir/name`, the pre-shared key `psk`, dialing `peers`.
pub fn bare_peer_config(dir: &Path, name: &str, psk: Option<[u8; 32]>, peers: Vec<String>) -> P2pConfig {
    P2pConfig {
        data_dir: dir.join(name),
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        peers,
        mdns: false,
        relay: false,
        cluster_psk: psk,
        admission_key: None,
        fixed_cluster: false,
        open_cluster: false,
        external_addresses: Vec::new(),
    }
}

/// A bare peer holding what a connection key carries (the pre-shared key, the inviter's
/// addresses); it still has to present the key to become a member.
pub fn key_holder_config(dir: &Path, name: &str, key: &str) -> P2pConfig {
    let invitation = Invitation::from_key(key).unwrap();
    bare_peer_config(dir, name, invitation.cluster_psk, invitation.addresses)
}

/// An announcement of one small chat model `model` by `peer_id`, named `name`.
pub fn announcement(peer_id: String, name: &str, model: &str, issued_at_ms: u64) -> Announcement {
    Announcement {
        version: ANNOUNCEMENT_VERSION,
        peer_id,
        name: name.into(),
        addresses: Vec::new(),
        models: vec![AnnouncedModel {
            id: model.into(),
            kind: "chat".into(),
            architecture: "llama".into(),
            quantization: "Q8_0".into(),
            context_length: 64,
            parameters: 0,
            file_bytes: 0,
        }],
        hardware: Hardware::default(),
        usage: ResourceUsage::default(),
        load: AnnouncedLoad::default(),
        software_version: "test".into(),
        started_at: 0,
        issued_at_ms,
        revoked: Default::default(),
        members: Vec::new(),
        founder_proof: None,
        draining: false,
        infer_protocols: vec![llmesh::p2p::INFER_PROTOCOL.to_string()],
        api_keys: Default::default(),
        key_usage: Vec::new(),
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}
