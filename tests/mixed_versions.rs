//! Nodes of other llmesh versions in one cluster, played by bare overlay peers: an older one that
//! speaks only an older inference protocol is listed with its version flagged, and a request for
//! its model gets a 503 naming the version instead of a stream it would misread; a newer one that
//! also speaks this node's protocol is flagged and still chosen as a host. (An announcement of a
//! later version, with fields appended, is read by `p2p/announcement.rs`'s unit tests.)

mod support;

use axum::http::StatusCode;
use llmesh::p2p::{self, INFER_PROTOCOL, P2pHandle};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use support::cluster::{call, entry_node, eventually};
use support::overlay::{announcement, bare_peer_config, now_ms};

/// Announce (afresh each time) until `node` lists the peer.
async fn announce_until_listed(
    node: &llmesh::node::Node,
    peer: &P2pHandle,
    name: &str,
    model: &str,
    version: &str,
    protocols: &[&str],
) {
    eventually(&format!("the node lists {name}"), async || {
        let mut announced = announcement(peer.peer_id(), name, model, now_ms());
        announced.software_version = version.into();
        announced.infer_protocols = protocols.iter().map(|protocol| protocol.to_string()).collect();
        peer.announce(announced).await.unwrap();
        let nodes: Value = serde_json::from_str(&call(node, "GET", "/api/nodes", None).await.body).unwrap();
        nodes["data"].as_array().unwrap().iter().any(|entry| entry["name"] == name)
    })
    .await;
}

fn entry_of<'a>(nodes: &'a Value, name: &str) -> &'a Value {
    nodes["data"].as_array().unwrap().iter().find(|entry| entry["name"] == name).expect("listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_other_versions_are_flagged_and_used_only_where_the_protocols_match() {
    let dir = tempfile::tempdir().unwrap();
    let node = entry_node("node", &dir, Vec::new(), |_| {}).await;
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let peers = node.p2p_addresses().to_vec();
    let (older, _older_events, _) =
        p2p::spawn(bare_peer_config(dir.path(), "older", None, peers.clone()), stop.clone()).await.unwrap();
    let (newer, _newer_events, _) =
        p2p::spawn(bare_peer_config(dir.path(), "newer", None, peers), stop.clone()).await.unwrap();
    announce_until_listed(&node, &older, "older", "legacy-model", "0.0.9", &["/llmesh/infer/2"]).await;
    let ours = INFER_PROTOCOL.to_string();
    announce_until_listed(&node, &newer, "newer", "new-model", "9.9.9", &[&ours, "/llmesh/infer/9"]).await;

    let nodes: Value = serde_json::from_str(&call(&node, "GET", "/api/nodes", None).await.body).unwrap();
    let (older_entry, newer_entry, own) =
        (entry_of(&nodes, "older"), entry_of(&nodes, "newer"), entry_of(&nodes, "node"));
    assert_eq!((&older_entry["version"], &older_entry["version_skew"]), (&json!("0.0.9"), &json!(true)));
    assert_eq!(older_entry["infer_protocols"], json!(["/llmesh/infer/2"]));
    assert_eq!(newer_entry["version_skew"], true);
    assert_eq!(own["version_skew"], false);

    // The older node's model: refused with the reason, never sent over a protocol it lacks.
    let chat = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let response = call(&node, "POST", "/v1/chat/completions", Some(chat("legacy-model"))).await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE, "{}", response.body);
    assert!(response.body.contains("older (llmesh 0.0.9)"), "{}", response.body);

    // The newer node speaks this node's protocol too: it is a host of its model.
    let models: Value = serde_json::from_str(&call(&node, "GET", "/v1/models", None).await.body).unwrap();
    let new_model =
        models["data"].as_array().unwrap().iter().find(|model| model["id"] == "new-model").expect("listed");
    assert_eq!(new_model["llmesh"]["hosts"][0]["name"], "newer", "{new_model}");

    node.shutdown();
    node.join().await.unwrap();
}
